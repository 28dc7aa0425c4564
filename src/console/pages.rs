//! The console's pages, rendered on the server (maud escapes every value).
//! Readable without JavaScript: the only moving page, a replay's progress,
//! refreshes itself with a meta tag.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use super::session::Session;
use super::UiFilter;
use crate::app::App;
use crate::ledger::archive::Archived;
use crate::ledger::replay::{DeadFilter, DeadJob, ReplayRun};
use crate::ledger::views::{JobView, RecentActivity, StatusCounts, StepView};
use crate::ops::{OwnerView, Verdict};
use crate::reconcile::Report;
use crate::replay::Summary;
use crate::restore::RestoreReport;

/// Rows a list shows; the count says how many matched.
pub const MAX_ROWS: usize = 200;

/// Jobs a replay preview (and so a replay from the console) may hold.
pub const MAX_PREVIEW: usize = 500;

pub const STYLE: &str = include_str!("style.css");

const CLASSES: [&str; 5] = ["permanent", "exhausted", "plan", "blocked", "poison"];

fn layout(title: &str, refresh: Option<u32>, nav: Option<&Session>, body: Markup) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                @if let Some(secs) = refresh { meta http-equiv="refresh" content=(secs); }
                title { (title) " · reaper" }
                link rel="stylesheet" href="/ui/style.css";
            }
            body {
                @if let Some(s) = nav {
                    nav {
                        a.brand href="/ui" { "reaper" }
                        a href="/ui" { "Overview" }
                        a href="/ui/dead" { "Dead letters" }
                        a href="/ui/reconcile" { "Reconcile" }
                        form.inline method="get" action="/ui/owner" {
                            input type="text" name="owner" placeholder="owner, e.g. node/n1" aria-label="owner";
                            button type="submit" { "Open owner" }
                        }
                        form.inline.right method="post" action="/ui/logout" {
                            (csrf(s))
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    page.into_response()
}

fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// A page with one message, and the status it is served with.
pub fn message(status: StatusCode, title: &str, text: &str) -> Response {
    let mut resp =
        layout(title, None, None, html! { p.message { (text) } p { a href="/ui" { "Back to the overview" } } });
    *resp.status_mut() = status;
    resp
}

/// What a page could not read: the ledger (or the broker) failed.
pub fn failed(e: &dyn std::fmt::Display) -> Response {
    message(StatusCode::SERVICE_UNAVAILABLE, "Could not load this page", &e.to_string())
}

pub fn login(configured: bool, next: &str, error: Option<&str>) -> Response {
    layout(
        "Log in",
        None,
        None,
        html! {
            @if !configured {
                p.message { "No admin token is configured, so nobody can log in: set admin.token_env (REAPER_ADMIN_TOKEN) or admin.token_file and restart." }
            } @else {
                @if let Some(e) = error { p.error { (e) } }
                form method="post" action="/ui/login" {
                    input type="hidden" name="next" value=(next);
                    label for="token" { "Admin token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Log in" }
                }
                p.hint { "The same token the /v1 API takes as a bearer token. The session lasts admin.session_hours." }
            }
        },
    )
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn opt_time(t: &Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.as_ref().map(time).unwrap_or_else(|| "-".into())
}

const PATH_SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// The owner page's address: the owner in one path segment (its slash encoded).
pub fn owner_href(owner: &str) -> String {
    format!("/ui/owners/{}", segment(owner))
}

/// A value as one path segment or query value.
fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, PATH_SEGMENT).to_string()
}

fn owner_link(owner: &str) -> Markup {
    html! { a href=(owner_href(owner)) { (owner) } }
}

fn job_link(id: &uuid::Uuid) -> Markup {
    html! { a.mono href=(format!("/ui/jobs/{id}")) { (id) } }
}

fn status(s: &str) -> Markup {
    html! { span class=(format!("status {s}")) { (s) } }
}

pub fn overview(
    s: &Session,
    app: &App,
    counts: &StatusCounts,
    recent: &RecentActivity,
    rate: Option<f64>,
    database: bool,
) -> Response {
    let consuming = app.is_ready();
    let body = html! {
        @if let Some(p) = &counts.paused {
            div.banner.paused {
                "Paused since " (time(&p.since)) " by " (p.by) ": " (p.reason) ". No job deletes anything and no sweep runs."
                form.inline method="post" action="/ui/resume" { (csrf(s)) button type="submit" { "Resume" } }
            }
        }
        section.cards {
            div.card {
                h2 { "Readiness" }
                p { "Consuming: " (yes_no(consuming)) }
                p { "Database: " (yes_no(database)) }
                p.hint { "This replica; other replicas answer their own /readyz." }
            }
            div.card {
                h2 { "Jobs by state" }
                table { @for (k, n) in &counts.jobs { tr { td { (status(k)) } td.num { (n) } } } }
                p { "Owners tracked: " (counts.owners_tracked) }
            }
            div.card {
                h2 { "Traffic" }
                p { "Events per second (this replica): "
                    @match rate { Some(r) => { (format!("{r:.1}")) }, None => { "measuring; reload" } } }
                p { "Teardown jobs opened in the last 5 minutes: " (recent.jobs_5m) }
                p { "Outbox backlog: " (counts.outbox_backlog) }
            }
            div.card {
                h2 { "Dead letters by class" }
                table {
                    tr { th { "class" } th { "last hour" } th { "last day" } }
                    @for (class, day) in &recent.dead_day {
                        tr {
                            td { a href=(format!("/ui/dead?class={}", segment(class))) { (class) } }
                            td.num { (recent.dead_hour.get(class).copied().unwrap_or(0)) }
                            td.num { (day) }
                        }
                    }
                }
                @if recent.dead_day.is_empty() { p { "None in the last day." } }
                p { a href="/ui/dead" { "All dead letters" } }
            }
        }
        section {
            h2 { "Reconcile rules" }
            (rules_table(app, counts))
        }
        @if counts.paused.is_none() {
            section {
                h2 { "Pause" }
                form method="post" action="/ui/pause" {
                    (csrf(s))
                    input type="text" name="reason" placeholder="why (shown to everyone)" aria-label="reason";
                    button type="submit" { "Pause every replica" }
                }
                p.hint { "Same as reaper pause / POST /v1/pause: deliveries wait in the retry queue, nothing is deleted, no sweep runs." }
            }
        }
    };
    layout("Overview", None, Some(s), body)
}

fn yes_no(b: bool) -> Markup {
    html! { @if b { span.ok { "yes" } } @else { span.bad { "no" } } }
}

fn rules_table(app: &App, counts: &StatusCounts) -> Markup {
    html! {
        @if app.settings.reconcile.rules.is_empty() { p { "No rules are configured." } }
        @else {
            table {
                tr { th { "rule" } th { "schedule" } th { "last sweep" } th { "outcome" } th { "orphans" }
                     th { "younger than the grace" } th { "in quarantine" } th { "actionable" } th { "why refused" } }
                @for (name, rule) in &app.settings.reconcile.rules {
                    @let last = counts.reconcile.get(name).and_then(|r| r.get("last_report")).filter(|r| !r.is_null());
                    tr {
                        td { a href="/ui/reconcile" { (name) } }
                        td { (rule.when()) }
                        td { (last.and_then(|r| r["started_at"].as_str()).unwrap_or("never")) }
                        td { (last.and_then(|r| r["outcome"].as_str()).unwrap_or("-")) }
                        td.num { (last.map(|r| r["orphans"].to_string()).unwrap_or_default()) }
                        td.num { (last.map(|r| r["too_young"].to_string()).unwrap_or_default()) }
                        td.num { (last.map(|r| r["in_quarantine"].to_string()).unwrap_or_default()) }
                        td.num { (last.map(|r| r["actionable"].to_string()).unwrap_or_default()) }
                        td { (last.and_then(|r| r["refused"].as_str()).unwrap_or("")) }
                    }
                }
            }
        }
    }
}

fn filter_query(f: &UiFilter) -> String {
    serde_urlencoded::to_string(f).unwrap_or_default()
}

pub fn dead(
    s: &Session,
    f: &UiFilter,
    jobs: &[DeadJob],
    steps: &std::collections::HashMap<uuid::Uuid, Vec<StepView>>,
    replays: &[ReplayRun],
) -> Response {
    let body = html! {
        form.filters method="get" action="/ui/dead" {
            label { "Class " select name="class" {
                option value="" { "any" }
                @for c in CLASSES { option value=(c) selected[f.class == c] { (c) } }
            } }
            label { "Kind " input type="text" name="kind" value=(f.kind) size="10"; }
            label { "Owner " input type="text" name="owner" value=(f.owner) size="16"; }
            label { "Reason contains " input type="text" name="reason" value=(f.reason) size="16"; }
            label { "Within " input type="text" name="age" value=(f.age) size="5" placeholder="6h"; }
            button type="submit" { "Filter" }
        }
        p {
            (jobs.len()) " dead-lettered job" @if jobs.len() != 1 { "s" } " match."
            @if jobs.len() > MAX_ROWS { " The first " (MAX_ROWS) " are shown." }
            @if !jobs.is_empty() {
                " " a.button href=(format!("/ui/replay?{}", filter_query(f))) { "Preview a replay of these " (jobs.len()) }
            }
        }
        table.dead {
            tr { th { "job" } th { "owner" } th { "class" } th { "reason" } th { "resources" } th { "dead since" } th { "replays" } th {} }
            @for j in jobs.iter().take(MAX_ROWS) {
                tr {
                    td { (job_link(&j.job_id)) }
                    td { (owner_link(&j.owner)) }
                    td { (j.error_class.as_deref().unwrap_or("-")) }
                    td.reason { (j.reason.as_deref().unwrap_or("")) }
                    td {
                        @for st in steps.get(&j.job_id).map(Vec::as_slice).unwrap_or(&[]) {
                            div { span.mono { (st.kind) "/" (st.id) } ": " (status(&st.outcome))
                                @if st.attempts > 1 { " (" (st.attempts) " attempts)" }
                                @if let Some(e) = &st.error { " " span.err { (e) } } }
                        }
                    }
                    td { (opt_time(&j.finished_at)) }
                    td.num { (j.replays) }
                    td { a.button href=(format!("/ui/replay?job={}", j.job_id)) { "Replay…" } }
                }
            }
        }
        @if !replays.is_empty() {
            h2 { "Recent replays" }
            table {
                tr { th { "replay" } th { "started" } th { "by" } th { "state" } th { "matched" } th { "reopened" } }
                @for r in replays {
                    tr {
                        td { a.mono href=(format!("/ui/replays/{}", r.replay_id)) { (r.replay_id) } }
                        td { (time(&r.started_at)) } td { (r.requested_by) } td { (status(r.state)) }
                        td.num { (r.matched) } td.num { (r.reopened) }
                    }
                }
            }
        }
    };
    layout("Dead letters", None, Some(s), body)
}

pub fn replay_preview(s: &Session, filter: &DeadFilter, summary: &Summary) -> Response {
    let unfiltered = filter.is_every_job();
    // A job whose lookups cannot be asked now is left out: nobody can say
    // what it would delete.
    let ids: Vec<String> =
        summary.preview.iter().filter(|p| p.lookup_error.is_none()).map(|p| p.job_id.to_string()).collect();
    let n = ids.len();
    let unknown = summary.preview.len() - n;
    let body = html! {
        @if unfiltered { p.banner.paused { "No filter: this is every dead-lettered job." } }
        p { (summary.matched) " matched; " (n) " would be replayed." }
        @if unknown > 0 {
            p.error { (unknown) " left out: their lookups cannot be asked now, so what they would delete is unknown." }
        }
        @if !summary.held_back.is_empty() {
            p.error { (summary.held_back.len()) " replayed too often already (worker.max_replays): held back for a person to look at." }
        }
        @for p in &summary.preview {
            div.card.job {
                h3 { (job_link(&p.job_id)) " · " (owner_link(&p.owner)) " · " (p.error_class.as_deref().unwrap_or("-")) }
                p.reason { (p.reason.as_deref().unwrap_or("")) }
                @if p.resources.is_empty() {
                    p { "Nothing it claimed is left." }
                } @else {
                    p { "Would ask to delete again:" }
                    ul { @for r in &p.resources { li.mono { (r.kind) "/" (r.id) } } }
                }
                @if p.lookups_pending {
                    p.error { "Its lookups have not run yet: a replay runs them and claims what they find." }
                    @if let Some(e) = &p.lookup_error {
                        p.error { "They cannot be asked now, so this job is left out: " (e) }
                    } @else if p.found_by_lookups.is_empty() {
                        p { "They find nothing more it would claim now." }
                    } @else {
                        p { "They find now, and it would delete too:" }
                        ul { @for r in &p.found_by_lookups { li.mono { (r.kind) "/" (r.id) } } }
                    }
                    @if !p.found_not_claimed.is_empty() {
                        p { "They also find, and it would leave tracked for the owner (not dated to the life this job ends):" }
                        ul { @for r in &p.found_not_claimed { li.mono { (r.kind) "/" (r.id) } } }
                    }
                }
            }
        }
        @if n > 0 {
            form.confirm method="post" action="/ui/replay" {
                (csrf(s))
                input type="hidden" name="jobs" value=(ids.join(","));
                label { input type="checkbox" name="confirm" value="yes" required; " I have read what these jobs will delete" }
                button.danger type="submit" { "Replay " (n) " job" @if n != 1 { "s" } }
            }
            p.hint { "Same as reaper replay --job … and POST /v1/dead/replay {\"jobs\": […], \"async\": true}." }
        }
    };
    layout("Replay preview", None, Some(s), body)
}

pub fn replay_progress(s: &Session, run: &ReplayRun) -> Response {
    let refresh = (run.state == "running").then_some(2);
    let body = html! {
        p { "Replay " span.mono { (run.replay_id) } ", started " (time(&run.started_at)) " by " (run.requested_by) ": " (status(run.state)) }
        table {
            tr { th { "matched" } td.num #matched { (run.matched) } }
            tr { th { "reopened" } td.num #reopened { (run.reopened) } }
            @for (st, n) in &run.jobs { tr { th { "now " (status(st)) } td.num id=(format!("jobs-{st}")) { (n) } } }
        }
        @if !run.job_ids.is_empty() {
            h2 { "Jobs" }
            ul { @for j in &run.job_ids { li { (job_link(j)) } } }
        }
        @if let Some(summary) = &run.summary {
            details { summary { "Summary" } pre { (serde_json::to_string_pretty(summary).unwrap_or_default()) } }
        }
        @if refresh.is_some() { p.hint { "This page reloads every 2 seconds until the replay has finished." } }
    };
    layout("Replay", refresh, Some(s), body)
}

pub fn owner(s: &Session, owner: &str, v: &OwnerView) -> Response {
    let mut lives: Vec<Option<uuid::Uuid>> = v.resources.iter().map(|r| r.job_id).collect();
    lives.sort();
    lives.dedup();
    let body = html! {
        p.mono { (owner) }
        p {
            a.button href=(format!("{}/validate", owner_href(owner))) { "Validate (ask each provider)" }
            " "
            a.button href=(format!("{}/script", owner_href(owner))) { "Fallback script" }
        }
        @if v.resources.is_empty() && v.jobs.is_empty() { p.message { "reaper knows nothing of this owner." } }
        h2 { "Tracked resources by life" }
        @for life in &lives {
            h3 {
                @match life {
                    None => { "Current life (not claimed by any teardown)" },
                    Some(j) => { "Ended by job " (job_link(j))
                        @if let Some(job) = v.jobs.iter().find(|x| x.job_id == *j) { " (" (status(&job.status)) ")" } },
                }
            }
            table {
                tr { th { "kind" } th { "id" } th { "state" } th { "tracked" } th { "waits on" } }
                @for r in v.resources.iter().filter(|r| r.job_id == *life) {
                    tr {
                        td { (r.kind) } td.mono { (r.id) } td { (status(&r.state)) } td { (time(&r.tracked_at)) }
                        td.waits { (v.waits.get(&(r.kind.clone(), r.id.clone())).map(String::as_str).unwrap_or("")) }
                    }
                }
            }
        }
        h2 { "Jobs" }
        ol.timeline {
            @for j in &v.jobs {
                li {
                    (time(&j.started_at)) " " (j.trigger) " " (job_link(&j.job_id)) " " (status(&j.status))
                    @if let Some(f) = &j.finished_at { " ended " (time(f)) }
                    @if let Some(c) = &j.error_class { " · " (c) }
                    @if let Some(r) = &j.reason { div.reason { (r) } }
                }
            }
        }
        h2 { "Plan: what a teardown would do now" }
        @match &v.plan {
            Ok(steps) if steps.is_empty() => { p { "Nothing is left to delete." } },
            Ok(steps) => {
                table {
                    tr { th { "level" } th { "kind" } th { "id" } th { "request" } }
                    @for st in steps { tr { td.num { (st.level) } td { (st.kind) } td.mono { (st.id) } td.mono { (st.request) } } }
                }
            },
            Err(e) => { p.error { (e) } },
        }
    };
    layout("Owner", None, Some(s), body)
}

pub fn validate(s: &Session, owner: &str, verdicts: &[Verdict]) -> Response {
    let pass = !verdicts.is_empty() && verdicts.iter().all(|v| v.verdict == "PASS");
    let body = html! {
        p { (owner_link(owner)) ": " @if verdicts.is_empty() { "reaper tracks nothing for this owner." } @else { (status(if pass { "PASS" } else { "FAIL" })) } }
        table {
            tr { th { "kind" } th { "id" } th { "ledger" } th { "verdict" } th { "detail" } }
            @for v in verdicts { tr { td { (v.kind) } td.mono { (v.id) } td { (v.state) } td { (status(v.verdict)) } td { (v.detail) } } }
        }
        p.hint { "Same as reaper validate / GET /v1/owners/{owner}/validate." }
    };
    layout("Validate", None, Some(s), body)
}

pub fn reconcile_rules(s: &Session, app: &App, counts: &StatusCounts) -> Response {
    let body = html! {
        (rules_table(app, counts))
        @for (name, rule) in &app.settings.reconcile.rules {
            div.card {
                h2 { (name) }
                p { (rule.when()) "; grace " (crate::domain::human(std::time::Duration::from_secs_f64(rule.grace_secs)))
                    ", quarantine " (rule.quarantine_sweeps) " sweep(s), brakes: at most " (rule.max_count) " and "
                    (format!("{:.0}%", rule.max_fraction * 100.0)) " of the copy" }
                form.inline method="post" action=(format!("/ui/reconcile/{}", segment(name))) {
                    (csrf(s))
                    input type="hidden" name="action" value="dry_run";
                    button type="submit" { "Dry run" }
                }
                p.hint { "A dry run changes nothing; its report offers the Execute button." }
            }
        }
    };
    layout("Reconcile", None, Some(s), body)
}

pub fn reconcile_report(s: &Session, rule: &str, r: &Report) -> Response {
    let body = html! {
        p { "Rule " b { (rule) } ", sweep " (r.sweep) ": " (status(r.outcome.as_str())) @if r.dry_run { " (dry run)" } }
        @if let Some(why) = &r.refused { p.error #refused { "Refused: " (why) } }
        table {
            tr { th { "truth" } td.num { (r.truth.map(|t| t.to_string()).unwrap_or_else(|| "-".into())) } }
            tr { th { "copy" } td.num { (r.copy) } }
            tr { th { "excluded by filters" } td.num { (r.excluded) } }
            tr { th { "orphans" } td.num { (r.orphans) } }
            tr { th { "younger than the grace" } td.num { (r.too_young) } }
            tr { th { "in quarantine" } td.num { (r.in_quarantine) } }
            tr { th { "actionable" } td.num #actionable { (r.actionable) } }
            tr { th { "already requested" } td.num { (r.already_requested) } }
            tr { th { "teardowns published" } td.num { (r.published) } }
        }
        @if !r.sample_actionable.is_empty() { p { "Actionable, first few: " span.mono { (r.sample_actionable.join(", ")) } } }
        @if !r.sample_waiting.is_empty() { p { "Waiting, first few: " span.mono { (r.sample_waiting.join(", ")) } } }
        @let refused = r.outcome == crate::reconcile::Outcome::Refused;
        @if (r.dry_run || refused) && r.actionable > 0 {
            form.confirm method="post" action=(format!("/ui/reconcile/{}", segment(rule))) {
                (csrf(s))
                input type="hidden" name="action" value="execute";
                label { input type="checkbox" name="confirm" value="yes" required;
                    " Tear down the " (r.actionable) " actionable orphan" @if r.actionable != 1 { "s" } " (the sweep counts again when it runs)" }
                details open[refused && !r.dry_run] {
                    summary { "Go past the brakes (--force)" }
                    label { input type="checkbox" name="force" value="yes"; " force: ignore max_count and max_fraction" }
                    label { " and type FORCE: " input type="text" name="force_word" size="6" autocomplete="off"; }
                }
                button.danger type="submit" { "Execute: tear down " (r.actionable) }
            }
        }
        p { a href="/ui/reconcile" { "Back to the rules" } }
        p.hint { "Same as reaper reconcile RULE [--execute [--force]] / POST /v1/reconcile/RULE." }
    };
    layout("Reconcile report", None, Some(s), body)
}

pub fn job(s: &Session, v: &JobView, archived: &[Archived]) -> Response {
    let j = &v.job;
    let open = j.status == "running" || j.status == "dead_lettered";
    let body = html! {
        table {
            tr { th { "job" } td.mono { (j.job_id) } }
            tr { th { "owner" } td { (owner_link(&v.owner)) } }
            tr { th { "event" } td.mono { (j.event_id) } }
            tr { th { "trigger" } td { (j.trigger) @if j.dry_run { " (dry run)" } } }
            tr { th { "status" } td #status { (status(&j.status)) } }
            tr { th { "started" } td { (time(&j.started_at)) } }
            tr { th { "finished" } td { (opt_time(&j.finished_at)) } }
            tr { th { "deliveries / failed runs" } td { (j.attempts) " / " (j.failed_runs) } }
            @if let Some(c) = &j.error_class { tr { th { "class" } td { (c) } } }
            @if let Some(r) = &j.reason { tr { th { "why" } td.reason { (r) } } }
            @if let Some(r) = &j.request.reason { tr { th { "asked because" } td { (r) } } }
            @if let Some(r) = &j.request.requested_by { tr { th { "asked by" } td { (r) } } }
            @if let Some(e) = &j.request.error { tr { th { "provisioning error" } td { (e) } } }
            tr { th { "traceparent" } td.mono #traceparent {
                @match (&v.traceparent, j.status.as_str()) {
                    (Some(t), _) => { (t) },
                    (None, "running") => { "recorded when the job ends" },
                    (None, _) => { "none" },
                }
            } }
        }
        @if let Some(event) = &v.event {
            details { summary { "The event" } pre { (serde_json::to_string_pretty(event).unwrap_or_default()) } }
        }
        h2 { "Steps" }
        @if v.steps.is_empty() { p { "None recorded." } }
        @else {
            table {
                tr { th { "kind" } th { "id" } th { "outcome" } th { "attempts" } th { "error" } }
                @for st in &v.steps {
                    tr { td { (st["kind"].as_str().unwrap_or("")) } td.mono { (st["id"].as_str().unwrap_or("")) }
                         td { (status(st["outcome"].as_str().unwrap_or(""))) } td.num { (st["attempts"]) }
                         td.err { (st["error"].as_str().unwrap_or("")) } }
                }
            }
        }
        @if open {
            form.inline method="post" action=(format!("/ui/jobs/{}/cancel", j.job_id)) {
                (csrf(s))
                input type="text" name="reason" placeholder="why cancel" aria-label="reason";
                button.danger type="submit" { "Cancel this job" }
            }
        }
        @if j.status == "dead_lettered" { p { a.button href=(format!("/ui/replay?job={}", j.job_id)) { "Replay…" } } }
        h2 { "Archived records" }
        @if archived.is_empty() { p { "None." } }
        @else {
            p { (archived.len()) " record(s), " (archived.iter().filter(|a| a.restored).count()) " restored." }
            ul { @for a in archived.iter().take(MAX_ROWS) { li.mono { (a.kind) "/" (a.resource_id) @if a.restored { " (restored)" } } } }
            form.inline method="post" action=(format!("/ui/jobs/{}/restore", j.job_id)) {
                (csrf(s))
                input type="hidden" name="dry_run" value="yes";
                button type="submit" { "Restore… (dry run first)" }
            }
        }
        @if let Some(result) = &v.result {
            h2 { "Result" }
            pre { (serde_json::to_string_pretty(result).unwrap_or_default()) }
        }
    };
    layout("Job", None, Some(s), body)
}

pub fn restore_report(s: &Session, id: uuid::Uuid, r: &RestoreReport) -> Response {
    let body = html! {
        p { "Job " (job_link(&id)) @if r.dry_run { ": a dry run, nothing was written." } }
        table {
            tr { th { @if r.dry_run { "would restore" } @else { "restored" } } td.num { (r.restored) } }
            tr { th { "already present" } td.num { (r.already_present) } }
            tr { th { "restored before" } td.num { (r.restored_before) } }
        }
        @for f in &r.failed { p.error { (f) } }
        @for n in &r.not_restorable { p { "Not restorable (deleted through an API): " (n) } }
        @if r.dry_run && r.restored > 0 {
            form.confirm method="post" action=(format!("/ui/jobs/{id}/restore")) {
                (csrf(s))
                label { input type="checkbox" name="confirm" value="yes" required; " Put these " (r.restored) " record(s) back" }
                button type="submit" { "Restore" }
            }
        }
        p.hint { "Same as reaper restore JOB [--dry-run] / POST /v1/jobs/{id}/restore." }
    };
    layout("Restore", None, Some(s), body)
}
