-- Results are memoized across runs: two jobs with the same package checksum, the same toolchain
-- build and the same experiment have interchangeable results. `memo_key` names that identity;
-- `reused_from` marks a result copied from an earlier job instead of computed.
ALTER TABLE results ADD COLUMN memo_key text;
ALTER TABLE results ADD COLUMN reused_from uuid;
CREATE INDEX results_memo_key ON results (memo_key) WHERE reused_from IS NULL;
