-- Why a `broken` result could not be prepared (`BrokenReason`'s kebab-case names: an invalid
-- manifest, yanked or missing dependencies, a refused git dependency, ...): what a triager
-- counts and sorts broken packages by, decided by the consumer when it records the result.
ALTER TABLE results ADD COLUMN broken_reason text;
