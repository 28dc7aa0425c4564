//! The simulated cloud: a real HTTP server that stores resources by path,
//! enforces dependencies (deleting something another resource depends on answers
//! 409 and is counted as refused for order), and injects faults on request.
//!
//! Resource API (any path outside `/_sim`):
//! - `PUT /any/path` with `{"depends_on": ["/other/path"], "attributes": {...}}` creates.
//! - `GET /any/path` answers 200 with the resource or 404; on a collection
//!   (`GET /v1/servers?start=ID&limit=N`) it lists children one segment down,
//!   a page at a time: `{"items": [{"id", "path", "attributes"}], "next": ID|null}`.
//! - `DELETE /any/path`: 204, 404 when missing, 409 while a dependent exists.
//! - A collection can list in a real API's shape instead (LiteLLM, Proxmox,
//!   Vertex AI, IBM VPC, offset paging: [`ListShape`]), set with
//!   `POST /_sim/shapes` `{"collection": "/model/info", "shape": "data", "max_page": 100}`.
//!
//! Control API: `GET|POST /_sim/faults`, `GET /_sim/stats`, `GET /_sim/requests`
//! (every resource request: method and path as sent), `GET /_sim/resources`, `POST /_sim/reset`,
//! `POST /_sim/tokens` (a [`TokenPolicy`]: from then on every resource request
//! needs `Authorization: Bearer TOKEN` with a token the cloud issued and that
//! has not expired, or a fixed one, which may also be the header's whole
//! value, as Proxmox's `PVEAPIToken=...`; else 401).
//!
//! Token endpoint, like a cloud's IAM: `POST /_sim/oauth/token` with a form
//! (`grant_type=client_credentials` and `client_secret=…`, or
//! `grant_type=urn:ibm:params:oauth:grant-type:apikey` and `apikey=…`)
//! answers `{"access_token", "token_type": "Bearer", "expires_in"}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Faults applied to every resource request, in this order: latency, hang,
/// `fail_next`, then the random rates.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Faults {
    pub latency_ms: u64,
    /// Fraction of requests answered 503.
    pub error_rate: f64,
    /// Fraction of requests answered 429 with `Retry-After: retry_after_secs`.
    pub rate_limit_rate: f64,
    pub retry_after_secs: f64,
    /// Fraction of requests that hang for `hang_ms` and then answer 504.
    pub hang_rate: f64,
    pub hang_ms: u64,
    /// The next N resource requests answer `fail_status` (503 when 0; a 429
    /// carries `Retry-After: retry_after_secs`).
    pub fail_next: u32,
    pub fail_status: u16,
    /// The first N requests that the faults would hit pass untouched (a list
    /// whose first page answers and whose second does not).
    pub pass_first: u32,
    /// Only requests with this method suffer the faults (all when empty).
    pub only_method: String,
    /// Seed for the random rates, so a run can be repeated.
    pub seed: Option<u64>,
    /// When set, every resource request is answered `redirect_status` (307
    /// when 0) with `Location: redirect_to + path`: an API that moved, or a
    /// hostile one.
    pub redirect_to: String,
    pub redirect_status: u16,
}

/// Counters a test reads to prove what happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub creates: u64,
    pub deletes: u64,
    pub deleted: u64,
    pub delete_not_found: u64,
    /// Deletes refused with 409 because a dependent still existed: proof the order broke.
    pub refused_for_order: u64,
    pub injected_errors: u64,
    pub injected_rate_limits: u64,
    pub injected_hangs: u64,
    pub checks: u64,
    /// Requests that carried an Authorization header (the token itself is not kept).
    pub with_authorization: u64,
    /// The most resource requests that were being answered at once.
    pub max_in_flight: u64,
    /// Tokens the token endpoint issued.
    pub tokens_issued: u64,
    /// Resource requests answered 401 (no token, an unknown or expired one).
    pub unauthorized: u64,
}

/// What the simulated cloud demands of a caller once set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TokenPolicy {
    /// The secret (client_secret or apikey) the token endpoint takes.
    pub client_secret: String,
    /// How long an issued token is accepted.
    pub lifetime_secs: f64,
    /// Tokens accepted without expiry (a token file's or a command's).
    pub fixed_tokens: Vec<String>,
}

impl Default for TokenPolicy {
    /// An hour, as clouds commonly give.
    fn default() -> TokenPolicy {
        TokenPolicy { client_secret: String::new(), lifetime_secs: 3600.0, fixed_tokens: Vec::new() }
    }
}

/// How a collection answers a list: the simulated cloud's own shape, or a
/// real API's, so an example's config is tested against what it will read.
/// In a real API's shape, each item is the resource's attributes as created.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListShape {
    /// `{"items": [{"id", "path", "attributes"}], "next": ID|null}`, `?start=ID&limit=N`.
    #[default]
    Sim,
    /// LiteLLM's `/model/info`, Proxmox's `/api2/json/...`: `{"data": [...]}`, one page.
    Data,
    /// Vertex AI: `{"models": [...], "nextPageToken": "..."}` (the array is
    /// named after the collection), `?pageSize=N&pageToken=T`.
    PageToken,
    /// IBM VPC: `{"bare_metal_servers": [...], "limit", "first": {"href"},
    /// "next": {"href"}}` with whole URLs, `?start=T&limit=N`; `?version=` is required.
    NextHref,
    /// `{"items": [...], "total": N}`, `?offset=N&limit=M`.
    Offset,
}

/// One resource request as the cloud saw it: when it arrived (since the
/// simulated cloud was made), what it was and how it was answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Arrival {
    pub at: Duration,
    /// When its answer went out.
    pub done: Duration,
    pub method: String,
    pub path: String,
    pub status: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SimResource {
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub attributes: serde_json::Value,
}

#[derive(Default)]
struct Inner {
    resources: BTreeMap<String, SimResource>,
    /// path → paths that depend on it and still exist.
    dependents: HashMap<String, BTreeSet<String>>,
    /// Paths that have held resources: listing one that is empty now answers
    /// an empty page, not 404.
    collections: BTreeSet<String>,
    faults: Faults,
    rng: Option<fastrand::Rng>,
    stats: Stats,
    /// Every resource request as it arrived: method and raw (still encoded) path.
    requests: Vec<(String, String)>,
    /// Every answered resource request, in the order the answers went out.
    timeline: Vec<Arrival>,
    in_flight: u64,
    tokens: Option<TokenPolicy>,
    /// Issued token → when it stops being accepted.
    issued: HashMap<String, std::time::Instant>,
    /// Collection path → how it lists, and the most items a page holds.
    shapes: HashMap<String, (ListShape, usize)>,
}

/// `reaper sim`: serves the simulated cloud (or, with `null`, an API that
/// answers 204 to everything) on 127.0.0.1:`port` until Ctrl-C.
pub async fn run(port: u16, null: bool, latency_ms: u64) -> std::process::ExitCode {
    let token = CancellationToken::new();
    crate::runner::cancel_on_signals(token.clone());
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: binding 127.0.0.1:{port}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // With --port 0 the system picks one: say which.
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    let served = if null {
        println!("null API on http://127.0.0.1:{port}: 204 to everything after {latency_ms} ms");
        Sim::serve_null(listener, Duration::from_millis(latency_ms), token).await
    } else {
        println!("simulated cloud on http://127.0.0.1:{port} (control API under /_sim)");
        Sim::new().serve(listener, token).await
    };
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A handle on the simulated cloud's state, shared with its server.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Mutex<Inner>>,
    born: std::time::Instant,
}

impl Default for Sim {
    fn default() -> Sim {
        Sim { inner: Arc::default(), born: std::time::Instant::now() }
    }
}

impl Sim {
    pub fn new() -> Sim {
        Sim::default()
    }

    /// Every answered resource request, with when it arrived: what a test
    /// reads to see pacing, pauses and the order things happened in.
    pub fn timeline(&self) -> Vec<Arrival> {
        let mut t = self.inner.lock().unwrap().timeline.clone();
        t.sort_by_key(|a| a.at);
        t
    }

    /// Creates a resource directly (no HTTP), as a provisioner would have.
    pub fn create(&self, path: &str, depends_on: &[&str]) {
        let mut g = self.inner.lock().unwrap();
        g.insert(
            path.to_string(),
            SimResource {
                depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
                attributes: serde_json::Value::Null,
            },
        );
    }

    /// Makes `path` a collection that lists (possibly empty) rather than 404.
    pub fn create_collection(&self, path: &str) {
        self.inner.lock().unwrap().collections.insert(path.trim_end_matches('/').to_string());
    }

    /// Creates a resource with attributes (what a list shows of it).
    pub fn create_with(&self, path: &str, attributes: serde_json::Value) {
        let mut g = self.inner.lock().unwrap();
        g.insert(path.to_string(), SimResource { depends_on: Vec::new(), attributes });
    }

    /// Deletes a resource directly (no HTTP), as someone at a console would.
    pub fn remove(&self, path: &str) {
        self.inner.lock().unwrap().remove(path);
    }

    pub fn exists(&self, path: &str) -> bool {
        self.inner.lock().unwrap().resources.contains_key(path)
    }

    pub fn paths(&self) -> Vec<String> {
        self.inner.lock().unwrap().resources.keys().cloned().collect()
    }

    /// Every resource request so far, as (method, path exactly as sent).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.inner.lock().unwrap().requests.clone()
    }

    pub fn stats(&self) -> Stats {
        self.inner.lock().unwrap().stats.clone()
    }

    /// Every token the token endpoint issued, for a test to look for in logs.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.lock().unwrap().issued.keys().cloned().collect()
    }

    /// Issued tokens stop being accepted at once (a revocation, a key rotated
    /// at the IAM): the next request with one is answered 401.
    pub fn revoke_tokens(&self) {
        self.inner.lock().unwrap().issued.retain(|_, until| {
            *until = std::time::Instant::now();
            true
        });
    }

    /// From now on, resource requests need a token (see [`TokenPolicy`]).
    pub fn require_tokens(&self, policy: TokenPolicy) {
        self.inner.lock().unwrap().tokens = Some(policy);
    }

    /// From now on `collection` lists in `shape`, at most `max_page` items a
    /// page whatever the caller asks for (as APIs cap their page sizes).
    pub fn set_list_shape(&self, collection: &str, shape: ListShape, max_page: usize) {
        let path = collection.trim_end_matches('/').to_string();
        let mut g = self.inner.lock().unwrap();
        g.collections.insert(path.clone());
        g.shapes.insert(path, (shape, max_page.max(1)));
    }

    pub fn set_faults(&self, f: Faults) {
        let mut g = self.inner.lock().unwrap();
        g.rng = Some(f.seed.map(fastrand::Rng::with_seed).unwrap_or_default());
        g.faults = f;
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
        let app = axum::Router::new().fallback(handle).with_state(self);
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
    }

    /// An endpoint that answers every request 204 after `latency`: the
    /// near-zero-cost API of the benchmark.
    pub async fn serve_null(
        listener: TcpListener,
        latency: Duration,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let app = axum::Router::new().fallback(move || async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            StatusCode::NO_CONTENT
        });
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
    }

    /// Binds 127.0.0.1 on `port` (0 for any) and serves in the background.
    pub async fn spawn(&self, port: u16, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let sim = self.clone();
        tokio::spawn(async move {
            if let Err(e) = sim.serve(listener, shutdown).await {
                tracing::error!(error = %e, "simulated cloud stopped");
            }
        });
        Ok(addr)
    }
}

impl Inner {
    fn insert(&mut self, path: String, r: SimResource) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.collections.insert(parent.to_string());
        }
        for d in &r.depends_on {
            self.dependents.entry(d.clone()).or_default().insert(path.clone());
        }
        self.resources.insert(path, r);
        self.stats.creates += 1;
    }

    fn remove(&mut self, path: &str) {
        if let Some(r) = self.resources.remove(path) {
            for d in &r.depends_on {
                if let Some(set) = self.dependents.get_mut(d) {
                    set.remove(path);
                }
            }
        }
    }

    /// Whether the request carries a token the policy accepts (always, without a policy).
    fn authorized(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(policy) = &self.tokens else { return true };
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        // A fixed token is the whole value (Proxmox's `PVEAPIToken=USER@REALM!ID=SECRET`) or a bearer's.
        if policy.fixed_tokens.iter().any(|t| t == value || value.strip_prefix("Bearer ") == Some(t.as_str())) {
            return true;
        }
        let Some(token) = value.strip_prefix("Bearer ") else { return false };
        self.issued.get(token).is_some_and(|until| std::time::Instant::now() < *until)
    }

    /// The token endpoint: a form with the right secret gets a new token.
    fn grant(&mut self, body: &[u8]) -> Response {
        let Some(policy) = self.tokens.clone() else {
            return (StatusCode::NOT_FOUND, "no token policy: POST /_sim/tokens first").into_response();
        };
        let form = parse_form(body);
        let secret = match form.get("grant_type").map(String::as_str) {
            Some("client_credentials") => form.get("client_secret"),
            Some("urn:ibm:params:oauth:grant-type:apikey") => form.get("apikey"),
            _ => {
                return (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": "unsupported_grant_type"})))
                    .into_response()
            }
        };
        if secret != Some(&policy.client_secret) || policy.client_secret.is_empty() {
            return (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"error": "invalid_client"}))).into_response();
        }
        let token = format!("sim-{:016x}", fastrand::u64(..));
        let lifetime = Duration::from_secs_f64(policy.lifetime_secs.clamp(0.001, 86_400.0));
        self.issued.insert(token.clone(), std::time::Instant::now() + lifetime);
        self.stats.tokens_issued += 1;
        Json(serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": policy.lifetime_secs}))
            .into_response()
    }

    /// Decides which fault, if any, hits this request.
    fn roll(&mut self, method: &Method) -> Option<Injected> {
        let f = &self.faults;
        if !f.only_method.is_empty() && !f.only_method.eq_ignore_ascii_case(method.as_str()) {
            return None;
        }
        if self.faults.pass_first > 0 {
            self.faults.pass_first -= 1;
            return None;
        }
        let f = &self.faults;
        let rng = self.rng.get_or_insert_with(fastrand::Rng::new);
        if f.hang_rate > 0.0 && rng.f64() < f.hang_rate {
            self.stats.injected_hangs += 1;
            return Some(Injected::Hang(Duration::from_millis(f.hang_ms.max(1))));
        }
        if self.faults.fail_next > 0 {
            self.faults.fail_next -= 1;
            self.stats.injected_errors += 1;
            let s = if self.faults.fail_status == 0 { 503 } else { self.faults.fail_status };
            if s == 429 {
                self.stats.injected_rate_limits += 1;
                return Some(Injected::RateLimited(self.faults.retry_after_secs));
            }
            return Some(Injected::Status(StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)));
        }
        let f = &self.faults;
        let roll = rng.f64();
        if roll < f.error_rate {
            self.stats.injected_errors += 1;
            return Some(Injected::Status(StatusCode::SERVICE_UNAVAILABLE));
        }
        if roll < f.error_rate + f.rate_limit_rate {
            self.stats.injected_rate_limits += 1;
            return Some(Injected::RateLimited(f.retry_after_secs));
        }
        None
    }
}

enum Injected {
    Status(StatusCode),
    RateLimited(f64),
    Hang(Duration),
}

async fn handle(
    State(sim): State<Sim>,
    method: Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if let Some(control) = path.strip_prefix("/_sim/") {
        return control_api(&sim, &method, control, &body);
    }
    let at = sim.born.elapsed();
    /// Counts the request out however it ends (a client that hangs up drops it).
    struct InFlight<'a>(&'a Sim);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.inner.lock().unwrap().in_flight -= 1;
        }
    }
    {
        let mut g = sim.inner.lock().unwrap();
        g.in_flight += 1;
        g.stats.max_in_flight = g.stats.max_in_flight.max(g.in_flight);
    }
    let counted = InFlight(&sim);
    let response = resource_request(&sim, &method, &uri, &headers, &body).await;
    drop(counted);
    let status = response.status().as_u16();
    let done = sim.born.elapsed();
    sim.inner.lock().unwrap().timeline.push(Arrival { at, done, method: method.to_string(), path, status });
    response
}

async fn resource_request(
    sim: &Sim,
    method: &Method,
    uri: &Uri,
    headers: &axum::http::HeaderMap,
    body: &Bytes,
) -> Response {
    let path = uri.path().to_string();
    let (latency, injected) = {
        let mut g = sim.inner.lock().unwrap();
        g.stats.requests += 1;
        if headers.contains_key(axum::http::header::AUTHORIZATION) {
            g.stats.with_authorization += 1;
        }
        g.requests.push((method.to_string(), path.clone()));
        if !g.authorized(headers) {
            g.stats.unauthorized += 1;
            let body = serde_json::json!({"error": "invalid_token", "message": "no token, or one that expired"});
            return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
        }
        if !g.faults.redirect_to.is_empty() {
            let status = StatusCode::from_u16(g.faults.redirect_status).unwrap_or(StatusCode::TEMPORARY_REDIRECT);
            let location = format!("{}{}", g.faults.redirect_to, uri);
            let mut r = status.into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(axum::http::header::LOCATION, v);
            }
            return r;
        }
        (g.faults.latency_ms, g.roll(method))
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    match injected {
        Some(Injected::Hang(d)) => {
            tokio::time::sleep(d).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        Some(Injected::Status(s)) => return (s, "injected fault").into_response(),
        Some(Injected::RateLimited(secs)) => {
            let mut r = (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response();
            r.headers_mut().insert("retry-after", HeaderValue::from_str(&format!("{secs}")).unwrap());
            return r;
        }
        None => {}
    }
    let mut g = sim.inner.lock().unwrap();
    match *method {
        Method::PUT | Method::POST => {
            let r: SimResource = if body.is_empty() {
                SimResource::default()
            } else {
                match serde_json::from_slice(body) {
                    Ok(r) => r,
                    Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
                }
            };
            g.insert(path, r);
            StatusCode::CREATED.into_response()
        }
        Method::GET => {
            g.stats.checks += 1;
            if let Some(r) = g.resources.get(&path) {
                return Json(r.clone()).into_response();
            }
            let host = headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            list(&g, &path, &query_map(uri.query()), host)
        }
        Method::DELETE => {
            g.stats.deletes += 1;
            if !g.resources.contains_key(&path) {
                g.stats.delete_not_found += 1;
                return StatusCode::NOT_FOUND.into_response();
            }
            let blockers: Vec<String> =
                g.dependents.get(&path).map(|s| s.iter().cloned().collect()).unwrap_or_default();
            if !blockers.is_empty() {
                g.stats.refused_for_order += 1;
                return (StatusCode::CONFLICT, format!("still in use by {}", blockers.join(", "))).into_response();
            }
            g.remove(&path);
            g.stats.deleted += 1;
            StatusCode::NO_CONTENT.into_response()
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

/// Up to `limit` children one segment below `path`, in order, after the
/// child `after` or from the `skip`th; and whether more follow. None: no such collection.
fn children<'a>(
    g: &'a Inner,
    path: &str,
    after: Option<&str>,
    skip: usize,
    limit: usize,
) -> Option<(Vec<(String, &'a SimResource)>, bool)> {
    let prefix = format!("{}/", path.trim_end_matches('/'));
    let from = match after {
        Some(s) => format!("{prefix}{s}\u{0}"),
        None => prefix.clone(),
    };
    let mut all = g
        .resources
        .range(from..)
        .map_while(|(p, r)| p.strip_prefix(&prefix).map(|id| (id.to_string(), r)))
        .filter(|(id, _)| !id.contains('/'))
        .skip(skip);
    let items: Vec<_> = all.by_ref().take(limit).collect();
    let more = all.next().is_some();
    let known = g.collections.contains(path.trim_end_matches('/'));
    if items.is_empty() && after.is_none() && skip == 0 && !known && !g.resources.keys().any(|k| k.starts_with(&prefix))
    {
        return None;
    }
    Some((items, more))
}

/// A list, in the collection's shape (see [`ListShape`]).
fn list(g: &Inner, path: &str, q: &HashMap<String, String>, host: &str) -> Response {
    let (shape, cap) = g.shapes.get(path.trim_end_matches('/')).copied().unwrap_or((ListShape::Sim, 1000));
    let num = |k: &str, default: usize| q.get(k).and_then(|v| v.parse::<usize>().ok()).unwrap_or(default);
    let attrs =
        |items: Vec<(String, &SimResource)>| items.into_iter().map(|(_, r)| r.attributes.clone()).collect::<Vec<_>>();
    let not_found = || StatusCode::NOT_FOUND.into_response();
    let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("items").to_string();
    match shape {
        ListShape::Sim => {
            let limit = num("limit", 100).clamp(1, cap);
            let Some((items, more)) = children(g, path, q.get("start").map(String::as_str), 0, limit) else {
                return not_found();
            };
            let next = more.then(|| items.last().map(|(id, _)| id.clone())).flatten();
            let items: Vec<_> = items
                .into_iter()
                .map(|(id, r)| serde_json::json!({ "id": id, "path": format!("{}/{id}", path.trim_end_matches('/')), "attributes": r.attributes }))
                .collect();
            Json(serde_json::json!({ "items": items, "next": next })).into_response()
        }
        ListShape::Data => match children(g, path, None, 0, usize::MAX) {
            Some((items, _)) => Json(serde_json::json!({ "data": attrs(items) })).into_response(),
            None => not_found(),
        },
        ListShape::PageToken => {
            // The token is opaque to the caller: the last id, hex-encoded.
            let after = match q.get("pageToken").map(|t| hex_decode(t)) {
                Some(Some(id)) => Some(id),
                Some(None) => return (StatusCode::BAD_REQUEST, "invalid page token").into_response(),
                None => None,
            };
            let Some((items, more)) = children(g, path, after.as_deref(), 0, num("pageSize", 100).clamp(1, cap)) else {
                return not_found();
            };
            let token = more.then(|| items.last().map(|(id, _)| hex_encode(id))).flatten();
            let mut body = serde_json::json!({ name: attrs(items) });
            if let Some(t) = token {
                body["nextPageToken"] = t.into();
            }
            Json(body).into_response()
        }
        ListShape::NextHref => {
            let Some(version) = q.get("version") else {
                let e = serde_json::json!({"errors": [{"code": "bad_request", "message": "version query parameter is required"}]});
                return (StatusCode::BAD_REQUEST, Json(e)).into_response();
            };
            let limit = num("limit", 50).clamp(1, cap);
            let Some((items, more)) = children(g, path, q.get("start").map(String::as_str), 0, limit) else {
                return not_found();
            };
            let href = |start: Option<&str>| {
                let start = start.map(|s| format!("&start={s}")).unwrap_or_default();
                format!("http://{host}{path}?limit={limit}{start}&version={version}")
            };
            let next = more.then(|| items.last().map(|(id, _)| href(Some(id)))).flatten();
            let mut body = serde_json::json!({ name: attrs(items), "limit": limit, "first": { "href": href(None) } });
            if let Some(n) = next {
                body["next"] = serde_json::json!({ "href": n });
            }
            Json(body).into_response()
        }
        ListShape::Offset => {
            let total = children(g, path, None, 0, usize::MAX).map(|(all, _)| all.len());
            let Some((items, _)) = children(g, path, None, num("offset", 0), num("limit", 100).clamp(1, cap)) else {
                return not_found();
            };
            Json(serde_json::json!({ "items": attrs(items), "total": total })).into_response()
        }
    }
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> =
        (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    String::from_utf8(bytes?).ok()
}

/// The query string's parameters, decoded.
fn query_map(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .map(|(k, v)| (k.to_string(), percent_encoding::percent_decode_str(v).decode_utf8_lossy().to_string()))
        .collect()
}

fn control_api(sim: &Sim, method: &Method, what: &str, body: &[u8]) -> Response {
    match (method.clone(), what) {
        (Method::GET, "faults") => Json(sim.inner.lock().unwrap().faults.clone()).into_response(),
        (Method::POST, "faults") => match serde_json::from_slice::<Faults>(body) {
            Ok(f) => {
                sim.set_faults(f);
                StatusCode::NO_CONTENT.into_response()
            }
            Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        },
        (Method::GET, "stats") => Json(sim.stats()).into_response(),
        (Method::GET, "requests") => Json(sim.requests()).into_response(),
        (Method::GET, "resources") => Json(sim.paths()).into_response(),
        (Method::POST, "tokens") => match serde_json::from_slice::<TokenPolicy>(body) {
            Ok(p) => {
                sim.require_tokens(p);
                StatusCode::NO_CONTENT.into_response()
            }
            Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        },
        (Method::POST, "shapes") => {
            #[derive(Deserialize)]
            struct Shape {
                collection: String,
                shape: ListShape,
                #[serde(default = "hundred")]
                max_page: usize,
            }
            fn hundred() -> usize {
                100
            }
            match serde_json::from_slice::<Shape>(body) {
                Ok(s) => {
                    sim.set_list_shape(&s.collection, s.shape, s.max_page);
                    StatusCode::NO_CONTENT.into_response()
                }
                Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
            }
        }
        (Method::POST, "oauth/token") => sim.inner.lock().unwrap().grant(body),
        (Method::POST, "reset") => {
            *sim.inner.lock().unwrap() = Inner::default();
            StatusCode::NO_CONTENT.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// An `application/x-www-form-urlencoded` body as a map (`+` is a space).
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    let decode = |s: &str| percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}
