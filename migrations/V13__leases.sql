-- A job a consumer has taken off the work queue. The consumer acks the delivery as soon as it
-- holds the lease, so no broker `consumer_timeout` ever sees a long job; the lease is the job's
-- place in the world until its result is recorded (released in that transaction) or it is handed
-- back to the queue. The holder renews `expires_at` while it has the job in hand; a lease that
-- lapses (its consumer died) is published again by any consumer's sweeper, from `message`.
CREATE TABLE leases (
    job_id          uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    run_id          uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    -- The holder's fleet id (consumers.id) and name.
    holder          uuid NOT NULL,
    consumer        text NOT NULL,
    -- The message as delivered, and its count of failed attempts: what is published again.
    message         bytea NOT NULL,
    failed_attempts integer NOT NULL,
    taken_at        timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL
);
CREATE INDEX leases_expires_at ON leases (expires_at);
CREATE INDEX leases_holder ON leases (holder);

-- A lapsed lease's job published again says so in its history.
ALTER TABLE job_events DROP CONSTRAINT job_events_kind_check;
ALTER TABLE job_events ADD CONSTRAINT job_events_kind_check CHECK (kind IN ('queued', 'started',
    'attempt-failed', 'waiting', 'finished', 'dead-lettered', 'requeued', 'lease-lapsed'));
