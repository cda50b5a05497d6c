-- API tokens: bearer credentials with a scope. Only a SHA-256 hash of each token is stored;
-- the token itself is shown once, when it is created.

CREATE TABLE api_token (
    -- Names the token in audit rows (the actor of everything done with it).
    -- `bootstrap` is the name of the admin token a node is given in its configuration.
    name        text        PRIMARY KEY
                CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$' AND name <> 'bootstrap'),
    scope       text        NOT NULL CHECK (scope IN ('viewer', 'operator', 'admin')),
    -- SHA-256 of the token (tokens carry 256 random bits, so a fast hash is enough).
    hash        bytea       NOT NULL UNIQUE CHECK (length(hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The token that created this one.
    created_by  text        NOT NULL,
    -- NULL: never expires.
    expires_at  timestamptz,
    revoked_at  timestamptz
);
