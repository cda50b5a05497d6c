-- Recovery: the coordinator's leader lease, what a node reports, and what recovery needs to
-- know about the step an instance is running.

CREATE TABLE leader_lease (
    name         text        PRIMARY KEY,
    holder       uuid,
    -- +1 at every change of holder; every leader write checks it in its transaction.
    term         bigint      NOT NULL DEFAULT 0,
    expires_at   timestamptz NOT NULL DEFAULT 'epoch',
    acquired_at  timestamptz
);

INSERT INTO leader_lease (name) VALUES ('coordinator');

ALTER TABLE node ADD COLUMN rss_bytes bigint NOT NULL DEFAULT 0;
CREATE INDEX node_live ON node (heartbeat_at) WHERE status <> 'dead';

-- The current step's timeout, and when a claim of it is overdue (the worker enforces the
-- timeout itself; this catches a stuck worker whose node still heartbeats).
ALTER TABLE instance ADD COLUMN step_timeout_ms bigint NOT NULL DEFAULT 30000;
ALTER TABLE instance ADD COLUMN run_deadline timestamptz;
CREATE INDEX instance_overdue ON instance (run_deadline) WHERE state = 'running';
