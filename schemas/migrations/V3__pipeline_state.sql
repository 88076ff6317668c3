-- State the aggregator commits in the same transaction as the aggregates: consumed offsets,
-- partition leases (the generation fence), dedup ids, dead letters, corrections and the
-- per-outcome event accounting.

-- Who owns a partition, under which generation. A shard takes or renews a lease with a bumped
-- generation; every flush checks, inside its transaction, that its (owner, generation) still
-- holds the lease (SELECT ... FOR UPDATE), so a shard that lost a partition cannot commit for it.
CREATE TABLE partition_leases (
    consumer_group  text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    owner           text        NOT NULL,
    generation      bigint      NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (consumer_group, topic, partition)
);

-- The next offset to consume per partition. Only this table decides what was counted; Kafka's
-- own committed offsets are for monitoring.
CREATE TABLE consumer_offsets (
    consumer_group  text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    next_offset     bigint      NOT NULL CHECK (next_offset >= 0),
    generation      bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Dedup on (tenant, source, id) within the dedup window (default 24 h): rows older than the
-- window are deleted by the aggregator's housekeeping.
CREATE TABLE dedup_ids (
    tenant_id  uuid        NOT NULL,
    source     text        NOT NULL,
    event_id   text        NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, source, event_id)
);
CREATE INDEX dedup_ids_seen_at ON dedup_ids (seen_at);

-- Events that cannot be counted (beyond the lateness horizon, unmeterable values, undecodable
-- records), kept whole with the reason.
CREATE TABLE dead_letters (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     uuid,
    source        text,
    event_id      text,
    event_type    text,
    subject       text,
    event_time    timestamptz,
    reason        text        NOT NULL,
    detail        text        NOT NULL DEFAULT '',
    raw_event     jsonb,
    topic         text,
    partition     integer,
    kafka_offset  bigint,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_tenant ON dead_letters (tenant_id, received_at);

-- A late event that changed a window after it closed: which window, which meter, how much, when.
-- The rater turns corrections of already-rated periods into correction lines on the next invoice
-- (rated_at marks a correction as billed).
CREATE TABLE usage_corrections (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     uuid        NOT NULL,
    meter_id      uuid        NOT NULL,
    subject       text        NOT NULL,
    group_values  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    window_start  timestamptz NOT NULL,
    delta_sum     numeric     NOT NULL DEFAULT 0,
    delta_count   bigint      NOT NULL DEFAULT 0,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    rated_at      timestamptz
);
CREATE INDEX usage_corrections_pending ON usage_corrections (tenant_id, window_start) WHERE rated_at IS NULL;

-- Every event received is counted once under one outcome: accepted, duplicate, unmetered or
-- rejected (with a reason). received = accepted + duplicate + unmetered + rejected, per tenant.
CREATE TABLE event_outcomes (
    tenant_id  uuid    NOT NULL,
    day        date    NOT NULL,
    outcome    text    NOT NULL CHECK (outcome IN ('accepted', 'duplicate', 'unmetered', 'rejected')),
    reason     text    NOT NULL DEFAULT '',
    events     bigint  NOT NULL DEFAULT 0 CHECK (events >= 0),
    PRIMARY KEY (tenant_id, day, outcome, reason)
);
