//! Reconcile rules as configured: what each side reads, what is done with an
//! orphan, the safety settings. Plain data; `src/reconcile/` checks and runs them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSettings {
    /// The shortest `every_secs` a rule's schedule may have.
    pub min_interval_secs: f64,
    /// Whether `reaper run` runs the rules' schedules (off: by hand and the admin API only).
    pub run_schedules: bool,
    #[serde(default)]
    pub rules: BTreeMap<String, RuleSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    /// The source of truth. Without one, every item of the copy that passes
    /// the filters is an orphan (a rule like "failed for more than 24 hours").
    #[serde(default)]
    pub truth: Option<InventorySettings>,
    pub copy: InventorySettings,
    pub action: ActionSettings,
    /// Items younger than this (by their created_at, else by when reaper first
    /// saw them orphaned) are left alone.
    #[serde(default)]
    pub grace_secs: f64,
    /// Consecutive sweeps that must all find an item orphaned before it is touched.
    #[serde(default = "one")]
    pub quarantine_sweeps: u32,
    /// Refuse (unless forced) when a sweep would tear down more than this many...
    #[serde(default = "default_max_count")]
    pub max_count: u64,
    /// ...or more than this fraction of the copy (rules with a truth only).
    #[serde(default = "default_max_fraction")]
    pub max_fraction: f64,
    /// Only items matching all of these are considered.
    #[serde(default)]
    pub include: Vec<Filter>,
    /// Items matching any of these are never touched.
    #[serde(default)]
    pub exclude: Vec<Filter>,
    /// Run inside `reaper run` this often; unset: by hand only.
    #[serde(default)]
    pub every_secs: Option<f64>,
    /// Or at these times: a cron pattern in UTC ("0 4 * * *"; six fields
    /// put seconds first). One of the two.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Scheduled sweeps act (true) or only report (false, the default).
    #[serde(default)]
    pub execute_on_schedule: bool,
    /// false keeps the rule configured, and runnable by hand, with its schedule off.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

impl RuleSettings {
    /// When it runs, as listings say it: "every 3600s", "cron 0 4 * * * (UTC)",
    /// "by hand"; "(disabled)" when its schedule is off.
    pub fn when(&self) -> String {
        let when = match (self.every_secs, &self.schedule) {
            (Some(e), _) => format!("every {e}s"),
            (None, Some(c)) => format!("cron {c} (UTC)"),
            (None, None) => return "by hand".into(),
        };
        let act = if self.execute_on_schedule { "executes" } else { "reports only" };
        match self.enabled {
            true => format!("{when}, {act}"),
            false => format!("{when} (disabled: by hand only)"),
        }
    }
}

fn one() -> u32 {
    1
}
fn default_max_count() -> u64 {
    100
}
fn default_max_fraction() -> f64 {
    0.5
}

/// What a sweep does with each orphan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSettings {
    /// Tear the orphan down as a resource of this kind (provisioning.failed
    /// listing it). Without a kind, the owner itself is torn down
    /// (deletion.requested or provisioning.failed, lookups finding the rest).
    #[serde(default)]
    pub kind: Option<String>,
    /// The attribute that is the resource's id; default the key.
    #[serde(default)]
    pub id: Option<String>,
    /// The owner, "type/{key}"; default "reconcile.RULE/{key}".
    #[serde(default)]
    pub owner: Option<String>,
    /// "deletion.requested" or "provisioning.failed".
    #[serde(default)]
    pub event: Option<String>,
}

/// `field` is "key" or an attribute; `glob` may use `*`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub field: String,
    pub glob: String,
}

/// Where one side of a rule is read from. Which fields apply depends on the
/// provider's type; `provider = "ledger"` reads what reaper itself tracks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventorySettings {
    pub provider: String,
    /// HTTP: "GET /path" of the list.
    #[serde(default)]
    pub request: Option<String>,
    /// HTTP: JSON pointer to the array of items in a page ("" = the page is the array).
    #[serde(default)]
    pub items: String,
    /// The key: a JSON pointer in an HTTP item ("/name"), a document field, a
    /// SQL column (default "key").
    #[serde(default)]
    pub key: Option<String>,
    /// HTTP: JSON pointer to the next page's token; absent or null ends the list.
    #[serde(default)]
    pub next: Option<String>,
    /// HTTP: query parameter the token is sent back in.
    #[serde(default = "default_next_param")]
    pub next_param: String,
    /// HTTP: JSON pointer to the next page's URL (IBM VPC's "/next/href"), a
    /// whole URL or a path; followed only under `base_url`. Absent or null ends the list.
    #[serde(default)]
    pub next_url: Option<String>,
    /// HTTP: offset paging, the query parameter the offset goes in ("offset").
    /// Pages are asked for until one comes back empty.
    #[serde(default)]
    pub offset_param: Option<String>,
    /// HTTP, offset paging: the query parameter of the page size, and the size asked for.
    #[serde(default = "default_limit_param")]
    pub limit_param: String,
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// HTTP, offset paging: JSON pointer to the list's total count, if the
    /// API gives one; a total that changes between pages fails the load.
    #[serde(default)]
    pub total: Option<String>,
    /// HTTP: the key is the last '/'-separated segment of the value at `key`
    /// (a resource name such as "projects/p/locations/l/models/123" → "123").
    #[serde(default)]
    pub key_last_segment: bool,
    /// Where the creation time is (pointer, field or column); RFC 3339, a
    /// UNIX time in seconds, or a timestamp column. Times without a zone are UTC.
    #[serde(default)]
    pub created_at: Option<String>,
    /// Attribute name → pointer or field (HTTP, MongoDB). SQL: every other column.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// SQL: the query.
    #[serde(default)]
    pub sql: Option<String>,
    /// MongoDB: the collection and a filter (plain JSON, no placeholders).
    #[serde(default)]
    pub collection: Option<String>,
    #[serde(default)]
    pub filter: Option<String>,
    /// Ledger: the kind whose live tracked resources are the inventory.
    #[serde(default)]
    pub kind: Option<String>,
}

fn default_next_param() -> String {
    "start".into()
}
fn default_limit_param() -> String {
    "limit".into()
}
fn default_page_size() -> u32 {
    100
}
