//! The contracts themselves: the Kafka payload round-trips, the JSON Schemas accept what the API
//! accepts and refuse what it refuses, and migrations are numbered without gaps.

use prost::Message;
use schemas::proto::usage::v1::{EventBatch, UsageEvent};

#[test]
fn event_batch_round_trips_with_exact_data() {
    let batch = EventBatch {
        tenant_id: "t1".into(),
        request_id: "r1".into(),
        received_unix_nanos: -1,
        events: vec![UsageEvent {
            id: "e1".into(),
            source: "s".into(),
            r#type: "tokens".into(),
            subject: "c".into(),
            time_unix_nanos: 1_700_000_000_123_456_789,
            data_json: br#"{"n":0.1000000000000000000001}"#.to_vec().into(),
        }],
    };
    let bytes = batch.encode_to_vec();
    let back = EventBatch::decode(bytes.as_slice()).expect("decode");
    assert_eq!(back, batch);
    assert!(EventBatch::decode(&b"\xff\xff"[..]).is_err());
}

#[test]
fn record_keys_separate_tenant_and_subject() {
    // "ab" + "c" and "a" + "bc" must not collide.
    assert_ne!(
        schemas::kafka::record_key("ab", "c"),
        schemas::kafka::record_key("a", "bc")
    );
}

fn validator(schema: &str) -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(schema).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

#[test]
fn usage_event_schema_accepts_and_refuses() {
    let v = validator(schemas::json::USAGE_EVENT_SCHEMA);
    let good = serde_json::json!({
        "specversion": "1.0", "id": "1", "source": "svc", "type": "tokens",
        "subject": "c1", "time": "2026-11-25T10:00:00.123Z", "data": {"tokens": "12"}
    });
    assert!(v.is_valid(&good));
    for (field, bad) in [
        ("specversion", serde_json::json!("0.3")),
        ("id", serde_json::json!("")),
        ("time", serde_json::json!("yesterday")),
        ("data", serde_json::json!([1])),
    ] {
        let mut e = good.clone();
        e[field] = bad;
        assert!(!v.is_valid(&e), "{field} should be refused");
    }
    let mut missing = good.clone();
    missing.as_object_mut().expect("object").remove("subject");
    assert!(!v.is_valid(&missing));
}

#[test]
fn meter_schema_requires_a_value_property_except_for_count() {
    let v = validator(schemas::json::METER_SCHEMA);
    let count =
        serde_json::json!({"slug": "api_calls", "eventType": "request", "aggregation": "COUNT"});
    assert!(v.is_valid(&count));
    let sum = serde_json::json!({"slug": "tokens", "eventType": "llm", "aggregation": "SUM",
        "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}});
    assert!(v.is_valid(&sum));
    let no_value = serde_json::json!({"slug": "tokens", "eventType": "llm", "aggregation": "SUM"});
    assert!(!v.is_valid(&no_value));
    let bad_slug =
        serde_json::json!({"slug": "Bad Slug", "eventType": "llm", "aggregation": "COUNT"});
    assert!(!v.is_valid(&bad_slug));
    let bad_agg = serde_json::json!({"slug": "x", "eventType": "llm", "aggregation": "MEDIAN"});
    assert!(!v.is_valid(&bad_agg));
}

#[test]
fn migrations_are_numbered_without_gaps() {
    let known = schemas::migrate::known();
    assert!(!known.is_empty());
    for (i, m) in known.iter().enumerate() {
        assert_eq!(
            m.version as usize,
            i + 1,
            "migration {} out of sequence",
            m.name
        );
    }
}
