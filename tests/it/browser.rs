//! The console in a real browser: headless Chromium from Debian's packages,
//! driven over WebDriver by chromedriver (`.ci/run` installs both). The
//! WebDriver calls are plain JSON over HTTP, made with reqwest (a handful of
//! endpoints; no client crate needed). Screenshots of every page go to
//! `target/tmp/console-shots/`; docs/operations.md shows them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::Utc;
use reaper::devtools::demo::VpcNode;
use reaper::devtools::sim::Faults;
use serde_json::{json, Value};

use crate::helpers::*;

const TOKEN: &str = "browser-tok-9d41aa";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver and one browser session; both end when it drops.
struct Browser {
    driver: Child,
    http: reqwest::Client,
    session: String,
    shots: PathBuf,
}

impl Browser {
    async fn start() -> Browser {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new(std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed: apt-get install chromium chromium-driver (.ci/run does)");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{base}/status")).send().await.ok();
            let ready = match ready {
                Some(r) => r.json::<Value>().await.ok().is_some_and(|v| v["value"]["ready"] == true),
                None => false,
            };
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not answer on {base} within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                // As root, Chromium runs only without its sandbox.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1360,1000"]
            }
        } } });
        let r: Value = http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let id = r["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no browser session: {r}")).to_string();
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-shots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser { driver, http, session: format!("{base}/session/{id}"), shots }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r: Value = req.send().await.unwrap().json().await.unwrap();
        assert!(r["value"].get("error").is_none(), "WebDriver {method} {path}: {r}");
        r["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None).await.as_str().unwrap().to_string()
    }

    async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None).await.as_str().unwrap().to_string()
    }

    async fn text(&self) -> String {
        let body = self.find("body").await;
        self.call(reqwest::Method::GET, &format!("/element/{body}/text"), None).await.as_str().unwrap().to_string()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .http
            .post(format!("{}/element", self.session))
            .json(&json!({ "using": "css selector", "value": css }))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        match v["value"][ELEMENT].as_str() {
            Some(e) => e.to_string(),
            None => panic!("no element {css} ({v}) on {}:\n{}", self.url().await, self.source().await),
        }
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/click"), Some(json!({}))).await;
    }

    /// Clicks something that loads a new page, and waits until it has: the
    /// old document is marked first, so even a POST answered at the same
    /// address is told apart.
    async fn click_and_load(&self, css: &str) {
        self.script("window.__reaperOld = true").await;
        self.click(css).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let state = self.script("return [window.__reaperOld === true, document.readyState]").await;
            if state[0] == false && state[1] == "complete" {
                return;
            }
            assert!(Instant::now() < deadline, "clicking {css} loaded no new page within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_in(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/clear"), Some(json!({}))).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/value"), Some(json!({ "text": text }))).await;
    }

    async fn script(&self, js: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": js, "args": [] }))).await
    }

    /// Reloads until the page's text holds `what`, or fails saying what it held.
    async fn wait_for_text(&self, what: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text().await;
            if text.contains(what) {
                return text;
            }
            assert!(Instant::now() < deadline, "the page never showed {what:?} within {limit:?}; it shows:\n{text}");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let url = self.url().await;
            self.goto(&url).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn log_in(b: &Browser, base: &str) {
    b.goto(&format!("{base}/ui/dead")).await;
    assert!(b.url().await.contains("/ui/login?next="), "no session: the login page");
    b.screenshot("login").await;
    b.type_in("#token", TOKEN).await;
    b.click_and_load("button[type=submit]").await;
    assert!(b.url().await.ends_with("/ui/dead"), "back where it was going: {}", b.url().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_dead_job_among_others_replays_it_and_sees_it_complete() {
    let (mut t, base, _file) = spawn_with_admin("", TOKEN).await;
    // Three owners dead-lettered: two refused (403), one blocked by a 409 nobody clears.
    let nodes: Vec<VpcNode> = (0..3).map(|_| VpcNode::new(&unique("node"))).collect();
    for n in &nodes {
        t.provision(n).await;
    }
    for (i, n) in nodes.iter().enumerate() {
        t.sim.set_faults(Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
        t.publish("deletion.requested", &deletion(&format!("{}-ev{i}", n.owner), &n.owner, Utc::now())).await;
        assert_eq!(t.next_result(30).await.result.status, "dead_lettered");
    }
    let target = &nodes[1];
    let b = Browser::start().await;
    log_in(&b, &base).await;
    let all = b.text().await;
    assert!(all.contains("3 dead-lettered jobs match"), "{all}");

    // Filter by owner: only the one.
    b.type_in("form.filters input[name=owner]", &target.owner).await;
    b.click_and_load("form.filters button[type=submit]").await;
    let filtered = b.text().await;
    assert!(filtered.contains("1 dead-lettered job match"), "{filtered}");
    assert!(filtered.contains(&target.owner) && !filtered.contains(&nodes[0].owner), "{filtered}");
    b.screenshot("dead-letters").await;

    // Open the job, then preview its replay.
    b.click_and_load("table.dead a.mono").await;
    assert!(b.url().await.contains("/ui/jobs/"));
    let job = b.text().await;
    assert!(job.contains("dead_lettered") && job.contains(&target.owner), "{job}");
    b.screenshot("job").await;
    b.click_and_load("a.button[href^='/ui/replay?job=']").await;
    let preview = b.text().await;
    let left = target.resources.iter().filter(|r| t.sim.exists(&r.path)).count();
    assert!(left > 0);
    assert!(preview.contains("Would ask to delete again"), "{preview}");
    b.screenshot("replay-preview").await;

    // Replaying without the confirmation is not possible; with it, it runs.
    b.click("form.confirm input[name=confirm]").await;
    b.click_and_load("form.confirm button[type=submit]").await;
    assert!(b.url().await.contains("/ui/replays/"), "{}", b.url().await);
    let done = b.wait_for_text("now completed", Duration::from_secs(30)).await;
    assert!(done.contains("finished"), "{done}");
    b.screenshot("replay-progress").await;
    assert_eq!(t.next_result(30).await.result.status, "completed");
    assert_eq!(target.resources.iter().filter(|r| t.sim.exists(&r.path)).count(), 0, "the target's resources are gone");
    for other in [&nodes[0], &nodes[2]] {
        assert!(other.resources.iter().any(|r| t.sim.exists(&r.path)), "the other dead jobs were not replayed");
    }

    // The owner page: resources by life, the jobs, the plan.
    b.goto(&format!("{base}/ui/owners/{}", nodes[0].owner.replace('/', "%2F"))).await;
    let owner = b.text().await;
    assert!(owner.contains("Ended by job") && owner.contains("Plan"), "{owner}");
    b.screenshot("owner").await;
    b.goto(&format!("{base}/ui")).await;
    let overview = b.text().await;
    assert!(overview.contains("Jobs by state") && overview.contains("Dead letters by class"), "{overview}");
    b.screenshot("overview").await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_the_brakes_refuse_says_why_and_a_form_without_its_csrf_token_does_nothing() {
    let (t, base, _file) = spawn_with_admin(crate::reconcile::RULE, TOKEN).await;
    let orphans: Vec<String> = (0..7).map(|i| format!("gone-{i}")).collect();
    let refs: Vec<&str> = orphans.iter().map(|s| s.as_str()).collect();
    crate::reconcile::world(&t, 10, &refs).await;
    let b = Browser::start().await;
    log_in(&b, &base).await;

    b.goto(&format!("{base}/ui/reconcile")).await;
    b.screenshot("reconcile").await;
    b.click_and_load("form[action='/ui/reconcile/models'] button[type=submit]").await;
    let report = b.text().await;
    assert!(report.contains("actionable\n7") || report.contains("actionable 7"), "{report}");
    b.click("form.confirm input[name=confirm]").await;
    b.click_and_load("form.confirm button[type=submit]").await;
    let refused = b.text().await;
    assert!(refused.contains("Refused: 7 deletions exceed max_count 5"), "{refused}");
    b.screenshot("reconcile-refused").await;
    let rows: i64 = t.count("SELECT count(*) FROM models").await;
    assert_eq!(rows, 17, "the brakes held: nothing was torn down");
    assert_eq!(t.count("SELECT count(*) FROM jobs").await, 0);

    // Past the brakes only with the second confirmation: the word typed.
    b.click("form.confirm input[name=confirm]").await;
    b.click("form.confirm input[name=force]").await;
    b.click_and_load("form.confirm button[type=submit]").await;
    let unconfirmed = b.text().await;
    assert!(unconfirmed.contains("needs the word FORCE"), "{unconfirmed}");
    assert_eq!(t.count("SELECT count(*) FROM jobs").await, 0, "nothing was requested");

    // A form posted without its CSRF token is refused and changes nothing.
    b.goto(&format!("{base}/ui")).await;
    b.script("document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())").await;
    b.type_in("form[action='/ui/pause'] input[name=reason]", "no token").await;
    b.click_and_load("form[action='/ui/pause'] button[type=submit]").await;
    let answer = b.text().await;
    assert!(answer.contains("did not carry this session's CSRF token"), "{answer}");
    assert!(t.app.ledger.paused().await.unwrap().is_none(), "not paused");
}
