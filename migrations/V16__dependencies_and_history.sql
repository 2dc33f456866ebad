-- What each package of a run depends on: the direct dependencies (normal and build, not dev)
-- of the version tested, as the registry's index lists them. The report ranks a failure by how
-- many of the run's packages depend on the crate, and shows a dependency's failures under it.
CREATE TABLE dependencies (
    run_id     uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    dependency text NOT NULL,
    crate_name text NOT NULL,
    PRIMARY KEY (run_id, dependency, crate_name)
);

-- A package's outcomes in earlier runs (the report's history of each regression).
CREATE INDEX IF NOT EXISTS jobs_crate_name ON jobs (crate_name);
