//! The admin HTTP API (axum). Health, readiness, metrics and the OpenAPI
//! document are open; every other route needs `Authorization: Bearer <token>`
//! (401 without, 403 with a wrong one), compared in constant time.
//! Owners contain a slash: send them percent-encoded (`node%2Fn1`).

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::redact_url;
use crate::ledger::replay::DeadFilter;
use crate::ops;

pub const OPENAPI: &str = include_str!("openapi.json");

pub fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/owners/{owner}", get(owner))
        .route("/v1/owners/{owner}/teardown", post(teardown))
        .route("/v1/owners/{owner}/validate", get(validate))
        .route("/v1/owners/{owner}/script", get(script))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/jobs/{id}/restore", post(restore))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/dead", get(dead))
        .route("/v1/dead/replay", post(replay))
        .route("/v1/replays", get(replays))
        .route("/v1/replays/{id}", get(replay_status))
        .route("/v1/reconcile/{rule}", post(reconcile))
        .route("/v1/pause", post(pause))
        .route("/v1/resume", post(resume))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    let api = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .merge(protected)
        .fallback(no_route)
        .layer(middleware::map_response(json_errors))
        .with_state(app.clone());
    // The console answers HTML, its errors too: it joins after the JSON layer.
    crate::console::router(app).merge(api)
}

/// No route: most often an owner whose slash was not encoded.
async fn no_route(uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let hint = match path.strip_prefix("/v1/owners/").and_then(|rest| rest.split_once('/')) {
        Some((kind, rest)) => format!("; an owner's slash is written %2F: /v1/owners/{kind}%2F{rest}"),
        None => String::new(),
    };
    error(StatusCode::NOT_FOUND, &format!("no route for {path}{hint}"))
}

/// Every error answers JSON, also those axum writes itself (a body that is
/// not JSON: 415; a query that does not parse: 400).
async fn json_errors(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if resp.status().is_success() || is_json || resp.status().is_redirection() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let message = if text.trim().is_empty() { parts.status.canonical_reason().unwrap_or("error") } else { text.trim() };
    let mut json = error(parts.status, message);
    // Allow (405), Retry-After (503) and the like stay; the body's own go.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

/// Serves the API on `addr` until `shutdown`.
/// Serves on the socket `App::build` bound (so a port that cannot be had
/// stopped start-up instead of leaving a worker without `/healthz`).
pub async fn serve(app: Arc<App>, listener: std::net::TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "admin API listening");
    axum::serve(listener, router(app)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn require_token(State(app): State<Arc<App>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let Some(expected) = &app.admin_token else {
        return error(
            StatusCode::UNAUTHORIZED,
            "no admin token is configured; set admin.token_env (REAPER_ADMIN_TOKEN) or admin.token_file",
        );
    };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => error(StatusCode::UNAUTHORIZED, "missing bearer token"),
        Some(t) if expected.matches(t) => next.run(req).await,
        Some(_) => error(StatusCode::FORBIDDEN, "wrong token"),
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let consuming = app.is_ready();
    let database = app.ledger.ping().await;
    let code = if consuming && database { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({ "ready": consuming && database, "consuming": consuming, "database": database })))
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let counts = match app.ledger.status_counts().await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    let s = &app.settings;
    let providers: serde_json::Map<String, serde_json::Value> =
        s.providers.iter().map(|(name, p)| (name.clone(), p.summary())).collect();
    let kinds: serde_json::Map<String, serde_json::Value> = app
        .catalog
        .kind_names()
        .into_iter()
        .filter_map(|k| {
            app.catalog.kind(k).map(|spec| {
                (
                    k.to_string(),
                    json!({ "provider": spec.provider, "after": spec.after, "check": spec.check.is_some() }),
                )
            })
        })
        .collect();
    Json(json!({
        "ready": app.is_ready(),
        "counts": counts,
        "config": {
        "reconcile": s.reconcile.rules.iter().map(|(name, r)| (name.clone(), json!({
            "every_secs": r.every_secs, "schedule": r.schedule, "enabled": r.enabled,
            "execute_on_schedule": r.execute_on_schedule,
            "max_count": r.max_count, "max_fraction": r.max_fraction, "grace_secs": r.grace_secs,
            "quarantine_sweeps": r.quarantine_sweeps,
        }))).collect::<serde_json::Map<_, _>>(),
            "broker": { "url": redact_url(s.broker.url.expose()), "prefix": s.broker.prefix, "prefetch": s.broker.prefetch,
                        "queue_type": format!("{:?}", s.broker.queue_type).to_lowercase() },
            "database": { "url": redact_url(s.database.url.expose()), "max_connections": s.database.max_connections },
            "worker": { "step_attempts": s.worker.step_attempts, "retry_delays_secs": s.worker.retry_delays_secs,
                        "lease_ttl_secs": s.worker.lease_ttl_secs, "max_replays": s.worker.max_replays },
            "providers": providers,
            "kinds": kinds,
        }
    }))
    .into_response()
}

async fn owner(State(app): State<Arc<App>>, Path(owner): Path<String>) -> Response {
    match app.ledger.owner_view(&owner).await {
        Ok((resources, jobs)) if resources.is_empty() && jobs.is_empty() => {
            error(StatusCode::NOT_FOUND, &format!("reaper knows nothing of owner {owner:?}"))
        }
        Ok((resources, jobs)) => match ops::waits(&app.ledger, &app.catalog, &owner, &resources, &jobs).await {
            Ok(w) => {
                Json(json!({ "owner": owner, "resources": resources, "jobs": jobs, "waits": ops::waits_json(&w) }))
                    .into_response()
            }
            Err(e) => internal(e),
        },
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct TeardownQuery {
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    reason: Option<String>,
}

async fn teardown(State(app): State<Arc<App>>, Path(owner): Path<String>, Query(q): Query<TeardownQuery>) -> Response {
    if q.dry_run {
        return match ops::plan(&app, &owner).await {
            Ok(steps) => Json(json!({ "owner": owner, "dry_run": true, "plan": steps })).into_response(),
            Err(e) => internal(e),
        };
    }
    let reason = q.reason.unwrap_or_else(|| "requested through the admin API".into());
    if let Err(e) = crate::contract::check_owner(&owner) {
        return error(StatusCode::BAD_REQUEST, &e.0);
    }
    let publisher = match app.link.publisher(&app.settings, &app.names).await {
        Ok(p) => p,
        Err(e) => return internal(e),
    };
    let sent = ops::request_deletion(&publisher, &app.names, &owner, false, &reason, "admin-api").await;
    if let Err(ops::OpsError::Broker(_)) = &sent {
        app.link.forget().await;
    }
    match sent {
        Ok(event_id) => (StatusCode::ACCEPTED, Json(json!({ "event_id": event_id, "owner": owner }))).into_response(),
        Err(ops::OpsError::Invalid(m)) => error(StatusCode::BAD_REQUEST, &m),
        Err(e) => internal(e),
    }
}

/// `{"reason": "..."}`, optional: the body of a pause or a cancel.
#[derive(Deserialize, Default)]
struct PauseBody {
    #[serde(default)]
    reason: Option<String>,
}

/// Pauses every replica (the flag in the ledger; each reads it every
/// `worker.pause_poll_ms`). The body is optional: `{"reason": "..."}`.
async fn pause(State(app): State<Arc<App>>, body: Option<Json<PauseBody>>) -> Response {
    let reason = body.and_then(|b| b.0.reason).unwrap_or_else(|| "paused through the admin API".into());
    match ops::pause(&app, &reason, "admin-api").await {
        Ok(p) => Json(json!({ "paused": p })).into_response(),
        Err(e) => internal(e),
    }
}

/// Cancels a job (as `reaper cancel`): 200 with what happened, 404 no such
/// job, 409 it had ended already.
async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>, body: Option<Json<PauseBody>>) -> Response {
    let Ok(job_id) = uuid::Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, &format!("{id:?} is not a job id"));
    };
    let reason = body.and_then(|b| b.0.reason).unwrap_or_else(|| "cancelled through the admin API".into());
    match ops::cancel_job(&app, job_id, &reason).await {
        Ok(o @ ops::CancelOutcome::NoSuchJob) => (StatusCode::NOT_FOUND, Json(json!(o))).into_response(),
        Ok(o @ ops::CancelOutcome::Ended { .. }) => (StatusCode::CONFLICT, Json(json!(o))).into_response(),
        Ok(o) => Json(json!(o)).into_response(),
        Err(e) => internal(e),
    }
}

async fn resume(State(app): State<Arc<App>>) -> Response {
    match ops::resume(&app).await {
        Ok(was) => Json(json!({ "paused": null, "was": was })).into_response(),
        Err(e) => internal(e),
    }
}

async fn validate(State(app): State<Arc<App>>, Path(owner): Path<String>) -> Response {
    match ops::validate(&app, &owner).await {
        Ok(v) if v.is_empty() => error(StatusCode::NOT_FOUND, &format!("reaper tracks nothing for owner {owner:?}")),
        Ok(v) => {
            let pass = v.iter().all(|x| x.verdict == "PASS");
            Json(json!({ "owner": owner, "result": if pass { "PASS" } else { "FAIL" }, "resources": v }))
                .into_response()
        }
        Err(e) => internal(e),
    }
}

async fn script(State(app): State<Arc<App>>, Path(owner): Path<String>) -> Response {
    match ops::plan(&app, &owner).await {
        Ok(steps) => {
            ([(header::CONTENT_TYPE, "text/x-shellscript")], ops::script(&app.settings, &owner, &steps)).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn job(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else { return error(StatusCode::BAD_REQUEST, "job ids are UUIDs") };
    match app.ledger.job_view(id).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such job"),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize, Default)]
struct DryRun {
    #[serde(default)]
    dry_run: bool,
}

/// Puts back what the job archived (`reaper restore`); `?dry_run=true` counts only.
async fn restore(State(app): State<Arc<App>>, Path(id): Path<String>, Query(q): Query<DryRun>) -> Response {
    use crate::restore::{restore_with, RestoreError};
    let Ok(id) = uuid::Uuid::parse_str(&id) else { return error(StatusCode::BAD_REQUEST, "job ids are UUIDs") };
    match restore_with(&app.catalog, &app.ledger, &app.providers, id, q.dry_run).await {
        Ok(r) => Json(r).into_response(),
        Err(e @ RestoreError::NoJob(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize, Default)]
struct FilterBody {
    job: Option<uuid::Uuid>,
    owner: Option<String>,
    reason: Option<String>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
    error_class: Option<String>,
    kind: Option<String>,
    /// Only these jobs (what a preview listed).
    jobs: Option<Vec<uuid::Uuid>>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    dry_run: bool,
    /// Answer 202 with the replay's id at once; `GET /v1/replays/{id}` tells its progress.
    #[serde(default, rename = "async")]
    run_async: bool,
}

impl FilterBody {
    fn filter(&self) -> DeadFilter {
        DeadFilter {
            job: self.job,
            owner: self.owner.clone(),
            reason: self.reason.clone(),
            since: self.since,
            error_class: self.error_class.clone(),
            kind: self.kind.clone(),
            until: self.until,
            jobs: self.jobs.clone(),
        }
    }
}

async fn dead(State(app): State<Arc<App>>, Query(f): Query<FilterBody>) -> Response {
    match app.ledger.dead_jobs(&f.filter()).await {
        Ok(jobs) => Json(json!({
            "jobs": jobs.iter().map(|j| json!({ "job_id": j.job_id, "event_id": j.event_id, "owner": j.owner, "reason": j.reason,
                                                 "error_class": j.error_class, "finished_at": j.finished_at, "replays": j.replays })).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => internal(e),
    }
}

async fn replay(State(app): State<Arc<App>>, body: Option<Json<FilterBody>>) -> Response {
    let f = body.map(|b| b.0).unwrap_or_default();
    let filter = f.filter();
    if filter.is_every_job() && !f.all {
        return error(
            StatusCode::BAD_REQUEST,
            "give a filter (job, owner, reason, since, error_class, kind) or \"all\": true",
        );
    }
    match ops::replay(&app, &filter, f.dry_run, f.run_async, "admin-api").await {
        Ok(ops::Replayed::Started { replay_id, matched }) => (
            StatusCode::ACCEPTED,
            Json(json!({ "replay_id": replay_id, "matched": matched, "status": format!("/v1/replays/{replay_id}") })),
        )
            .into_response(),
        Ok(ops::Replayed::Done(summary)) => Json(summary).into_response(),
        Err(e) => internal(e),
    }
}

/// The latest replays, newest first.
async fn replays(State(app): State<Arc<App>>) -> Response {
    match app.ledger.replay_runs(None, 50).await {
        Ok(runs) => Json(json!({ "replays": runs })).into_response(),
        Err(e) => internal(e),
    }
}

/// How far a replay got: the jobs it reopened and where they are now.
async fn replay_status(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else { return error(StatusCode::BAD_REQUEST, "replay ids are UUIDs") };
    match app.ledger.replay_run(id).await {
        Ok(Some(run)) => Json(run).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such replay"),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize, Default)]
struct ReconcileQuery {
    #[serde(default)]
    execute: bool,
    #[serde(default)]
    force: bool,
    /// This run's age for "old enough", in seconds (the CLI's --older-than).
    #[serde(default)]
    older_than_secs: Option<f64>,
}

/// A dry run unless `?execute=true`. 200 with the report when the sweep ran,
/// 422 with it when a safety rule refused, 409 while another sweep of the
/// rule runs, 503 when an inventory failed to load.
async fn reconcile(State(app): State<Arc<App>>, Path(rule): Path<String>, Query(q): Query<ReconcileQuery>) -> Response {
    use crate::reconcile::{Mode, ReconcileError};
    let mode = Mode { execute: q.execute, force: q.force, older_than: q.older_than_secs };
    match ops::reconcile(app, &rule, mode).await {
        Ok(r) if r.outcome == crate::reconcile::Outcome::Refused => {
            (StatusCode::UNPROCESSABLE_ENTITY, Json(r)).into_response()
        }
        Ok(r) => Json(r).into_response(),
        Err(e @ ReconcileError::UnknownRule(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ ReconcileError::Refused { .. }) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ ReconcileError::Busy { .. }) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ ReconcileError::Inventory { .. }) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::constant_time_eq;

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
