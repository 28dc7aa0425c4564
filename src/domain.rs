//! Plain types the rest of the crate talks in. No I/O, no wire format.

use std::collections::BTreeMap;
use std::fmt;

/// A resource as reaper knows it: the provider's own ID, the kind that says how
/// to delete it, and what templates may need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub kind: String,
    pub id: String,
    /// Values a request template may use as `{attr.NAME}`.
    pub attributes: BTreeMap<String, String>,
    /// This resource must be gone before its parent is deleted.
    pub parent: Option<ResourceRef>,
}

/// Names one resource: `kind/id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceRef {
    pub kind: String,
    pub id: String,
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

impl Resource {
    pub fn reference(&self) -> ResourceRef {
        ResourceRef { kind: self.kind.clone(), id: self.id.clone() }
    }
}

/// What happened to one resource in one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Deleted,
    AlreadyGone,
    WouldDelete,
    Blocked,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Deleted => "deleted",
            Outcome::AlreadyGone => "already_gone",
            Outcome::WouldDelete => "would_delete",
            Outcome::Blocked => "blocked",
            Outcome::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "deleted" => Outcome::Deleted,
            "already_gone" => Outcome::AlreadyGone,
            "would_delete" => Outcome::WouldDelete,
            "blocked" => Outcome::Blocked,
            "failed" => Outcome::Failed,
            _ => return None,
        })
    }

    /// The resource no longer exists: a resumed job must not touch it again.
    pub fn is_gone(self) -> bool {
        matches!(self, Outcome::Deleted | Outcome::AlreadyGone)
    }
}

/// Why a job exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    DeletionRequested,
    ProvisioningFailed,
    /// A resource was tracked after its owner's teardown had started.
    LateTrack,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::DeletionRequested => "deletion.requested",
            Trigger::ProvisioningFailed => "provisioning.failed",
            Trigger::LateTrack => "late_track",
        }
    }

    pub fn parse(s: &str) -> Option<Trigger> {
        Some(match s {
            "deletion.requested" => Trigger::DeletionRequested,
            "provisioning.failed" => Trigger::ProvisioningFailed,
            "late_track" => Trigger::LateTrack,
            _ => return None,
        })
    }
}

/// Terminal state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Running,
    Completed,
    DeadLettered,
    /// An operator cancelled it (`reaper cancel`).
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::DeadLettered => "dead_lettered",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        Some(match s {
            "running" => JobStatus::Running,
            "completed" => JobStatus::Completed,
            "dead_lettered" => JobStatus::DeadLettered,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }
}

/// A duration as people write it: "250ms", "1s", "1.5s", "2m", "1h 30m".
pub fn human(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => {
            let s = d.as_secs_f64();
            if ms.is_multiple_of(1000) {
                format!("{}s", ms / 1000)
            } else {
                format!("{}s", (s * 10.0).round() / 10.0)
            }
        }
        _ => {
            let secs = d.as_secs();
            let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
            let parts: Vec<String> = [(h, "h"), (m, "m"), (s, "s")]
                .into_iter()
                .filter(|(n, _)| *n > 0)
                .map(|(n, u)| format!("{n}{u}"))
                .collect();
            parts.join(" ")
        }
    }
}

/// An age as people write it on a command line, in seconds: "48h", "90m",
/// "7d", "1h30m", "3600s", or a bare number of seconds.
pub fn parse_age(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not an age: write 48h, 90m, 7d, 1h30m or a number of seconds (up to 100 years)");
    // Past a century it is a typo, and PostgreSQL's intervals end soon after.
    let sane = |secs: f64| (secs.is_finite() && (0.0..=100.0 * 365.0 * 86_400.0).contains(&secs)).then_some(secs);
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return sane(secs).ok_or_else(bad);
    }
    let (mut total, mut number) = (0.0, String::new());
    for c in t.chars() {
        match c {
            '0'..='9' | '.' => number.push(c),
            's' | 'm' | 'h' | 'd' if !number.is_empty() => {
                let n: f64 = number.parse().map_err(|_| bad())?;
                total += n * match c {
                    's' => 1.0,
                    'm' => 60.0,
                    'h' => 3600.0,
                    _ => 86400.0,
                };
                number.clear();
            }
            _ => return Err(bad()),
        }
    }
    if !number.is_empty() || t.is_empty() {
        return Err(bad());
    }
    sane(total).ok_or_else(bad)
}

/// A `deletion.requested` or `provisioning.failed` event.
#[derive(Debug, Clone)]
pub struct TeardownRequest {
    pub event_id: String,
    pub owner: String,
    pub trigger: Trigger,
    pub dry_run: bool,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    /// Which life of a reused owner name ends here, when the producer knows.
    pub generation: Option<i64>,
    /// Resources the provisioner knows it created (provisioning.failed only).
    pub resources: Vec<TrackedResource>,
    pub asked: Asked,
}

/// What the producer said about a teardown: why, who asked, and for a
/// provisioning failure, which step failed with which error. Kept with the
/// job (in its stored event) for operators: `reaper show`, `GET /v1/jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Asked {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A `resource.tracked` event: one resource, or a list of one owner's.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub event_id: String,
    pub owner: String,
    pub generation: Option<i64>,
    /// Never empty; sorted by kind, then id, so that one list has one identity
    /// however the producer ordered it (see `Ledger::track`).
    pub resources: Vec<TrackedResource>,
}

impl Tracked {
    /// "vni/v-1", or "vni/v-1 and 4 more": how logs and refusals name it.
    pub fn describe(&self) -> String {
        let first = self.resources[0].resource.reference().to_string();
        match self.resources.len() {
            1 => first,
            n => format!("{first} and {} more", n - 1),
        }
    }
}

/// A resource with the facts that decide which life of its owner it belongs to.
#[derive(Debug, Clone)]
pub struct TrackedResource {
    pub resource: Resource,
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// RFC 3339, or a date-time without a zone (taken as UTC), or UNIX seconds.
pub fn parse_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    // PostgreSQL's text form of a timestamptz: "2026-12-01 01:03:18.123456+00".
    if let Ok(t) = chrono::DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z") {
        return Some(t.with_timezone(&chrono::Utc));
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(n) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Some(n.and_utc());
        }
    }
    s.parse::<f64>().ok().and_then(|secs| chrono::DateTime::from_timestamp(secs as i64, 0))
}

#[cfg(test)]
mod tests {
    use super::parse_age;

    #[test]
    fn ages_read_as_people_write_them() {
        assert_eq!(parse_age("48h"), Ok(172_800.0));
        assert_eq!(parse_age("1h30m"), Ok(5_400.0));
        assert_eq!(parse_age("7d"), Ok(604_800.0));
        assert_eq!(parse_age("90"), Ok(90.0));
        assert_eq!(parse_age("2.5m"), Ok(150.0));
        for bad in ["", "h", "48x", "-1", "48h5", "1e400", "NaN", "1e20", "99999999d"] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
    }
}
