//! The remaining documented commands, run as a new user would type them.

use std::process::Stdio;
use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_end_to_end_and_exits_zero_when_everything_is_gone() {
    let t = spawn_app("").await;
    let out = t.reaper(&["demo", "--nodes", "6", "--timeout-secs", "60"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("every simulated resource is gone") && stdout.contains("deletes refused for order"),
        "{stdout}"
    );
    // The demo worked in a database of its own and dropped it: the configured
    // ledger holds none of its jobs (a later `replay --all` must not find them).
    assert_eq!(t.count("SELECT count(*) FROM jobs").await, 0, "the demo wrote into the real ledger");
    assert_eq!(t.count("SELECT count(*) FROM tracked_resources").await, 0);
    let own =
        stdout.split("in database ").nth(1).and_then(|r| r.split_whitespace().next()).expect("names its database");
    assert!(own.starts_with("reaper_demo_") && own.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{own}");
    let left = t.count(&format!("SELECT count(*) FROM pg_database WHERE datname = '{own}'")).await;
    assert_eq!(left, 0, "the demo's own database {own} is dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_demo_names_the_jobs_that_failed_and_bad_rates_are_refused() {
    let t = spawn_app("").await;
    for rate in ["1.5", "-0.1", "NaN"] {
        let rate = &format!("--error-rate={rate}");
        let out = t.reaper(&["demo", "--nodes", "1", rate], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{rate}: {stderr}");
        assert!(stderr.contains("between 0 and 1"), "{rate}: {stderr}");
    }
    // Every API call fails: the job retries, then dead-letters; the summary says which and why.
    let out = t.reaper(&["demo", "--nodes", "1", "--error-rate", "1", "--timeout-secs", "60"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("dead_lettered") && stdout.contains("node/demo-"), "names the failed job: {stdout}");
    assert!(stdout.contains("503"), "and why: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_schema_and_is_idempotent() {
    let t = spawn_app("").await;
    for _ in 0..2 {
        let out = t.reaper(&["migrate"], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied"));
    }
    let out = t.reaper(&["migrate"], &[("REAPER_DATABASE__URL", "postgres://postgres:pw-5e3a@127.0.0.1:1/nowhere")]);
    assert_eq!(out.status.code(), Some(3), "an unreachable database is exit code 3");
    // Once, which server, why, and no password.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1:1") && stderr.contains("refused"), "names where and why: {stderr}");
    assert!(stderr.contains("database.url") && !stderr.contains("pw-5e3a"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_serves_the_simulated_cloud_with_dependencies_enforced() {
    // Port 0: the sim binds one the system picks and prints it.
    let mut child = Child::spawn(reaper_cmd().args(["sim", "--port", "0"]).stdout(Stdio::piped()), "reaper sim");
    let first = first_line(child.inner.stdout.take().unwrap(), Duration::from_secs(20), "reaper sim's banner");
    let base =
        first.split_whitespace().find(|w| w.starts_with("http://")).expect("the banner names the URL").to_string();
    let c = reqwest::Client::new();
    wait_until("the sim listens", Duration::from_secs(10), || {
        let c = c.clone();
        let url = format!("{base}/_sim/stats");
        async move { c.get(url).send().await.is_ok() }
    })
    .await;
    assert_eq!(c.put(format!("{base}/v1/servers/s1")).send().await.unwrap().status(), 201);
    let dep = serde_json::json!({ "depends_on": ["/v1/servers/s1"] });
    assert_eq!(c.put(format!("{base}/v1/vnis/v1")).json(&dep).send().await.unwrap().status(), 201);
    assert_eq!(
        c.delete(format!("{base}/v1/servers/s1")).send().await.unwrap().status(),
        409,
        "the VNI still needs the server"
    );
    assert_eq!(c.delete(format!("{base}/v1/vnis/v1")).send().await.unwrap().status(), 204);
    assert_eq!(c.delete(format!("{base}/v1/servers/s1")).send().await.unwrap().status(), 204);
    assert_eq!(c.delete(format!("{base}/v1/servers/s1")).send().await.unwrap().status(), 404);
    let stats: serde_json::Value = c.get(format!("{base}/_sim/stats")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["refused_for_order"], 1);
    assert!(child.terminate(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_a_small_run() {
    let t = spawn_app("").await;
    let out = t.reaper(&["bench", "--jobs", "150", "--only-e2e", "--json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["ceiling_msgs_per_sec"].as_f64().unwrap() > 0.0);
    // Every job completed (the bench fails otherwise), and the rate is what
    // the jobs and the time say (the first job starts the clock).
    let e2e = &report["e2e"];
    assert_eq!(e2e["jobs"], 150, "{report}");
    let (secs, rate) = (e2e["secs"].as_f64().unwrap(), e2e["jobs_per_sec"].as_f64().unwrap());
    assert!(secs > 0.0 && (rate - 149.0 / secs).abs() < 0.01 * rate, "{report}");
    assert!(report["e2e"]["worker_peak_rss_mib"].as_f64().unwrap() > 1.0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_keep_failures_leaves_dead_letters_in_a_running_console_until_ctrl_c() {
    use std::io::BufRead;
    let t = spawn_app("").await;
    let mut cmd = reaper_cmd();
    cmd.args(["demo", "--nodes", "2", "--keep-failures", "--timeout-secs", "60", "--config"])
        .arg(t.config_file())
        .env("REAPER_ADMIN_TOKEN", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut demo = Child::spawn(&mut cmd, "reaper demo --keep-failures");
    let stdout = demo.inner.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut token, mut console, mut database, mut printed) = (None, None, None, String::new());
    while console.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|_| panic!("the demo never said where its console is:\n{printed}"));
        printed.push_str(&line);
        printed.push('\n');
        if let Some(rest) = line.split("log in with the token ").nth(1) {
            token = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = line.split("in database ").nth(1) {
            database = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = line.strip_prefix("console: http://") {
            console = Some(format!("http://{}", rest.split("/ui").next().unwrap()));
        }
    }
    assert!(printed.contains("every simulated resource is gone"), "{printed}");
    let (token, base, database) = (token.expect("a token made for the demo"), console.unwrap(), database.unwrap());
    let c = reqwest::Client::new();
    let dead: serde_json::Value =
        c.get(format!("{base}/v1/dead")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(dead["jobs"].as_array().unwrap().len(), 2, "two dead letters to look at: {dead}");
    // The cloud no longer refuses: replaying them completes.
    let r = c
        .post(format!("{base}/v1/dead/replay"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "all": true, "async": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["replay_id"].as_str().unwrap().to_string();
    let mut run = serde_json::Value::Null;
    for _ in 0..300 {
        run = c.get(format!("{base}/v1/replays/{id}")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        if run["state"] == "finished" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run["jobs"]["completed"], 2, "{run}");

    // Ctrl-C ends it: exit 0, its database dropped.
    let sent = std::process::Command::new("kill").args(["-INT", &demo.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let status = demo.wait(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let left = t.count(&format!("SELECT count(*) FROM pg_database WHERE datname = '{database}'")).await;
    assert_eq!(left, 0, "the demo's database {database} is dropped");
}
