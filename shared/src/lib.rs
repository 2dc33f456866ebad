//! What Quarry's producer, consumer and reporter share: the domain types ([`job`], [`category`],
//! [`cost`]), the configuration ([`config`]), and the clients for PostgreSQL ([`store`]),
//! RabbitMQ ([`queue`]), S3 ([`s3`]) and crates.io-compatible registries ([`registry`]), and what
//! changes a run across them ([`requeue`]).

pub mod category;
pub mod config;
pub mod cost;
pub mod job;
pub mod queue;
pub mod registry;
pub mod requeue;
pub mod s3;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use config::Config;
