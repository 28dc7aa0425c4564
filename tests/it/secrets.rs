//! Tokens and passwords from the config never reach the logs or /v1/status.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use reaper::devtools::demo::VpcNode;

use crate::helpers::*;

const CLOUD_TOKEN: &str = "cloud-secret-9f8e7d6c";
const ADMIN_TOKEN: &str = "admin-secret-1a2b3c4d";
const DB_PASSWORD: &str = "db-pass-5e6f7a8b";
const MONGO_PASSWORD: &str = "mongo-pass-3c2b1a09";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_passwords_never_appear_in_logs_or_status() {
    // A MongoDB provider with a password in its URL: built at start, listed in /v1/status.
    let mongo = format!(
        "[providers.docs]\ntype = \"mongodb\"\nurl = \"mongodb://reaper:{MONGO_PASSWORD}@127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=200\"\ndatabase = \"x\"\n"
    );
    let mut t = spawn_app(&mongo).await;
    t.stop().await; // the binary below does the work, with secrets in its config
    let dir = std::env::temp_dir().join(format!("reaper-secrets-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("admin-token"), ADMIN_TOKEN).unwrap();
    let config = t
        .config_text
        .replace("# auth = {", "auth = {")
        .replace("postgres://postgres@", &format!("postgres://postgres:{DB_PASSWORD}@"))
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"", dir.join("admin-token").display()),
        );
    assert!(config.contains(DB_PASSWORD) && config.contains(MONGO_PASSWORD));
    assert!(config.contains("token_env = \"REAPER_CLOUD_TOKEN\""));
    std::fs::write(dir.join("reaper.toml"), &config).unwrap();
    let (mut child, stderr, mut logs, base) =
        spawn_worker(&dir.join("reaper.toml"), &[("REAPER_CLOUD_TOKEN", CLOUD_TOKEN)]).await;
    let c = reqwest::Client::new();
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.publish("deletion.requested", &deletion("secret-run", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert!(t.sim.stats().with_authorization >= 5, "the API token was sent with the requests");
    let status =
        c.get(format!("{base}/v1/status")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().text().await.unwrap();
    assert!(status.contains("\"counts\""), "{status}");
    assert_eq!(c.get(format!("{base}/v1/status")).bearer_auth("wrong").send().await.unwrap().status(), 403);

    let mut stdout = child.inner.stdout.take().unwrap();
    assert!(child.terminate(Duration::from_secs(20)).success());
    logs.extend(stderr.iter().map(|l| l + "\n"));
    stdout.read_to_string(&mut logs).unwrap();
    assert!(logs.len() > 1000 && logs.contains("job finished"), "debug logs were written: {} bytes", logs.len());
    assert!(
        status.contains("\"mongodb\"") && status.contains("127.0.0.1:1"),
        "the MongoDB provider is listed: {status}"
    );
    for secret in [CLOUD_TOKEN, ADMIN_TOKEN, DB_PASSWORD, MONGO_PASSWORD] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
        assert!(!status.contains(secret), "{secret} leaked into /v1/status");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `reaper run` with debug JSON logs; once ready: the child, its log lines
/// to come, those so far and the admin API's base URL.
async fn spawn_worker(
    config: &std::path::Path,
    env: &[(&str, &str)],
) -> (Child, std::sync::mpsc::Receiver<String>, String, String) {
    let mut cmd = reaper_cmd();
    cmd.args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "debug")
        .env("REAPER_LOG__FORMAT", "json")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Child::spawn(&mut cmd, "reaper run");
    // The admin API listens on a port the system picks; the log says which.
    let stderr = lines_of(child.inner.stderr.take().unwrap());
    let mut logs = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let addr = loop {
        let line = stderr
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the worker logs where its admin API listens");
        logs.push_str(&line);
        logs.push('\n');
        if line.contains("admin API listening") {
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON logs");
            break v["fields"]["addr"].as_str().expect("the address is logged").to_string();
        }
    };
    let base = format!("http://{addr}");
    let c = reqwest::Client::new();
    wait_until("the worker is ready", Duration::from_secs(20), || {
        let c = c.clone();
        let url = format!("{base}/readyz");
        async move { c.get(url).send().await.map(|r| r.status() == 200).unwrap_or(false) }
    })
    .await;
    (child, stderr, logs, base)
}

const API_KEY: &str = "iam-apikey-0b1c2d3e";

/// An API key exchanged at an IAM endpoint for tokens that last a second:
/// neither the key nor any token it bought reaches the logs, /v1/status or
/// a plan's script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanged_api_keys_and_their_tokens_never_appear_in_logs_status_or_plans() {
    use reaper::devtools::sim::TokenPolicy;
    let dir = std::env::temp_dir().join(format!("reaper-secrets-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("apikey"), API_KEY).unwrap();
    std::fs::write(dir.join("admin-token"), ADMIN_TOKEN).unwrap();
    let auth = format!(
        "[providers.cloud.auth]\noauth2 = {{ token_url = \"{{sim_url}}/_sim/oauth/token\", client_secret_file = \"{}\", secret_field = \"apikey\", form = {{ grant_type = \"urn:ibm:params:oauth:grant-type:apikey\" }} }}\n",
        dir.join("apikey").display()
    );
    let mut t = spawn_app(&auth).await;
    t.stop().await;
    t.sim.require_tokens(TokenPolicy { client_secret: API_KEY.into(), lifetime_secs: 1.0, fixed_tokens: vec![] });
    let config = t.config_text.replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"", dir.join("admin-token").display()),
    );
    assert!(config.contains("secret_field = \"apikey\""), "{config}");
    std::fs::write(dir.join("reaper.toml"), &config).unwrap();
    let (mut child, stderr, mut logs, base) = spawn_worker(&dir.join("reaper.toml"), &[]).await;
    let c = reqwest::Client::new();
    for i in 0..3 {
        let node = VpcNode::new(&unique("iam"));
        t.provision(&node).await;
        t.publish("deletion.requested", &deletion(&format!("iam-{i}"), &node.owner, Utc::now())).await;
        assert_eq!(t.next_result(30).await.result.status, "completed");
        // The IAM revokes the token: the next teardown exchanges the key again.
        t.sim.revoke_tokens();
    }
    let tokens = t.sim.issued_tokens();
    assert!(tokens.len() >= 3, "the key was exchanged for each teardown: {tokens:?}");
    let status =
        c.get(format!("{base}/v1/status")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().text().await.unwrap();
    // What is left of a node not deleted, as the fallback script.
    let left = VpcNode::new(&unique("iam"));
    t.provision(&left).await;
    let plan = t.reaper(&["plan", &left.owner, "--format", "sh"], &[]);
    let script = String::from_utf8_lossy(&plan.stdout).to_string() + &String::from_utf8_lossy(&plan.stderr);
    assert!(plan.status.success() && script.contains("curl"), "{script}");
    let mut stdout = child.inner.stdout.take().unwrap();
    assert!(child.terminate(Duration::from_secs(20)).success());
    logs.extend(stderr.iter().map(|l| l + "\n"));
    stdout.read_to_string(&mut logs).unwrap();
    assert!(logs.contains("job finished"), "debug logs were written");
    for secret in tokens.iter().map(String::as_str).chain([API_KEY]) {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
        assert!(!status.contains(secret), "{secret} leaked into /v1/status");
        assert!(!script.contains(secret), "{secret} leaked into a script");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const BASIC_PASSWORD: &str = "basic-pass-77aa11ee";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_and_scripts_never_show_the_credentials_in_a_base_url() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.stop().await;
    // The API takes Basic auth from the URL's userinfo (reqwest sends it so).
    let base = match t.app.settings.providers.get("cloud") {
        Some(reaper::config::ProviderSettings::Http(h)) => h.base_url.clone(),
        _ => panic!("the VPC config has an HTTP provider named cloud"),
    };
    let with_userinfo = base.replace("http://", &format!("http://reaper:{BASIC_PASSWORD}@"));
    let config = t.config_text.replace(&format!("base_url = \"{base}\""), &format!("base_url = \"{with_userinfo}\""));
    assert!(config.contains(BASIC_PASSWORD));
    let file = std::env::temp_dir().join(format!("reaper-basic-{:08x}.toml", fastrand::u32(..)));
    std::fs::write(&file, &config).unwrap();
    // `reaper plan` as a table, as JSON (what teardown?dry_run=true answers) and
    // as the shell script (what GET /v1/owners/{o}/script answers).
    for format in ["table", "json", "sh"] {
        let out = run_to_end(
            reaper_cmd().args(["plan", &node.owner, "--format", format, "--config"]).arg(&file),
            "reaper plan",
            Duration::from_secs(60),
        );
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{format}: {stderr}");
        assert!(stdout.contains(&base), "{format}: the plan shows where the requests go: {stdout}");
        assert!(!stdout.contains(BASIC_PASSWORD) && !stderr.contains(BASIC_PASSWORD), "{format} leaked it: {stdout}");
        if format == "sh" {
            assert!(stdout.contains("-u \"${REAPER_CLOUD_USERINFO:?"), "the script asks for the userinfo: {stdout}");
        }
    }
    let _ = std::fs::remove_file(&file);
}
