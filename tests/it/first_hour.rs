//! Small things that cost a newcomer time, tried as one would: each answer
//! says what happened and exits the way `show` does.

use reaper::config::ProviderSettings;

use crate::helpers::*;

fn text(out: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_plainly_what_it_did_and_did_not_do() {
    let t = spawn_app("").await;
    // `plan` of an owner reaper knows nothing of fails as `show` does.
    let out = t.reaper(&["plan", "node/never-seen"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("knows nothing of owner"), "{stderr}");

    // `request-deletion` of such an owner says so, and sends it all the same
    // (its tracks may still be on their way): never a silent success.
    let out = t.reaper(&["request-deletion", "node/never-seen"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("knows nothing of owner \"node/never-seen\" yet"), "{stderr}");
    assert!(!stdout.trim().is_empty(), "the event id is printed: {stdout}");
    // Its provider's token need not be where the deletion is requested from.
    let out = t.reaper(
        &["request-deletion", "node/never-seen"],
        &[("REAPER_PROVIDERS__CLOUD__AUTH__TOKEN_ENV", "REAPER_TEST_NOT_SET")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);

    // check-config lists the kinds in the order they go, in columns.
    let out = t.reaper(&["check-config"], &[]);
    let (stdout, _) = text(&out);
    let kinds: Vec<&str> =
        stdout.lines().filter(|l| l.contains("provider=cloud")).map(|l| l.split_whitespace().next().unwrap()).collect();
    let at = |k: &str| kinds.iter().position(|x| *x == k).unwrap_or_else(|| panic!("{k} missing: {stdout}"));
    assert!(at("vni") < at("bare_metal_server") && at("dns_record") < at("bare_metal_server"), "{stdout}");
    assert!(at("dns_record") < at("ip_reservation"), "teardown order: {stdout}");
    let columns: Vec<usize> =
        stdout.lines().filter(|l| l.contains("provider=cloud")).map(|l| l.find("provider=").unwrap()).collect();
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "aligned: {stdout}");

    // A command run without a config file says how to give one.
    let mut cmd = reaper_cmd();
    let out = run_to_end(cmd.args(["plan", "node/x"]), "reaper plan without -c", std::time::Duration::from_secs(60));
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--config"), "says how to give a config: {stderr}");

    // Pretty logs written to a pipe carry no colour codes.
    let out = t.reaper(&["status"], &[("RUST_LOG", "debug")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains('\u{1b}') && !stdout.contains('\u{1b}'), "escape codes in a pipe: {stderr:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_errors_are_json_and_an_unencoded_owner_is_explained() {
    let token = "first-hour-admin-token";
    let file = std::env::temp_dir().join(format!("reaper-admin-token-{:08x}", fastrand::u32(..)));
    std::fs::write(&file, token).unwrap();
    let t = spawn_app(&format!("[admin]\ntoken_file = \"{}\"\n", file.display())).await;
    let base = format!("http://{}", t.app.admin_addr.get().expect("the admin API listens"));
    let c = reqwest::Client::new();
    // A body that is not JSON: 415, said in JSON like every other error.
    let r = c
        .post(format!("{base}/v1/dead/replay"))
        .bearer_auth(token)
        .header("content-type", "text/plain")
        .body("owner=node/n1&all=true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let body: serde_json::Value = r.json().await.expect("a JSON error body");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("application/json")), "{body}");
    // An owner with its slash not encoded: a 404 that says how to write it.
    let r = c.get(format!("{base}/v1/owners/node/n1")).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.expect("a JSON error body");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("node%2Fn1")), "{body}");
    let r = c.post(format!("{base}/v1/owners/node/n1/teardown")).bearer_auth(token).send().await.unwrap();
    let body: serde_json::Value = r.json().await.expect("a JSON error body");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("/v1/owners/node%2Fn1/teardown")), "{body}");
    // A wrong method keeps its Allow header under the JSON body.
    let r = c.delete(format!("{base}/v1/status")).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().contains_key("allow"), "{:?}", r.headers());
    // `reconcile` appears once in /v1/status: the rules' state under counts,
    // their settings under config.
    let status: serde_json::Value =
        c.get(format!("{base}/v1/status")).bearer_auth(token).send().await.unwrap().json().await.unwrap();
    assert!(status.get("reconcile").is_none(), "{status}");
    assert!(status["counts"].get("reconcile").is_some() && status["config"].get("reconcile").is_some(), "{status}");
    let _ = std::fs::remove_file(&file);
}

/// docs/first-run.md, step by step, through the binary and the simulated
/// cloud's HTTP API (the test's own database and broker prefix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_run_walkthrough_works_as_written() {
    let mut t = spawn_app("").await;
    let ProviderSettings::Http(cloud) = &t.app.settings.providers["cloud"] else { panic!("cloud is HTTP") };
    let sim = cloud.base_url.clone();
    let c = reqwest::Client::new();
    let put = |path: &str, body: &'static str| c.put(format!("{sim}{path}")).body(body).send();
    assert_eq!(put("/v1/bare_metal_servers/bm-1", "").await.unwrap().status(), 201);
    let deps = r#"{"depends_on": ["/v1/bare_metal_servers/bm-1"]}"#;
    assert_eq!(put("/v1/virtual_network_interfaces/vni-1", deps).await.unwrap().status(), 201);
    assert_eq!(put("/v1/dns_zones/zone-1/resource_records/dns-1", deps).await.unwrap().status(), 201);

    let owner = format!("node/{}", unique("n1"));
    // `reaper track` refuses what the worker would refuse, before sending it.
    let out = t.reaper(&["track", &owner, "dns_record", "dns-1"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("--attr zone_id=VALUE"), "{}", text(&out).1);
    ok(&t, &["track", &owner, "bare_metal_server", "bm-1"]);
    ok(&t, &["track", &owner, "vni", "vni-1"]);
    ok(&t, &["track", &owner, "dns_record", "dns-1", "--attr", "zone_id=zone-1"]);
    let owners = vec![owner.clone()];
    wait_until("3 tracked", std::time::Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 3
    })
    .await;
    assert!(ok(&t, &["show", &owner]).contains("bm-1"));
    let plan = ok(&t, &["plan", &owner]);
    assert!(plan.find("vni-1").unwrap() < plan.find("bm-1").unwrap(), "the interface goes first: {plan}");

    let faults = r#"{"fail_next": 100, "fail_status": 403, "only_method": "DELETE"}"#;
    assert_eq!(c.post(format!("{sim}/_sim/faults")).body(faults).send().await.unwrap().status(), 204);
    ok(&t, &["request-deletion", &owner]);
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    assert!(ok(&t, &["show", &owner]).contains("dead_lettered"));
    assert!(t.sim.exists("/v1/bare_metal_servers/bm-1"), "the server was never asked before its dependents");

    assert_eq!(c.post(format!("{sim}/_sim/faults")).body("{}").send().await.unwrap().status(), 204);
    ok(&t, &["replay", "--owner", &owner, "--dry-run"]);
    ok(&t, &["replay", "--owner", &owner]);
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    let left: Vec<String> = c.get(format!("{sim}/_sim/resources")).send().await.unwrap().json().await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    t.stop().await;
}

/// Runs the binary with the test's config; it must succeed; its stdout.
fn ok(t: &TestApp, args: &[&str]) -> String {
    let out = t.reaper(args, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "reaper {args:?}: {stdout}{stderr}");
    stdout
}

/// `reaper provisioning-failed`, as a playbook's rescue block would call it:
/// what was tracked goes, and the resources it names besides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_failed_from_the_cli_tears_down_what_was_tracked_and_what_it_names() {
    let mut t = spawn_app("").await;
    let owner = format!("node/{}", unique("pf"));
    t.sim.create("/v1/bare_metal_servers/pf-bm", &[]);
    t.sim.create("/v1/virtual_network_interfaces/pf-vni", &["/v1/bare_metal_servers/pf-bm"]);
    ok(&t, &["track", &owner, "bare_metal_server", "pf-bm"]);
    let owners = vec![owner.clone()];
    wait_until("tracked", std::time::Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 1
    })
    .await;
    // Refused before sending: an unknown kind, a kind whose requests need an
    // attribute the command line cannot give, a resource not KIND/ID.
    for bad in ["spaceship/s1", "dns_record/d1", "just-an-id"] {
        let out = t.reaper(&["provisioning-failed", &owner, "--error", "x", "--resource", bad], &[]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out).1);
    }
    let event_id = ok(
        &t,
        &[
            "provisioning-failed",
            &owner,
            "--error",
            "timeout waiting for the server",
            "--step",
            "install_os",
            "--resource",
            "vni/pf-vni",
        ],
    );
    let r = t.next_result(30).await.result;
    assert_eq!((r.event_id.as_str(), r.trigger.as_str()), (event_id.trim(), "provisioning.failed"), "{r:?}");
    assert_eq!(r.status, "completed", "{r:?}");
    assert!(t.sim.paths().is_empty(), "the tracked server and the named interface are gone: {:?}", t.sim.paths());
    t.stop().await;
}
