-- A fast, second liveness signal beside the heartbeat: each node process holds a session-level
-- advisory lock (namespace 0x44525652 'DRVR', key `liveness_key`) on a connection of its own.
-- A process that dies closes its sockets at once and Postgres releases the lock; the leader sees
-- the lock gone (pg_locks) and, with the heartbeat a little late too, declares the node dead
-- without waiting out the whole heartbeat silence. A frozen process or a partition keeps (or
-- cannot be told from keeping) its lock: the heartbeat stays the rule for those.
CREATE SEQUENCE node_liveness_key_seq AS integer MINVALUE 1 CYCLE;
ALTER TABLE node
    ADD COLUMN liveness_key integer NOT NULL DEFAULT nextval('node_liveness_key_seq'),
    -- When the node first held its lock: the fast signal counts only for nodes that did.
    ADD COLUMN liveness_at timestamptz;
