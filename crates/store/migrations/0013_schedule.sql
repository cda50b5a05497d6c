-- Schedules (issue 13): a schedule starts an instance of a workflow at each of its fire times.
-- A fire is a row of `schedule_fire`, unique on (schedule, fire time) and written in the
-- transaction that starts its instance, so two coordinators, a leader change at the fire
-- instant or a restart never fire twice. `next_fire_at` is the next nominal fire time the
-- leader owes (NULL: none left, past `end_at`); `next_due_at` adds its jitter.

CREATE TABLE schedule (
    id                 uuid        PRIMARY KEY,
    name               text        NOT NULL UNIQUE,
    workflow           text        NOT NULL,
    campaign_id        bigint      NOT NULL REFERENCES campaign (id),
    vars               jsonb       NOT NULL DEFAULT '{}',
    cron               text,
    timezone           text        NOT NULL DEFAULT 'UTC',
    every_ms           bigint      CHECK (every_ms >= 1000),
    overlap            text        NOT NULL DEFAULT 'skip'
        CHECK (overlap IN ('skip', 'buffer_one', 'allow_all', 'cancel_other', 'terminate_other')),
    catchup_window_ms  bigint      NOT NULL CHECK (catchup_window_ms >= 0),
    jitter_ms          bigint      NOT NULL DEFAULT 0 CHECK (jitter_ms >= 0),
    start_at           timestamptz,
    end_at             timestamptz,
    paused             boolean     NOT NULL DEFAULT false,
    note               text,
    next_fire_at       timestamptz,
    next_due_at        timestamptz,
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK ((cron IS NULL) <> (every_ms IS NULL)),
    CHECK ((next_fire_at IS NULL) = (next_due_at IS NULL))
);

CREATE INDEX schedule_due ON schedule (next_due_at) WHERE NOT paused AND next_due_at IS NOT NULL;

CREATE TABLE schedule_fire (
    schedule_id  uuid        NOT NULL REFERENCES schedule (id) ON DELETE CASCADE,
    -- The nominal fire time (jitter only moves when it was due).
    fire_at      timestamptz NOT NULL,
    outcome      text        NOT NULL CHECK (outcome IN ('fired', 'skipped', 'buffered')),
    -- fired: on_time, catch_up, buffered, trigger, backfill; skipped: missed, overlap.
    reason       text        NOT NULL,
    -- No foreign key: retention deletes finished instances, the fire's record stays.
    instance_id  uuid,
    leader_term  bigint,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (schedule_id, fire_at),
    CHECK ((outcome = 'fired') = (instance_id IS NOT NULL))
);

-- At most one fire waits for the live run to end (`buffer_one`).
CREATE UNIQUE INDEX schedule_fire_buffered ON schedule_fire (schedule_id) WHERE outcome = 'buffered';
CREATE INDEX schedule_fire_instance ON schedule_fire (instance_id) WHERE instance_id IS NOT NULL;
