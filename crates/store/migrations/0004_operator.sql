-- Operator actions: every one leaves an audit row, written in the action's own transaction.

CREATE TABLE audit (
    id       bigserial   PRIMARY KEY,
    -- Who acted: the operator's name as the CLI or API client sent it.
    actor    text        NOT NULL,
    -- What was done: `resume`, …
    action   text        NOT NULL,
    -- What it was done to, e.g. an instance id.
    target   text        NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The action's parameters and effect (mode, steps, variables set, new checkpoint).
    details  jsonb
);

CREATE INDEX audit_by_target ON audit (target, at);
