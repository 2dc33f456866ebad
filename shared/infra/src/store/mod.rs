//! PostgreSQL: the single source of truth for runs, jobs, results and the job event log.
//!
//! Every SQL statement Quarry runs lives here, so the invariants the schema relies on are kept in
//! one place:
//! - a job row exists before its message is published (`record_jobs` then `mark_published`);
//! - a job has at most one result (`record_result` inserts with `ON CONFLICT DO NOTHING`);
//! - events are only appended, never updated.
//!
//! Split by what each part owns, each an `impl Store` of its own: [`runs`], [`jobs`], [`claims`]
//! (leases and computation claims), [`results`], [`events`], [`fleet`] and [`reports`] (what the
//! reporter and `verify` read). This file holds the connection pool, the migrations, and the
//! helpers that turn rows into domain values.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Serialize;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;
use uuid::Uuid;

use crate::config::DatabaseConfig;
use quarry_core::category::{Category, SideVerdict, Verdict, categorize};
use quarry_core::cost::Cost;
pub use quarry_core::fleet::FleetState;
use quarry_core::job::{
    BrokenReason, EventKind, Job, JobId, Outcome, PackageVersion, Refusal, RunId,
};
use quarry_core::progress::{Progress, RunFigures};

mod claims;
mod events;
mod fleet;
mod jobs;
mod reports;
mod results;
mod rows;
mod runs;

pub use rows::*;

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Key of the session advisory lock held while migrating ("quarry" in ASCII).
const MIGRATION_LOCK: i64 = 0x7175_6172_7279;

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

/// libpq's verifying modes, which tokio-postgres does not parse, as `require`: Quarry verifies
/// the server's certificate whenever it uses TLS.
fn libpq_sslmode(url: &str) -> std::borrow::Cow<'_, str> {
    if url.contains("sslmode=verify-full") || url.contains("sslmode=verify-ca") {
        url.replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require")
            .into()
    } else {
        url.into()
    }
}

/// A `StoredJob` from a row of jobs (id, crate_name, crate_version, checksum, side, rerun_of).
fn stored_job(row: tokio_postgres::Row) -> StoredJob {
    StoredJob {
        id: JobId(row.get(0)),
        package: PackageVersion {
            name: row.get(1),
            version: row.get(2),
            checksum: row.get(3),
        },
        side: row.get(4),
        rerun_of: row.get::<_, Option<Uuid>>(5).map(JobId),
    }
}

/// A `ResultBrief` from (crate_name, crate_version, side, outcome, at, reason).
fn brief_of(row: &Row) -> anyhow::Result<ResultBrief> {
    Ok(ResultBrief {
        crate_name: row.get(0),
        crate_version: row.get(1),
        side: row.get(2),
        outcome: row.get::<_, String>(3).parse()?,
        at: row.get(4),
        reason: row.get(5),
    })
}

const RUN_COLUMNS: &str =
    "id, name, definition, created_at, published_at, jobs_total, producer_summary, cancelled_at,
     paging_position";

fn run_from_row(row: tokio_postgres::Row) -> Run {
    Run {
        id: RunId(row.get(0)),
        name: row.get(1),
        definition: row.get(2),
        created_at: row.get(3),
        published_at: row.get(4),
        jobs_total: row.get(5),
        producer_summary: row.get(6),
        cancelled_at: row.get(7),
        paging_position: row.get(8),
    }
}

/// Refusals as the database keeps them: their names.
fn parse_broken_reason(name: Option<String>) -> anyhow::Result<Option<BrokenReason>> {
    name.map(|name| name.parse()).transpose()
}

fn refusal_names(refused: &[Refusal]) -> Vec<&'static str> {
    refused.iter().map(|r| r.as_str()).collect()
}

fn parse_refusals(names: Vec<String>) -> anyhow::Result<Vec<Refusal>> {
    names.iter().map(|name| name.parse()).collect()
}

/// A count for a `bigint` column (saturating: none of Quarry's comes near 2^63).
fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The cost recorded on a result, from its five columns starting at `first` (`cpu_ms`,
/// `peak_memory_bytes`, `disk_bytes`, `slot_wait_ms`, `steps`): none where `steps` is NULL.
fn cost_of(row: &tokio_postgres::Row, first: usize) -> anyhow::Result<Option<Cost>> {
    let Some(steps) = row.get::<_, Option<serde_json::Value>>(first + 4) else {
        return Ok(None);
    };
    let count = |i: usize| {
        row.get::<_, Option<i64>>(first + i)
            .map(|n| n.max(0) as u64)
    };
    Ok(Some(Cost {
        cpu_ms: count(0),
        peak_memory_bytes: count(1),
        disk_bytes: count(2).unwrap_or(0),
        slot_wait_ms: count(3).unwrap_or(0),
        steps: serde_json::from_value(steps)
            .context("a result's steps are not what the consumer records")?,
    }))
}

impl Store {
    /// Connects (lazily: the pool opens connections on first use) and checks one connection works.
    pub async fn connect(config: &DatabaseConfig) -> anyhow::Result<Store> {
        let mut pg_config: tokio_postgres::Config = libpq_sslmode(config.url.expose())
            .parse()
            .context("invalid database URL")?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if pg_config.get_ssl_mode() == SslMode::Require {
            let tls = crate::tls::client_config(config.ca_file.as_deref())
                .context("cannot set up TLS for PostgreSQL")?;
            Manager::from_config(pg_config, MakeRustlsConnect::new(tls), manager_config)
        } else {
            // `prefer` (the default) would encrypt without knowing whom to: unless TLS is
            // required, and then verified, the connection is plain.
            pg_config.ssl_mode(SslMode::Disable);
            Manager::from_config(pg_config, NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .build()
            .context("cannot build the PostgreSQL pool")?;
        let store = Store { pool };
        // Fail now, with a clear message, rather than at the first query.
        drop(store.client().await.with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {}",
                config.url.redacted_url()
            )
        })?);
        Ok(store)
    }

    /// A pooled connection. Its statements are prepared once per connection
    /// (`prepare_cached`): a statement then costs one round trip instead of two, and PostgreSQL
    /// parses and plans it once; consumers run the same few statements for every job. (The
    /// migration lock is taken unprepared: once per process, and its unlock must run whatever
    /// happened.)
    async fn client(&self) -> anyhow::Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    /// Runs one statement (prepared once per connection) on a pooled connection, for the
    /// methods that need nothing else of it; returns the rows it changed.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> anyhow::Result<u64> {
        let client = self.client().await?;
        Ok(client
            .execute(&client.prepare_cached(sql).await?, params)
            .await?)
    }

    /// As [`Store::execute`], returning its rows.
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> anyhow::Result<Vec<Row>> {
        let client = self.client().await?;
        Ok(client
            .query(&client.prepare_cached(sql).await?, params)
            .await?)
    }

    /// As [`Store::execute`], returning its one row.
    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> anyhow::Result<Row> {
        let client = self.client().await?;
        Ok(client
            .query_one(&client.prepare_cached(sql).await?, params)
            .await?)
    }

    /// As [`Store::execute`], returning its row if there is one.
    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> anyhow::Result<Option<Row>> {
        let client = self.client().await?;
        Ok(client
            .query_opt(&client.prepare_cached(sql).await?, params)
            .await?)
    }

    /// Applies pending migrations. Safe to call from many processes at once: the session-level
    /// advisory lock makes them take turns, and the later ones find nothing left to do.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .context("cannot take the migration lock")?;
        let outcome = embedded::migrations::runner()
            .set_abort_divergent(true)
            .run_async(&mut **client)
            .await;
        // Unlock even when migrating failed, or the pooled session would keep the lock.
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        outcome.context("database migration failed")?;
        unlocked.context("cannot release the migration lock")?;
        Ok(())
    }
}
