-- Technical workflows (issue 13): a definition's severity, a campaign's retention, and the
-- indexes the retention cleanup and the paused-too-long check walk.

-- `severity:` of the definition (normal | production | critical), kept beside its body so the
-- paused-too-long check can filter on it. Versions deployed before it are `normal` unless
-- their body says otherwise.
ALTER TABLE workflow_definition ADD COLUMN severity text NOT NULL DEFAULT 'normal'
    CHECK (severity IN ('normal', 'production', 'critical'));
UPDATE workflow_definition SET severity = body->>'severity'
WHERE body->>'severity' IN ('production', 'critical');

-- How long the campaign's finished instances are kept (`drover campaign set-retention`);
-- NULL: the cluster default (the `system-cleanup` workflow's `retention` variable).
ALTER TABLE campaign ADD COLUMN retention_ms bigint CHECK (retention_ms IS NULL OR retention_ms >= 0);

-- The cleanup walks each campaign's finished instances oldest first.
CREATE INDEX instance_finished ON instance (campaign_id, finished_at, id)
    WHERE state IN ('completed', 'failed', 'stopped');
-- The paused-too-long check: paused instances by when they were paused.
CREATE INDEX instance_paused ON instance (paused_at) WHERE state = 'paused';

-- Deleting an instance checks the foreign keys that point at it: without these, each deleted
-- row would scan `instance` (for `wait_child`) and `instance_signal` (its cascade) whole.
CREATE INDEX instance_wait_child ON instance (wait_child) WHERE wait_child IS NOT NULL;
CREATE INDEX instance_signal_instance ON instance_signal (instance_id);
