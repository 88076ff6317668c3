-- Usage aggregates at one-minute granularity, with hour and day rollups, and exact distinct
-- values for UNIQUE_COUNT meters.
--
-- Where the TimescaleDB extension is available (production), the minute tables become
-- hypertables with compression (after the 35-day lateness horizon, so late events never touch a
-- compressed chunk in the common case) and retention. Where it is not (PostgreSQL 15 here), they
-- are natively partitioned by month, with a DEFAULT partition so that no write ever fails for a
-- missing partition; `metering_ensure_partitions` creates months ahead and the aggregator calls it
-- at start.
--
-- Rollups are ordinary tables that the aggregator updates in the same transaction as the minute
-- rows in both cases (not continuous aggregates): that keeps hour/day answers exact right after a
-- late event and gives one code path that the tests here exercise. High-volume tables carry no
-- foreign keys (cost per row on the hot path); the aggregator only writes ids it read from
-- `meters`.

CREATE FUNCTION metering_has_timescale() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    END IF;
END
$$;

DO $$
DECLARE
    ts boolean := metering_has_timescale();
    part text := CASE WHEN metering_has_timescale() THEN '' ELSE ' PARTITION BY RANGE (window_start)' END;
    g text;
BEGIN
    FOREACH g IN ARRAY ARRAY['minute', 'hour', 'day'] LOOP
        -- sum_value/event_count serve SUM, COUNT and AVG (= sum/count); min/max and the latest
        -- value by event time serve MIN, MAX and LATEST. All values are exact numerics.
        EXECUTE format($f$
            CREATE TABLE usage_%1$s (
                tenant_id     uuid        NOT NULL,
                meter_id      uuid        NOT NULL,
                window_start  timestamptz NOT NULL,
                subject       text        NOT NULL,
                group_values  jsonb       NOT NULL DEFAULT '{}'::jsonb,
                sum_value     numeric     NOT NULL DEFAULT 0,
                event_count   bigint      NOT NULL DEFAULT 0,
                min_value     numeric,
                max_value     numeric,
                latest_value  numeric,
                latest_time   timestamptz,
                updated_at    timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (tenant_id, meter_id, window_start, subject, group_values)
            )%2$s$f$, g, CASE WHEN g = 'minute' THEN part ELSE '' END);
        -- One row per distinct value per window: UNIQUE_COUNT over any range is
        -- count(DISTINCT value) over the windows in range, exact.
        EXECUTE format($f$
            CREATE TABLE usage_unique_%1$s (
                tenant_id     uuid        NOT NULL,
                meter_id      uuid        NOT NULL,
                window_start  timestamptz NOT NULL,
                subject       text        NOT NULL,
                group_values  jsonb       NOT NULL DEFAULT '{}'::jsonb,
                value         text        NOT NULL,
                PRIMARY KEY (tenant_id, meter_id, window_start, subject, group_values, value)
            )%2$s$f$, g, CASE WHEN g = 'minute' THEN part ELSE '' END);
    END LOOP;

    IF ts THEN
        PERFORM create_hypertable('usage_minute', 'window_start', chunk_time_interval => interval '1 day');
        PERFORM create_hypertable('usage_unique_minute', 'window_start', chunk_time_interval => interval '1 day');
        PERFORM create_hypertable('usage_hour', 'window_start', chunk_time_interval => interval '30 days');
        PERFORM create_hypertable('usage_unique_hour', 'window_start', chunk_time_interval => interval '30 days');
        EXECUTE 'ALTER TABLE usage_minute SET (timescaledb.compress, timescaledb.compress_segmentby = ''tenant_id, meter_id'')';
        PERFORM add_compression_policy('usage_minute', interval '40 days');
        PERFORM add_retention_policy('usage_minute', interval '400 days');
        PERFORM add_retention_policy('usage_unique_minute', interval '400 days');
    ELSE
        CREATE TABLE usage_minute_default PARTITION OF usage_minute DEFAULT;
        CREATE TABLE usage_unique_minute_default PARTITION OF usage_unique_minute DEFAULT;
    END IF;
END
$$;

-- Creates the monthly partitions of the minute tables covering [p_from, p_to) when TimescaleDB is
-- absent; a no-op with TimescaleDB. Idempotent. A month whose rows already sit in the DEFAULT
-- partition is left there (with a notice) rather than failing the caller.
CREATE FUNCTION metering_ensure_partitions(p_from date, p_to date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', p_from)::date;
    t text;
    created integer := 0;
BEGIN
    IF metering_has_timescale() THEN
        RETURN 0;
    END IF;
    WHILE m < p_to LOOP
        FOREACH t IN ARRAY ARRAY['usage_minute', 'usage_unique_minute'] LOOP
            IF to_regclass(format('%s_%s', t, to_char(m, 'YYYYMM'))) IS NULL THEN
                BEGIN
                    EXECUTE format(
                        'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                        format('%s_%s', t, to_char(m, 'YYYYMM')), t,
                        m::timestamp AT TIME ZONE 'UTC', (m + interval '1 month')::timestamp AT TIME ZONE 'UTC');
                    created := created + 1;
                EXCEPTION WHEN check_violation THEN
                    RAISE NOTICE 'rows for % already in the default partition of %; left there', m, t;
                END;
            END IF;
        END LOOP;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END
$$;

SELECT metering_ensure_partitions((date_trunc('month', now()) - interval '2 months')::date,
                                  (date_trunc('month', now()) + interval '3 months')::date);

CREATE INDEX usage_hour_subject ON usage_hour (tenant_id, meter_id, subject, window_start);
CREATE INDEX usage_day_subject ON usage_day (tenant_id, meter_id, subject, window_start);
