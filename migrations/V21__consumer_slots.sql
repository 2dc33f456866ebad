-- How many jobs each consumer runs at once. A consumer takes a job it cannot start yet (to
-- prepare it while its slots work) only while the queue holds enough for every other slot of
-- the fleet too: at the end of a run, a job prepared ahead waits for its own consumer's slot
-- while another consumer has nothing left to take.
ALTER TABLE consumers ADD COLUMN slots integer NOT NULL DEFAULT 1;
