//! A local crates.io-compatible registry for tests and the demo.
//!
//! It serves real `.crate` files (for example cargo's own download cache,
//! `~/.cargo/registry/cache`) with their real checksums and the metadata of their published
//! `Cargo.toml`:
//! - the sparse index under `/index/` (with `config.json`, `ETag` and `If-None-Match`),
//! - downloads at `/api/v1/crates/{name}/{version}/download`,
//! - paged listings at `/api/v1/crates`, shaped like crates.io's.
//!
//! It also writes its corpus as a crates.io database dump (`--write-dump`, [`dump`]), and
//! collects corpora of real crates with their whole dependency trees through cargo
//! (`quarry-registry corpus`, [`collect`]).
//!
//! It can be told to misbehave (status codes, `Retry-After`, delays, bodies cut short, corrupted
//! downloads) through `PUT /-/faults` or [`RunningRegistry::set_faults`], and counts what it
//! served at `GET /-/stats`, so reliability tests can check what clients did.

pub mod collect;
mod corpus;
pub mod dump;
mod server;

pub use corpus::{Corpus, Published, read_crate_file};
pub use server::{Fault, RunningRegistry, Stats, serve};
