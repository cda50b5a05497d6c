-- Operator lifecycle commands (pause, unpause, stop, kill, restart). The request flags and who
-- paused an instance, and when, come with 0005.

-- The state an operator paused the instance from (`queued`, `ready` or `waiting`); NULL when a
-- RUNNING instance's step commit paused it. Unpause puts a paused `waiting` instance back to
-- WAITING if nothing that would have woken it came meanwhile, and a paused `queued` one back
-- through admission; everything else goes READY.
ALTER TABLE instance ADD COLUMN paused_from text
    CHECK (paused_from IS NULL OR paused_from IN ('queued', 'ready', 'waiting'));

-- The finished instance this one restarts (same definition version, same initial variables).
-- At most one restart per instance: restarting it again is a no-op that names the first.
ALTER TABLE instance ADD COLUMN restarted_from uuid REFERENCES instance (id);
CREATE UNIQUE INDEX instance_restarted_from ON instance (restarted_from)
    WHERE restarted_from IS NOT NULL;
