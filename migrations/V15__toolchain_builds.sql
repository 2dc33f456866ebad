-- A toolchain's identity is its exact build (`rustc -vV`: release, commit hash and date), which
-- memoization keys on: each result records the build it ran with, so `nightly` of two days is
-- told apart in the database as in the memo key. Consumers say which toolchains they have ready
-- (their own and those installed on demand), for `quarry-producer consumers`.
ALTER TABLE results ADD COLUMN toolchain_build text;
ALTER TABLE consumers ADD COLUMN toolchains text[] NOT NULL DEFAULT '{}';
