-- Waiting steps: durable `sleep`, `wait_event` and `subworkflow`.
--
-- A WAITING instance holds no worker; what wakes it is in its row: `wake_at` (the leader's
-- timer, index `instance_waiting` of 0001), an event named `wait_event` (a signal delivery), or
-- its child `wait_child` finishing (the child's terminal commit). The `wait_*` columns describe
-- the current step's wait and are cleared whenever the instance leaves the step (or retries it).

-- When the current step's wait ends (a sleep's wake time, a wait_event's timeout), fixed when
-- the step first waits, so a re-run of the step neither extends nor restarts it.
ALTER TABLE instance ADD COLUMN wait_deadline timestamptz;
-- The event a WAITING instance waits for (a slug).
ALTER TABLE instance ADD COLUMN wait_event text;
-- The child instance the current `subworkflow` step started (its latest attempt's).
ALTER TABLE instance ADD COLUMN wait_child uuid REFERENCES instance (id);
-- A signal arrived while the instance was not waiting for it (set by a delivery, cleared by a
-- claim): a step that commits a wait for an event goes READY instead, and runs again to find
-- the signal. This closes the race between a step that looked for its signal and a delivery
-- that came just after.
ALTER TABLE instance ADD COLUMN signal_pending boolean NOT NULL DEFAULT false;

ALTER TABLE instance ADD CONSTRAINT waiting_has_a_driver CHECK (
    state <> 'waiting' OR wake_at IS NOT NULL OR wait_event IS NOT NULL OR wait_child IS NOT NULL
);

-- Events delivered to instances (`wait_event`). Stored on arrival, never lost: one that comes
-- before its instance reaches the step waits here; the step consumes the oldest unconsumed
-- one of its name, in the commit that completes it (so only if that commit lands).
CREATE TABLE instance_signal (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   uuid        NOT NULL REFERENCES instance (id) ON DELETE CASCADE,
    name          text        NOT NULL,
    payload       jsonb       NOT NULL DEFAULT 'null',
    received_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    consumed_at   timestamptz,
    -- The checkpoint (journal step_seq) of the commit that consumed it.
    consumed_seq  bigint,
    CONSTRAINT consumed_together CHECK ((consumed_at IS NULL) = (consumed_seq IS NULL))
);

CREATE INDEX instance_signal_unconsumed ON instance_signal (instance_id, name, id)
    WHERE consumed_at IS NULL;
