-- Identical jobs in flight: while one job computes a result (claimed by its memo_key), an
-- identical job of another run waits for it instead of computing the same thing again. A claim
-- whose heartbeat stops (its consumer died) goes stale and can be taken over.
CREATE TABLE computations (
    memo_key     text PRIMARY KEY,
    job_id       uuid NOT NULL,
    consumer     text NOT NULL,
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE job_events DROP CONSTRAINT job_events_kind_check;
ALTER TABLE job_events ADD CONSTRAINT job_events_kind_check CHECK (kind IN ('queued', 'started',
    'attempt-failed', 'waiting', 'finished', 'dead-lettered'));
