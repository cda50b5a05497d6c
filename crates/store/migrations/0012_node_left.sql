-- A node that stopped gracefully is `left`: gone like a dead one (its remaining instances are
-- taken back at once), but nobody had to wait for its silence. Dead and left rows are pruned
-- after a retention by the leader.
ALTER TABLE node DROP CONSTRAINT node_status_check;
ALTER TABLE node ADD CONSTRAINT node_status_check
    CHECK (status IN ('alive', 'draining', 'dead', 'left'));
CREATE INDEX node_gone ON node (died_at) WHERE status IN ('dead', 'left');
