-- Events as facts: the outbox holds what happened (instance, per-instance sequence, kind,
-- data, database time), not a rendered CloudEvent and subject; the bus renders those when it
-- relays. Each instance (and campaign, for campaign events) numbers its events from 1 without
-- gaps, in commit order: the counter lives on the row every transition of it locks.

ALTER TABLE instance ADD COLUMN event_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE campaign ADD COLUMN event_seq bigint NOT NULL DEFAULT 0;

CREATE TABLE event_fact (
    -- Write order; relayed oldest first.
    pos          bigserial   PRIMARY KEY,
    id           uuid        NOT NULL UNIQUE,
    -- NULL: an event about the campaign itself.
    instance_id  uuid,
    campaign     text        NOT NULL,
    workflow     text,
    version      integer,
    seq          bigint      NOT NULL,
    kind         text        NOT NULL,
    data         jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    relayed_at   timestamptz,
    -- Which relay partition sends it: all events of one instance (or campaign) share one, so
    -- one relay at a time sends them, in order.
    part         smallint    NOT NULL GENERATED ALWAYS AS (
        (hashtext(coalesce(instance_id::text, 'campaign:' || campaign)) & 15)::smallint) STORED,
    CHECK ((instance_id IS NULL) = (workflow IS NULL))
);

CREATE INDEX event_fact_pending ON event_fact (part, pos) WHERE relayed_at IS NULL;
CREATE INDEX event_fact_relayed ON event_fact (relayed_at) WHERE relayed_at IS NOT NULL;
CREATE UNIQUE INDEX event_fact_instance_seq ON event_fact (instance_id, seq)
    WHERE instance_id IS NOT NULL;

-- Who relays which partition: a relay holds a lease on a fair share of the 16 partitions.
CREATE TABLE event_relay (
    part         smallint    PRIMARY KEY CHECK (part BETWEEN 0 AND 15),
    owner        uuid,
    lease_until  timestamptz
);
INSERT INTO event_relay (part) SELECT generate_series(0, 15);

-- Events not relayed before the upgrade become facts, numbered in the order they were written.
WITH old AS (
    SELECT o.id, o.created_at,
           split_part(o.payload ->> 'type', '.', 2) AS about,
           split_part(o.payload ->> 'type', '.', 3) AS kind,
           o.payload -> 'data' AS data
    FROM event_outbox o
    WHERE o.relayed_at IS NULL
), numbered AS (
    SELECT old.*,
           row_number() OVER (PARTITION BY about, CASE WHEN about = 'instance'
                                                  THEN data ->> 'instance'
                                                  ELSE data ->> 'campaign' END
                              ORDER BY created_at, id) AS n
    FROM old
)
INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind, data, created_at)
SELECT id,
       CASE WHEN about = 'instance' THEN (data ->> 'instance')::uuid END,
       data ->> 'campaign',
       CASE WHEN about = 'instance' THEN data ->> 'workflow' END,
       CASE WHEN about = 'instance' THEN (data ->> 'version')::int END,
       n, kind,
       data - 'instance' - 'campaign' - 'workflow' - 'version',
       created_at
FROM numbered
WHERE data ->> 'campaign' IS NOT NULL
  AND (about <> 'instance' OR (data ->> 'workflow' IS NOT NULL AND data ->> 'version' IS NOT NULL));

UPDATE instance i SET event_seq = f.last
FROM (SELECT instance_id, max(seq) AS last FROM event_fact
      WHERE instance_id IS NOT NULL GROUP BY instance_id) f
WHERE i.id = f.instance_id;

UPDATE campaign c SET event_seq = f.last
FROM (SELECT campaign, max(seq) AS last FROM event_fact
      WHERE instance_id IS NULL GROUP BY campaign) f
WHERE c.name = f.campaign;

DROP TABLE event_outbox;
