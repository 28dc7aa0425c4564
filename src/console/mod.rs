//! The operator console at `/ui`: server-rendered pages on the admin
//! listener, for what the CLI and the API already do (every action here calls
//! the same `ops`, `replay`, `restore` and `reconcile` code they do).
//!
//! Access: the login form trades the admin token for a session cookie
//! (`session.rs`: signed, expiring, `HttpOnly`, `SameSite=Strict`, `Secure`
//! over HTTPS). Every POST but the login carries the session's CSRF token;
//! the middleware checks it before any handler runs, so no form can forget it.

mod pages;
pub mod session;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;

use crate::app::App;
use crate::ledger::replay::DeadFilter;
use crate::ops;
use session::{Session, Sessions};

/// What the console's handlers share.
pub struct Ui {
    pub app: Arc<App>,
    /// Made on first use (the key needs the ledger's secret); None when no
    /// admin token is configured: nobody can log in.
    sessions: tokio::sync::OnceCell<Option<Sessions>>,
    /// The last reading of this replica's event counter, for a rate.
    events: Mutex<Option<(Instant, u64, f64)>>,
}

/// How long a wrong token at the login form waits for its answer: a guess a
/// second per connection, with no lockout anyone could use to keep operators
/// out. (The token's length is what makes guessing hopeless; a short one is
/// warned about at start-up.)
const WRONG_TOKEN_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

impl Ui {
    async fn sessions(&self) -> Result<Option<&Sessions>, crate::ledger::LedgerError> {
        let made = self
            .sessions
            .get_or_try_init(|| async {
                let Some(token) = &self.app.admin_token else { return Ok(None) };
                let secret = self.app.ledger.console_secret().await?;
                let ttl = std::time::Duration::from_secs_f64(self.app.settings.admin.session_hours * 3600.0);
                Ok::<_, crate::ledger::LedgerError>(Some(Sessions::new(token.expose(), &secret, ttl)))
            })
            .await?;
        Ok(made.as_ref())
    }

    /// Events per second handled by this replica since the last reading
    /// (kept for at least five seconds, so a refresh does not zero it).
    fn event_rate(&self) -> Option<f64> {
        use prometheus::core::Collector;
        let total: u64 = self
            .app
            .metrics
            .events
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum();
        let now = Instant::now();
        let mut last = self.events.lock().expect("not poisoned");
        match *last {
            Some((at, _, rate)) if now.duration_since(at).as_secs_f64() < 5.0 => Some(rate),
            Some((at, n, _)) => {
                let rate = total.saturating_sub(n) as f64 / now.duration_since(at).as_secs_f64();
                *last = Some((now, total, rate));
                Some(rate)
            }
            None => {
                *last = Some((now, total, 0.0));
                None
            }
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    let ui = Arc::new(Ui { app, sessions: tokio::sync::OnceCell::new(), events: Mutex::new(None) });
    let pages = Router::new()
        .route("/ui", get(overview))
        .route("/ui/", get(overview))
        .route("/ui/pause", post(pause))
        .route("/ui/resume", post(resume))
        .route("/ui/dead", get(dead))
        .route("/ui/replay", get(replay_preview).post(replay))
        .route("/ui/replays/{id}", get(replay_progress))
        .route("/ui/owner", get(find_owner))
        .route("/ui/owners/{owner}", get(owner))
        .route("/ui/owners/{owner}/validate", get(validate))
        .route("/ui/owners/{owner}/script", get(script))
        .route("/ui/reconcile", get(reconcile_rules))
        // A reload of a report (a POST's answer) lands on the rules.
        .route("/ui/reconcile/{rule}", post(reconcile).get(|| async { Redirect::to("/ui/reconcile") }))
        .route("/ui/jobs/{id}", get(job))
        .route("/ui/jobs/{id}/restore", post(restore))
        .route("/ui/jobs/{id}/cancel", post(cancel))
        .route("/ui/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(ui.clone(), require_session));
    Router::new()
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], pages::STYLE) }))
        .merge(pages)
        .layer(middleware::map_response(no_store))
        .with_state(ui)
}

/// Pages hold operators' data: never cached, never framed.
async fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    resp
}

/// No session: to the login page (GET), or 401 (anything else). A POST
/// without the session's CSRF token: 403, before the handler runs.
async fn require_session(State(ui): State<Arc<Ui>>, req: Request, next: Next) -> Response {
    let now = chrono::Utc::now();
    let sessions = match ui.sessions().await {
        Ok(s) => s,
        Err(e) => return pages::failed(&e),
    };
    let mut session = sessions.and_then(|s| {
        let cookies = req.headers().get(header::COOKIE).and_then(|v| v.to_str().ok())?;
        s.check(session::from_header(cookies)?, now)
    });
    if let Some(s) = &session {
        match ui.app.ledger.session_ended(&s.id).await {
            Ok(false) => {}
            Ok(true) => session = None,
            Err(e) => return pages::failed(&e),
        }
    }
    let Some(session) = session else {
        if req.method() == Method::GET {
            let next = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/ui");
            let to = format!("/ui/login?next={}", percent_encoding::utf8_percent_encode(next, QUERY_VALUE));
            return Redirect::to(&to).into_response();
        }
        return pages::message(StatusCode::UNAUTHORIZED, "Not logged in", "Log in again: your session has ended.");
    };
    let req = if req.method() == Method::GET || req.method() == Method::HEAD {
        req
    } else {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, 256 * 1024).await else {
            return pages::message(StatusCode::PAYLOAD_TOO_LARGE, "Too large", "That form is too large.");
        };
        let csrf = form_field(&bytes, "csrf");
        if !csrf.as_deref().is_some_and(|c| session.csrf_ok(c)) {
            return pages::message(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form did not carry this session's CSRF token, so nothing was done. Reload the page and try again.",
            );
        }
        Request::from_parts(parts, Body::from(bytes))
    };
    let mut req = req;
    req.extensions_mut().insert(session);
    next.run(req).await
}

const QUERY_VALUE: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

fn form_field(body: &[u8], name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// `Secure` when the page was reached over HTTPS: a TLS-terminating proxy
/// says so in `X-Forwarded-Proto`, or the configuration says it always is.
fn secure(ui: &Ui, headers: &HeaderMap) -> bool {
    ui.app.settings.admin.secure_cookies
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

#[derive(Deserialize, Default)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_page(State(ui): State<Arc<Ui>>, Query(q): Query<LoginQuery>) -> Response {
    pages::login(ui.app.admin_token.is_some(), safe_next(q.next.as_deref().unwrap_or("/ui")), None)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(State(ui): State<Arc<Ui>>, headers: HeaderMap, Form(f): Form<LoginForm>) -> Response {
    let next = safe_next(&f.next);
    let sessions = match ui.sessions().await {
        Ok(s) => s,
        Err(e) => return pages::failed(&e),
    };
    let (Some(sessions), Some(expected)) = (sessions, &ui.app.admin_token) else {
        return pages::login(false, next, None);
    };
    if !expected.matches(f.token.trim()) {
        tracing::warn!("console login refused: wrong token");
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        let mut resp = pages::login(true, next, Some("That is not the admin token."));
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        return resp;
    }
    let cookie = format!(
        "{}={}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{}",
        session::COOKIE,
        sessions.issue(chrono::Utc::now()),
        sessions.ttl_secs(),
        if secure(&ui, &headers) { "; Secure" } else { "" }
    );
    let mut resp = Redirect::to(next).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("an ASCII cookie"));
    resp
}

/// Only a path of the console itself: never another site after a login.
fn safe_next(next: &str) -> &str {
    let ok = next.starts_with("/ui")
        && next.is_ascii()
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_ascii_control());
    if ok {
        next
    } else {
        "/ui"
    }
}

async fn logout(State(ui): State<Arc<Ui>>, Extension(s): Extension<Session>, headers: HeaderMap) -> Response {
    // The cookie could still be replayed until it expires: the ledger ends it.
    if let Err(e) = ui.app.ledger.end_session(&s.id, s.expires).await {
        return pages::failed(&e);
    }
    let cookie = format!(
        "{}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0{}",
        session::COOKIE,
        if secure(&ui, &headers) { "; Secure" } else { "" }
    );
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("an ASCII cookie"));
    resp
}

async fn overview(State(ui): State<Arc<Ui>>, Extension(s): Extension<Session>) -> Response {
    let app = &ui.app;
    let counts = match app.ledger.status_counts().await {
        Ok(c) => c,
        Err(e) => return pages::failed(&e),
    };
    let recent = match app.ledger.recent_activity().await {
        Ok(r) => r,
        Err(e) => return pages::failed(&e),
    };
    let database = app.ledger.ping().await;
    pages::overview(&s, app, &counts, &recent, ui.event_rate(), database)
}

#[derive(Deserialize, Default)]
struct ReasonForm {
    #[serde(default)]
    reason: String,
}

async fn pause(State(ui): State<Arc<Ui>>, Form(f): Form<ReasonForm>) -> Response {
    let reason = if f.reason.trim().is_empty() { "paused from the console" } else { f.reason.trim() };
    match ops::pause(&ui.app, reason, "console").await {
        Ok(_) => Redirect::to("/ui").into_response(),
        Err(e) => pages::failed(&e),
    }
}

async fn resume(State(ui): State<Arc<Ui>>) -> Response {
    match ops::resume(&ui.app).await {
        Ok(_) => Redirect::to("/ui").into_response(),
        Err(e) => pages::failed(&e),
    }
}

/// The dead-letter filter as forms send it: empty fields mean "any".
#[derive(Deserialize, serde::Serialize, Default, Clone)]
pub struct UiFilter {
    #[serde(default)]
    pub job: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub class: String,
    #[serde(default)]
    pub kind: String,
    /// An age: 30m, 6h, 2d. Turned into `since` when a replay is previewed,
    /// so the set confirmed is the set previewed.
    #[serde(default)]
    pub age: String,
    /// RFC 3339.
    #[serde(default)]
    pub since: String,
}

fn some(s: &str) -> Option<String> {
    Some(s.trim().to_string()).filter(|s| !s.is_empty())
}

impl UiFilter {
    fn to_filter(&self) -> Result<DeadFilter, String> {
        let job = match some(&self.job) {
            Some(j) => Some(uuid::Uuid::parse_str(&j).map_err(|_| format!("{j:?} is not a job id"))?),
            None => None,
        };
        let since = match (some(&self.since), some(&self.age)) {
            (Some(t), _) => Some(
                chrono::DateTime::parse_from_rfc3339(&t)
                    .map_err(|_| format!("{t:?} is not an RFC 3339 time"))?
                    .with_timezone(&chrono::Utc),
            ),
            (None, Some(age)) => {
                let secs = crate::domain::parse_age(&age)?;
                Some(chrono::Utc::now() - chrono::Duration::milliseconds((secs * 1000.0) as i64))
            }
            (None, None) => None,
        };

        Ok(DeadFilter {
            job,
            owner: some(&self.owner),
            reason: some(&self.reason),
            since,
            error_class: some(&self.class),
            kind: some(&self.kind),
            until: None,
            jobs: None,
        })
    }
}

async fn dead(State(ui): State<Arc<Ui>>, Extension(s): Extension<Session>, Query(f): Query<UiFilter>) -> Response {
    let filter = match f.to_filter() {
        Ok(filter) => filter,
        Err(m) => return pages::message(StatusCode::BAD_REQUEST, "Filter not understood", &m),
    };
    let jobs = match ui.app.ledger.dead_jobs(&filter).await {
        Ok(j) => j,
        Err(e) => return pages::failed(&e),
    };
    let shown: Vec<_> = jobs.iter().take(pages::MAX_ROWS).map(|j| j.job_id).collect();
    let steps = match ui.app.ledger.steps_of(&shown).await {
        Ok(st) => st,
        Err(e) => return pages::failed(&e),
    };
    let replays = ui.app.ledger.replay_runs(None, 5).await.unwrap_or_default();
    pages::dead(&s, &f, &jobs, &steps, &replays)
}

async fn replay_preview(
    State(ui): State<Arc<Ui>>,
    Extension(s): Extension<Session>,
    Query(f): Query<UiFilter>,
) -> Response {
    let filter = match f.to_filter() {
        Ok(filter) => filter,
        Err(m) => return pages::message(StatusCode::BAD_REQUEST, "Filter not understood", &m),
    };
    let matched = match ui.app.ledger.dead_jobs(&filter).await {
        Ok(jobs) => jobs.len(),
        Err(e) => return pages::failed(&e),
    };
    if matched > pages::MAX_PREVIEW {
        return pages::message(
            StatusCode::BAD_REQUEST,
            "Too many to preview",
            &format!(
                "{matched} dead-lettered jobs match; the console previews and replays at most {} at once. \
                 Narrow the filter, or use reaper replay --dry-run, then reaper replay.",
                pages::MAX_PREVIEW
            ),
        );
    }
    match ops::replay(&ui.app, &filter, true, false, "console").await {
        // Jobs dead-lettered between the count and the preview.
        Ok(ops::Replayed::Done(summary)) if summary.preview.len() > pages::MAX_PREVIEW => pages::message(
            StatusCode::BAD_REQUEST,
            "Too many to preview",
            &format!("More than {} jobs match now: narrow the filter.", pages::MAX_PREVIEW),
        ),
        Ok(ops::Replayed::Done(summary)) => pages::replay_preview(&s, &filter, &summary),
        Ok(ops::Replayed::Started { .. }) => unreachable!("a dry run does not start a replay"),
        Err(e) => pages::failed(&e),
    }
}

/// A replay's confirmation: the jobs its preview listed, by id, and the tick.
#[derive(Deserialize)]
struct ReplayForm {
    /// Job ids, separated by commas.
    #[serde(default)]
    jobs: String,
    #[serde(default)]
    confirm: String,
}

async fn replay(State(ui): State<Arc<Ui>>, Form(f): Form<ReplayForm>) -> Response {
    if f.confirm != "yes" {
        return pages::message(StatusCode::BAD_REQUEST, "Not confirmed", "Tick the confirmation to replay.");
    }
    let ids: Result<Vec<uuid::Uuid>, _> =
        f.jobs.split(',').filter(|j| !j.trim().is_empty()).map(|j| j.trim().parse()).collect();
    let ids = match ids {
        Ok(ids) if ids.len() > pages::MAX_PREVIEW => {
            let m = format!("A replay from the console holds at most {} jobs.", pages::MAX_PREVIEW);
            return pages::message(StatusCode::BAD_REQUEST, "Too many jobs", &m);
        }
        Ok(ids) if !ids.is_empty() => ids,
        _ => {
            return pages::message(
                StatusCode::BAD_REQUEST,
                "No jobs",
                "Replay from a preview: it lists the jobs to replay.",
            )
        }
    };
    // Exactly the jobs the preview showed (those still dead), nothing that
    // was dead-lettered since.
    let filter = DeadFilter { jobs: Some(ids), ..Default::default() };
    match ops::replay(&ui.app, &filter, false, true, "console").await {
        Ok(ops::Replayed::Started { replay_id, .. }) => {
            Redirect::to(&format!("/ui/replays/{replay_id}")).into_response()
        }
        Ok(ops::Replayed::Done(_)) => Redirect::to("/ui/dead").into_response(),
        Err(e) => pages::failed(&e),
    }
}

async fn replay_progress(
    State(ui): State<Arc<Ui>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return pages::message(StatusCode::BAD_REQUEST, "Not a replay", "Replay ids are UUIDs.");
    };
    match ui.app.ledger.replay_run(id).await {
        Ok(Some(run)) => pages::replay_progress(&s, &run),
        Ok(None) => pages::message(StatusCode::NOT_FOUND, "No such replay", &format!("No replay {id}.")),
        Err(e) => pages::failed(&e),
    }
}

#[derive(Deserialize)]
struct OwnerQuery {
    #[serde(default)]
    owner: String,
}

async fn find_owner(Query(q): Query<OwnerQuery>) -> Response {
    let owner = q.owner.trim();
    if owner.is_empty() {
        return Redirect::to("/ui").into_response();
    }
    Redirect::to(&pages::owner_href(owner)).into_response()
}

async fn owner(State(ui): State<Arc<Ui>>, Extension(s): Extension<Session>, Path(owner): Path<String>) -> Response {
    let app = &ui.app;
    let view = match ops::owner_view(app, &owner).await {
        Ok(v) => v,
        Err(e) => return pages::failed(&e),
    };
    pages::owner(&s, &owner, &view)
}

async fn validate(State(ui): State<Arc<Ui>>, Extension(s): Extension<Session>, Path(owner): Path<String>) -> Response {
    match ops::validate(&ui.app, &owner).await {
        Ok(v) => pages::validate(&s, &owner, &v),
        Err(e) => pages::failed(&e),
    }
}

async fn script(State(ui): State<Arc<Ui>>, Path(owner): Path<String>) -> Response {
    match ops::plan(&ui.app, &owner).await {
        Ok(steps) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], ops::script(&ui.app.settings, &owner, &steps))
                .into_response()
        }
        Err(e) => pages::failed(&e),
    }
}

async fn reconcile_rules(State(ui): State<Arc<Ui>>, Extension(s): Extension<Session>) -> Response {
    match ui.app.ledger.status_counts().await {
        Ok(counts) => pages::reconcile_rules(&s, &ui.app, &counts),
        Err(e) => pages::failed(&e),
    }
}

#[derive(Deserialize)]
struct ReconcileForm {
    /// dry_run | execute
    action: String,
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    force: String,
    /// The word FORCE, typed: the second confirmation `--force` needs.
    #[serde(default)]
    force_word: String,
}

async fn reconcile(
    State(ui): State<Arc<Ui>>,
    Extension(s): Extension<Session>,
    Path(rule): Path<String>,
    Form(f): Form<ReconcileForm>,
) -> Response {
    let execute = f.action == "execute";
    if execute && f.confirm != "yes" {
        return pages::message(StatusCode::BAD_REQUEST, "Not confirmed", "Tick the confirmation to execute.");
    }
    let force = f.force == "yes";
    if force && f.force_word.trim() != "FORCE" {
        return pages::message(
            StatusCode::BAD_REQUEST,
            "Force not confirmed",
            "Going past the brakes needs the word FORCE typed in its box.",
        );
    }
    let mode = crate::reconcile::Mode { execute, force: force && execute, older_than: None };
    match ops::reconcile(ui.app.clone(), &rule, mode).await {
        Ok(report) => pages::reconcile_report(&s, &rule, &report),
        Err(e) => pages::message(StatusCode::UNPROCESSABLE_ENTITY, "The sweep did not run", &e.to_string()),
    }
}

async fn job(State(ui): State<Arc<Ui>>, Extension(s): Extension<Session>, Path(id): Path<String>) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else { return not_a_job() };
    let view = match ui.app.ledger.job_view(id).await {
        Ok(Some(v)) => v,
        Ok(None) => return pages::message(StatusCode::NOT_FOUND, "No such job", &format!("No job {id}.")),
        Err(e) => return pages::failed(&e),
    };
    let archived = ui.app.ledger.archived(id).await.unwrap_or_default();
    pages::job(&s, &view, &archived)
}

#[derive(Deserialize)]
struct RestoreForm {
    #[serde(default)]
    dry_run: String,
    #[serde(default)]
    confirm: String,
}

async fn restore(
    State(ui): State<Arc<Ui>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Form(f): Form<RestoreForm>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else { return not_a_job() };
    let dry_run = f.dry_run == "yes";
    if !dry_run && f.confirm != "yes" {
        return pages::message(StatusCode::BAD_REQUEST, "Not confirmed", "Tick the confirmation to restore.");
    }
    let app = &ui.app;
    match crate::restore::restore_with(&app.catalog, &app.ledger, &app.providers, id, dry_run).await {
        Ok(report) => pages::restore_report(&s, id, &report),
        Err(e) => pages::message(StatusCode::UNPROCESSABLE_ENTITY, "Restore failed", &e.to_string()),
    }
}

async fn cancel(State(ui): State<Arc<Ui>>, Path(id): Path<String>, Form(f): Form<ReasonForm>) -> Response {
    let Ok(job_id) = uuid::Uuid::parse_str(&id) else { return not_a_job() };
    let reason = if f.reason.trim().is_empty() { "cancelled from the console" } else { f.reason.trim() };
    match ops::cancel_job(&ui.app, job_id, reason).await {
        Ok(_) => Redirect::to(&format!("/ui/jobs/{job_id}")).into_response(),
        Err(e) => pages::failed(&e),
    }
}

/// The answer to a job id that is not one.
fn not_a_job() -> Response {
    pages::message(StatusCode::BAD_REQUEST, "Not a job", "Job ids are UUIDs.")
}
