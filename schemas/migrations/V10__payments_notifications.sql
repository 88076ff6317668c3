-- Credit notes, payments and refunds (with the sandbox provider's own books), provider webhook
-- events, and notifications: channels, templates, threshold firings, the in-app inbox and the
-- delivery log of the outbox.

-- A credit note against an issued or paid invoice: numbered per tenant without gaps (its own
-- sequence, beside the invoices'), amounts negative, one row per credited invoice line.
CREATE TABLE credit_notes (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    invoice_id  uuid NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
    number      bigint NOT NULL,
    reason      text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    currency    text NOT NULL,
    net         numeric NOT NULL CHECK (net <= 0),
    tax         numeric NOT NULL CHECK (tax <= 0),
    total       numeric NOT NULL CHECK (total < 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, number)
);
CREATE INDEX credit_notes_invoice ON credit_notes (invoice_id);

CREATE TABLE credit_note_lines (
    credit_note_id  uuid NOT NULL REFERENCES credit_notes (id) ON DELETE CASCADE,
    position        integer NOT NULL,
    -- The credited invoice line.
    invoice_id      uuid NOT NULL,
    line_position   integer NOT NULL,
    description     text NOT NULL,
    net             numeric NOT NULL,
    tax             numeric NOT NULL,
    total           numeric NOT NULL CHECK (total < 0),
    PRIMARY KEY (credit_note_id, position),
    FOREIGN KEY (invoice_id, line_position) REFERENCES invoice_lines (invoice_id, position)
);

CREATE TABLE credit_note_counters (
    tenant_id    uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    last_number  bigint NOT NULL DEFAULT 0
);

-- Payments of invoices. `provider_ref` is the provider's id of the charge (NULL until the
-- provider answered, and for manual payments). A payment is written `pending` before the
-- provider is called, so a crash between the two leaves a row that `refresh` or reconcile finds.
CREATE TABLE payments (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    invoice_id      uuid NOT NULL REFERENCES invoices (id),
    provider        text NOT NULL CHECK (provider IN ('sandbox', 'stripe', 'manual')),
    provider_ref    text,
    amount          numeric NOT NULL CHECK (amount > 0),
    currency        text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    failure_code    text,
    refunded        numeric NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= amount),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, provider_ref)
);
CREATE INDEX payments_invoice ON payments (invoice_id);
CREATE INDEX payments_pending ON payments (created_at) WHERE status = 'pending';

CREATE TABLE refunds (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    payment_id    uuid NOT NULL REFERENCES payments (id),
    provider_ref  text,
    amount        numeric NOT NULL CHECK (amount > 0),
    reason        text NOT NULL DEFAULT '',
    status        text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refunds_payment ON refunds (payment_id);

-- Webhook events taken from a provider: each applied once (a replayed event answers 200 and
-- changes nothing).
CREATE TABLE provider_events (
    provider     text NOT NULL,
    event_id     text NOT NULL,
    type         text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);

-- The sandbox provider's own records: what a real provider would hold on its side. Reconcile
-- compares them with `payments` and `refunds`.
CREATE TABLE sandbox_charges (
    id           text PRIMARY KEY,
    tenant_id    uuid NOT NULL,
    -- The caller's idempotency key (our payment id): a retried charge answers the same record.
    idempotency_key text NOT NULL UNIQUE,
    amount       numeric NOT NULL,
    currency     text NOT NULL,
    card_last4   text NOT NULL,
    status       text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    failure_code text,
    -- Delayed confirmation: a pending charge settles when it is read at or after this time.
    settles_at   timestamptz,
    settles_to   text CHECK (settles_to IN ('succeeded', 'failed')),
    metadata     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE sandbox_refunds (
    id           text PRIMARY KEY,
    charge_id    text NOT NULL REFERENCES sandbox_charges (id) ON DELETE CASCADE,
    idempotency_key text NOT NULL UNIQUE,
    amount       numeric NOT NULL CHECK (amount > 0),
    status       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Notification channels of a tenant. webhook: `target` is the URL and `secret_sealed` the
-- signing secret (sealed with the server key); email: `target` an address; inbox: `target` a
-- user id of the tenant.
CREATE TABLE notification_channels (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind           text NOT NULL CHECK (kind IN ('webhook', 'email', 'inbox')),
    name           text NOT NULL DEFAULT '',
    target         text NOT NULL CHECK (length(target) BETWEEN 1 AND 2048),
    secret_sealed  bytea,
    disabled_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'webhook') = (secret_sealed IS NOT NULL))
);

-- A tenant's own wording for a kind of notification (built-in templates otherwise).
CREATE TABLE notification_templates (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    subject     text NOT NULL CHECK (length(subject) BETWEEN 1 AND 500),
    body        text NOT NULL CHECK (length(body) BETWEEN 1 AND 20000),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, kind)
);

-- Each threshold crossing, once per subscription, meter, period, percentage and channel: the
-- primary key is what makes an alert fire exactly once, across restarts and processes.
CREATE TABLE threshold_firings (
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    subscription_id  uuid NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    meter_id         uuid NOT NULL,
    period_start     timestamptz NOT NULL,
    percent          integer NOT NULL CHECK (percent IN (80, 90, 100)),
    channel_id       uuid NOT NULL REFERENCES notification_channels (id) ON DELETE CASCADE,
    usage            numeric NOT NULL,
    entitlement      numeric NOT NULL,
    outbox_id        bigint,
    fired_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, meter_id, period_start, percent, channel_id)
);

-- The outbox gains channels, scheduling of retries and a dead state.
ALTER TABLE notification_outbox
    ADD COLUMN channel_id       uuid REFERENCES notification_channels (id) ON DELETE SET NULL,
    ADD COLUMN next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN dead_at          timestamptz;
DROP INDEX notification_outbox_pending;
CREATE INDEX notification_outbox_due ON notification_outbox (next_attempt_at)
    WHERE sent_at IS NULL AND dead_at IS NULL;

-- Every delivery attempt.
CREATE TABLE notification_deliveries (
    id           bigserial PRIMARY KEY,
    outbox_id    bigint NOT NULL REFERENCES notification_outbox (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    ok           boolean NOT NULL,
    status_code  integer,
    error        text,
    duration_ms  integer NOT NULL
);
CREATE INDEX notification_deliveries_outbox ON notification_deliveries (outbox_id, id);

-- The in-app inbox of a user.
CREATE TABLE inbox_items (
    id           bigserial PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    outbox_id    bigint UNIQUE,
    category     text NOT NULL,
    title        text NOT NULL,
    body         text NOT NULL,
    data         jsonb NOT NULL DEFAULT '{}'::jsonb,
    read_at      timestamptz,
    archived_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbox_items_user ON inbox_items (user_id, id);
