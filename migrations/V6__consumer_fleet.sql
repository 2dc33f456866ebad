-- The fleet: every consumer process registers itself, renews a heartbeat while it runs and says
-- which jobs it has in hand, so people can see who is working on what. Two consumers with the
-- same name are told apart by their id; the secret proves an update comes from the process that
-- registered.
CREATE TABLE consumers (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    secret       text NOT NULL,
    host         text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    current_jobs uuid[] NOT NULL DEFAULT '{}',
    jobs_done    bigint NOT NULL DEFAULT 0,
    stopped_at   timestamptz
);
CREATE INDEX consumers_heartbeat ON consumers (heartbeat_at);
