-- Named as the glossary names them. The column `toolchain` has held a job's side since patches
-- came (`1.95.0 with serde@1.0.300`, `1.95.0 (re-run)`); `recheck_of` is the job a re-run runs
-- again. Renaming is a catalog change only: no row is rewritten, and the indexes, the foreign
-- key and the view follow their columns.
ALTER TABLE jobs RENAME COLUMN toolchain TO side;
ALTER TABLE jobs RENAME COLUMN recheck_of TO rerun_of;
ALTER INDEX jobs_recheck_of RENAME TO jobs_rerun_of;
