-- A failure that points at the environment rather than the package's code (the sandbox denied
-- it the network) says why here; the comparison then calls it spurious, like a time or memory
-- limit, instead of a regression.
ALTER TABLE results ADD COLUMN environment text;
