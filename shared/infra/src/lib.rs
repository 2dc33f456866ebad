//! Quarry's infrastructure, between the domain (`quarry-core`) and the three programs: the
//! configuration ([`config`]), the clients for PostgreSQL ([`store`]), RabbitMQ ([`queue`]), S3
//! ([`s3`]) and crates.io-compatible registries ([`registry`]), telemetry, what changes a run
//! across them ([`requeue`]) and how a terminal follows one ([`follow`]). It must not know the producer, consumer or reporter.

pub mod config;
pub mod follow;
pub mod queue;
pub mod registry;
pub mod requeue;
pub mod s3;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use config::Config;
