-- Start-and-wait: an instance started by a client that waits for its end is announced (NOTIFY
-- drover_instance_end, payload its id) by the very transaction that ends it, whichever path
-- that is (a step commit, a stop or kill, recovery, …). Others cost nothing: the trigger's
-- WHEN is false for them.
ALTER TABLE instance ADD COLUMN announce_end boolean NOT NULL DEFAULT false;

CREATE FUNCTION drover_announce_instance_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('drover_instance_end', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER instance_end_announced
    AFTER UPDATE OF state ON instance
    FOR EACH ROW
    WHEN (NEW.announce_end AND NEW.state IS DISTINCT FROM OLD.state
          AND NEW.state IN ('completed', 'failed', 'stopped', 'in_error'))
    EXECUTE FUNCTION drover_announce_instance_end();
