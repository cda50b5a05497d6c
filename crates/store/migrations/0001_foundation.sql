-- Drover's foundation schema: definitions, campaigns, instances, journal, event outbox, nodes.
-- Every non-terminal instance state has a driver that moves it on; see ARCHITECTURE.md.

CREATE TABLE workflow_definition (
    name        text        NOT NULL,
    version     integer     NOT NULL CHECK (version >= 1),
    body        jsonb       NOT NULL,
    source      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (name, version)
);

CREATE TABLE campaign (
    id               bigserial   PRIMARY KEY,
    name             text        NOT NULL UNIQUE,
    -- NULL: no limit.
    max_running      integer     CHECK (max_running IS NULL OR max_running BETWEEN 1 AND 100000),
    running          integer     NOT NULL DEFAULT 0 CHECK (running >= 0),
    queued           integer     NOT NULL DEFAULT 0 CHECK (queued >= 0),
    on_error_permit  text        NOT NULL DEFAULT 'release' CHECK (on_error_permit IN ('release', 'hold')),
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

INSERT INTO campaign (name) VALUES ('default');

CREATE SEQUENCE instance_queue_seq;

CREATE TABLE instance (
    id                  uuid        PRIMARY KEY,
    campaign_id         bigint      NOT NULL REFERENCES campaign (id),
    workflow            text        NOT NULL,
    version             integer     NOT NULL,
    state               text        NOT NULL CHECK (state IN ('queued', 'ready', 'running', 'waiting',
                                        'paused', 'in_error', 'completed', 'failed', 'stopped')),
    holds_permit        boolean     NOT NULL DEFAULT false,
    queue_seq           bigint,
    current_step        text        NOT NULL,
    -- The checkpoint sequence: +1 on every journaled transition.
    step_seq            bigint      NOT NULL DEFAULT 0,
    -- The step_seq at which the current step was entered: stable across its retries, so it
    -- keys the step's idempotency.
    step_entered_seq    bigint      NOT NULL DEFAULT 0,
    step_attempt        integer     NOT NULL DEFAULT 1,
    step_retryable      boolean     NOT NULL DEFAULT true,
    -- Claims of the current step that have not been committed yet (allow_retry: false).
    step_claims         integer     NOT NULL DEFAULT 0,
    steps_run           integer     NOT NULL DEFAULT 0,
    fence               bigint      NOT NULL DEFAULT 0,
    owner_node          uuid,
    claimed_at          timestamptz,
    -- READY since (or, for a delayed retry, from) this time; the stale-READY sweeper's index.
    ready_at            timestamptz,
    wake_at             timestamptz,
    parent_instance_id  uuid        REFERENCES instance (id),
    call_depth          integer     NOT NULL DEFAULT 0,
    pending_children    integer     NOT NULL DEFAULT 0,
    vars                jsonb       NOT NULL DEFAULT '{}',
    initial_vars        jsonb       NOT NULL DEFAULT '{}',
    -- Latest output of each completed step, keyed by step id (CEL's `steps`).
    outputs             jsonb       NOT NULL DEFAULT '{}',
    error               text,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at         timestamptz,
    FOREIGN KEY (workflow, version) REFERENCES workflow_definition (name, version),
    CONSTRAINT permit_only_while_live CHECK (NOT holds_permit OR state NOT IN ('completed', 'failed', 'stopped')),
    CONSTRAINT running_has_owner CHECK ((state = 'running') = (owner_node IS NOT NULL))
);

CREATE INDEX instance_queued ON instance (campaign_id, queue_seq) WHERE state = 'queued';
CREATE INDEX instance_ready ON instance (ready_at) WHERE state = 'ready';
CREATE INDEX instance_running ON instance (owner_node) WHERE state = 'running';
CREATE INDEX instance_waiting ON instance (wake_at) WHERE state = 'waiting';
CREATE INDEX instance_listing ON instance (created_at DESC, id DESC);
CREATE INDEX instance_by_state ON instance (state, created_at DESC);
CREATE INDEX instance_children ON instance (parent_instance_id) WHERE parent_instance_id IS NOT NULL;

CREATE TABLE journal (
    instance_id  uuid        NOT NULL REFERENCES instance (id) ON DELETE CASCADE,
    step_seq     bigint      NOT NULL,
    step_id      text        NOT NULL,
    outcome      text        NOT NULL,
    -- The step moved to, or the state entered.
    transition   text,
    fence        bigint      NOT NULL,
    attempt      integer     NOT NULL,
    node_id      uuid,
    actor        text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    output       jsonb,
    error        text,
    PRIMARY KEY (instance_id, step_seq)
);

CREATE TABLE event_outbox (
    id             uuid        PRIMARY KEY,
    subject        text        NOT NULL,
    payload        jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- A relay's claim; an expired claim is relayed again (deduplicated by Nats-Msg-Id).
    claimed_until  timestamptz,
    relayed_at     timestamptz
);

CREATE INDEX event_outbox_pending ON event_outbox (created_at) WHERE relayed_at IS NULL;
CREATE INDEX event_outbox_relayed ON event_outbox (relayed_at) WHERE relayed_at IS NOT NULL;

CREATE TABLE node (
    id            uuid        PRIMARY KEY,
    roles         text[]      NOT NULL,
    host          text        NOT NULL,
    version       text        NOT NULL,
    status        text        NOT NULL DEFAULT 'alive' CHECK (status IN ('alive', 'draining', 'dead')),
    heartbeat_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    died_at       timestamptz,
    in_flight     integer     NOT NULL DEFAULT 0
);
