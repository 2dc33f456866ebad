-- Quarry's schema, version 1: runs, their jobs, one result per job, and the event log.
-- Applied by quarry_shared::store::Store::migrate under a PostgreSQL advisory lock.

CREATE TABLE runs (
    id           uuid PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    -- The experiment as given to the producer (mode, toolchains, selection, limits), as JSON.
    -- A run resumed under the same name must have the same definition.
    definition   jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Set when the producer has published every job it selected; until then the total is unknown.
    published_at timestamptz,
    jobs_total   bigint,
    -- What the producer did, e.g. {"selected": 20, "queued": 10, "already_done": 10}.
    producer_summary jsonb
);

CREATE TABLE jobs (
    id             uuid PRIMARY KEY,
    run_id         uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    crate_name     text NOT NULL,
    crate_version  text NOT NULL,
    checksum       text NOT NULL,
    toolchain      text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- Set once the broker confirmed the job's message; a re-run publishes only jobs without it.
    published_at   timestamptz,
    UNIQUE (run_id, crate_name, crate_version, toolchain)
);
CREATE INDEX jobs_run_id ON jobs (run_id);

-- At most one row per job: consumers insert with ON CONFLICT DO NOTHING, so a redelivered or
-- duplicated message can never create a second result.
CREATE TABLE results (
    job_id       uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    run_id       uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    outcome      text NOT NULL CHECK (outcome IN ('build-pass', 'build-fail', 'test-pass',
                     'test-fail', 'timeout', 'out-of-memory', 'broken', 'error', 'skipped')),
    exit_code    integer,
    duration_ms  bigint NOT NULL,
    attempt      integer NOT NULL,
    consumer     text NOT NULL,
    log          text NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX results_run_id ON results (run_id);

-- Append-only: what happened to each job, in order. A job's state is a projection of it.
CREATE TABLE job_events (
    id        bigserial PRIMARY KEY,
    job_id    uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    run_id    uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind      text NOT NULL CHECK (kind IN ('queued', 'started', 'attempt-failed', 'finished',
                  'dead-lettered')),
    attempt   integer,
    consumer  text,
    detail    text
);
CREATE INDEX job_events_job_id ON job_events (job_id, id);
CREATE INDEX job_events_run_kind ON job_events (run_id, kind);
