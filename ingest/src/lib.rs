//! Ingest edge: authenticated, bounded, durable intake of CloudEvents into Kafka (issue #3).
