-- The campaign semaphore (ARCHITECTURE.md, "Semaphore") and the operator lifecycle flags.
--
-- `campaign.running` counts the instances holding a permit (`holds_permit`) and
-- `campaign.queued` the QUEUED ones; both change only under the campaign row's lock (`FOR NO KEY
-- UPDATE`, see the store's `semaphore` module),
-- in the transaction that changes the rows they count. A campaign without a limit
-- (`max_running IS NULL`, e.g. `default`) hands out no permits and queues nothing.

-- A QUEUED instance has its place in the queue and no permit; children never hold one (they
-- run under their parent's).
ALTER TABLE instance ADD CONSTRAINT queued_has_a_place CHECK (
    state <> 'queued' OR (queue_seq IS NOT NULL AND NOT holds_permit)
);
ALTER TABLE instance ADD CONSTRAINT children_hold_no_permit CHECK (
    NOT holds_permit OR parent_instance_id IS NULL
);

-- When the instance last entered the queue (creation, or a resume that re-queued it): the
-- queue's age, shown by `drover campaign show`.
ALTER TABLE instance ADD COLUMN queued_at timestamptz;

-- The holders of a campaign's permits: the reconciler's count, and `why` lists them.
CREATE INDEX instance_permit_holders ON instance (campaign_id) WHERE holds_permit;

-- Operator lifecycle. A graceful pause or stop of a RUNNING instance is a request that the
-- step's commit honours (the step finishes, then the instance is PAUSED or STOPPED): the
-- operator's name, NULL when not requested.
ALTER TABLE instance ADD COLUMN pause_requested_by text;
ALTER TABLE instance ADD COLUMN stop_requested_by text;
-- Who paused a PAUSED instance, and when.
ALTER TABLE instance ADD COLUMN paused_at timestamptz;
ALTER TABLE instance ADD COLUMN paused_by text;
