//! Aggregator: sharded, exactly-once windowed usage into PostgreSQL (issue #4).
