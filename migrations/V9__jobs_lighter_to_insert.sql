-- A job's id is derived from (run, package, version, side), so the primary key already keeps
-- them unique; the second unique index over four text columns only cost every insert (two
-- million per crates.io-wide run). Lookups and joins by run and package keep a narrower index.
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_run_id_crate_name_crate_version_toolchain_key;
CREATE INDEX IF NOT EXISTS jobs_run_package ON jobs (run_id, crate_name, crate_version);
