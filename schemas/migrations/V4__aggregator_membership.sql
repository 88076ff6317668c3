-- Aggregator membership and per-partition watermarks.
--
-- Partition ownership is leased in PostgreSQL with manual assignment (DESIGN.md allows it; the
-- generation fence lives here anyway). Each aggregator process heartbeats a row below; the live
-- members (heartbeat younger than the lease time) split the topic's partitions among themselves
-- by a rule every member computes alike (partition p goes to live member p mod n, members sorted
-- by name). A member takes a partition's lease only when it is free or expired, bumping the
-- generation; a member that is no longer meant to own a partition flushes and releases it.
CREATE TABLE aggregator_members (
    consumer_group  text        NOT NULL,
    member          text        NOT NULL,
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, member)
);

-- The watermark (event time, Unix nanoseconds) each partition had reached at its last flush, so
-- that a restarted shard classifies late events as the one before it would have.
ALTER TABLE consumer_offsets ADD COLUMN watermark_unix_nanos bigint NOT NULL DEFAULT 0;
