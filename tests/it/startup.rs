use std::time::Duration;

use crate::helpers::{reaper_cmd, run_to_end};

fn reaper(args: &[&str], config: &str) -> std::process::Output {
    reaper_env(args, config, &[("REAPER_CLOUD_TOKEN", "t")])
}

/// Runs reaper with `config` as its file and only `env` of the REAPER_ variables.
fn reaper_env(args: &[&str], config: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("reaper-cfg-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("reaper.toml");
    std::fs::write(&file, config).unwrap();
    let mut cmd = reaper_cmd();
    cmd.args(args).arg("--config").arg(&file).envs(env.iter().copied());
    let out = run_to_end(&mut cmd, &format!("reaper {}", args.join(" ")), Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// check-config's exit code and stderr.
fn check(config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = reaper_env(&["check-config"], config, env);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const VPC: &str = include_str!("../../config/vpc-node.toml");
const TOKEN: &[(&str, &str)] = &[("REAPER_CLOUD_TOKEN", "t")];

#[test]
fn a_delete_that_does_not_use_the_id_is_refused_unless_it_says_it_deletes_the_whole() {
    let cases = [
        ("http", "[providers.p]\ntype = \"http\"\nbase_url = \"http://127.0.0.1:1\"\n[kinds.zone_record]\nprovider = \"p\"\ndelete = \"DELETE /v1/zones/{attr.zone}/records\"\n"),
        ("sql", "[providers.p]\ntype = \"postgres\"\nurl = \"postgres://127.0.0.1:1/app\"\n[kinds.zone_record]\nprovider = \"p\"\ndelete = \"DELETE FROM records WHERE zone = $1\"\nparams = [\"attr.zone\"]\n"),
        ("sql-unused-id", "[providers.p]\ntype = \"postgres\"\nurl = \"postgres://127.0.0.1:1/app\"\n[kinds.zone_record]\nprovider = \"p\"\ndelete = \"DELETE FROM records WHERE zone = $2\"\nparams = [\"id\", \"attr.zone\"]\n"),
        ("mongodb", "[providers.p]\ntype = \"mongodb\"\nurl = \"mongodb://127.0.0.1:1\"\ndatabase = \"app\"\n[kinds.zone_record]\nprovider = \"p\"\ncollection = \"records\"\ndelete = '{\"zone\": \"{attr.zone}\"}'\n"),
    ];
    for (what, config) in cases {
        let (code, stderr) = check(config, &[]);
        assert_eq!(code, Some(2), "{what}: {stderr}");
        assert!(
            stderr.contains("kind \"zone_record\"") && stderr.contains("does not use the resource's id"),
            "{what}: {stderr}"
        );
        assert!(stderr.contains("scope = \"whole\""), "{what}: the message says how to mean it: {stderr}");
        if what != "sql-unused-id" {
            let whole = config.replace("provider = \"p\"\n", "provider = \"p\"\nscope = \"whole\"\n");
            let (code, stderr) = check(&whole, &[]);
            assert_eq!(code, Some(0), "{what} with scope = \"whole\": {stderr}");
        }
    }
}

#[test]
fn unknown_keys_are_refused_with_the_key_its_section_and_where_it_belongs() {
    let cases = [
        (
            VPC.replace("after = [\"vni\", \"dns_record\"]", "aftr = [\"vni\", \"dns_record\"]"),
            "aftr",
            "kinds.bare_metal_server",
        ),
        (format!("{VPC}\n[brokr]\nprefetch = 8\n"), "brokr", ""),
        (format!("{VPC}\n[worker]\nstep_atempts = 3\n"), "step_atempts", "worker"),
        (VPC.replace("rate_per_sec = 500", "rate_per_second = 500"), "rate_per_second", "providers.cloud"),
        (format!("{VPC}\n[worker]\nprefetch = 8\n"), "prefetch", "[broker]"),
    ];
    for (config, key, place) in &cases {
        let (code, stderr) = check(config, TOKEN);
        assert_eq!(code, Some(2), "{key}: {stderr}");
        assert!(stderr.contains(&format!("`{key}`")) && stderr.contains(place), "{key}: {stderr}");
    }
    // Environment: only the known sections are read, so tokens and test variables sharing the prefix pass...
    let env = [
        ("REAPER_CLOUD_TOKEN", "t"),
        ("REAPER_ADMIN_TOKEN", "a"),
        ("REAPER_TEST_PG", "x"),
        ("REAPER_WORKER__STEP_ATTEMPTS", "3"),
    ];
    let (code, stderr) = check(VPC, &env);
    assert_eq!(code, Some(0), "{stderr}");
    // ...but a typo inside a known section does not.
    let (code, stderr) = check(VPC, &[("REAPER_CLOUD_TOKEN", "t"), ("REAPER_WORKER__STEP_ATEMPTS", "3")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("`step_atempts`"), "{stderr}");
}

#[test]
fn check_config_runs_every_check_that_run_runs() {
    let (code, stderr) = check(VPC, TOKEN);
    assert_eq!(code, Some(0), "{stderr}");
    let cases = [
        (VPC.to_string(), &[][..], "REAPER_CLOUD_TOKEN"),
        (
            "[providers.cloud]\ntype = \"http\"\nbase_url = \"http://127.0.0.1:1\"\n".to_string(),
            TOKEN,
            "no kinds are configured",
        ),
        (VPC.replace("/dns_zones/{attr.zone_id}/", "/dns_zones/{attr.zone_id/"), TOKEN, "dns_record"),
        (
            VPC.replace(
                "delete = \"DELETE /v1/bare_metal_servers/{id}\"",
                "delete = \"DELET /v1/bare_metal_servers/{id}\"",
            ),
            TOKEN,
            "DELET",
        ),
    ];
    for (config, env, want) in &cases {
        let (code, stderr) = check(config, env);
        assert_eq!(code, Some(2), "{want}: {stderr}");
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
}

const CYCLE: &str = r#"
[providers.cloud]
type = "http"
base_url = "http://127.0.0.1:1"
[kinds.server]
provider = "cloud"
delete = "DELETE /servers/{id}"
after = ["vni"]
[kinds.vni]
provider = "cloud"
delete = "DELETE /vnis/{id}"
after = ["server"]
"#;

#[test]
fn a_cycle_in_the_config_stops_start_up_with_a_message_naming_it() {
    for cmd in ["run", "check-config"] {
        let out = reaper(&[cmd], CYCLE);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
        assert!(stderr.contains("kinds form a cycle through `after`: server -> vni -> server"), "{cmd}: {stderr}");
    }
}

#[test]
fn check_config_prints_the_order_of_a_valid_config() {
    let out = reaper(&["check-config"], include_str!("../../config/vpc-node.toml"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("bare_metal_server") && stdout.contains("after: vni, dns_record"), "{stdout}");
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let out = run_to_end(
        reaper_cmd().args(["check-config", "--config", "/nonexistent/reaper.toml"]),
        "reaper check-config",
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/reaper.toml does not exist"));
}

/// An admin port that cannot be bound stops start-up with a message naming
/// it: a worker running on without `/healthz` would fail an orchestrator's
/// probes while it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_that_cannot_be_bound_stops_start_up() {
    let t = crate::helpers::spawn_app("").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = t.config_text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""));
    assert!(config.contains(&format!("127.0.0.1:{port}")));
    let file = std::env::temp_dir().join(format!("reaper-port-{port}.toml"));
    std::fs::write(&file, config).unwrap();
    let mut cmd = reaper_cmd();
    cmd.args(["run", "--config"]).arg(&file);
    let out = run_to_end(&mut cmd, "reaper run", Duration::from_secs(60));
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("admin.listen 127.0.0.1:{port}")), "names the setting and address: {stderr}");
    drop(taken);
}

/// A URL that cannot be read is a configuration error (exit 2) naming its
/// setting, found before anything connects; so is a broker URL whose path
/// names the empty vhost (`amqp://host/` is the vhost "", not "/").
#[test]
fn urls_that_cannot_be_used_are_configuration_errors_naming_their_setting() {
    let cases = [
        ("[broker]\nurl = \"amqps//mq.internal:5671\"\n", "broker.url"),
        ("[broker]\nurl = \"amqp://guest:guest@127.0.0.1:5672/\"\n", "empty vhost"),
        ("[database]\nurl = \"postgresql//db.internal/reaper\"\n", "database.url"),
    ];
    for (extra, want) in cases {
        let (code, stderr) = check(&format!("{VPC}\n{extra}"), TOKEN);
        assert_eq!(code, Some(2), "{extra}: {stderr}");
        assert!(stderr.contains(want), "{extra}: {stderr}");
        assert!(!stderr.contains("guest:guest"), "credentials are not printed: {stderr}");
    }
}

/// A broker that turns the worker away says which broker, and why, in plain
/// words (never the password): a wrong password, a vhost that is not there,
/// a port nobody listens on. The worker keeps trying (the broker may be
/// fixed without a restart), and each attempt says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_turns_the_worker_away_says_why_plainly() {
    let t = crate::helpers::spawn_app("").await;
    let cases = [
        ("amqp://guest:wrong-pw-77@127.0.0.1:5672/%2f", "refused user \"guest\""),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "has no vhost \"no-such-vhost\""),
        ("amqp://guest:guest@127.0.0.1:1/%2f", "127.0.0.1:1 refused the connection"),
    ];
    for (url, want) in cases {
        let mut worker = crate::helpers::Child::spawn(
            reaper_cmd()
                .args(["run", "--config"])
                .arg(t.config_file())
                .env("REAPER_BROKER__URL", url)
                .env("REAPER_ADMIN__LISTEN", "")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped()),
            "reaper run",
        );
        let lines = crate::helpers::lines_of(worker.inner.stderr.take().unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let said = loop {
            let line = lines
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or_else(|_| panic!("{url}: no line saying {want:?}"));
            assert!(!line.contains("wrong-pw-77"), "the password is never printed: {line}");
            if line.contains(want) {
                break line;
            }
        };
        assert!(said.contains("broker.url"), "says which setting to look at: {said}");
        assert!(worker.terminate(Duration::from_secs(20)).success());
    }
}
