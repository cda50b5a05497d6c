-- Bulk lifecycle commands run as server-side operations (issue 14): their record, so that any
-- API node answers for them and a restart forgets nothing. The task running one stays on the
-- API node that accepted it (`owner_node`, no foreign key: node rows are pruned); it writes
-- `progress` after every batch and reads `cancel_requested` in the same statement, so a cancel
-- sent to any API node stops it between two batches. A `running` operation whose owner is no
-- longer alive or draining reads as `interrupted` (its commands are idempotent: run it again).
-- Finished ones are pruned when a new operation is created, an hour after they end.
CREATE TABLE operation (
    id               uuid PRIMARY KEY,
    command          text NOT NULL,
    -- The filter as given (campaign, workflow, state).
    filter           jsonb NOT NULL,
    actor            text NOT NULL,
    state            text NOT NULL DEFAULT 'running'
        CHECK (state IN ('running', 'completed', 'cancelled', 'failed', 'interrupted')),
    -- The counts so far; once it ended, its result (the API's LifecycleSummary).
    progress         jsonb NOT NULL,
    error            text,
    cancel_requested boolean NOT NULL DEFAULT false,
    owner_node       uuid,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at      timestamptz,
    CHECK ((state = 'running') = (finished_at IS NULL))
);
CREATE INDEX operation_finished ON operation (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX operation_running ON operation (updated_at) WHERE state = 'running';
