-- What a job is expected to take, set when it is recorded: the duration of the latest result
-- computed for the same crate in another run (its own side's first). The producer publishes the
-- longest first, and the ETA counts these work-seconds rather than jobs. NULL: never run before.
ALTER TABLE jobs ADD COLUMN expected_ms bigint;
