//! TLS to every service reaper talks to, against real TLS endpoints that
//! .ci/tls-endpoints.sh sets up with a throwaway CA: RabbitMQ's amqps
//! listener on 5671 (client certificate required), the machine's PostgreSQL
//! (role reaper_cert logs in by client certificate only), secantusd-rs over
//! TLS on 27019, and the simulated cloud behind HTTPS. The server
//! certificate names `localhost` only; `other-ca.pem` signed nothing served.

use chrono::Utc;
use reaper::config::ProviderSettings;
use reaper::devtools::demo::VpcNode;
use serde_json::json;

use crate::helpers::*;

const AMQPS: &str = "amqps://guest:guest@localhost:5671/%2f";
/// Never asked for (reaper_cert logs in by certificate): there to be looked for in the output.
const PG_PASSWORD: &str = "pg-s3cret-77e1";

/// PostgreSQL over TLS as reaper_cert, verify-full against `ca`.
fn pg_tls(host: &str, db: &str, ca: &str) -> String {
    format!(
        "postgres://reaper_cert:{PG_PASSWORD}@{host}:5432/{db}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        tls_file(ca),
        tls_file("client.pem"),
        tls_file("client.key")
    )
}

fn mongo_tls(ca: &str) -> String {
    format!(
        "mongodb://localhost:27019/?directConnection=true&tls=true&tlsCAFile={}&serverSelectionTimeoutMS=3000",
        tls_file(ca)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teardown_runs_end_to_end_over_tls_to_the_broker_the_ledger_and_every_kind_of_provider() {
    let extra = format!(
        r#"
[broker]
url = "{AMQPS}"
[broker.tls]
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
[database]
url = "{ledger}"
[providers.cloud]
base_url = "{{sim_https_url}}"
ca_file = "{ca}"
[providers.appdb]
type = "postgres"
url = "{ledger}"
[providers.docs]
type = "mongodb"
url = "{mongo}"
database = "{{mongo_prefix}}_docs"
[kinds.app_row]
provider = "appdb"
delete = "DELETE FROM tls_rows WHERE id = $1"
check = "SELECT 1 FROM tls_rows WHERE id = $1"
[kinds.note]
provider = "docs"
collection = "notes"
delete = '{{"owner": "{{id}}"}}'
"#,
        ca = tls_file("ca.pem"),
        cert = tls_file("client.pem"),
        key = tls_file("client.key"),
        ledger = pg_tls("localhost", "{db_name}", "ca.pem"),
        mongo = mongo_tls("ca.pem"),
    );
    let mut t = spawn_app(&extra).await;
    // The ledger's own connections are TLS, as reaper_cert by its certificate.
    let (ssl, user, dn): (bool, String, Option<String>) =
        sqlx::query_as("SELECT ssl, current_user::text, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(t.app.ledger.pool())
            .await
            .unwrap();
    assert!(ssl && user == "reaper_cert", "ledger connection: ssl={ssl} user={user}");
    assert_eq!(dn.as_deref(), Some("/CN=reaper_cert"), "logged in by its client certificate");
    t.sql("CREATE TABLE tls_rows (id text PRIMARY KEY)").await;
    t.sql("INSERT INTO tls_rows VALUES ('r1'), ('r2')").await;
    let mongo = mongodb::Client::with_uri_str(mongo_tls("ca.pem")).await.unwrap();
    let _dropped = DropOnExit(mongo.database(&format!("{}_docs", t.mongo_prefix)));
    let notes = mongo.database(&format!("{}_docs", t.mongo_prefix)).collection::<mongodb::bson::Document>("notes");
    notes.insert_many([mongodb::bson::doc! { "owner": "n1" }, mongodb::bson::doc! { "owner": "n2" }]).await.unwrap();

    let node = VpcNode::new(&unique("tls"));
    t.provision(&node).await;
    for (event, kind, id) in [("tr-row", "app_row", "r1"), ("tr-note", "note", "n1")] {
        t.publish("resource.tracked", &json!({"event_id": event, "owner": node.owner, "kind": kind, "id": id})).await;
    }
    let owners = vec![node.owner.clone()];
    wait_until("7 tracked", std::time::Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 7
    })
    .await;
    t.publish("deletion.requested", &deletion("del-tls", &node.owner, Utc::now())).await;
    let r = t.next_result(60).await;
    assert_eq!(r.result.status, "completed", "{:?}", r.result);
    assert_eq!(r.result.resources.len(), 7, "{:?}", r.result.resources);
    assert!(t.sim.paths().is_empty(), "left in the cloud: {:?}", t.sim.paths());
    assert_eq!(t.count("SELECT count(*) FROM tls_rows WHERE id = 'r1'").await, 0, "the tracked row goes");
    assert_eq!(t.count("SELECT count(*) FROM tls_rows WHERE id = 'r2'").await, 1, "the other row stays");
    let left: Vec<String> = notes
        .distinct("owner", mongodb::bson::doc! {})
        .await
        .unwrap()
        .into_iter()
        .filter_map(|b| b.as_str().map(str::to_string))
        .collect();
    assert_eq!(left, vec!["n2".to_string()], "only the tracked note goes");
    t.stop().await;
}

/// Drops a database of the TLS MongoDB-wire server (which the shared cleanup
/// does not know) when the test ends, passed or not.
struct DropOnExit(mongodb::Database);

impl Drop for DropOnExit {
    fn drop(&mut self) {
        let db = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), db.drop()).await;
            })
        })
        .join();
    }
}

/// `reaper check-config --connect` against every TLS endpoint: with the
/// right CA and names each answers; with the wrong ones each says which
/// server and why, in words, and never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_says_which_server_failed_tls_and_why() {
    let t = spawn_app("").await;
    let ProviderSettings::Http(cloud) = &t.app.settings.providers["cloud"] else { panic!("cloud is HTTP") };
    let front = HttpsFront::to(cloud.base_url.trim_start_matches("http://").parse().unwrap()).await;
    let https = format!("https://localhost:{}", front.port);
    let db = t.app.settings.database.url.expose().rsplit('/').next().unwrap().to_string();
    let mongo_db = format!("{}_docs", t.mongo_prefix);
    let run = |env: &[(&str, String)]| {
        let mut all: Vec<(&str, String)> = vec![
            ("REAPER_BROKER__URL", AMQPS.into()),
            ("REAPER_PROVIDERS__CLOUD__BASE_URL", https.clone()),
            ("REAPER_PROVIDERS__APPDB__TYPE", "postgres".into()),
            ("REAPER_PROVIDERS__DOCS__TYPE", "mongodb".into()),
            ("REAPER_PROVIDERS__DOCS__DATABASE", mongo_db.clone()),
        ];
        all.extend(env.iter().cloned());
        let env: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
        t.reaper(&["check-config", "--connect"], &env)
    };
    let good = run(&[
        ("REAPER_BROKER__TLS__CA_FILE", tls_file("ca.pem")),
        ("REAPER_BROKER__TLS__CERT_FILE", tls_file("client.pem")),
        ("REAPER_BROKER__TLS__KEY_FILE", tls_file("client.key")),
        ("REAPER_DATABASE__URL", pg_tls("localhost", &db, "ca.pem")),
        ("REAPER_PROVIDERS__CLOUD__CA_FILE", tls_file("ca.pem")),
        ("REAPER_PROVIDERS__APPDB__URL", pg_tls("localhost", &db, "ca.pem")),
        ("REAPER_PROVIDERS__DOCS__URL", mongo_tls("ca.pem")),
    ]);
    let out = String::from_utf8_lossy(&good.stdout).to_string() + &String::from_utf8_lossy(&good.stderr);
    assert_eq!(good.status.code(), Some(0), "{out}");
    let connections = out.split_once("connections:").map(|(_, c)| c.to_string()).unwrap_or_default();
    assert_eq!(connections.matches(": answers").count(), 5, "broker, ledger and three providers:\n{out}");

    // The wrong CA everywhere, and the ledger by a name its certificate lacks.
    let bad = run(&[
        ("REAPER_BROKER__TLS__CA_FILE", tls_file("other-ca.pem")),
        ("REAPER_BROKER__TLS__CERT_FILE", tls_file("client.pem")),
        ("REAPER_BROKER__TLS__KEY_FILE", tls_file("client.key")),
        ("REAPER_DATABASE__URL", pg_tls("127.0.0.1", &db, "ca.pem")),
        ("REAPER_PROVIDERS__APPDB__URL", pg_tls("localhost", &db, "other-ca.pem")),
        ("REAPER_PROVIDERS__DOCS__URL", mongo_tls("other-ca.pem")),
    ]);
    let out = String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(3), "{out}");
    let line = |start: &str| line_of(&out, start);
    let unknown = "not signed by a CA reaper trusts (unknown issuer)";
    let broker = line("broker");
    assert!(broker.contains("localhost:5671") && broker.contains(unknown), "{broker}");
    assert!(broker.contains("broker.tls.ca_file"), "says what to set: {broker}");
    let ledger = line("ledger");
    assert!(ledger.contains("127.0.0.1:5432") && ledger.contains("not valid for the name \"127.0.0.1\""), "{ledger}");
    let cloud = line("provider cloud");
    assert!(
        cloud.contains("localhost") && cloud.contains(unknown) && cloud.contains("providers.cloud.ca_file"),
        "{cloud}"
    );
    let appdb = line("provider appdb");
    assert!(appdb.contains(unknown) && appdb.contains("sslrootcert in providers.appdb.url"), "{appdb}");
    let docs = line("provider docs");
    assert!(docs.contains("localhost:27019") && docs.contains(unknown), "{docs}");
    assert!(!out.contains("guest:guest") && !out.contains(PG_PASSWORD), "no password: {out}");

    // The broker asks for a client certificate; without one it says so.
    let no_client = run(&[
        ("REAPER_BROKER__TLS__CA_FILE", tls_file("ca.pem")),
        ("REAPER_DATABASE__URL", pg_tls("localhost", &db, "ca.pem")),
        ("REAPER_PROVIDERS__APPDB__URL", pg_tls("localhost", &db, "ca.pem")),
        ("REAPER_PROVIDERS__DOCS__URL", mongo_tls("ca.pem")),
    ]);
    let out = String::from_utf8_lossy(&no_client.stdout).to_string();
    let broker = line_of(&out, "broker");
    assert!(broker.contains("localhost:5671") && broker.contains("client certificate"), "{out}");
}

/// The line of `reaper check-config --connect` about `service`.
fn line_of<'a>(out: &'a str, service: &str) -> &'a str {
    let connections =
        out.split_once("connections:").map(|(_, c)| c).unwrap_or_else(|| panic!("no connections:\n{out}"));
    connections
        .lines()
        .find(|l| l.trim_start().starts_with(service))
        .unwrap_or_else(|| panic!("no {service} line:\n{out}"))
}

/// A TLS setting that cannot work is a configuration error (exit 2) naming
/// it, before anything connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_settings_that_cannot_work_are_configuration_errors() {
    let t = spawn_app("").await;
    let missing = std::env::temp_dir().join("reaper-no-such-ca.pem").display().to_string();
    let not_pem = tls_file("ca.key");
    for (env, says) in [
        (vec![("REAPER_BROKER__TLS__CA_FILE", tls_file("ca.pem"))], "TLS needs amqps://"),
        (
            vec![("REAPER_BROKER__URL", AMQPS.to_string()), ("REAPER_BROKER__TLS__CERT_FILE", tls_file("client.pem"))],
            "cert_file and broker.tls.key_file go together",
        ),
        (
            vec![("REAPER_BROKER__URL", AMQPS.to_string()), ("REAPER_BROKER__TLS__CA_FILE", missing.clone())],
            "broker.tls.ca_file",
        ),
        (vec![("REAPER_PROVIDERS__CLOUD__CA_FILE", not_pem.clone())], "holds no PEM certificate"),
    ] {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = t.reaper(&["check-config"], &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {err}");
        assert!(err.contains(says), "{env:?} should say {says:?}: {err}");
    }
}

/// `mongodb+srv://` (Atlas) is looked up in DNS when the client is built.
/// No DNS server here can be pointed at one of the test's own (the driver
/// takes only its three public resolvers or the machine's), so this shows the
/// lookup is made and said plainly when it finds nothing; the rest of the
/// path is the TLS one above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongodb_srv_url_is_looked_up_in_dns_and_a_failed_lookup_is_said_plainly() {
    let t = spawn_app("").await;
    let env = [
        ("REAPER_PROVIDERS__DOCS__TYPE", "mongodb"),
        ("REAPER_PROVIDERS__DOCS__URL", "mongodb+srv://app:s3cret@cluster0.reaper.invalid/?tls=true"),
        ("REAPER_PROVIDERS__DOCS__DATABASE", "docs"),
    ];
    let out = t.reaper(&["check-config"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("provider \"docs\"") && err.contains("mongodb+srv://cluster0.reaper.invalid"), "{err}");
    assert!(err.contains("_mongodb._tcp.cluster0.reaper.invalid"), "the SRV name it asked for: {err}");
    assert!(!err.contains("s3cret"), "no password: {err}");
}

/// libpq's rule: `sslrootcert` with `sslmode=require` checks the CA (sqlx
/// alone would take any certificate, so a URL copied from libpq would be open
/// to a man in the middle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslrootcert_with_sslmode_require_checks_the_ca_as_libpq_does() {
    let url = |ca: &str| {
        format!(
            "postgres://reaper_cert@localhost:5432/postgres?sslmode=require&sslrootcert={}&sslcert={}&sslkey={}",
            tls_file(ca),
            tls_file("client.pem"),
            tls_file("client.key")
        )
    };
    let wrong = reaper::config::pg_options("database.url", &url("other-ca.pem")).unwrap();
    let err = sqlx::ConnectOptions::connect(&wrong).await.expect_err("a server the CA did not sign is refused");
    let said = reaper::tls::explain(&err, "localhost", "sslrootcert").unwrap_or_else(|| err.to_string());
    assert!(said.contains("unknown issuer"), "{said}");
    let right = reaper::config::pg_options("database.url", &url("ca.pem")).unwrap();
    let conn = sqlx::ConnectOptions::connect(&right).await.expect("the right CA connects");
    drop(conn);
    // A file the URL names that is not there is a configuration error naming it.
    let missing = url("ca.pem").replace("sslkey=", "sslkey=/nonexistent");
    let err = reaper::config::pg_options("providers.appdb.url", &missing).unwrap_err().to_string();
    assert!(err.contains("providers.appdb.url") && err.contains("sslkey"), "{err}");
}
