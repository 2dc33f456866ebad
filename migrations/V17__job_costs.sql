-- What each job used where it ran (shared/src/cost.rs): CPU time of its steps' processes, the
-- most memory one step used, the disk its scratch directory took, the wait for a slot, and each
-- step's share. NULL for results that ran nothing here (memoized, infrastructure errors, jobs
-- that ended before a step) and for results recorded before this migration.
ALTER TABLE results
    ADD COLUMN cpu_ms            bigint,
    ADD COLUMN peak_memory_bytes bigint,
    ADD COLUMN disk_bytes        bigint,
    ADD COLUMN slot_wait_ms      bigint,
    ADD COLUMN steps             jsonb;
