-- The subscription state machine (billing-core's `lifecycle`): trials, cancel at period end,
-- auto-renew, past due, plan changes, and the domain events every transition leaves behind.

ALTER TABLE subscriptions
    ADD COLUMN trial_ends_at            timestamptz,
    ADD COLUMN cancel_at_period_end     boolean NOT NULL DEFAULT false,
    ADD COLUMN canceled_at              timestamptz,
    ADD COLUMN past_due_since           timestamptz,
    -- A plan change scheduled for the end of the current period.
    ADD COLUMN scheduled_plan_version_id uuid,
    ADD COLUMN scheduled_change_at      timestamptz,
    -- The subscription that took over after a plan change.
    ADD COLUMN replaced_by              uuid REFERENCES subscriptions (id),
    ADD CONSTRAINT subscriptions_scheduled_together
        CHECK ((scheduled_plan_version_id IS NULL) = (scheduled_change_at IS NULL));

CREATE TABLE subscription_events (
    id               bigserial PRIMARY KEY,
    tenant_id        uuid NOT NULL,
    subscription_id  uuid NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    at               timestamptz NOT NULL DEFAULT now(),
    event            text NOT NULL,
    from_status      text,
    to_status        text NOT NULL,
    data             jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX subscription_events_sub ON subscription_events (subscription_id, id);
