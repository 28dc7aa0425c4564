//! The public wire contract (docs/contract.md, proto/reaper/v1/events.proto).
//!
//! The only module that knows the JSON shapes. `decode` turns a delivery into an
//! [`Event`] or a [`Malformed`] reason; `TeardownResult` is what leaves on the
//! results exchange.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::Catalog;
use crate::domain::{Resource, ResourceRef};

/// Routing keys on the events exchange.
pub const DELETION_REQUESTED: &str = "deletion.requested";
pub const PROVISIONING_FAILED: &str = "provisioning.failed";
pub const RESOURCE_TRACKED: &str = "resource.tracked";
/// Routing keys on the results exchange.
pub const TEARDOWN_COMPLETED: &str = "teardown.completed";
pub const TEARDOWN_DEAD_LETTERED: &str = "teardown.dead_lettered";
/// An operator cancelled the job (`reaper cancel`): `reason` says why.
pub const TEARDOWN_CANCELLED: &str = "teardown.cancelled";

/// Largest message reaper accepts; larger ones are dead-lettered unread.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Longest `event_id` in bytes: it travels as the AMQP `message_id`, a short
/// string of at most 255 bytes.
pub const MAX_EVENT_ID_BYTES: usize = 255;

/// One message as it came off the broker, with what the broker and reaper
/// know about it besides its body.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub routing_key: &'a str,
    pub body: &'a [u8],
    /// When reaper first received the message (a trip through a retry queue
    /// keeps the first time).
    pub received_at: DateTime<Utc>,
    /// The AMQP `timestamp` property, when the producer set one.
    pub sent_at: Option<DateTime<Utc>>,
    /// The producer's W3C `traceparent` header, when it sent a valid one.
    pub traceparent: Option<&'a str>,
}

/// A W3C `traceparent` (version 00: `00-<32 hex trace id>-<16 hex parent
/// id>-<2 hex flags>`, ids not all zero), lower-cased; anything else is
/// dropped rather than carried into logs and the ledger.
pub fn traceparent(value: &str) -> Option<String> {
    let value = value.trim();
    if value.len() != 55 {
        return None;
    }
    let v = value.to_ascii_lowercase();
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    match parts.as_slice() {
        [ver, trace, parent, flags]
            if *ver == "00"
                && hex(trace, 32)
                && hex(parent, 16)
                && hex(flags, 2)
                && nonzero(trace)
                && nonzero(parent) =>
        {
            Some(v)
        }
        _ => None,
    }
}

/// What an event is checked against beyond its shape (`worker.*` settings).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How far ahead of `received_at` an `occurred_at` may be.
    pub max_clock_skew: chrono::Duration,
    /// Most resources one event may list.
    pub max_resources: usize,
}

impl Limits {
    /// The worker's settings for them.
    pub fn of(w: &crate::config::WorkerSettings) -> Limits {
        Limits {
            max_clock_skew: chrono::Duration::seconds(w.max_clock_skew_secs.min(366 * 24 * 3600) as i64),
            max_resources: w.max_resources_per_event,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_clock_skew: chrono::Duration::minutes(5), max_resources: 5000 }
    }
}

/// A well-formed event, validated against the configured kinds.
#[derive(Debug, Clone)]
pub enum Event {
    Teardown(TeardownRequest),
    Tracked(Tracked),
}

// The event shapes the rest of the crate works with live in `domain`; this
// module reads them off the wire.
pub use crate::domain::{TeardownRequest, Tracked, TrackedResource};

/// Why a message was refused. Goes into the `x-reaper-reason` header on the dead queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

#[derive(Deserialize)]
struct WireTeardown {
    event_id: String,
    owner: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    requested_by: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default, deserialize_with = "occurred_at_field")]
    occurred_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "int64")]
    generation: Option<i64>,
    #[serde(default)]
    failed_step: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    resources: Vec<WireResource>,
}

/// A track names one resource at the top level (kind, id, ...) or lists
/// several in `resources`; the fields are all optional here so that `decode`
/// can say which form is missing or mixed.
#[derive(Deserialize)]
struct WireTracked {
    event_id: String,
    owner: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    attributes: Option<BTreeMap<String, String>>,
    #[serde(default)]
    parent: Option<WireRef>,
    #[serde(default, deserialize_with = "created_at_field")]
    created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    resources: Option<Vec<WireResource>>,
    #[serde(default, deserialize_with = "int64")]
    generation: Option<i64>,
}

impl WireTracked {
    /// The resources it names, in either form.
    fn into_resources(self, limits: &Limits) -> Result<Vec<WireResource>, Malformed> {
        // An empty map or list is what some protobuf JSON writers print for "unset".
        let resources = self.resources.filter(|list| !list.is_empty() || self.kind.is_none());
        let top_level = self.kind.is_some()
            || self.id.is_some()
            || self.attributes.as_ref().is_some_and(|a| !a.is_empty())
            || self.parent.is_some()
            || self.created_at.is_some();
        match resources {
            Some(_) if top_level => Err(Malformed(
                "a resource.tracked names either kind and id, or resources (a list); this one has both".into(),
            )),
            Some(list) if list.is_empty() => Err(Malformed("resources is empty; list at least one".into())),
            Some(list) if list.len() > limits.max_resources => Err(Malformed(format!(
                "the event lists {} resources, the limit is {} (worker.max_resources_per_event); split it into several tracks",
                list.len(),
                limits.max_resources
            ))),
            Some(list) => Ok(list),
            None => {
                let missing = |field: &str| Malformed(format!("invalid fields: missing field `{field}` (or list resources)"));
                Ok(vec![WireResource {
                    kind: self.kind.ok_or_else(|| missing("kind"))?,
                    id: self.id.ok_or_else(|| missing("id"))?,
                    attributes: self.attributes.unwrap_or_default(),
                    parent: self.parent,
                    created_at: self.created_at,
                    owner: None,
                    generation: None,
                    event_id: None,
                }])
            }
        }
    }
}

#[derive(Deserialize)]
struct WireResource {
    kind: String,
    id: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    parent: Option<WireRef>,
    #[serde(default, deserialize_with = "created_at_field")]
    created_at: Option<DateTime<Utc>>,
    /// An event's own fields: a track's list refuses them (`validate_tracked`).
    #[serde(default)]
    owner: Option<IgnoredAny>,
    #[serde(default)]
    generation: Option<IgnoredAny>,
    #[serde(default)]
    event_id: Option<IgnoredAny>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct WireRef {
    pub kind: String,
    pub id: String,
}

/// Decodes and validates one message. Everything a producer can get wrong ends
/// here as a [`Malformed`] with a reason a person can act on.
pub fn decode(env: &Envelope, catalog: &Catalog, limits: &Limits) -> Result<Event, Malformed> {
    let body = env.body;
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(Malformed(format!("message is {} bytes, the limit is {MAX_MESSAGE_BYTES}", body.len())));
    }
    match env.routing_key {
        DELETION_REQUESTED | PROVISIONING_FAILED => {
            let wire: WireTeardown = parse_json(body)?;
            let trigger = if env.routing_key == DELETION_REQUESTED {
                if !wire.resources.is_empty() {
                    return Err(Malformed(
                        "deletion.requested does not carry resources; track them or send provisioning.failed".into(),
                    ));
                }
                crate::domain::Trigger::DeletionRequested
            } else {
                crate::domain::Trigger::ProvisioningFailed
            };
            check_event_id(&wire.event_id)?;
            check_owner(&wire.owner)?;
            if wire.resources.len() > limits.max_resources {
                return Err(Malformed(format!(
                    "the event lists {} resources, the limit is {} (worker.max_resources_per_event); track them instead",
                    wire.resources.len(),
                    limits.max_resources
                )));
            }
            let resources = wire.resources.into_iter().map(|r| r.validate(catalog)).collect::<Result<Vec<_>, _>>()?;
            Ok(Event::Teardown(TeardownRequest {
                event_id: wire.event_id,
                owner: wire.owner,
                trigger,
                dry_run: wire.dry_run,
                occurred_at: occurred_at(wire.occurred_at, env, limits),
                generation: wire.generation,
                resources: dedupe(resources)?,
                asked: crate::domain::Asked {
                    reason: wire.reason,
                    requested_by: wire.requested_by,
                    failed_step: wire.failed_step,
                    error: wire.error,
                },
            }))
        }
        RESOURCE_TRACKED => {
            let mut wire: WireTracked = parse_json(body)?;
            check_event_id(&wire.event_id)?;
            check_owner(&wire.owner)?;
            let (event_id, owner, generation) =
                (std::mem::take(&mut wire.event_id), std::mem::take(&mut wire.owner), wire.generation);
            let resources = wire.into_resources(limits)?;
            let resources =
                resources.into_iter().map(|r| r.validate_tracked(catalog)).collect::<Result<Vec<_>, _>>()?;
            let mut resources = dedupe(resources)?;
            resources.sort_by(|a, b| (&a.resource.kind, &a.resource.id).cmp(&(&b.resource.kind, &b.resource.id)));
            Ok(Event::Tracked(Tracked { event_id, owner, generation, resources }))
        }
        other => Err(Malformed(format!(
            "unknown routing key {other:?}; expected {DELETION_REQUESTED}, {PROVISIONING_FAILED} or {RESOURCE_TRACKED}"
        ))),
    }
}

/// When the owner's life ended, as far as reaper will believe: the producer's
/// `occurred_at`, else the message's AMQP timestamp, else when reaper received
/// it; never later than `received_at` + the allowed skew. A time in the future
/// would make the owner's next life look like part of this one (its tracks
/// "late"), and tear it down.
fn occurred_at(stated: Option<DateTime<Utc>>, env: &Envelope, limits: &Limits) -> DateTime<Utc> {
    let claimed = stated.or(env.sent_at).unwrap_or(env.received_at);
    match env.received_at.checked_add_signed(limits.max_clock_skew) {
        Some(latest) => claimed.min(latest),
        None => claimed,
    }
}

/// The same resource listed twice is one resource (the ledger could not
/// store it twice in one statement); listed twice with different facts, it
/// is ambiguous which to act on, and refused.
fn dedupe(resources: Vec<TrackedResource>) -> Result<Vec<TrackedResource>, Malformed> {
    let mut seen: std::collections::HashMap<(String, String), usize> = std::collections::HashMap::new();
    let mut out: Vec<TrackedResource> = Vec::with_capacity(resources.len());
    for r in resources {
        let key = (r.resource.kind.clone(), r.resource.id.clone());
        match seen.get(&key) {
            Some(&i) if out[i].resource == r.resource && out[i].created_at == r.created_at => {}
            Some(_) => {
                return Err(Malformed(format!(
                    "{}/{} is listed twice with different attributes, parents or created_at",
                    key.0, key.1
                )))
            }
            None => {
                seen.insert(key, out.len());
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// A time field, refused with its name and value when it is not RFC 3339
/// (serde's own message names neither).
fn time_field<'de, D: serde::Deserializer<'de>>(d: D, field: &str) -> Result<Option<DateTime<Utc>>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else { return Ok(None) };
    // The same parse serde would do (chrono's FromStr), only with a better error.
    text.parse::<DateTime<Utc>>().map(Some).map_err(|_| {
        let shown: String = text.chars().take(64).collect();
        serde::de::Error::custom(format!("{field} {shown:?} is not an RFC 3339 time (like 2026-12-05T10:00:00Z)"))
    })
}

fn occurred_at_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    time_field(d, "occurred_at")
}

fn created_at_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    time_field(d, "created_at")
}

/// proto3's JSON mapping writes 64-bit integers as strings; accept both.
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        N(i64),
        S(String),
    }
    match Option::<Int>::deserialize(d)? {
        None => Ok(None),
        Some(Int::N(n)) => Ok(Some(n)),
        Some(Int::S(s)) => {
            s.parse().map(Some).map_err(|_| serde::de::Error::custom(format!("generation {s:?} is not an integer")))
        }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Malformed> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            Malformed(format!("not JSON: {e}"))
        } else {
            Malformed(format!("invalid fields: {e}"))
        }
    })
}

/// PostgreSQL text and jsonb cannot hold NUL; refusing it here keeps such an
/// event from failing in the ledger over and over.
fn check_no_nul<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<(), Malformed> {
    for (name, value) in fields {
        if value.contains('\0') {
            return Err(Malformed(format!("{name} contains a NUL character")));
        }
    }
    Ok(())
}

fn check_event_id(id: &str) -> Result<(), Malformed> {
    check_no_nul([("event_id", id)])?;
    let n = id.chars().count();
    if n == 0 || n > 128 {
        return Err(Malformed(format!("event_id must be 1..128 characters, got {n}")));
    }
    if id.len() > MAX_EVENT_ID_BYTES {
        return Err(Malformed(format!(
            "event_id must be at most {MAX_EVENT_ID_BYTES} bytes in UTF-8 (it is the AMQP message_id), got {}",
            id.len()
        )));
    }
    Ok(())
}

/// Owners are "type/id", both parts non-empty, 1..256 characters in all.
pub fn check_owner(owner: &str) -> Result<(), Malformed> {
    check_no_nul([("owner", owner)])?;
    let n = owner.chars().count();
    if n == 0 || n > 256 {
        return Err(Malformed(format!("owner must be 1..256 characters, got {n}")));
    }
    match owner.split_once('/') {
        Some((t, i)) if !t.is_empty() && !i.is_empty() => Ok(()),
        _ => Err(Malformed(format!("owner {owner:?} is not of the form \"type/id\""))),
    }
}

impl WireResource {
    /// A resource of a track's list: as `validate`, and without fields of
    /// its own that a track takes for the whole list. A per-resource owner
    /// would be recorded (and torn down) under the event's owner; a
    /// per-resource generation would be dropped, and another rule would
    /// decide which life the resource belongs to.
    fn validate_tracked(self, catalog: &Catalog) -> Result<TrackedResource, Malformed> {
        for (field, present) in [
            ("owner", self.owner.is_some()),
            ("generation", self.generation.is_some()),
            ("event_id", self.event_id.is_some()),
        ] {
            if present {
                return Err(Malformed(format!(
                    "{}/{} in resources has its own {field}; a track lists resources of its owner, \
                     of its generation (send one track per owner and generation)",
                    self.kind, self.id
                )));
            }
        }
        self.validate(catalog)
    }

    fn validate(self, catalog: &Catalog) -> Result<TrackedResource, Malformed> {
        check_no_nul([("kind", self.kind.as_str()), ("id", self.id.as_str())])?;
        check_no_nul(
            self.attributes
                .iter()
                .flat_map(|(k, v)| [("an attribute name", k.as_str()), ("an attribute value", v.as_str())]),
        )?;
        if let Some(p) = &self.parent {
            check_no_nul([("parent.kind", p.kind.as_str()), ("parent.id", p.id.as_str())])?;
        }
        let kind = catalog.kind(&self.kind).ok_or_else(|| {
            Malformed(format!("unknown kind {:?}; configured kinds: {}", self.kind, catalog.kind_names().join(", ")))
        })?;
        let n = self.id.chars().count();
        if n == 0 || n > 512 {
            return Err(Malformed(format!("{} id must be 1..512 characters, got {n}", self.kind)));
        }
        if let Some(missing) = kind.missing_attribute(&self.attributes) {
            return Err(Malformed(format!(
                "{}/{} lacks attribute {missing:?}, which the kind's requests need",
                self.kind, self.id
            )));
        }
        if let Some(why) = kind.path_values_refused(&self.id, &self.attributes) {
            return Err(Malformed(format!("{}/{:?}: {why}", self.kind, self.id)));
        }
        if let Some(p) = &self.parent {
            if catalog.kind(&p.kind).is_none() {
                return Err(Malformed(format!("parent of {}/{} has unknown kind {:?}", self.kind, self.id, p.kind)));
            }
            if p.id.is_empty() || p.id.chars().count() > 512 {
                return Err(Malformed(format!("parent id of {}/{} must be 1..512 characters", self.kind, self.id)));
            }
        }
        Ok(TrackedResource {
            resource: Resource {
                kind: self.kind,
                id: self.id,
                attributes: self.attributes,
                parent: self.parent.map(|p| ResourceRef { kind: p.kind, id: p.id }),
            },
            created_at: self.created_at,
        })
    }
}

/// What reaper publishes on the results exchange when a job ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TeardownResult {
    pub event_id: String,
    pub job_id: Uuid,
    pub owner: String,
    pub trigger: String,
    pub status: String,
    pub dry_run: bool,
    pub resources: Vec<ResourceReport>,
    pub attempts: u32,
    #[serde(with = "rfc3339")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "rfc3339")]
    pub finished_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One resource's line in a [`TeardownResult`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResourceReport {
    pub kind: String,
    pub id: String,
    pub outcome: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TeardownResult {
    pub fn routing_key(&self) -> &'static str {
        match self.status.as_str() {
            "dead_lettered" => TEARDOWN_DEAD_LETTERED,
            "cancelled" => TEARDOWN_CANCELLED,
            _ => TEARDOWN_COMPLETED,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a TeardownResult always serializes")
    }
}

/// A teardown event reaper publishes itself (`reaper request-deletion`, the
/// admin API, reconcile): the shape producers send, written in this one place.
#[derive(Debug, Clone, Serialize)]
pub struct OutgoingTeardown<'a> {
    pub event_id: &'a str,
    pub owner: &'a str,
    pub reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    #[serde(with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    /// provisioning.failed: what failed, and at which step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<OutgoingResource<'a>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutgoingResource<'a> {
    pub kind: &'a str,
    pub id: &'a str,
    pub attributes: &'a BTreeMap<String, String>,
}

impl OutgoingTeardown<'_> {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an outgoing event serializes")
    }
}

/// A `resource.tracked` reaper publishes itself (`reaper track`).
#[derive(Debug, Clone, Serialize)]
pub struct OutgoingTrack<'a> {
    pub event_id: &'a str,
    pub owner: &'a str,
    #[serde(flatten)]
    pub resource: OutgoingResource<'a>,
    #[serde(with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
}

impl OutgoingTrack<'_> {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an outgoing event serializes")
    }
}

/// Timestamps leave as RFC 3339 in UTC with `Z`, in the protobuf JSON form
/// (0, 3, 6 or 9 fractional digits), so the two encodings agree byte for byte.
pub mod rfc3339 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn format(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_a_valid_version_00_traceparent_is_kept() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent(good).as_deref(), Some(good));
        assert_eq!(traceparent(&good.to_uppercase()).as_deref(), Some(good), "lower-cased");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\n",
        ] {
            assert_eq!(traceparent(bad), None, "{bad:?}");
        }
        assert_eq!(traceparent(&"0".repeat(1 << 20)), None, "a huge value is dropped unread");
    }

    use super::*;

    #[test]
    fn the_events_reaper_writes_itself_pass_its_own_door() {
        let settings = crate::config::Settings::from_toml(include_str!("../config/vpc-node.toml")).unwrap();
        let catalog = crate::catalog::validate(&settings).unwrap();
        let attrs: BTreeMap<String, String> = [("zone_id".to_string(), "z1".to_string())].into();
        let now = Utc::now();
        let failed = OutgoingTeardown {
            event_id: "e1",
            owner: "node/n1",
            reason: "reconcile rule r",
            requested_by: None,
            dry_run: false,
            occurred_at: now,
            error: Some("orphan found by reconcile"),
            failed_step: Some("r"),
            resources: vec![OutgoingResource { kind: "dns_record", id: "r1", attributes: &attrs }],
        };
        let bytes = failed.to_bytes();
        let env = Envelope {
            routing_key: PROVISIONING_FAILED,
            body: &bytes,
            received_at: now,
            sent_at: None,
            traceparent: None,
        };
        let Ok(Event::Teardown(t)) = decode(&env, &catalog, &Limits::default()) else { panic!("refused") };
        assert_eq!((t.owner.as_str(), t.resources.len()), ("node/n1", 1));
        assert_eq!(t.resources[0].resource.attributes["zone_id"], "z1");
        let asked = OutgoingTeardown {
            event_id: "e2",
            requested_by: Some("reaper-cli"),
            dry_run: true,
            error: None,
            failed_step: None,
            resources: Vec::new(),
            ..failed
        };
        let bytes = asked.to_bytes();
        let env = Envelope {
            routing_key: DELETION_REQUESTED,
            body: &bytes,
            received_at: now,
            sent_at: None,
            traceparent: None,
        };
        let Ok(Event::Teardown(t)) = decode(&env, &catalog, &Limits::default()) else { panic!("refused") };
        assert!(t.dry_run && t.resources.is_empty());
    }
}
