//! Quarry's domain, the layer every other crate builds on: what a run, a job and its outcome
//! are ([`job`]), what a job cost ([`cost`]), how far a run has got and when it will end ([`progress`]), how two sides' outcomes compare ([`category`]),
//! a consumer's state in the fleet ([`fleet`]),
//! the registry's data ([`index`]) and what a `.crate` says of itself ([`archive`]). Types and pure logic only: this crate must not know
//! about I/O, an async runtime, a command line or any service (the `layers` test holds it to
//! that).

pub mod archive;
pub mod category;
pub mod cost;
pub mod fleet;
pub mod index;
pub mod job;
pub mod progress;
