-- Worker queues: where the current step's job goes, and what a worker needs to run it; and
-- which queues and handlers each worker node serves.

-- The current step's queue (the step's own, else its workflow's, else 'default'), and the
-- handler of a `handler` step: kept per current step like step_timeout_ms, and handed back
-- with every job, so whoever publishes a job knows where it goes without the definition.
ALTER TABLE instance ADD COLUMN step_queue text NOT NULL DEFAULT 'default';
ALTER TABLE instance ADD COLUMN step_handler text;

-- Definitions deployed before queues name none, so their queue is 'default'; the handler of
-- a live instance's current step is read from its definition.
UPDATE instance i SET step_handler = s.step->>'handler'
FROM workflow_definition d, jsonb_array_elements(d.body->'steps') AS s(step)
WHERE d.name = i.workflow AND d.version = i.version
  AND s.step->>'id' = i.current_step AND s.step->>'kind' = 'handler'
  AND i.state NOT IN ('completed', 'failed', 'stopped');

-- What a worker node serves (written at registration). A node registered before queues
-- existed pulled every job: 'default' is all there was.
ALTER TABLE node ADD COLUMN queues text[] NOT NULL DEFAULT '{default}';
ALTER TABLE node ADD COLUMN handlers text[] NOT NULL DEFAULT '{}';
