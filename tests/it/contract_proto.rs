//! The protobuf schemas in proto/ must describe exactly the JSON reaper reads
//! and writes: every example goes JSON → proto message (unknown fields refused)
//! → JSON and must come back equal, and reaper must decode what protobuf writes.

use chrono::{DateTime, Utc};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use reaper::config::Settings;
use reaper::contract::{self, ResourceReport, TeardownResult};
use serde_json::{json, Value};

fn pool() -> DescriptorPool {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let fds = protox::compile(["reaper/v1/events.proto"], [root]).expect("the proto compiles");
    DescriptorPool::from_file_descriptor_set(fds).unwrap()
}

fn round_trip(pool: &DescriptorPool, message: &str, value: &Value) -> Result<Value, String> {
    let desc = pool.get_message_by_name(&format!("reaper.v1.{message}")).unwrap();
    let text = serde_json::to_string(value).unwrap();
    let mut de = serde_json::Deserializer::from_str(&text);
    let msg =
        DynamicMessage::deserialize_with_options(desc, &mut de, &DeserializeOptions::new().deny_unknown_fields(true))
            .map_err(|e| e.to_string())?;
    let opts =
        SerializeOptions::new().use_proto_field_name(true).stringify_64_bit_integers(false).skip_default_fields(true);
    let mut ser = serde_json::Serializer::new(Vec::new());
    msg.serialize_with_options(&mut ser, &opts).map_err(|e| e.to_string())?;
    Ok(serde_json::from_slice(&ser.into_inner()).unwrap())
}

/// Drops fields holding their default (protobuf does not write them) and
/// writes timestamps one way, so equal meanings compare equal.
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| {
                    !matches!(v, Value::Bool(false) | Value::Null)
                        && *v != &json!(0)
                        && *v != &json!([])
                        && *v != &json!({})
                        && *v != &json!("")
                })
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::String(s) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => Value::String(t.with_timezone(&Utc).to_rfc3339()),
            Err(_) => v.clone(),
        },
        _ => v.clone(),
    }
}

fn examples() -> Vec<(&'static str, &'static str, Value)> {
    let t = "2026-11-23T10:00:00.123+01:00";
    vec![
        (
            "DeletionRequested",
            "deletion.requested",
            json!({"event_id": "e1", "owner": "node/n1", "reason": "deleted by user", "requested_by": "api", "dry_run": true, "occurred_at": t, "generation": 3}),
        ),
        (
            "ProvisioningFailed",
            "provisioning.failed",
            json!({
                "event_id": "e2", "owner": "node/n1", "occurred_at": t, "failed_step": "attach_vni", "error": "quota",
                "resources": [{"kind": "vni", "id": "v1", "attributes": {"a": "b"}, "parent": {"kind": "bare_metal_server", "id": "s1"}, "created_at": t}]
            }),
        ),
        (
            "ResourceTracked",
            "resource.tracked",
            json!({"event_id": "e3", "owner": "node/n1", "kind": "ip_reservation", "id": "ip1", "attributes": {"subnet_id": "s"}, "created_at": t, "generation": 3}),
        ),
        (
            "ResourceTracked",
            "resource.tracked",
            json!({
                "event_id": "e4", "owner": "node/n1", "generation": 3,
                "resources": [
                    {"kind": "ip_reservation", "id": "ip1", "attributes": {"subnet_id": "s"}, "created_at": t},
                    {"kind": "vni", "id": "v1", "parent": {"kind": "bare_metal_server", "id": "s1"}}
                ]
            }),
        ),
    ]
}

#[test]
fn events_round_trip_through_the_protobuf_schemas_and_back_into_reaper() {
    let pool = pool();
    let catalog =
        reaper::catalog::validate(&Settings::from_toml(include_str!("../../config/vpc-node.toml")).unwrap()).unwrap();
    for (message, key, value) in examples() {
        let back = round_trip(&pool, message, &value).unwrap_or_else(|e| panic!("{message}: {e}"));
        assert_eq!(normalize(&back), normalize(&value), "{message}");
        // What a protobuf JSON writer produces, reaper reads (64-bit ints as strings too).
        let mut as_proto_writes = back.clone();
        if as_proto_writes.get("generation").is_some() {
            as_proto_writes["generation"] = json!("3");
        }
        let body = serde_json::to_vec(&as_proto_writes).unwrap();
        let env = contract::Envelope {
            routing_key: key,
            body: &body,
            received_at: chrono::Utc::now(),
            sent_at: None,
            traceparent: None,
        };
        contract::decode(&env, &catalog, &contract::Limits::default()).unwrap_or_else(|e| panic!("{message}: {e}"));
    }
}

#[test]
fn the_result_reaper_publishes_round_trips_through_its_schema() {
    let result = TeardownResult {
        event_id: "e1".into(),
        job_id: uuid::Uuid::new_v4(),
        owner: "node/n1".into(),
        trigger: "deletion.requested".into(),
        status: "dead_lettered".into(),
        dry_run: false,
        resources: vec![
            ResourceReport { kind: "vni".into(), id: "v1".into(), outcome: "deleted".into(), attempts: 2, error: None },
            ResourceReport {
                kind: "bare_metal_server".into(),
                id: "s1".into(),
                outcome: "failed".into(),
                attempts: 4,
                error: Some("403".into()),
            },
        ],
        attempts: 1,
        started_at: Utc::now(),
        finished_at: Utc::now(),
        reason: Some("bare_metal_server/s1: permanent: 403".into()),
    };
    let value: Value = serde_json::from_slice(&result.to_bytes()).unwrap();
    let back = round_trip(&pool(), "TeardownResult", &value).unwrap();
    assert_eq!(normalize(&back), normalize(&value));
}

#[test]
fn a_field_the_schema_lacks_is_caught() {
    let err = round_trip(
        &pool(),
        "DeletionRequested",
        &json!({"event_id": "e", "owner": "a/b", "occurred_at": "2026-01-01T00:00:00Z", "colour": "red"}),
    );
    assert!(err.is_err(), "the round trip must refuse unknown fields, or it proves nothing");
}
