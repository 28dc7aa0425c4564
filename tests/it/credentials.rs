//! Credentials that expire: an OAuth2 token endpoint whose tokens last a
//! second, a 401 answered by one refresh and one retry, a token command (an
//! exec plugin) and a token file that is rotated. The simulated cloud issues
//! the tokens and refuses expired ones with 401, as a cloud's IAM does.

use std::time::Instant;

use chrono::Utc;
use reaper::devtools::demo::VpcNode;
use reaper::devtools::sim::TokenPolicy;

use crate::helpers::*;

const SECRET: &str = "oauth-secret-4d5e6f70";

/// A file under the system's temp dir holding `text`, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(what: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("reaper-{what}-{:08x}", fastrand::u32(..)));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    fn path(&self) -> String {
        self.0.display().to_string()
    }

    fn write(&self, text: &str) {
        // Written beside and renamed, as Kubernetes swaps a projected token.
        let next = self.0.with_extension("next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &self.0).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn oauth2_auth(secret_file: &TempFile) -> String {
    format!(
        "[providers.cloud.auth]\noauth2 = {{ token_url = \"{{sim_url}}/_sim/oauth/token\", client_id = \"reaper\", client_secret_file = \"{}\" }}\n",
        secret_file.path()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_expire_every_second_carry_200_teardowns_without_a_dead_letter() {
    let secret = TempFile::new("oauth-secret", SECRET);
    let mut t = spawn_app(&oauth2_auth(&secret)).await;
    t.sim.require_tokens(TokenPolicy { client_secret: SECRET.into(), lifetime_secs: 1.0, fixed_tokens: vec![] });
    let nodes: Vec<VpcNode> = (0..200).map(|i| VpcNode::new(&unique(&format!("tok{i}")))).collect();
    for n in &nodes {
        n.create_in(&t.sim);
    }
    let started = Instant::now();
    for (i, n) in nodes.iter().enumerate() {
        t.publish("provisioning.failed", &failed_event(&format!("tok-{i}"), n)).await;
    }
    let mut completed = 0;
    while completed < nodes.len() {
        let r = t.next_result(120).await.result;
        assert_eq!(r.status, "completed", "{r:?}");
        completed += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(t.sim.paths().is_empty(), "left in the cloud: {}", t.sim.paths().len());
    assert!(t.drain_dead().await.is_empty(), "no dead letter");
    let stats = t.sim.stats();
    // Refreshed 0.2 s before each expiry: about one token per 0.8 s of work,
    // fetched by one step while the others waited (never one per step), and
    // at most one more per 401.
    assert!(elapsed > 3.0 && stats.tokens_issued >= 3, "several expiries: {elapsed:.1}s, {stats:?}");
    let bound = (elapsed / 0.8).ceil() as u64 + 2 + stats.unauthorized;
    assert!(
        stats.tokens_issued <= bound,
        "one refresh per expiry: {} tokens in {elapsed:.1}s, {stats:?}",
        stats.tokens_issued
    );
    t.stop().await;
}

/// A provisioning failure that names the node's resources (no tracking first).
fn failed_event(event_id: &str, n: &VpcNode) -> serde_json::Value {
    let resources: Vec<serde_json::Value> = n
        .resources
        .iter()
        .map(|r| serde_json::json!({"kind": r.kind, "id": r.id, "attributes": r.attributes}))
        .collect();
    serde_json::json!({"event_id": event_id, "owner": n.owner, "occurred_at": Utc::now().to_rfc3339(), "resources": resources})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_fetches_one_new_token_and_retries_without_counting_a_failed_attempt() {
    let secret = TempFile::new("oauth-secret", SECRET);
    // Unpaced, so the twenty requests below are in flight together.
    let mut t = spawn_app(&format!("[providers.cloud]\nrate_per_sec = 1000000\n{}", oauth2_auth(&secret))).await;
    t.sim.require_tokens(TokenPolicy { client_secret: SECRET.into(), lifetime_secs: 3600.0, fixed_tokens: vec![] });
    let first = VpcNode::new(&unique("rev"));
    first.create_in(&t.sim);
    t.publish("provisioning.failed", &failed_event("rev-1", &first)).await;
    assert_eq!(t.next_result(30).await.result.status, "completed");
    assert_eq!(t.sim.stats().tokens_issued, 1, "one token for the whole first teardown");

    // The IAM revokes it: twenty steps at once (each answer takes 50 ms, so
    // they overlap) get a 401 for the same token.
    t.sim.revoke_tokens();
    t.sim.set_faults(reaper::devtools::sim::Faults { latency_ms: 50, ..Default::default() });
    let owner = format!("node/{}", unique("rev"));
    let vnis: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            let id = format!("{owner}-vni-{i}").replace('/', "-");
            t.sim.create(&format!("/v1/virtual_network_interfaces/{id}"), &[]);
            serde_json::json!({"kind": "vni", "id": id})
        })
        .collect();
    let event = serde_json::json!({"event_id": "rev-2", "owner": owner, "occurred_at": Utc::now().to_rfc3339(), "resources": vnis});
    t.publish("provisioning.failed", &event).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    let stats = t.sim.stats();
    assert!(stats.unauthorized >= 1, "the revoked token was refused: {stats:?}");
    assert_eq!(stats.tokens_issued, 2, "one refresh however many steps got the 401: {stats:?}");
    assert!(
        r.resources.iter().all(|s| s.attempts == 1),
        "a 401 answered by a refresh is not a failed try: {:?}",
        r.resources
    );
    assert!(t.sim.paths().is_empty(), "{:?}", t.sim.paths());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_command_and_a_token_file_are_read_again_when_the_token_changes() {
    for source in ["command", "file"] {
        let token = TempFile::new("token", "first-token-aa11\n");
        let auth = match source {
            "command" => format!(
                "[providers.cloud.auth]\ntoken_command = [\"sh\", \"-c\", \"cat '{}'\"]\ntoken_ttl_secs = 3600\n",
                token.path()
            ),
            _ => format!("[providers.cloud.auth]\ntoken_file = \"{}\"\n", token.path()),
        };
        let mut t = spawn_app(&auth).await;
        let only = |tok: &str| TokenPolicy { fixed_tokens: vec![tok.into()], ..Default::default() };
        t.sim.require_tokens(only("first-token-aa11"));
        let a = VpcNode::new(&unique("rot"));
        a.create_in(&t.sim);
        t.publish("provisioning.failed", &failed_event("rot-1", &a)).await;
        assert_eq!(t.next_result(30).await.result.status, "completed", "{source}");

        // Rotated: the cloud takes only the new token, the file holds it. The
        // file is noticed by its change; the command (its TTL an hour away)
        // runs again after the 401.
        t.sim.require_tokens(only("second-token-bb22"));
        token.write("second-token-bb22\n");
        let b = VpcNode::new(&unique("rot"));
        b.create_in(&t.sim);
        t.publish("provisioning.failed", &failed_event("rot-2", &b)).await;
        let r = t.next_result(30).await.result;
        assert_eq!(r.status, "completed", "{source}: {r:?}");
        assert!(t.sim.paths().is_empty(), "{source}");
        let refused = t.sim.stats().unauthorized;
        match source {
            "file" => assert_eq!(refused, 0, "the changed file is read before the next request"),
            _ => assert!(refused >= 1, "the command runs again only when the cloud says 401"),
        }
        t.stop().await;
    }
}

/// A credential that cannot be had says which provider and why, never the
/// secret; the job is not lost (it retries, then dead-letters for replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_secret_or_a_failing_command_says_so_without_the_secret() {
    let wrong = TempFile::new("oauth-secret", "not-the-secret-5a5a");
    let mut t = spawn_app(&format!("{}[worker]\nretry_delays_secs = [0.1]\n", oauth2_auth(&wrong))).await;
    t.sim.require_tokens(TokenPolicy { client_secret: SECRET.into(), lifetime_secs: 60.0, fixed_tokens: vec![] });
    let n = VpcNode::new(&unique("bad"));
    n.create_in(&t.sim);
    t.publish("provisioning.failed", &failed_event("bad-secret", &n)).await;
    let r = t.next_result(60).await;
    assert_eq!(r.result.status, "dead_lettered", "{:?}", r.result);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("token endpoint") && body.contains("401"), "says what refused: {body}");
    assert!(!body.contains("not-the-secret-5a5a"), "no secret in the result: {body}");
    assert_eq!(n.resources.len(), t.sim.paths().len(), "nothing was deleted");
    t.stop().await;
}

/// A token endpoint that never answers: the step that asked waits out the
/// provider's timeout, and the steps that queued behind it get the same
/// answer at once instead of each waiting it out again, one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_hangs_is_waited_out_once_not_once_per_step() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let black_hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket); // never answered
        }
    });
    let secret = TempFile::new("oauth-secret", SECRET);
    let mut t = spawn_app(&format!(
        "[providers.cloud]\ntimeout_ms = 500\n[providers.cloud.auth]\noauth2 = {{ token_url = \"http://{hole_addr}/token\", client_secret_file = \"{}\" }}\n",
        secret.path()
    ))
    .await;
    // Twenty interfaces of one node: twenty steps at once.
    let vnis: Vec<serde_json::Value> =
        (0..20).map(|i| serde_json::json!({"kind": "vni", "id": format!("hang-vni-{i}")})).collect();
    let event = serde_json::json!({"event_id": "hang-1", "owner": format!("node/{}", unique("hang")), "occurred_at": Utc::now().to_rfc3339(), "resources": vnis});
    t.publish("provisioning.failed", &event).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    assert!(r.reason.as_deref().is_some_and(|why| why.contains("token endpoint")), "{r:?}");
    let asked = accepted.load(std::sync::atomic::Ordering::SeqCst);
    // 20 steps × 4 tries × 3 runs would be 240 waits of 0.5 s; held failures keep it to a few.
    assert!(asked <= 12, "the token endpoint was asked {asked} times");
    black_hole.abort();
    t.stop().await;
}

/// A 401 to a token that a fresh fetch gives back unchanged (a helper with
/// its own cache) counts at once: the command is not run again per step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_that_comes_back_unchanged_is_fetched_again_once_not_per_step() {
    let token = TempFile::new("token", "stale-token-cc33\n");
    let runs = TempFile::new("runs", "");
    let mut t = spawn_app(&format!(
        "[providers.cloud.auth]\ntoken_command = [\"sh\", \"-c\", \"echo run >> '{}'; cat '{}'\"]\n",
        runs.path(),
        token.path()
    ))
    .await;
    t.sim.require_tokens(TokenPolicy { fixed_tokens: vec!["fresh-token-dd44".into()], ..Default::default() });
    let vnis: Vec<serde_json::Value> =
        (0..20).map(|i| serde_json::json!({"kind": "vni", "id": format!("stale-vni-{i}")})).collect();
    let event = serde_json::json!({"event_id": "stale-1", "owner": format!("node/{}", unique("stale")), "occurred_at": Utc::now().to_rfc3339(), "resources": vnis});
    t.publish("provisioning.failed", &event).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "a 401 that a new token does not fix is permanent: {r:?}");
    let ran = std::fs::read_to_string(&runs.0).unwrap().lines().count();
    assert!(ran <= 2, "the command ran {ran} times for 20 steps");
    t.stop().await;
}
