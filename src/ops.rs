//! What operators ask of reaper, shared by the admin API and the CLI: the
//! plan for an owner, "is it really gone?", the fallback script, and sending a
//! deletion by hand.

use serde::Serialize;

use crate::app::App;
use crate::broker::{self, Names};
use crate::config::{redact_url, ProviderSettings, Settings};
use crate::contract;
use crate::domain::Resource;
use crate::plan;
use crate::providers::Action;

#[derive(Debug, Serialize)]
pub struct PlanStep {
    pub level: usize,
    pub kind: String,
    pub id: String,
    pub provider: String,
    /// The request that deletes it, e.g. "DELETE https://api/v1/servers/s1".
    pub request: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("{0}")]
    Plan(#[from] plan::PlanError),
    #[error("{0}")]
    Invalid(String),
}

/// What is left of `owner`, in the order reaper would delete it.
pub async fn plan(app: &App, owner: &str) -> Result<Vec<PlanStep>, OpsError> {
    let resources = app.ledger.remaining(owner).await?;
    plan_of(&app.settings, &app.catalog, &resources)
}

pub fn plan_of(
    settings: &Settings,
    catalog: &crate::catalog::Catalog,
    resources: &[Resource],
) -> Result<Vec<PlanStep>, OpsError> {
    let levels = plan::levels(resources, catalog)?;
    let mut out = Vec::new();
    for (n, level) in levels.iter().enumerate() {
        for &i in level {
            let r = &resources[i];
            let Some(spec) = catalog.kind(&r.kind) else { continue };
            let request = match &spec.delete {
                Action::Http(t) => {
                    let base = match settings.providers.get(&spec.provider) {
                        // Plans are printed and served: never with the URL's credentials.
                        Some(ProviderSettings::Http(h)) => redact_url(h.base_url.trim_end_matches('/')),
                        _ => String::new(),
                    };
                    let path = t.render(&r.id, &r.attributes).map_err(OpsError::Invalid)?;
                    format!("{} {base}{path}", t.method())
                }
                Action::Sql(t) => {
                    let values = t.values(r).map_err(OpsError::Invalid)?;
                    format!("SQL {} -- with {}", t.sql, serde_json::to_string(&values).expect("strings serialize"))
                }
                Action::Mongo(t) => {
                    let filter = t.for_resource(r).map_err(OpsError::Invalid)?;
                    let verb = match &t.soft_delete_field {
                        Some(f) => format!("updateMany (set {f} = now)"),
                        None => "deleteMany".into(),
                    };
                    format!("MONGO db.{}.{verb} {}", t.collection, filter)
                }
            };
            out.push(PlanStep {
                level: n,
                kind: r.kind.clone(),
                id: r.id.clone(),
                provider: spec.provider.clone(),
                request,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub kind: String,
    pub id: String,
    /// The ledger's view: live, deleted, already_gone.
    pub state: String,
    /// PASS: the provider says it is gone. FAIL: it still exists.
    /// UNKNOWN: the kind has no check, or the check failed.
    pub verdict: &'static str,
    pub detail: String,
}

/// Asks each provider whether each of the owner's resources still exists.
pub async fn validate(app: &App, owner: &str) -> Result<Vec<Verdict>, OpsError> {
    let mut out = Vec::new();
    for (resource, state) in app.ledger.resources_with_state(owner).await? {
        let r = &resource;
        let (verdict, detail) =
            match (app.catalog.kind(&r.kind), app.catalog.kind(&r.kind).and_then(|k| app.providers.get(&k.provider))) {
                (Some(spec), Some(p)) => match p.exists(spec.check.as_ref(), &spec.delete, &resource).await {
                    Ok(Some(false)) => ("PASS", "gone at the provider".to_string()),
                    Ok(Some(true)) => ("FAIL", "still exists at the provider".to_string()),
                    Ok(None) => ("UNKNOWN", "the kind has no check configured".to_string()),
                    Err(e) => ("UNKNOWN", format!("the check failed: {e}")),
                },
                _ => ("UNKNOWN", format!("kind {:?} is not configured", r.kind)),
            };
        out.push(Verdict { kind: resource.kind.clone(), id: resource.id.clone(), state, verdict, detail });
    }
    Ok(out)
}

/// A shell script of the requests that would remove what is left, in order,
/// for the day the worker can't. Tokens are read from the environment, never inlined.
pub fn script(settings: &Settings, owner: &str, steps: &[PlanStep]) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!(
        "# What is left of {} (generated by reaper {}).\n",
        shell_comment(owner),
        env!("CARGO_PKG_VERSION")
    ));
    s.push_str("# Each request must answer 2xx, or 404/410 if already gone. Stops at the first failure.\nset -eu\n\n");
    s.push_str("del() {\n  method=$1; url=$2; shift 2\n  code=$(curl -sS -o /dev/null -w '%{http_code}' -X \"$method\" \"$@\" \"$url\")\n  case \"$code\" in 2??|404|410) echo \"ok $code $url\" ;; *) echo \"FAILED $code $url\" >&2; exit 1 ;; esac\n}\n");
    let mut level = usize::MAX;
    for step in steps {
        if step.level != level {
            level = step.level;
            s.push_str(&format!("\n# level {level}: these can go in any order\n"));
        }
        let (method, url) = step.request.split_once(' ').unwrap_or(("DELETE", &step.request));
        if method == "SQL" || method == "MONGO" {
            // Values are bound by reaper, never pasted; by hand, run it with them bound.
            s.push_str(&format!(
                "# {}/{}: in the application database, run: {}\n",
                step.kind,
                shell_comment(&step.id),
                shell_comment(url)
            ));
            continue;
        }
        let auth = match settings.providers.get(&step.provider) {
            Some(ProviderSettings::Postgres(_) | ProviderSettings::Mongodb(_)) => None,
            Some(ProviderSettings::Http(h)) => h.auth.as_ref().map(|a| {
                let var =
                    a.token_env.clone().unwrap_or_else(|| format!("REAPER_{}_TOKEN", step.provider.to_uppercase()));
                let value = if a.scheme.is_empty() {
                    format!("${{{var}:?set {var}}}")
                } else {
                    format!("{} ${{{var}:?set {var}}}", a.scheme)
                };
                format!(" -H \"{}: {value}\"", a.header)
            }),
            None => None,
        };
        // Credentials in the base URL are asked for, like tokens, never written out.
        let userinfo = match settings.providers.get(&step.provider) {
            Some(ProviderSettings::Http(h)) if has_userinfo(&h.base_url) => {
                let var = format!("REAPER_{}_USERINFO", step.provider.to_uppercase());
                format!(" -u \"${{{var}:?set {var} to user:password}}\"")
            }
            _ => String::new(),
        };
        s.push_str(&format!(
            "del {method} {}{}{userinfo}  # {}/{}\n",
            shell_quote(url),
            auth.unwrap_or_default(),
            step.kind,
            shell_comment(&step.id)
        ));
    }
    s
}

/// Whether a URL carries `user[:password]@` before its host.
fn has_userinfo(url: &str) -> bool {
    url.split_once("://").is_some_and(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn shell_comment(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Publishes a `deletion.requested` for `owner`, as a producer would.
pub async fn request_deletion(
    publisher: &crate::broker::publisher::Publisher,
    names: &Names,
    owner: &str,
    dry_run: bool,
    reason: &str,
    requested_by: &str,
) -> Result<String, OpsError> {
    contract::check_owner(owner).map_err(|e| OpsError::Invalid(e.0))?;
    let event_id = uuid::Uuid::new_v4().to_string();
    let body = contract::OutgoingTeardown {
        event_id: &event_id,
        owner,
        reason,
        requested_by: Some(requested_by),
        dry_run,
        occurred_at: chrono::Utc::now(),
        error: None,
        failed_step: None,
        resources: Vec::new(),
    }
    .to_bytes();
    publisher.publish(&names.events, contract::DELETION_REQUESTED, &body, &event_id, &[]).await?;
    Ok(event_id)
}
