//! The operator commands of the CLI: tables for people, `--json` for scripts.
//! Exit codes: 0 fine, 1 the answer is bad news (validate FAIL), 2 bad usage
//! or config, 3 a service could not be reached.

use std::process::ExitCode;

use crate::app::App;
use crate::config::Settings;
use crate::ops;

fn fail(code: u8, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}

/// How `reaper plan` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PlanFormat {
    Table,
    Json,
    Sh,
}

/// `reaper check-config`: the kinds in the order they go, the reconcile
/// rules and the providers (credentials redacted).
pub async fn check_config(settings: &Settings, connect: bool) -> ExitCode {
    let (catalog, providers) = match App::check(settings).await {
        Ok(checked) => (checked.catalog, checked.providers),
        Err(e @ crate::app::AppError::Ledger(_)) => return fail(3, e),
        Err(e) => return fail(2, e),
    };
    println!("config is valid; kinds in the order they go, and what must be gone before each:");
    let width = catalog.kind_names().iter().map(|k| k.len()).max().unwrap_or(0).max(4);
    for k in catalog.teardown_order() {
        let spec = catalog.kind(k).expect("listed");
        let after = if spec.after.is_empty() { "-".to_string() } else { spec.after.join(", ") };
        let mut extras = Vec::new();
        if let Some(l) = &spec.lookup {
            extras.push(format!("lookup in {}", l.provider));
        }
        if let Some(g) = &spec.guard {
            extras.push(format!("guard on {}", g.provider));
        }
        if spec.archive.is_some() {
            extras.push("archived".into());
        }
        let extras = if extras.is_empty() { String::new() } else { format!("  [{}]", extras.join(", ")) };
        println!("  {k:<width$}  provider={:<12} after: {after}{extras}", spec.provider);
    }
    for (name, r) in &settings.reconcile.rules {
        let every = r.when();
        println!("  reconcile rule {name}: {every}");
    }
    for (name, p) in &settings.providers {
        let (url, max) = p.endpoint();
        println!("  provider {name}: {url} (max {max} in flight)");
    }
    if connect {
        return check_connections(settings, &providers).await;
    }
    ExitCode::SUCCESS
}

/// One line per service reaper talks to: it answers, or why not.
async fn check_connections(settings: &Settings, providers: &crate::providers::Providers) -> ExitCode {
    use crate::config::redact_url;
    use crate::providers::StepError;
    println!("connections:");
    let mut failed = 0;
    let mut say = |what: String, outcome: Result<String, String>| match outcome {
        Ok(ok) => println!("  {what}: {ok}"),
        Err(why) => {
            failed += 1;
            println!("  {what}: FAILED: {why}");
        }
    };
    let broker = crate::broker::link::reach(settings).await.map(|_| "answers".to_string()).map_err(|e| e.to_string());
    say(format!("broker {}", redact_url(settings.broker.url.expose())), broker);
    let ledger = crate::ledger::Ledger::from_settings(settings)
        .await
        .map(|l| {
            tokio::spawn(async move { l.pool().close().await });
            "answers".to_string()
        })
        .map_err(|e| e.to_string());
    say(format!("ledger {}", redact_url(settings.database.url.expose())), ledger);
    for name in settings.providers.keys() {
        let p = providers.get(name).expect("every configured provider is built");
        let (url, _) = settings.providers[name].endpoint();
        let reached = p.reach().await.map_err(|e| match e {
            StepError::Transient(why) | StepError::Permanent(why) => why,
            other => other.to_string(),
        });
        say(format!("provider {name} {url}"), reached);
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: {failed} service(s) did not answer (see above)");
        ExitCode::from(3)
    }
}

pub async fn status(settings: &Settings, json: bool) -> ExitCode {
    let ledger = match crate::ledger::Ledger::from_settings(settings).await {
        Ok(l) => l,
        Err(e) => return fail(3, e),
    };
    match ledger.status_counts().await {
        Ok(c) if json => {
            println!("{}", serde_json::to_string_pretty(&c).expect("serializable"));
            ExitCode::SUCCESS
        }
        Ok(c) => {
            // One column of labels, one of values, whatever the names' lengths.
            let mut rows: Vec<(String, String)> = vec![("owners tracked".into(), c.owners_tracked.to_string())];
            rows.extend(c.resources.iter().map(|(state, n)| (format!("resources {state}"), n.to_string())));
            rows.extend(c.jobs.iter().map(|(status, n)| (format!("jobs {status}"), n.to_string())));
            rows.push(("outbox backlog".into(), c.outbox_backlog.to_string()));
            let paused = match &c.paused {
                Some(p) => format!("PAUSED since {} by {}: {}", p.since.to_rfc3339(), p.by, p.reason),
                None => "no".into(),
            };
            rows.insert(0, ("paused".into(), paused));
            for (rule, v) in &c.reconcile {
                let last = &v["last_report"];
                let summary = if last.is_null() {
                    "no executed sweep yet".to_string()
                } else {
                    format!(
                        "last executed sweep {}: {} ({} orphans, {} published)",
                        last["started_at"].as_str().unwrap_or("?"),
                        last["outcome"].as_str().unwrap_or("?"),
                        last["orphans"],
                        last["published"]
                    )
                };
                rows.push((format!("reconcile {rule}"), summary));
            }
            let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
            for (label, value) in rows {
                println!("{label:<width$}  {value}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(3, e),
    }
}

pub async fn show(settings: &Settings, owner: &str, json: bool) -> ExitCode {
    let ledger = match crate::ledger::Ledger::from_settings(settings).await {
        Ok(l) => l,
        Err(e) => return fail(3, e),
    };
    let (resources, jobs) = match ledger.owner_view(owner).await {
        Ok(v) => v,
        Err(e) => return fail(3, e),
    };
    if resources.is_empty() && jobs.is_empty() {
        return fail(1, format!("reaper knows nothing of owner {owner:?}"));
    }
    let waits = match crate::catalog::validate(settings) {
        Ok(catalog) => crate::ops::waits(&ledger, &catalog, owner, &resources, &jobs).await.unwrap_or_default(),
        Err(_) => Default::default(),
    };
    if json {
        let all = serde_json::json!({ "owner": owner, "resources": resources, "jobs": jobs, "waits": crate::ops::waits_json(&waits) });
        println!("{}", serde_json::to_string_pretty(&all).expect("serializable"));
        return ExitCode::SUCCESS;
    }
    println!("{owner}");
    println!("  {:<20} {:<40} {:<13} job", "kind", "id", "state");
    for r in &resources {
        println!(
            "  {:<20} {:<40} {:<13} {}",
            r.kind,
            r.id,
            r.state,
            r.job_id.map(|j| j.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    let mut waiting: Vec<_> = waits.iter().collect();
    waiting.sort();
    if !waiting.is_empty() {
        println!("  waiting:");
        for ((kind, id), w) in waiting {
            println!("  {kind}/{id}: {w}");
        }
    }
    println!("  jobs:");
    for j in &jobs {
        let class = j.error_class.as_deref().map(|c| format!(" [{c}]")).unwrap_or_default();
        println!(
            "  {} {:<20} {:<14} deliveries {}, failed runs {}{class} {}",
            j.job_id,
            j.trigger,
            j.status,
            j.attempts,
            j.failed_runs,
            j.reason.as_deref().unwrap_or("")
        );
        let q = &j.request;
        let asked = [("reason", &q.reason), ("by", &q.requested_by), ("step", &q.failed_step), ("error", &q.error)]
            .into_iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| format!("{k}: {v}")))
            .collect::<Vec<_>>();
        if !asked.is_empty() {
            println!("      asked: {}", asked.join("; "));
        }
    }
    ExitCode::SUCCESS
}

/// The app of a one-shot command: no admin API (a worker on this host may
/// hold its port).
async fn one_shot(mut settings: Settings) -> Result<App, crate::app::AppError> {
    settings.admin.listen.clear();
    App::build(settings).await
}

pub async fn validate(settings: Settings, owner: &str, json: bool) -> ExitCode {
    let app = match one_shot(settings).await {
        Ok(a) => a,
        Err(e) => return fail(2, e),
    };
    let verdicts = match ops::validate(&app, owner).await {
        Ok(v) => v,
        Err(e) => return fail(3, e),
    };
    if verdicts.is_empty() {
        return fail(1, format!("reaper tracks nothing for owner {owner:?} and no lookup finds anything"));
    }
    let pass = verdicts.iter().all(|v| v.verdict == "PASS");
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "owner": owner, "result": if pass { "PASS" } else { "FAIL" }, "resources": verdicts })).expect("serializable"));
    } else {
        for v in &verdicts {
            println!("{:<8} {:<20} {:<40} {}", v.verdict, v.kind, v.id, v.detail);
        }
        println!("{}: {owner}", if pass { "PASS" } else { "FAIL" });
    }
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `reaper pause` (`reason` given) and `reaper resume` (`None`): the flag in
/// the ledger every replica reads. Needs no worker running.
pub async fn pause(settings: &Settings, reason: Option<&str>) -> ExitCode {
    let ledger = match crate::ledger::Ledger::from_settings(settings).await {
        Ok(l) => l,
        Err(e) => return fail(3, e),
    };
    if let Err(e) = ledger.migrate().await {
        return fail(3, e);
    }
    let every = std::time::Duration::from_millis(settings.worker.pause_poll_ms);
    let within = crate::domain::human(every);
    let done = match reason {
        Some(reason) => ledger.pause(reason, &who()).await.map(|p| {
            println!(
                "paused since {} ({}); every replica stops starting jobs and sweeps within {within}",
                p.since.to_rfc3339(),
                p.reason
            );
        }),
        None => ledger.resume().await.map(|was| match was {
            Some(p) => println!(
                "resumed (paused since {} by {}); replicas start jobs again within {within}",
                p.since.to_rfc3339(),
                p.by
            ),
            None => println!("was not paused"),
        }),
    };
    ledger.pool().close().await;
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(3, e),
    }
}

/// `reaper cancel JOB | --owner O`: exit 0 when each job ended cancelled or
/// was asked to stop, 1 when one had ended already or does not exist, 3
/// when the ledger could not be reached.
pub async fn cancel(
    settings: &Settings,
    job: Option<uuid::Uuid>,
    owner: Option<&str>,
    reason: &str,
    json: bool,
) -> ExitCode {
    let ledger = match crate::ledger::Ledger::from_settings(settings).await {
        Ok(l) => l,
        Err(e) => return fail(3, e),
    };
    if let Err(e) = ledger.migrate().await {
        return fail(3, e);
    }
    let jobs = match (job, owner) {
        (Some(j), _) => vec![j],
        (None, Some(o)) => match ledger.open_jobs(o).await {
            Ok(j) if j.is_empty() => return fail(1, format!("owner {o:?} has no job that has not ended")),
            Ok(j) => j,
            Err(e) => return fail(3, e),
        },
        (None, None) => return fail(2, "give a job id or --owner"),
    };
    // The results go out at once when the broker answers; else a worker's drainer sends them.
    let names = crate::broker::Names::new(&settings.broker.prefix);
    let link = crate::broker::link::open(settings, &names).await.ok();
    let mut all_ok = true;
    let mut rows = Vec::new();
    for id in jobs {
        let outcome = match ops::cancel(&ledger, link.as_ref().map(|(_, p)| p), &names, id, reason).await {
            Ok(o) => o,
            Err(e) => return fail(3, e),
        };
        let line = match &outcome {
            ops::CancelOutcome::Cancelled { published: true } => "cancelled; its result is published".to_string(),
            ops::CancelOutcome::Cancelled { published: false } => {
                "cancelled; its result waits in the outbox for a worker to send".to_string()
            }
            ops::CancelOutcome::Requested => {
                "running on a worker: it starts no further deletes and ends cancelled (within a lease heartbeat)".into()
            }
            ops::CancelOutcome::Ended { status } => {
                all_ok = false;
                format!("not cancelled: it had ended {status}")
            }
            ops::CancelOutcome::NoSuchJob => {
                all_ok = false;
                "not cancelled: no such job".to_string()
            }
        };
        if !json {
            println!("{id}  {line}");
        }
        rows.push(serde_json::json!({ "job_id": id, "result": outcome }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("serializable"));
    }
    if let Some((conn, publisher)) = link {
        publisher.close().await;
        let _ = conn.close(200, "done".into()).await;
    }
    ledger.pool().close().await;
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Who an operator command says it came from: the user on this host.
fn who() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    format!("reaper-cli ({user})")
}

/// The owners a batch command reads: one per line, blank lines and `#`
/// comments skipped, each once. Every line is checked first, so a typo on
/// line 900 stops the batch before its first owner, not half-way.
pub fn read_owners(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("reading owners from stdin: {e}"))?
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("reading owners from {}: {e}", path.display()))?
    };
    let mut owners: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |why: String| format!("{} line {}: {why}", path.display(), n + 1);
        // A comment starts a line or follows a space: `node/n1#2` is an owner
        // (cut at its `#`, it would name another one).
        let line = line.trim();
        let owner = match line.find(" #").or_else(|| line.find("\t#")) {
            _ if line.starts_with('#') => "",
            Some(i) => line[..i].trim_end(),
            None => line,
        };
        if owner.is_empty() {
            continue;
        }
        if owner.contains(char::is_whitespace) {
            return Err(at(format!("{owner:?} is not one owner (one per line)")));
        }
        crate::contract::check_owner(owner).map_err(|e| at(e.0))?;
        if seen.insert(owner.to_string()) {
            owners.push(owner.to_string());
        }
    }
    if owners.is_empty() {
        return Err(format!("{} lists no owners", path.display()));
    }
    Ok(owners)
}

/// `reaper validate --owners-from FILE`: one line per owner and a summary.
/// Exit 0 when every owner is gone, 1 when one is still there or reaper
/// knows nothing of it, 3 when an owner could not be asked about.
pub async fn validate_many(settings: Settings, file: &std::path::Path, json: bool) -> ExitCode {
    let owners = match read_owners(file) {
        Ok(o) => o,
        Err(e) => return fail(2, e),
    };
    let app = match one_shot(settings).await {
        Ok(a) => a,
        Err(e) => return fail(2, e),
    };
    let (mut gone, mut there, mut unknown, mut nothing, mut errors) = (0, 0, 0, 0, 0);
    let mut rows = Vec::new();
    for owner in &owners {
        let (result, detail, resources) = match ops::validate(&app, owner).await {
            Err(e) => {
                errors += 1;
                ("ERROR", e.to_string(), Vec::new())
            }
            Ok(v) if v.is_empty() => {
                nothing += 1;
                ("NOTHING", "reaper tracks nothing for it and no lookup finds anything".to_string(), v)
            }
            Ok(v) => {
                let left: Vec<String> =
                    v.iter().filter(|x| x.verdict == "FAIL").map(|x| format!("{}/{}", x.kind, x.id)).collect();
                let unsure = v.iter().filter(|x| x.verdict == "UNKNOWN").count();
                if !left.is_empty() {
                    there += 1;
                    ("FAIL", format!("{} of {} still there: {}", left.len(), v.len(), left.join(", ")), v)
                } else if unsure > 0 {
                    unknown += 1;
                    ("UNKNOWN", format!("{unsure} of {} could not be checked", v.len()), v)
                } else {
                    gone += 1;
                    ("PASS", format!("{} resource(s) gone", v.len()), v)
                }
            }
        };
        if !json {
            println!("{result:<8} {owner:<40} {detail}");
        }
        rows.push(serde_json::json!({ "owner": owner, "result": result, "detail": detail, "resources": resources }));
    }
    let summary = format!(
        "{} owner(s): {gone} gone, {there} still there, {unknown} unknown, {nothing} nothing known, {errors} not asked",
        owners.len()
    );
    if json {
        let counts = serde_json::json!({ "gone": gone, "still_there": there, "unknown": unknown, "nothing_known": nothing, "errors": errors });
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "owners": rows, "summary": counts }))
                .expect("serializable")
        );
    } else {
        println!("{summary}");
    }
    match (errors, there + unknown + nothing) {
        (0, 0) => ExitCode::SUCCESS,
        (0, _) => ExitCode::FAILURE,
        _ => ExitCode::from(3),
    }
}

pub async fn plan(settings: Settings, owner: &str, format: PlanFormat) -> ExitCode {
    let app = match one_shot(settings).await {
        Ok(a) => a,
        Err(e) => return fail(2, e),
    };
    let steps = match ops::plan(&app, owner).await {
        Ok(s) => s,
        Err(e) => return fail(3, e),
    };
    // Nothing to plan for an owner reaper never heard of: a typo, most likely.
    if steps.is_empty() {
        match app.ledger.owner_view(owner).await {
            Ok((r, j)) if r.is_empty() && j.is_empty() => {
                return fail(1, format!("reaper knows nothing of owner {owner:?}"))
            }
            Ok(_) => {}
            Err(e) => return fail(3, e),
        }
    }
    match format {
        PlanFormat::Json => println!("{}", serde_json::to_string_pretty(&steps).expect("serializable")),
        PlanFormat::Sh => print!("{}", ops::script(&app.settings, owner, &steps)),
        PlanFormat::Table => {
            if steps.is_empty() {
                println!("nothing left of {owner}");
            }
            let width = steps.iter().map(|s| s.id.len()).max().unwrap_or(0).max(2);
            for s in &steps {
                println!("level {}  {:<20} {:<width$}  {}", s.level, s.kind, s.id, s.request);
            }
        }
    }
    ExitCode::SUCCESS
}

/// `reaper track`: one resource.tracked, confirmed by the broker.
pub async fn track(
    settings: &Settings,
    owner: &str,
    kind: &str,
    id: &str,
    attributes: &std::collections::BTreeMap<String, String>,
) -> ExitCode {
    // The kinds only: no provider is built (its secrets need not be here).
    let catalog = match crate::catalog::validate(settings) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    send_one(settings, |publisher, names| async move {
        ops::track(&publisher, &names, &catalog, owner, kind, id, attributes).await
    })
    .await
}

/// `reaper provisioning-failed`: one provisioning.failed, confirmed by the broker.
pub async fn provisioning_failed(
    settings: &Settings,
    owner: &str,
    error: &str,
    step: Option<&str>,
    resources: &[(String, String)],
) -> ExitCode {
    let catalog = match crate::catalog::validate(settings) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    send_one(settings, |publisher, names| async move {
        ops::provisioning_failed(&publisher, &names, &catalog, owner, error, step, resources).await
    })
    .await
}

/// Opens a link, sends one event, closes, and prints the event's id: exit 2
/// for an event that cannot be sent as asked, 3 for a broker that failed.
async fn send_one<F, Fut>(settings: &Settings, send: F) -> ExitCode
where
    F: FnOnce(crate::broker::publisher::Publisher, crate::broker::Names) -> Fut,
    Fut: std::future::Future<Output = Result<String, ops::OpsError>>,
{
    let names = crate::broker::Names::new(&settings.broker.prefix);
    let (conn, publisher) = match crate::broker::link::open(settings, &names).await {
        Ok(link) => link,
        Err(e) => return fail(3, e),
    };
    let sent = send(publisher.clone(), names).await;
    publisher.close().await;
    let _ = conn.close(200, "sent".into()).await;
    match sent {
        Ok(event_id) => {
            println!("{event_id}");
            ExitCode::SUCCESS
        }
        Err(ops::OpsError::Invalid(m)) => fail(2, m),
        Err(e) => fail(3, e),
    }
}

/// Says so when the ledger knows nothing of the owner yet: most often a
/// typo. The deletion is sent all the same: its tracks may still be queued
/// (the ledger would record them late and the deletion tears them down), and
/// a kind with a lookup may find resources by owner. Never stops the send:
/// an unreachable ledger only skips the note.
async fn note_unknown_owner(settings: &Settings, owner: &str) {
    let Ok(ledger) = crate::ledger::Ledger::from_settings(settings).await else { return };
    let known = ledger.owner_view(owner).await;
    ledger.pool().close().await;
    if let Ok((r, j)) = known {
        if r.is_empty() && j.is_empty() {
            eprintln!(
                "note: reaper knows nothing of owner {owner:?} yet (nothing tracked, no job); the deletion is \
                 sent, and tears down what is tracked for it by the time it runs or comes in late"
            );
        }
    }
}

pub async fn request_deletion(settings: &Settings, owner: &str, dry_run: bool, reason: &str) -> ExitCode {
    if let Err(e) = crate::contract::check_owner(owner) {
        return fail(2, e.0);
    }
    note_unknown_owner(settings, owner).await;
    send_one(settings, |publisher, names| async move {
        ops::request_deletion(&publisher, &names, owner, dry_run, reason, "reaper-cli").await
    })
    .await
}

/// `reaper request-deletion --owners-from FILE`: every owner checked, then
/// one deletion each over one link, each printed with its event id as the
/// broker confirms it. A broker that fails half-way stops the batch and says
/// which owners were not sent: sending the file again is harmless (an
/// owner already torn down completes with nothing left).
pub async fn request_deletions(
    settings: &Settings,
    file: &std::path::Path,
    dry_run: bool,
    reason: &str,
    max: usize,
) -> ExitCode {
    let owners = match read_owners(file) {
        Ok(o) => o,
        Err(e) => return fail(2, e),
    };
    // A brake, as reconcile's max_count: the wrong file (every node, say)
    // must not tear a fleet down in one command.
    if owners.len() > max {
        return fail(
            2,
            format!(
                "{} lists {} owners, more than --max {max}; nothing was sent (look at the file, then give --max {})",
                file.display(),
                owners.len(),
                owners.len()
            ),
        );
    }
    let mut unknown = 0;
    if let Ok(ledger) = crate::ledger::Ledger::from_settings(settings).await {
        for owner in &owners {
            if matches!(ledger.owner_view(owner).await, Ok((r, j)) if r.is_empty() && j.is_empty()) {
                unknown += 1;
            }
        }
        ledger.pool().close().await;
    }
    if unknown > 0 {
        eprintln!(
            "note: reaper knows nothing yet of {unknown} of the {} owners (nothing tracked, no job); lookups may still find their resources",
            owners.len()
        );
    }
    let names = crate::broker::Names::new(&settings.broker.prefix);
    let (conn, publisher) = match crate::broker::link::open(settings, &names).await {
        Ok(link) => link,
        Err(e) => return fail(3, format!("{e}; nothing was sent")),
    };
    let mut sent = 0;
    let mut failure = None;
    for owner in &owners {
        match ops::request_deletion(&publisher, &names, owner, dry_run, reason, "reaper-cli").await {
            Ok(event_id) => {
                println!("{owner}\t{event_id}");
                sent += 1;
            }
            Err(e) => {
                failure = Some(format!("sending the deletion of {owner} failed: {e}"));
                break;
            }
        }
    }
    publisher.close().await;
    let _ = conn.close(200, "sent".into()).await;
    let what = if dry_run { "dry-run deletion request(s)" } else { "deletion request(s)" };
    eprintln!("sent {sent} of {} {what}", owners.len());
    match failure {
        None => ExitCode::SUCCESS,
        Some(e) => {
            let rest = owners[sent..].join(" ");
            fail(3, format!("{e}; not sent: {rest}"))
        }
    }
}
