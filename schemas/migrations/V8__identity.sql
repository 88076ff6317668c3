-- Identity, sessions, audit and idempotency for the control plane (issue 5).
--
-- Secrets are never stored in clear: passwords as argon2id PHC strings, refresh tokens, one-time
-- tokens and recovery codes as SHA-256 of their (high-entropy) text, TOTP secrets and outbox
-- payloads sealed with the server key (XChaCha20-Poly1305), stored idempotent answers likewise.

CREATE TABLE users (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- Lower-cased; one account per address across the installation (login takes no tenant).
    email             text NOT NULL UNIQUE CHECK (email = lower(email) AND length(email) <= 254),
    name              text NOT NULL DEFAULT '',
    role              text NOT NULL CHECK (role IN ('user', 'org_admin', 'sys_admin')),
    password_hash     text NOT NULL,
    email_verified_at timestamptz,
    -- TOTP: the sealed secret while enrolling (totp_enabled false) and once enabled.
    totp_sealed       bytea,
    totp_enabled      boolean NOT NULL DEFAULT false,
    -- The last accepted 30-second step: a code is never accepted twice.
    totp_last_step    bigint,
    failed_logins     integer NOT NULL DEFAULT 0,
    locked_until      timestamptz,
    disabled_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_tenant ON users (tenant_id, created_at, id);

CREATE TABLE recovery_codes (
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_sha256 bytea NOT NULL,
    used_at     timestamptz,
    PRIMARY KEY (user_id, code_sha256)
);

-- A login: one session per device, carrying a family of rotating refresh tokens.
CREATE TABLE sessions (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    ip            inet,
    user_agent    text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    revoked_why   text
);
CREATE INDEX sessions_user ON sessions (user_id, created_at);

CREATE TABLE refresh_tokens (
    token_sha256 bytea PRIMARY KEY,
    session_id   uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Set when exchanged: presenting it again is reuse and revokes the session.
    rotated_at   timestamptz
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- Email verification and password reset tokens.
CREATE TABLE one_time_tokens (
    token_sha256 bytea PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose      text NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE login_history (
    id          bigserial PRIMARY KEY,
    user_id     uuid REFERENCES users (id) ON DELETE CASCADE,
    tenant_id   uuid REFERENCES tenants (id) ON DELETE CASCADE,
    ip          inet,
    user_agent  text NOT NULL DEFAULT '',
    outcome     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_history_user ON login_history (user_id, id);

-- Messages to send (issue 6 delivers them). The payload holds tokens, so it is sealed.
CREATE TABLE notification_outbox (
    id            bigserial PRIMARY KEY,
    tenant_id     uuid REFERENCES tenants (id) ON DELETE CASCADE,
    user_id       uuid REFERENCES users (id) ON DELETE CASCADE,
    kind          text NOT NULL,
    channel       text NOT NULL DEFAULT 'email',
    recipient     text NOT NULL,
    payload_sealed bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text
);
CREATE INDEX notification_outbox_pending ON notification_outbox (id) WHERE sent_at IS NULL;

-- Every mutation by a user or a key. `before`/`after` are JSON with secrets redacted.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    tenant_id   uuid REFERENCES tenants (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    actor_kind  text NOT NULL CHECK (actor_kind IN ('user', 'api_key', 'anonymous', 'cli')),
    actor_id    uuid,
    action      text NOT NULL,
    object_kind text NOT NULL,
    object_id   text,
    status      integer NOT NULL,
    request_id  text NOT NULL,
    before      jsonb,
    after       jsonb
);
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, id);

-- Idempotency-Key: one row per (caller, key). The stored answer is sealed (it may hold a
-- secret shown once, such as a new API key).
CREATE TABLE idempotency_keys (
    principal     text NOT NULL,
    key           text NOT NULL,
    method        text NOT NULL,
    path          text NOT NULL,
    body_sha256   bytea NOT NULL,
    status        integer,
    response_sealed bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- API key rotation: the successor names its predecessor; the old key keeps working until its
-- `expires_at` (the grace period), which the ingest edge already honours.
ALTER TABLE api_keys ADD COLUMN rotated_to uuid REFERENCES api_keys (id);

-- Monthly event quotas: events accepted per key per UTC month, summed over ingest instances.
CREATE TABLE api_key_usage (
    key_id  uuid NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    month   date NOT NULL,
    events  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, month)
);
