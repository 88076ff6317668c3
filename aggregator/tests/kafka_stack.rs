//! The local broker is real: rdkafka against tansu (SQLite storage) for topic creation, the
//! idempotent acks=all producer, a consumer group with manual offset commits and resume, and a
//! consumer assigned at an exact offset (what the aggregator does with offsets it stored in
//! PostgreSQL).

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use schemas::testing::kafka_brokers;
use std::time::{Duration, Instant};

fn config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", kafka_brokers())
        .set("broker.address.family", "v4");
    c
}

async fn create_topic(partitions: i32) -> String {
    let name = format!("stack-test-{}", uuid::Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> = config().create().expect("admin client");
    let res = admin
        .create_topics(
            &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("topic {t} not created: {e}"));
    }
    name
}

fn producer() -> FutureProducer {
    config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "15000")
        .create()
        .expect("producer")
}

fn consumer(group: &str) -> BaseConsumer {
    config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .create()
        .expect("consumer")
}

/// Polls until `n` messages arrived or the deadline passes; returns (partition, offset, payload).
fn poll_n(c: &BaseConsumer, n: usize, deadline: Duration) -> Vec<(i32, i64, String)> {
    let until = Instant::now() + deadline;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < until {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.expect("consume error");
            let payload = String::from_utf8(m.payload().expect("payload").to_vec()).expect("utf8");
            out.push((m.partition(), m.offset(), payload));
        }
    }
    out
}

async fn produce(p: &FutureProducer, topic: &str, partition: i32, payloads: &[String]) {
    for payload in payloads {
        p.send(
            FutureRecord::to(topic)
                .partition(partition)
                .key("tenant\0subject")
                .payload(payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce failed: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_produce_group_commit_and_resume() {
    let topic = create_topic(3).await;
    let p = producer();
    let first: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    produce(&p, &topic, 1, &first).await;

    let group = format!("g-{}", uuid::Uuid::new_v4().simple());
    let c = consumer(&group);
    c.subscribe(&[&topic]).expect("subscribe");
    let got = poll_n(&c, 10, Duration::from_secs(30));
    assert_eq!(
        got.iter().map(|(_, _, p)| p.clone()).collect::<Vec<_>>(),
        first,
        "consumer group did not receive the produced records in order"
    );
    assert!(got.iter().all(|(part, _, _)| *part == 1));
    // Commit after the 6th record: the next consumer must resume at m6.
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 1, Offset::Offset(got[5].1 + 1))
        .expect("tpl");
    c.commit(&tpl, CommitMode::Sync).expect("commit");
    drop(c);

    let more: Vec<String> = (10..13).map(|i| format!("m{i}")).collect();
    produce(&p, &topic, 1, &more).await;

    let c2 = consumer(&group);
    c2.subscribe(&[&topic]).expect("subscribe");
    let resumed = poll_n(&c2, 7, Duration::from_secs(40));
    let payloads: Vec<String> = resumed.iter().map(|(_, _, p)| p.clone()).collect();
    let expected: Vec<String> = (6..13).map(|i| format!("m{i}")).collect();
    assert_eq!(
        payloads, expected,
        "resume did not start at the committed offset"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_consumer_resumes_at_an_exact_offset() {
    let topic = create_topic(1).await;
    let p = producer();
    let payloads: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
    produce(&p, &topic, 0, &payloads).await;

    let c = consumer(&format!("g-{}", uuid::Uuid::new_v4().simple()));
    let mut tpl = TopicPartitionList::new();
    // Offsets as stored in PostgreSQL by the aggregator: start in the middle of what was produced.
    tpl.add_partition_offset(&topic, 0, Offset::Offset(37))
        .expect("tpl");
    c.assign(&tpl).expect("assign");
    let got = poll_n(&c, 13, Duration::from_secs(30));
    let offsets: Vec<i64> = got.iter().map(|(_, o, _)| *o).collect();
    assert_eq!(offsets, (37..50).collect::<Vec<_>>());
    assert_eq!(got[0].2, "r37");
}
