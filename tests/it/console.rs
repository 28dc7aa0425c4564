//! The operator console over HTTP (the browser tests are in browser.rs):
//! access, CSRF, and the replay preview, asynchronous replay and trace
//! context the console is built on, through the API and the CLI too.

use std::time::Duration;

use chrono::Utc;
use reaper::devtools::demo::VpcNode;
use reaper::devtools::sim::Faults;
use serde_json::Value;

use crate::helpers::*;

const TOKEN: &str = "console-tok-51c2e8";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Logs in and returns the session cookie (`name=value`) and the raw Set-Cookie.
async fn login(c: &reqwest::Client, base: &str, extra: &[(&str, &str)]) -> (String, String) {
    let mut req = c.post(format!("{base}/ui/login")).form(&[("token", TOKEN), ("next", "/ui/dead")]);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 303, "a right token logs in");
    assert_eq!(r.headers()["location"], "/ui/dead", "and goes where it was asked");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    (set.split(';').next().unwrap().to_string(), set)
}

/// The CSRF token a page's forms carry.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a form with a CSRF token");
    html[at + 19..].split('"').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_needs_a_session_and_every_form_its_csrf_token() {
    let (t, base, _file) = spawn_with_admin("", TOKEN).await;
    let c = no_redirects();

    // No session: pages send to the login form, forms are refused.
    let r = c.get(format!("{base}/ui/dead?class=permanent")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/login?next=%2Fui%2Fdead%3Fclass%3Dpermanent");
    let r = c.post(format!("{base}/ui/pause")).form(&[("reason", "x")]).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // A wrong token: no cookie.
    let r = c
        .post(format!("{base}/ui/login"))
        .form(&[("token", "console-tok-51c2e"), ("next", "/ui")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // A forged or foreign `next` goes to the overview, never elsewhere.
    let r = c
        .post(format!("{base}/ui/login"))
        .form(&[("token", TOKEN), ("next", "https://evil.example/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/ui");

    let (cookie, set) = login(&c, &base, &[]).await;
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    assert!(!set.contains("Secure"), "plain HTTP: no Secure flag ({set})");
    let (_, behind_tls) = login(&c, &base, &[("x-forwarded-proto", "https")]).await;
    assert!(behind_tls.contains("; Secure"), "behind a TLS-terminating proxy: Secure ({behind_tls})");

    let page = c.get(format!("{base}/ui")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["cache-control"], "no-store");
    let html = page.text().await.unwrap();
    assert!(html.contains("Jobs by state"), "{html}");
    let csrf = csrf_of(&html);

    // A state-changing form without its token, or with another session's: refused, nothing changed.
    let r = c.post(format!("{base}/ui/pause")).header("cookie", &cookie).form(&[("reason", "x")]).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let (other, _) = login(&c, &base, &[]).await;
    let other_page = c.get(format!("{base}/ui")).header("cookie", &other).send().await.unwrap().text().await.unwrap();
    let other_csrf = csrf_of(&other_page);
    assert_ne!(other_csrf, csrf);
    let r = c
        .post(format!("{base}/ui/pause"))
        .header("cookie", &cookie)
        .form(&[("reason", "x"), ("csrf", other_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(t.app.ledger.paused().await.unwrap().is_none(), "no refused form paused reaper");

    // With its token it acts, as `reaper pause` would.
    let r = c
        .post(format!("{base}/ui/pause"))
        .header("cookie", &cookie)
        .form(&[("reason", "console test"), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let paused = t.app.ledger.paused().await.unwrap().expect("paused from the console");
    assert_eq!((paused.reason.as_str(), paused.by.as_str()), ("console test", "console"));
    let r = c
        .post(format!("{base}/ui/resume"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(t.app.ledger.paused().await.unwrap().is_none());

    // A tampered cookie is no session; logging out ends the session, also
    // for whoever kept a copy of the cookie.
    let last = if cookie.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{last}", &cookie[..cookie.len() - 1]);
    let r = c.get(format!("{base}/ui")).header("cookie", &tampered).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let r = c
        .post(format!("{base}/ui/logout"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let r = c.get(format!("{base}/ui")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 303, "the copy of a logged-out cookie is no session");
    let r = c.get(format!("{base}/ui")).header("cookie", &other).send().await.unwrap();
    assert_eq!(r.status(), 200, "another session goes on");

    // The API keeps its bearer token, and a session cookie is not one.
    let api = c.get(format!("{base}/v1/status")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(api.status(), 200);
    let api = c.get(format!("{base}/v1/status")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(api.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_previewed_per_job_then_run_in_the_background_with_its_progress_readable() {
    let (mut t, base, _file) = spawn_with_admin("", TOKEN).await;
    let c = reqwest::Client::new();
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.sim.set_faults(Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
    t.publish("deletion.requested", &deletion(&unique("replay-ev"), &node.owner, Utc::now())).await;
    let dead = t.next_result(30).await;
    assert_eq!(dead.result.status, "dead_lettered");
    let still_there = t.sim.paths().len();
    assert!(still_there > 0);
    let deletes_before = t.sim.stats().deletes;

    // The preview lists, per job, what a replay would ask to delete again.
    let preview: Value = c
        .post(format!("{base}/v1/dead/replay"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "owner": node.owner, "dry_run": true }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let resources = preview["preview"][0]["resources"].as_array().unwrap_or_else(|| panic!("{preview}"));
    assert_eq!(resources.len(), still_there, "{preview}");
    let listed: Vec<String> = resources.iter().map(|r| format!("{}/{}", r["kind"], r["id"]).replace('"', "")).collect();
    let out = t.reaper(&["replay", "--owner", &node.owner, "--dry-run"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for r in &listed {
        assert!(text.contains(&format!("would delete again: {r}")), "the CLI lists {r}: {text}");
    }
    assert_eq!(t.sim.stats().deletes, deletes_before, "a preview deletes nothing");
    assert_eq!(t.count("SELECT count(*) FROM replays").await, 0, "a preview records no replay");

    // Asynchronous: 202 with an id at once, then its progress until the job completed.
    let r = c
        .post(format!("{base}/v1/dead/replay"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "owner": node.owner, "async": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let started: Value = r.json().await.unwrap();
    let id = started["replay_id"].as_str().unwrap().to_string();
    assert_eq!(started["matched"], 1);
    assert_eq!(t.next_result(30).await.result.status, "completed");
    let url = format!("{base}/v1/replays/{id}");
    let mut run = Value::Null;
    for _ in 0..150 {
        run = c.get(&url).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
        if run["state"] == "finished" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run["state"], "finished", "within 15 s: {run}");
    assert_eq!(run["reopened"], 1, "{run}");
    assert_eq!(run["jobs"]["completed"], 1, "{run}");
    assert_eq!(run["requested_by"], "admin-api");
    let out = t.reaper(&["replay", "--status", &id], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("(finished)") && text.contains("1 reopened"), "{text}");
    let list: Value =
        c.get(format!("{base}/v1/replays")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["replays"][0]["replay_id"], id.as_str());
    assert!(t.sim.paths().is_empty());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_traceparent_follows_the_job_to_its_result_and_the_ledger() {
    let (mut t, base, _file) = spawn_with_admin("", TOKEN).await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.sim.set_faults(Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let ev = unique("traced");
    let body = serde_json::to_vec(&deletion(&ev, &node.owner, Utc::now())).unwrap();
    t.publisher.publish(&t.app.names.events, "deletion.requested", &body, &ev, &[("traceparent", tp)]).await.unwrap();
    let dead = t.next_result(30).await;
    assert_eq!(dead.result.status, "dead_lettered");
    assert_eq!(dead.traceparent.as_deref(), Some(tp), "the result carries the producer's trace");
    let dead_copy = t.dead_headers(1).await;
    assert_eq!(dead_copy[0].1.get("traceparent").map(String::as_str), Some(tp), "so does the dead copy");
    let job: Value = reqwest::Client::new()
        .get(format!("{base}/v1/jobs/{}", dead.result.job_id))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["traceparent"], tp, "{job}");
    // Replayed, the event goes out again with it: the new result carries it too.
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/dead/replay"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "job": dead.result.job_id }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let again = t.next_result(30).await;
    assert_eq!((again.result.status.as_str(), again.traceparent.as_deref()), ("completed", Some(tp)));

    // A malformed one is not carried anywhere.
    let node2 = VpcNode::new(&unique("node"));
    t.provision(&node2).await;
    let ev2 = unique("badtrace");
    let body = serde_json::to_vec(&deletion(&ev2, &node2.owner, Utc::now())).unwrap();
    t.publisher
        .publish(&t.app.names.events, "deletion.requested", &body, &ev2, &[("traceparent", "00-zz-\nx-01")])
        .await
        .unwrap();
    let done = t.next_result(30).await;
    assert_eq!(done.result.status, "completed");
    assert_eq!(done.traceparent, None);
    t.stop().await;
}

/// The value of a form field in a page.
fn field(html: &str, name: &str) -> String {
    let key = format!("name=\"{name}\" value=\"");
    let at = html.find(&key).unwrap_or_else(|| panic!("no field {name} in {html}"));
    html[at + key.len()..].split('"').next().unwrap().replace("&amp;", "&").replace("&quot;", "\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_replay_replays_what_its_preview_showed_and_nothing_dead_lettered_since() {
    let (mut t, base, _file) = spawn_with_admin("", TOKEN).await;
    let c = no_redirects();
    let (first, later) = (VpcNode::new(&unique("node")), VpcNode::new(&unique("node")));
    for n in [&first, &later] {
        t.provision(n).await;
    }
    let fail = || Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() };
    t.sim.set_faults(fail());
    t.publish("deletion.requested", &deletion(&unique("a"), &first.owner, Utc::now())).await;
    assert_eq!(t.next_result(30).await.result.status, "dead_lettered");

    let (cookie, _) = login(&c, &base, &[]).await;
    let preview = c.get(format!("{base}/ui/replay?class=permanent")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(preview.status(), 200);
    let html = preview.text().await.unwrap();
    assert!(html.contains(&first.owner) && html.contains("Replay 1 job"), "{html}");

    // Another job is dead-lettered while the operator reads the preview.
    t.sim.set_faults(fail());
    t.publish("deletion.requested", &deletion(&unique("b"), &later.owner, Utc::now())).await;
    assert_eq!(t.next_result(30).await.result.status, "dead_lettered");

    let mut form: Vec<(String, String)> = ["csrf", "jobs"].iter().map(|n| (n.to_string(), field(&html, n))).collect();
    // Without the tick: refused, nothing replayed.
    let r = c.post(format!("{base}/ui/replay")).header("cookie", &cookie).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(t.app.ledger.dead_jobs(&Default::default()).await.unwrap().len(), 2);
    form.push(("confirm".to_string(), "yes".to_string()));
    let r = c.post(format!("{base}/ui/replay")).header("cookie", &cookie).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(t.next_result(30).await.result.owner, first.owner, "the previewed job ran again");
    let still_dead = t.app.ledger.dead_jobs(&Default::default()).await.unwrap();
    assert_eq!(still_dead.len(), 1);
    assert_eq!(still_dead[0].owner, later.owner, "the job dead-lettered after the preview was not replayed");
    let run = t.app.ledger.replay_runs(None, 1).await.unwrap().pop().unwrap();
    assert_eq!((run.matched, run.requested_by.as_str()), (1, "console"));
    t.stop().await;
}

/// Every POST route of the console, from its source, with sample values.
fn console_posts() -> Vec<String> {
    let source = include_str!("../../src/console/mod.rs");
    let mut out: Vec<String> = source
        .lines()
        .filter(|l| l.contains("post("))
        .filter_map(|l| l.trim().strip_prefix(".route(\""))
        .map(|l| l.split('"').next().unwrap().to_string())
        .map(|p| {
            p.replace("{rule}", "models")
                .replace("{id}", "6f1c2a52-8f0e-4f7e-9d3b-1a2b3c4d5e6f")
                .replace("{owner}", "node%2Fx")
        })
        .collect();
    out.push("/ui/login".into());
    assert!(out.len() >= 8, "{out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_form_wants_a_session_and_its_csrf_token_and_changes_nothing_without() {
    let (t, base, _file) = spawn_with_admin("", TOKEN).await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    let c = no_redirects();
    let (cookie, _) = login(&c, &base, &[]).await;
    let form =
        [("reason", "x"), ("action", "execute"), ("confirm", "yes"), ("jobs", "6f1c2a52-8f0e-4f7e-9d3b-1a2b3c4d5e6f")];
    for path in console_posts().iter().filter(|p| *p != "/ui/login") {
        let none = c.post(format!("{base}{path}")).form(&form).send().await.unwrap().status();
        assert_eq!(none, 401, "POST {path} without a session");
        let no_csrf = c.post(format!("{base}{path}")).header("cookie", &cookie).form(&form).send().await.unwrap();
        assert_eq!(no_csrf.status(), 403, "POST {path} without the CSRF token");
        let json = c.post(format!("{base}{path}")).header("cookie", &cookie).json(&serde_json::json!({})).send().await;
        assert_eq!(json.unwrap().status(), 403, "POST {path} with a JSON body");
    }
    assert!(t.app.ledger.paused().await.unwrap().is_none());
    assert_eq!(t.count("SELECT count(*) FROM jobs").await, 0);
    assert_eq!(t.count("SELECT count(*) FROM replays").await, 0);
    assert_eq!(t.sim.stats().deletes, 0);

    // A wrong token is answered after a second; the right one at once, and
    // no number of wrong ones locks an operator out.
    for _ in 0..3 {
        let asked = std::time::Instant::now();
        let r = c.post(format!("{base}/ui/login")).form(&[("token", "guess")]).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().get("set-cookie").is_none());
        assert!(asked.elapsed() >= Duration::from_millis(900), "{:?}", asked.elapsed());
    }
    let r = c.post(format!("{base}/ui/login")).form(&[("token", TOKEN)]).send().await.unwrap();
    assert_eq!(r.status(), 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_producers_and_apis_wrote_is_shown_as_text_never_as_markup() {
    let (mut t, base, _file) = spawn_with_admin("", TOKEN).await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.sim.set_faults(Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
    let mut ev = deletion(&unique("xss"), &node.owner, Utc::now());
    ev["reason"] = serde_json::json!("<script>alert(1)</script>\"><img src=x onerror=alert(2)>");
    t.publish("deletion.requested", &ev).await;
    let dead = t.next_result(30).await.result;
    let c = no_redirects();
    let (cookie, _) = login(&c, &base, &[]).await;
    for path in [format!("/ui/jobs/{}", dead.job_id), "/ui/dead".to_string()] {
        let html = c.get(format!("{base}{path}")).header("cookie", &cookie).send().await.unwrap().text().await.unwrap();
        assert!(!html.contains("<script>alert") && !html.contains("<img src=x"), "{path}: {html}");
    }
    let job = c.get(format!("{base}/ui/jobs/{}", dead.job_id)).header("cookie", &cookie).send().await.unwrap();
    let html = job.text().await.unwrap();
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "shown, escaped: {html}");
}
