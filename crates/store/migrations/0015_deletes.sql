-- Deleting workflows and campaigns, pausing campaigns (issue 13, item 4).
--
-- Deletes are soft: finished instances keep pointing at their definition version and their
-- campaign (foreign keys), so their history (journal, events, `why`) stays readable. A deleted
-- definition version is never started again and is not listed; a deleted campaign admits no
-- instance and is not listed. Live instances still running a deleted version (only with
-- `--stop-instances`, which stops them first, or a start that raced the delete) run on.

ALTER TABLE workflow_definition ADD COLUMN deleted_at timestamptz;
ALTER TABLE workflow_definition ADD COLUMN deleted_by text;

ALTER TABLE campaign ADD COLUMN deleted_at timestamptz;
ALTER TABLE campaign ADD COLUMN deleted_by text;

-- A paused campaign admits nothing: new instances and those a freed permit would admit stay
-- QUEUED; instances holding a permit run on. Only a campaign with a limit can be paused (an
-- unlimited one has no queue and its row is never locked by the hot path).
ALTER TABLE campaign ADD COLUMN paused_at timestamptz;
ALTER TABLE campaign ADD COLUMN paused_by text;
ALTER TABLE campaign ADD CONSTRAINT only_limited_campaigns_pause CHECK (
    paused_at IS NULL OR max_running IS NOT NULL
);
