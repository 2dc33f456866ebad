//! The producer: turns an experiment definition into a run and its jobs.
//!
//! One invocation creates (or resumes) the run in PostgreSQL, pages the registry, and for each
//! page: reads every selected crate's versions from the sparse index, records the page's jobs in
//! PostgreSQL, publishes those not yet published, waits for the broker's confirms, and marks them
//! published. Only then does it ask for the next page, so an interrupted producer loses at most
//! the page in hand, and a re-run publishes nothing twice.

//!
//! Where each part lives: `definition.rs` (what a run is), `pages.rs` (pages of work from the
//! run's source), `resolution.rs` (a page turned into jobs), `publishing.rs` (recorded,
//! published, confirmed, page by page), `progress.rs`, `recovery.rs` (runs made from earlier
//! ones, and jobs published again), `dump.rs` (a crates.io database dump), `selection.rs`
//! (filters, samples, reverse dependencies), `tree.rs` (the
//! size of a package's dependency tree, which orders the jobs no earlier run timed).

mod definition;
mod dump;
mod pages;
mod progress;
mod publishing;
mod recovery;
mod resolution;
pub mod selection;
mod tree;

pub use definition::{
    RunDefinition, Selection, Sort, check_package_spec, read_package_list, resolve_patch,
    resolve_toolchain_file, validate_run_name,
};
pub use publishing::{PublishSummary, publish_run};
pub use recovery::{Only, Republished, packages_from_run, republish};
