//! What operators ask of reaper, shared by the admin API and the CLI: the
//! plan for an owner, "is it really gone?", the fallback script, and sending a
//! deletion by hand.

use serde::Serialize;

use crate::app::App;
use crate::broker::{self, Names};
use crate::config::Settings;
use crate::contract;
use crate::domain::Resource;
use crate::plan;

#[derive(Debug, Serialize)]
pub struct PlanStep {
    pub level: usize,
    pub kind: String,
    pub id: String,
    pub provider: String,
    /// The request that deletes it, e.g. "DELETE https://api/v1/servers/s1".
    pub request: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("{0}")]
    Plan(#[from] plan::PlanError),
    #[error("{0}")]
    Invalid(String),
    /// A replay could not be read or recorded.
    #[error("{0}")]
    Replay(String),
    /// A kind's lookup could not be asked: the answer would be partial.
    #[error("{0}; nothing is reported rather than half of it")]
    Lookup(String),
}

/// What is left of `owner`, in the order reaper would delete it: what the
/// ledger holds live, and what the kinds' lookups find now that the ledger
/// does not already know as gone.
pub async fn plan(app: &App, owner: &str) -> Result<Vec<PlanStep>, OpsError> {
    let resources =
        known_and_found(app, owner).await?.into_iter().filter(|(_, state)| state == "live" || state == "looked_up");
    plan_of(&app.settings, &app.catalog, &resources.map(|(r, _)| r).collect::<Vec<_>>())
}

/// The owner's resources with their state: the ledger's (live, deleted,
/// already_gone), then those only the lookups find ("looked_up"). A found
/// resource the ledger records as gone is left out (a provisioner's table
/// keeps its rows after a teardown), unless its kind's ids come back
/// (`reused_ids`) and the row found is of another life (another `created_at`).
async fn known_and_found(app: &App, owner: &str) -> Result<Vec<(Resource, String)>, OpsError> {
    let mut all = app.ledger.resources_with_state(owner).await?;
    let found = crate::handler::find_by_lookups(app, owner).await.map_err(OpsError::Lookup)?.unwrap_or_default();
    let life = |r: &Resource| r.attributes.get("created_at").and_then(|t| crate::domain::parse_time(t));
    for r in found {
        let reused = app.catalog.kind(&r.kind).is_some_and(|k| k.reused_ids);
        let known: Vec<_> = all.iter().filter(|(k, _)| k.kind == r.kind && k.id == r.id).collect();
        let same_life = |(k, _): &&(Resource, String)| !reused || life(k) == life(&r);
        if !known.iter().any(same_life) {
            all.push((r, "looked_up".into()));
        }
    }
    Ok(all)
}

pub fn plan_of(
    settings: &Settings,
    catalog: &crate::catalog::Catalog,
    resources: &[Resource],
) -> Result<Vec<PlanStep>, OpsError> {
    let levels = plan::levels(resources, catalog)?;
    let mut out = Vec::new();
    for (n, level) in levels.iter().enumerate() {
        for &i in level {
            let r = &resources[i];
            let Some(spec) = catalog.kind(&r.kind) else { continue };
            let request = spec.delete.describe(settings.providers.get(&spec.provider), r).map_err(OpsError::Invalid)?;
            out.push(PlanStep {
                level: n,
                kind: r.kind.clone(),
                id: r.id.clone(),
                provider: spec.provider.clone(),
                request,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub kind: String,
    pub id: String,
    /// The ledger's view: live, deleted, already_gone.
    pub state: String,
    /// PASS: the provider says it is gone. FAIL: it still exists.
    /// UNKNOWN: the kind has no check, or the check failed.
    pub verdict: &'static str,
    pub detail: String,
}

/// Asks each provider whether each of the owner's resources still exists.
pub async fn validate(app: &App, owner: &str) -> Result<Vec<Verdict>, OpsError> {
    let mut out = Vec::new();
    for (resource, state) in known_and_found(app, owner).await? {
        let r = &resource;
        let (verdict, detail) =
            match (app.catalog.kind(&r.kind), app.catalog.kind(&r.kind).and_then(|k| app.providers.get(&k.provider))) {
                (Some(spec), Some(p)) => match p.exists(spec.check.as_ref(), &spec.delete, &resource).await {
                    Ok(Some(false)) => ("PASS", "gone at the provider".to_string()),
                    Ok(Some(true)) => ("FAIL", "still exists at the provider".to_string()),
                    Ok(None) => ("UNKNOWN", "the kind has no check configured".to_string()),
                    Err(e) => ("UNKNOWN", format!("the check failed: {e}")),
                },
                _ => ("UNKNOWN", format!("kind {:?} is not configured", r.kind)),
            };
        out.push(Verdict { kind: resource.kind.clone(), id: resource.id.clone(), state, verdict, detail });
    }
    Ok(out)
}

/// A shell script of the requests that would remove what is left, in order,
/// for the day the worker can't. Tokens are read from the environment, never inlined.
pub fn script(settings: &Settings, owner: &str, steps: &[PlanStep]) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!(
        "# What is left of {} (generated by reaper {}).\n",
        shell_comment(owner),
        env!("CARGO_PKG_VERSION")
    ));
    s.push_str("# Each request must answer 2xx, or 404/410 if already gone. Stops at the first failure.\nset -eu\n\n");
    s.push_str("del() {\n  method=$1; url=$2; shift 2\n  code=$(curl -sS -o /dev/null -w '%{http_code}' -X \"$method\" \"$@\" \"$url\")\n  case \"$code\" in 2??|404|410) echo \"ok $code $url\" ;; *) echo \"FAILED $code $url\" >&2; exit 1 ;; esac\n}\n");
    let mut level = usize::MAX;
    for step in steps {
        if step.level != level {
            level = step.level;
            s.push_str(&format!("\n# level {level}: these can go in any order\n"));
        }
        let (method, url) = step.request.split_once(' ').unwrap_or(("DELETE", &step.request));
        if method == "SQL" || method == "MONGO" {
            // Values are bound by reaper, never pasted; by hand, run it with them bound.
            s.push_str(&format!(
                "# {}/{}: in the application database, run: {}\n",
                step.kind,
                shell_comment(&step.id),
                shell_comment(url)
            ));
            continue;
        }
        let credentials = settings
            .providers
            .get(&step.provider)
            .map(|p| crate::providers::http::curl_credentials(&step.provider, p))
            .unwrap_or_default();
        s.push_str(&format!(
            "del {method} {}{credentials}  # {}/{}\n",
            shell_quote(url),
            step.kind,
            shell_comment(&step.id)
        ));
    }
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn shell_comment(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// What the worker would refuse of a resource sent by hand, said before it
/// is sent rather than by a dead letter after: an unknown kind, a missing
/// attribute its requests use (`missing` words it), a value a path cannot hold.
fn check_resource(
    catalog: &crate::catalog::Catalog,
    kind: &str,
    id: &str,
    attributes: &std::collections::BTreeMap<String, String>,
    missing: impl FnOnce(&str) -> String,
) -> Result<(), OpsError> {
    let Some(spec) = catalog.kind(kind) else {
        let known = catalog.kind_names().join(", ");
        return Err(OpsError::Invalid(format!("no kind {kind:?} is configured; the kinds are: {known}")));
    };
    if let Some(name) = spec.missing_attribute(attributes) {
        return Err(OpsError::Invalid(missing(name)));
    }
    match spec.path_values_refused(id, attributes) {
        Some(why) => Err(OpsError::Invalid(format!("{kind}/{id}: {why}"))),
        None => Ok(()),
    }
}

/// Publishes a `resource.tracked` for one resource, as a provisioner would;
/// returns its event_id. The kind must be one the catalog knows.
pub async fn track(
    publisher: &crate::broker::publisher::Publisher,
    names: &Names,
    catalog: &crate::catalog::Catalog,
    owner: &str,
    kind: &str,
    id: &str,
    attributes: &std::collections::BTreeMap<String, String>,
) -> Result<String, OpsError> {
    contract::check_owner(owner).map_err(|e| OpsError::Invalid(e.0))?;
    check_resource(catalog, kind, id, attributes, |missing| {
        format!("kind {kind} needs --attr {missing}=VALUE (its requests use it)")
    })?;
    if id.is_empty() {
        return Err(OpsError::Invalid("a resource id cannot be empty".into()));
    }
    let event_id = uuid::Uuid::new_v4().to_string();
    let body = contract::OutgoingTrack {
        event_id: &event_id,
        owner,
        resource: contract::OutgoingResource { kind, id, attributes },
        occurred_at: chrono::Utc::now(),
    }
    .to_bytes();
    publisher.publish(&names.events, contract::RESOURCE_TRACKED, &body, &event_id, &[]).await?;
    Ok(event_id)
}

/// Publishes a `provisioning.failed` for `owner`, as a provisioner's failure
/// hook would: what failed, at which step, and resources it knows of beyond
/// those tracked. Returns its event_id.
pub async fn provisioning_failed(
    publisher: &crate::broker::publisher::Publisher,
    names: &Names,
    catalog: &crate::catalog::Catalog,
    owner: &str,
    error: &str,
    failed_step: Option<&str>,
    resources: &[(String, String)],
) -> Result<String, OpsError> {
    contract::check_owner(owner).map_err(|e| OpsError::Invalid(e.0))?;
    let none = std::collections::BTreeMap::new();
    for (kind, id) in resources {
        check_resource(catalog, kind, id, &none, |missing| {
            format!("{kind}/{id}: kind {kind} needs attribute {missing}, which only `reaper track --attr` can give")
        })?;
    }
    let event_id = uuid::Uuid::new_v4().to_string();
    let body = contract::OutgoingTeardown {
        event_id: &event_id,
        owner,
        reason: error,
        requested_by: None,
        dry_run: false,
        occurred_at: chrono::Utc::now(),
        error: Some(error),
        failed_step,
        resources: resources
            .iter()
            .map(|(kind, id)| contract::OutgoingResource { kind, id, attributes: &none })
            .collect(),
    }
    .to_bytes();
    publisher.publish(&names.events, contract::PROVISIONING_FAILED, &body, &event_id, &[]).await?;
    Ok(event_id)
}

/// Publishes a `deletion.requested` for `owner`, as a producer would.
pub async fn request_deletion(
    publisher: &crate::broker::publisher::Publisher,
    names: &Names,
    owner: &str,
    dry_run: bool,
    reason: &str,
    requested_by: &str,
) -> Result<String, OpsError> {
    contract::check_owner(owner).map_err(|e| OpsError::Invalid(e.0))?;
    let event_id = uuid::Uuid::new_v4().to_string();
    let body = contract::OutgoingTeardown {
        event_id: &event_id,
        owner,
        reason,
        requested_by: Some(requested_by),
        dry_run,
        occurred_at: chrono::Utc::now(),
        error: None,
        failed_step: None,
        resources: Vec::new(),
    }
    .to_bytes();
    publisher.publish(&names.events, contract::DELETION_REQUESTED, &body, &event_id, &[]).await?;
    Ok(event_id)
}

/// What `reaper cancel` did to one job.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum CancelOutcome {
    /// Ended `cancelled`; its result is published (or queued in the outbox
    /// when the broker did not confirm: a worker's drainer sends it).
    Cancelled {
        published: bool,
    },
    /// A worker runs it now: it starts no further deletes, lets those in
    /// flight finish, and ends `cancelled` with what it did.
    Requested,
    /// It had ended already.
    Ended {
        status: &'static str,
    },
    NoSuchJob,
}

/// Cancels one job, for the CLI and the admin API alike: the ledger ends it
/// (or asks its worker to), and its `cancelled` result goes out through the outbox.
pub async fn cancel(
    ledger: &crate::ledger::Ledger,
    publisher: Option<&crate::broker::publisher::Publisher>,
    names: &Names,
    job_id: uuid::Uuid,
    reason: &str,
) -> Result<CancelOutcome, OpsError> {
    use crate::ledger::cancel::Cancel;
    let reason = reason.replace('\0', "");
    let why = reason.clone();
    let answer = ledger
        .cancel(job_id, &reason, move |start| {
            let steps = crate::handler::not_run(start, "not attempted: the job was cancelled");
            let result = crate::handler::result_of(&start.job, &steps, crate::domain::JobStatus::Cancelled, Some(why));
            (result.to_bytes(), result.routing_key())
        })
        .await?;
    Ok(match answer {
        Cancel::Cancelled(row) => {
            let published = match publisher {
                Some(p) => crate::outbox::publish(p, names, &row).await.is_ok(),
                None => false,
            };
            if published {
                let _ = ledger.outbox_delete(&[row.id]).await;
            }
            CancelOutcome::Cancelled { published }
        }
        Cancel::Requested => CancelOutcome::Requested,
        Cancel::Ended(s) => CancelOutcome::Ended { status: s.as_str() },
        Cancel::NoSuchJob => CancelOutcome::NoSuchJob,
    })
}

/// What a replay asked through the API or the console gave back.
pub enum Replayed {
    /// Started in the background: its progress is `Ledger::replay_run(replay_id)`.
    Started { replay_id: uuid::Uuid, matched: usize },
    /// A dry run's preview, or a replay run to its end.
    Done(crate::replay::Summary),
}

/// Replays dead-lettered jobs for the API and the console (the CLI calls
/// `replay::replay_jobs` with its own link): a dry run previews, `run_async`
/// answers with the replay's id before the jobs are reopened.
pub async fn replay(
    app: &App,
    filter: &crate::ledger::replay::DeadFilter,
    dry_run: bool,
    run_async: bool,
    requested_by: &str,
) -> Result<Replayed, OpsError> {
    let max = app.settings.worker.max_replays;
    if dry_run {
        let mut summary = crate::replay::replay_jobs(&app.ledger, None, &app.names, max, filter, false, requested_by)
            .await
            .map_err(|e| OpsError::Replay(e.to_string()))?;
        crate::replay::look_up_pending(app, &mut summary).await.map_err(OpsError::Lookup)?;
        return Ok(Replayed::Done(summary));
    }
    let publisher = match app.link.publisher(&app.settings, &app.names).await {
        Ok(p) => p,
        Err(e) => {
            app.link.forget().await;
            return Err(e.into());
        }
    };
    if run_async {
        let (replay_id, matched) = crate::replay::start_replay(
            app.ledger.clone(),
            publisher,
            app.names.clone(),
            max,
            filter.clone(),
            requested_by,
        )
        .await?;
        return Ok(Replayed::Started { replay_id, matched });
    }
    // On a task of its own, as a sweep: a client that hangs up must not stop
    // the replay half-way.
    let (ledger, names, filter, by) = (app.ledger.clone(), app.names.clone(), filter.clone(), requested_by.to_string());
    let run = tokio::spawn(async move {
        crate::replay::replay_jobs(&ledger, Some(&publisher), &names, max, &filter, false, &by)
            .await
            .map_err(|e| e.to_string())
    });
    match run.await {
        Ok(done) => done.map(Replayed::Done).map_err(OpsError::Replay),
        Err(_) => Err(OpsError::Replay("the replay panicked".into())),
    }
}

/// Cancels a job for the API and the console: publishes its result when the
/// broker is there (the outbox keeps it when not) and counts it.
pub async fn cancel_job(app: &App, job_id: uuid::Uuid, reason: &str) -> Result<CancelOutcome, OpsError> {
    let publisher = app.link.publisher(&app.settings, &app.names).await.ok();
    let outcome = cancel(&app.ledger, publisher.as_ref(), &app.names, job_id, reason).await?;
    if matches!(outcome, CancelOutcome::Cancelled { .. }) {
        app.metrics.jobs.with_label_values(&["cancelled"]).inc();
    }
    Ok(outcome)
}

/// Runs a sweep for the API and the console, on a task of its own: a client
/// that hangs up must not drop the sweep half-way (its transaction would end
/// only when the pool reused the connection, holding the rule's lock until then).
pub async fn reconcile(
    app: std::sync::Arc<App>,
    rule: &str,
    mode: crate::reconcile::Mode,
) -> Result<crate::reconcile::Report, crate::reconcile::ReconcileError> {
    let name = rule.to_string();
    let swept = tokio::spawn(async move { app.sweeper().sweep(&name, mode).await }).await;
    swept.unwrap_or_else(|_| Err(crate::reconcile::ReconcileError::Panicked))
}

/// Everything the console's owner page shows, read once.
pub struct OwnerView {
    pub resources: Vec<crate::ledger::views::OwnerResource>,
    pub jobs: Vec<crate::ledger::views::OwnerJob>,
    /// Per resource still there and claimed by an unfinished or dead job,
    /// what it waits on, in words: from the steps the ledger recorded (a
    /// step's attempts and error are written when it fails) and the plan.
    pub waits: std::collections::HashMap<(String, String), String>,
    /// What a teardown would do now, or why that cannot be said.
    pub plan: Result<Vec<PlanStep>, String>,
}

pub async fn owner_view(app: &App, owner: &str) -> Result<OwnerView, OpsError> {
    let (resources, jobs) = app.ledger.owner_view(owner).await?;
    let waits = waits(&app.ledger, &app.catalog, owner, &resources, &jobs).await?;
    let plan = plan(app, owner).await.map_err(|e| e.to_string());
    Ok(OwnerView { resources, jobs, waits, plan })
}

/// What each resource still there, claimed by an unfinished or dead job,
/// waits on, in words (for the console, `/v1/owners/{owner}` and `reaper show`).
pub async fn waits(
    ledger: &crate::ledger::Ledger,
    catalog: &crate::catalog::Catalog,
    owner: &str,
    resources: &[crate::ledger::views::OwnerResource],
    jobs: &[crate::ledger::views::OwnerJob],
) -> Result<std::collections::HashMap<(String, String), String>, OpsError> {
    let open: Vec<uuid::Uuid> =
        jobs.iter().filter(|j| j.status == "running" || j.status == "dead_lettered").map(|j| j.job_id).collect();
    let mut waits = std::collections::HashMap::new();
    if open.is_empty() {
        return Ok(waits);
    }
    let steps = ledger.steps_of(&open).await?;
    let all = ledger.resources_with_state(owner).await?;
    for job in &open {
        let live: Vec<Resource> = all
            .iter()
            .filter(|(r, state)| {
                state == "live" && resources.iter().any(|o| o.kind == r.kind && o.id == r.id && o.job_id == Some(*job))
            })
            .map(|(r, _)| r.clone())
            .collect();
        let Ok(graph) = plan::Graph::build(&live, catalog) else { continue };
        let recorded = |r: &Resource| {
            steps.get(job).and_then(|st| st.iter().find(|s| s.kind == r.kind && s.id == r.id && s.outcome != "deleted"))
        };
        for (i, r) in live.iter().enumerate() {
            let own = recorded(r);
            // Its own failure says most; a step not attempted because of
            // another is better told by what it waits on.
            let text = if let Some(s) = own.filter(|s| s.outcome == "failed" || graph.waits_for(i).is_empty()) {
                s.describe()
            } else {
                let on: Vec<String> = graph
                    .waits_for(i)
                    .into_iter()
                    .map(|w| {
                        let o = &live[w];
                        match recorded(o) {
                            Some(s) => format!("{}/{} ({})", o.kind, o.id, s.describe()),
                            None => format!("{}/{}", o.kind, o.id),
                        }
                    })
                    .collect();
                if on.is_empty() {
                    "nothing: next to go".to_string()
                } else {
                    format!("waiting on {}", on.join(", "))
                }
            };
            waits.insert((r.kind.clone(), r.id.clone()), text);
        }
    }
    Ok(waits)
}

/// The waits as a list, for JSON.
pub fn waits_json(waits: &std::collections::HashMap<(String, String), String>) -> Vec<serde_json::Value> {
    let mut out: Vec<_> = waits.iter().collect();
    out.sort();
    out.into_iter().map(|((kind, id), w)| serde_json::json!({ "kind": kind, "id": id, "waits_on": w })).collect()
}

/// Pauses every replica (the CLI, the API and the console).
pub async fn pause(app: &App, reason: &str, by: &str) -> Result<crate::ledger::control::Pause, OpsError> {
    let p = app.ledger.pause(reason, by).await?;
    app.read_pause().await;
    Ok(p)
}

/// Ends the pause; the pause it ended, if any.
pub async fn resume(app: &App) -> Result<Option<crate::ledger::control::Pause>, OpsError> {
    let was = app.ledger.resume().await?;
    app.read_pause().await;
    Ok(was)
}
