-- Catalog (plans, versions, prices), customers, subscriptions, and what the rater writes:
-- invoices, their lines, and a gapless invoice number per tenant. Every row carries its tenant.

-- A plan is a named, versioned offer. A subscription points at one version and keeps it; a
-- change of prices is a new version.
CREATE TABLE plans (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key         text NOT NULL CHECK (key ~ '^[a-z0-9]+([_-][a-z0-9]+)*$' AND length(key) <= 63),
    name        text NOT NULL DEFAULT '',
    tier        text NOT NULL CHECK (tier IN ('free', 'basic', 'pro', 'enterprise', 'custom')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, key),
    UNIQUE (tenant_id, id)
);

CREATE TABLE plan_versions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL,
    plan_id         uuid NOT NULL,
    version         integer NOT NULL CHECK (version > 0),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- Charged per billing period, prorated by the second for a partial period.
    recurring_fee   numeric NOT NULL DEFAULT 0 CHECK (recurring_fee >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (plan_id, version),
    UNIQUE (tenant_id, id),
    FOREIGN KEY (tenant_id, plan_id) REFERENCES plans (tenant_id, id) ON DELETE CASCADE
);

-- One price per meter per version, in DESIGN.md's price format (validated by billing-core
-- before it is stored). `entitlement`: the usage the plan includes per period (for limits and
-- threshold alerts), NULL when unlimited.
CREATE TABLE plan_prices (
    tenant_id        uuid NOT NULL,
    plan_version_id  uuid NOT NULL,
    meter_id         uuid NOT NULL REFERENCES meters (id),
    price            jsonb NOT NULL CHECK (jsonb_typeof(price) = 'object'),
    entitlement      numeric CHECK (entitlement >= 0),
    PRIMARY KEY (plan_version_id, meter_id),
    FOREIGN KEY (tenant_id, plan_version_id) REFERENCES plan_versions (tenant_id, id) ON DELETE CASCADE
);

-- Tax rates by region, per tenant, in percent.
CREATE TABLE tax_rates (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    region      text NOT NULL CHECK (length(region) BETWEEN 1 AND 32),
    rate        numeric NOT NULL CHECK (rate >= 0 AND rate <= 100),
    inclusive   boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, region)
);

-- Customers. Billing periods start on `billing_anchor_day` (1..31; a month without that day
-- starts on its last day) at local midnight in `timezone`.
CREATE TABLE customers (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id           uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key                 text NOT NULL CHECK (length(key) BETWEEN 1 AND 256),
    name                text NOT NULL DEFAULT '',
    currency            text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    timezone            text NOT NULL DEFAULT 'UTC',
    billing_anchor_day  integer NOT NULL DEFAULT 1 CHECK (billing_anchor_day BETWEEN 1 AND 31),
    tax_region          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, key),
    UNIQUE (tenant_id, id)
);

-- Which event subjects belong to which customer: a subject belongs to one customer per tenant.
CREATE TABLE customer_subjects (
    tenant_id    uuid NOT NULL,
    subject      text NOT NULL,
    customer_id  uuid NOT NULL,
    PRIMARY KEY (tenant_id, subject),
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX customer_subjects_customer ON customer_subjects (customer_id);

-- A subscription of a customer to a plan version, billed from `started_at` until `ended_at`
-- (NULL: open-ended).
CREATE TABLE subscriptions (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id        uuid NOT NULL,
    customer_id      uuid NOT NULL,
    plan_version_id  uuid NOT NULL,
    status           text NOT NULL DEFAULT 'active'
                     CHECK (status IN ('trialing', 'active', 'past_due', 'canceled', 'expired')),
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz CHECK (ended_at IS NULL OR ended_at > started_at),
    auto_renew       boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, id),
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, plan_version_id) REFERENCES plan_versions (tenant_id, id)
);
CREATE INDEX subscriptions_customer ON subscriptions (customer_id);

-- Invoices: one per subscription and billing period. A draft is rewritten by each rating run;
-- `issue` freezes it and gives it the tenant's next number in the same transaction (gapless).
CREATE TABLE invoices (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id        uuid NOT NULL,
    customer_id      uuid NOT NULL,
    subscription_id  uuid NOT NULL,
    period           text NOT NULL CHECK (period ~ '^[0-9]{4}-[0-9]{2}$'),
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL,
    currency         text NOT NULL,
    status           text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'issued', 'paid', 'void')),
    number           bigint,
    subtotal         numeric NOT NULL,
    discount         numeric NOT NULL DEFAULT 0,
    tax              numeric NOT NULL,
    total            numeric NOT NULL,
    -- SHA-256 of the lines as rated: a re-run that rates the same writes nothing.
    content_sha256   bytea NOT NULL,
    issued_at        timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subscription_id, period),
    UNIQUE (tenant_id, number),
    CHECK ((status = 'draft') = (number IS NULL)),
    FOREIGN KEY (tenant_id, subscription_id) REFERENCES subscriptions (tenant_id, id)
);
CREATE INDEX invoices_tenant_period ON invoices (tenant_id, period);

-- Lines: a recurring fee, the usage of one meter, or a correction of an earlier period's usage
-- (then `period_start`/`period_end` name the corrected period, not the invoice's).
CREATE TABLE invoice_lines (
    invoice_id    uuid NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
    position      integer NOT NULL,
    tenant_id     uuid NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('recurring', 'usage', 'correction')),
    meter_id      uuid,
    description   text NOT NULL,
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL,
    -- For usage: the period's quantity; for a correction: the corrected period's quantity now
    -- (`previous_quantity`: what earlier invoices billed for it).
    quantity           numeric NOT NULL,
    previous_quantity  numeric,
    price              jsonb,
    -- Average unit price (amount / billable quantity), for display; NULL without a quantity.
    unit_price    numeric,
    tiers         jsonb NOT NULL DEFAULT '[]'::jsonb,
    amount        numeric NOT NULL,
    discount      numeric NOT NULL DEFAULT 0,
    tax           numeric NOT NULL DEFAULT 0,
    total         numeric NOT NULL,
    PRIMARY KEY (invoice_id, position)
);
CREATE INDEX invoice_lines_meter ON invoice_lines (tenant_id, meter_id, period_start);

CREATE TABLE invoice_counters (
    tenant_id    uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    last_number  bigint NOT NULL DEFAULT 0
);
