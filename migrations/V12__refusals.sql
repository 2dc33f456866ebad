-- What a package tried before any of its code ran that the consumer refused (an override file
-- removed, a git dependency not fetched, a connection cargo was steered to): machine-readable
-- reasons (`Refusal`'s kebab-case names), the details being in the job's log.
ALTER TABLE results ADD COLUMN refused text[] NOT NULL DEFAULT '{}';
