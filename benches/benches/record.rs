//! Encoding and decoding of the Kafka record payload (`usage.v1.EventBatch`), the unit every
//! event passes through twice (ingest encodes, the aggregator decodes).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use schemas::proto::usage::v1::{EventBatch, UsageEvent};

fn batch(n: usize) -> EventBatch {
    EventBatch {
        tenant_id: "0193a4f2-7c1e-7d3a-9b8e-5f2c1d0e9a7b".into(),
        request_id: "req-1".into(),
        received_unix_nanos: 1_764_000_000_000_000_000,
        events: (0..n)
            .map(|i| UsageEvent {
                id: format!("evt-{i}"),
                source: "svc-llm".into(),
                r#type: "tokens".into(),
                subject: "customer-42".into(),
                time_unix_nanos: 1_764_000_000_000_000_000 + i as i64,
                data_json: br#"{"model":"gpt-x","input":1234,"output":56}"#.to_vec().into(),
            })
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("event_batch");
    for n in [1usize, 100, 1000] {
        let b = batch(n);
        let bytes = b.encode_to_vec();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("encode/{n}"), |bench| {
            bench.iter(|| b.encode_to_vec())
        });
        g.bench_function(format!("decode/{n}"), |bench| {
            bench.iter(|| EventBatch::decode(bytes.as_slice()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
