-- A package that regressed is run once more on its failing side before it counts as regressed:
-- the re-run is a job of its own (side "<side> (re-run)"), added by the consumer that recorded
-- the regression, pointing at the job it re-runs.
ALTER TABLE jobs ADD COLUMN recheck_of uuid REFERENCES jobs (id) ON DELETE CASCADE;
CREATE INDEX jobs_recheck_of ON jobs (recheck_of) WHERE recheck_of IS NOT NULL;

-- Dead-lettered jobs can be requeued (`quarry-producer requeue`, or POST /runs/RUN/requeue): their
-- error result is removed and a `requeued` event says when and by whom; the event log stays
-- append-only.
ALTER TABLE job_events DROP CONSTRAINT job_events_kind_check;
ALTER TABLE job_events ADD CONSTRAINT job_events_kind_check CHECK (kind IN ('queued', 'started',
    'attempt-failed', 'waiting', 'finished', 'dead-lettered', 'requeued'));
