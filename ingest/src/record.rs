//! Kafka records: partition choice and the `usage.v1.EventBatch` encoding, written straight from
//! the borrowed events (no intermediate owned structs on the hot path). The bytes are exactly
//! what prost would produce for the same `EventBatch`; a test checks it.

use crate::event::Event;
use prost::bytes::BufMut;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};

/// Kafka's default (Java client) partitioner: `toPositive(murmur2(key)) % partitions`, the same
/// as librdkafka's `murmur2` partitioner, so a record keyed by tenant + subject lands where any
/// Kafka client would put it.
pub fn partition_for(key: &[u8], partitions: u32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1)) as i32
}

/// Kafka's murmur2 (seed 0x9747b28c).
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        prost::encoding::key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
    }
}

fn put_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.put_slice(s.as_bytes());
    }
}

fn put_sfixed64(tag: u32, v: i64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.put_i64_le(v);
    }
}

fn event_len(e: &Event<'_>) -> usize {
    str_len(1, &e.id)
        + str_len(2, &e.source)
        + str_len(3, &e.ty)
        + str_len(4, &e.subject)
        + if e.time_unix_nanos != 0 { 9 } else { 0 }
        + str_len(6, e.data.unwrap_or(""))
}

/// Writes the batch-level fields of an `EventBatch`. Event entries may follow in any number
/// (protobuf concatenation: repeated field 4 entries appended one by one form the same message).
pub fn put_batch_header(
    tenant: &str,
    request_id: &str,
    received_unix_nanos: i64,
    buf: &mut Vec<u8>,
) {
    put_str(1, tenant, buf);
    put_str(2, request_id, buf);
    put_sfixed64(3, received_unix_nanos, buf);
}

/// Appends one event as an `EventBatch.events` entry (field 4).
pub fn put_event(e: &Event<'_>, buf: &mut Vec<u8>) {
    encode_key(4, WireType::LengthDelimited, buf);
    encode_varint(event_len(e) as u64, buf);
    put_str(1, &e.id, buf);
    put_str(2, &e.source, buf);
    put_str(3, &e.ty, buf);
    put_str(4, &e.subject, buf);
    put_sfixed64(5, e.time_unix_nanos, buf);
    put_str(6, e.data.unwrap_or(""), buf);
}

/// Bytes [`put_event`] writes for `e`.
pub fn event_entry_len(e: &Event<'_>) -> usize {
    let l = event_len(e);
    1 + encoded_len_varint(l as u64) + l
}

/// Encodes an `EventBatch` of `events` for `tenant`.
pub fn encode_batch<'a>(
    tenant: &str,
    request_id: &str,
    received_unix_nanos: i64,
    events: impl Iterator<Item = &'a Event<'a>> + Clone,
) -> Vec<u8> {
    let body: usize = events.clone().map(event_entry_len).sum();
    let mut buf = Vec::with_capacity(body + tenant.len() + request_id.len() + 24);
    put_batch_header(tenant, request_id, received_unix_nanos, &mut buf);
    for e in events {
        put_event(e, &mut buf);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use schemas::proto::usage::v1::{EventBatch, UsageEvent};
    use std::borrow::Cow;

    #[test]
    fn encoding_matches_prost() {
        let events = [
            Event {
                id: Cow::Borrowed("e1"),
                source: Cow::Borrowed("svc"),
                ty: Cow::Borrowed("tokens"),
                subject: Cow::Owned("cust-é".into()),
                time_unix_nanos: -5,
                data: Some(r#"{"n":1.000000000000000000001}"#),
            },
            Event {
                id: Cow::Borrowed("e2"),
                source: Cow::Borrowed("svc"),
                ty: Cow::Borrowed("calls"),
                subject: Cow::Borrowed("c"),
                time_unix_nanos: 1_764_000_000_000_000_000,
                data: None,
            },
        ];
        let mine = encode_batch("tenant-1", "req-9", 77, events.iter());
        let expected = EventBatch {
            tenant_id: "tenant-1".into(),
            request_id: "req-9".into(),
            received_unix_nanos: 77,
            events: events
                .iter()
                .map(|e| UsageEvent {
                    id: e.id.to_string(),
                    source: e.source.to_string(),
                    r#type: e.ty.to_string(),
                    subject: e.subject.to_string(),
                    time_unix_nanos: e.time_unix_nanos,
                    data_json: e.data.unwrap_or("").as_bytes().to_vec().into(),
                })
                .collect(),
        };
        assert_eq!(mine, expected.encode_to_vec());
        assert_eq!(
            EventBatch::decode(mine.as_slice()).expect("decode"),
            expected
        );
    }

    #[test]
    fn partitions_stay_in_range() {
        // Agreement with librdkafka's murmur2 partitioner is checked against the real broker in
        // tests/ingest.rs; here only the range.
        for n in 1..20u32 {
            for k in [&b""[..], b"a", b"ab", b"abc", b"abcd", b"tenant\0subject"] {
                assert!((0..n as i32).contains(&partition_for(k, n)));
            }
        }
    }
}
