-- Tenants, API keys and meters: the control-plane rows the hot path reads.
-- Every row below carries its tenant; no query may cross tenants.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- API keys are 256-bit random secrets; only their SHA-256 is stored (a slow hash buys nothing
-- for a secret with that much entropy, and the ingest edge must verify keys at line rate).
-- `prefix` is the first characters of the key, shown in listings so a user can tell keys apart.
CREATE TABLE api_keys (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id            uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name                 text NOT NULL DEFAULT '',
    prefix               text NOT NULL,
    secret_sha256        bytea NOT NULL UNIQUE CHECK (length(secret_sha256) = 32),
    scopes               text[] NOT NULL DEFAULT ARRAY['ingest']
                         CHECK (scopes <@ ARRAY['ingest', 'read', 'admin'] AND cardinality(scopes) > 0),
    -- NULL: any address may use the key.
    allowed_cidrs        cidr[],
    -- NULL: the ingest edge's defaults apply.
    rate_limit_rps       integer CHECK (rate_limit_rps > 0),
    rate_limit_eps       integer CHECK (rate_limit_eps > 0),
    monthly_event_quota  bigint CHECK (monthly_event_quota > 0),
    expires_at           timestamptz,
    revoked_at           timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    -- The ingest edge's key cache refreshes by this column: every change must bump it.
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
CREATE INDEX api_keys_updated ON api_keys (updated_at);

-- Meters follow OpenMeter's v1 shape. Deleting a meter keeps the row (deleted_at) so that stored
-- usage still names its meter; a new meter may then reuse the slug.
CREATE TABLE meters (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    slug            text NOT NULL CHECK (slug ~ '^[a-z0-9]+([_-][a-z0-9]+)*$' AND length(slug) <= 63),
    name            text NOT NULL DEFAULT '',
    description     text NOT NULL DEFAULT '',
    event_type      text NOT NULL CHECK (length(event_type) BETWEEN 1 AND 256),
    aggregation     text NOT NULL
                    CHECK (aggregation IN ('SUM', 'COUNT', 'AVG', 'MIN', 'MAX', 'UNIQUE_COUNT', 'LATEST')),
    value_property  text,
    group_by        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(group_by) = 'object'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    CHECK (aggregation = 'COUNT' OR value_property IS NOT NULL)
);
CREATE UNIQUE INDEX meters_tenant_slug ON meters (tenant_id, slug) WHERE deleted_at IS NULL;
CREATE INDEX meters_tenant_type ON meters (tenant_id, event_type);
CREATE INDEX meters_updated ON meters (updated_at);
