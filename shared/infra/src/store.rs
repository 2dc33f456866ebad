//! PostgreSQL: the single source of truth for runs, jobs, results and the job event log.
//!
//! Every SQL statement Quarry runs lives here, so the invariants the schema relies on are kept in
//! one place:
//! - a job row exists before its message is published (`record_jobs` then `mark_published`);
//! - a job has at most one result (`record_result` inserts with `ON CONFLICT DO NOTHING`);
//! - events are only appended, never updated.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Serialize;
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use uuid::Uuid;

use crate::config::DatabaseConfig;
use quarry_core::category::{Category, Verdict, categorize};
use quarry_core::cost::Cost;
use quarry_core::job::{BrokenReason, Job, JobId, Outcome, PackageVersion, Refusal, RunId};
use quarry_core::progress::{Progress, RunFigures};

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Key of the session advisory lock held while migrating ("quarry" in ASCII).
const MIGRATION_LOCK: i64 = 0x7175_6172_7279;

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

/// A run as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: RunId,
    pub name: String,
    pub definition: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub jobs_total: Option<i64>,
    pub producer_summary: Option<serde_json::Value>,
    pub cancelled_at: Option<DateTime<Utc>>,
    /// Where the producer got to in the registry listing (its own format).
    pub paging_position: Option<serde_json::Value>,
}

/// Where a delivered job stands, as far as the database knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// It already has a result (a redelivery or a duplicate).
    Finished,
    /// No such job is recorded (its run was deleted, or the message is forged).
    Unknown,
    /// Its run was cancelled.
    RunCancelled,
    /// It is to be done. `crashes`: its attempts that started running (took an experiment
    /// slot) and never ended, since it was last requeued: each time, its consumer died.
    ToDo { crashes: u32 },
}

/// A job's lease as a consumer takes it (`Store::take_lease`).
pub struct NewLease<'a> {
    pub job: JobId,
    pub run: RunId,
    /// The consumer's fleet id, and its name.
    pub holder: Uuid,
    pub consumer: &'a str,
    /// The message as delivered, published again if the lease lapses.
    pub message: &'a [u8],
    pub failed_attempts: u32,
}

/// A lease whose holder stopped renewing it, as the sweeper publishes it again.
#[derive(Debug, Clone)]
pub struct LapsedLease {
    pub job: JobId,
    pub run: RunId,
    /// The name of the consumer that held it.
    pub holder: String,
    pub message: Vec<u8>,
    pub failed_attempts: u32,
    pub lapsed_for: Duration,
}

/// The final result of one job, as a consumer records it.
#[derive(Debug, Clone)]
pub struct NewResult {
    pub job_id: JobId,
    pub run_id: RunId,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub duration: Duration,
    pub attempt: i32,
    pub consumer: String,
    /// The log itself, where it is not in S3 (or a note that goes before the S3 log).
    pub log: Option<String>,
    /// The S3 key of the gzip-compressed log.
    pub log_key: Option<String>,
    /// The job's identity across runs (`Job::memo_key`), when it is known.
    pub memo_key: Option<String>,
    /// The earlier job whose result this one reuses.
    pub reused_from: Option<JobId>,
    /// Why a failure points at the environment rather than the code (`network denied: ...`).
    pub environment: Option<String>,
    /// What the package tried that the consumer refused.
    pub refused: Vec<Refusal>,
    /// For a `broken` result: why it could not be prepared, where that is known.
    pub broken_reason: Option<BrokenReason>,
    /// Why the job was given up on, for a job whose message was dead-lettered: logged as its
    /// `dead-lettered` event in the same transaction as the (`error`) result.
    pub dead_lettered: Option<String>,
    /// The exact build (`rustc -vV`) of the toolchain it ran with, where one was found.
    pub toolchain_build: Option<String>,
    /// What it used, where its steps ran here.
    pub cost: Option<Cost>,
    /// The job holds the computation of `memo_key` (`claim_computation`): released in the
    /// result's own transaction, so an identical job finds the claim or the result, never
    /// neither.
    pub releases_claim: bool,
    /// The holder (a consumer's fleet id) of the job's lease, released in the same transaction
    /// unless the result also recorded a re-run still to be published.
    pub lease_holder: Option<Uuid>,
}

/// Packages with these start and end results and end re-run outcome: how many.
pub type OutcomePair = (Option<Verdict>, Option<Verdict>, Option<Outcome>, i64);

/// A job as the database keeps it: (id, package, side label, the job it re-runs), from which
/// `StoredDefinition::job` rebuilds it.
pub type StoredJob = (JobId, PackageVersion, String, Option<JobId>);

/// What decides, when a job of a two-sided run gets its result, whether its package regressed
/// and must be run again: the labels of the run's two sides, and the re-run to add if so.
#[derive(Debug, Clone)]
pub struct Pairing {
    pub start: String,
    pub end: String,
    /// The end side's job of this package, re-run (`Job::recheck`).
    pub end_rerun: Job,
}

/// An earlier result that a job can reuse.
#[derive(Debug, Clone)]
pub struct MemoizedResult {
    pub job_id: JobId,
    pub run_name: String,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub duration_ms: i64,
    pub log_key: Option<String>,
    pub log: Option<String>,
    pub environment: Option<String>,
    pub refused: Vec<Refusal>,
    pub broken_reason: Option<BrokenReason>,
}

/// One row of a run's results, joined with its job, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct ResultRow {
    pub job_id: Uuid,
    pub crate_name: String,
    pub crate_version: String,
    pub toolchain: String,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub duration_ms: i64,
    pub attempt: i32,
    pub consumer: String,
    pub finished_at: DateTime<Utc>,
    /// For a regression's re-run: the job it ran again.
    pub recheck_of: Option<Uuid>,
    /// Why its failure points at the environment, if it does.
    pub environment: Option<String>,
    /// What the package tried that the consumer refused.
    pub refused: Vec<Refusal>,
    /// For a `broken` result: why it could not be prepared, where that is known.
    pub broken_reason: Option<BrokenReason>,
    /// What it used, where its steps ran (not for a reused result).
    pub cost: Option<Cost>,
    /// The exact build (`rustc -vV`) of the toolchain it ran with, where one was found.
    pub toolchain_build: Option<String>,
    /// The log kept in PostgreSQL (all of it, or a note before the S3 log).
    #[serde(skip)]
    pub log: Option<String>,
    /// The S3 key of the log.
    #[serde(skip)]
    pub log_key: Option<String>,
}

/// A package's result in an earlier run.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    pub crate_name: String,
    pub crate_version: String,
    pub run: String,
    pub created_at: DateTime<Utc>,
    pub side: String,
    pub outcome: Outcome,
}

/// What `Store::reconcile` found: the figures the invariants are checked against.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reconciliation {
    pub jobs: i64,
    /// Of the jobs, the re-runs of regressions that consumers added.
    pub reruns: i64,
    pub unpublished: i64,
    pub results: i64,
    /// Up to 20 jobs without a result, as `name@version (toolchain)`.
    pub jobs_without_result: Vec<String>,
    pub jobs_without_result_count: i64,
    /// Results whose job has no `finished` event, or more than one.
    pub results_without_one_finished_event: i64,
    /// Dead-lettered jobs without an `error` result.
    pub dead_letters_without_error_result: i64,
}

/// One job of a package in a run, for `explain`.
#[derive(Debug, Clone)]
pub struct PackageJob {
    pub id: JobId,
    pub version: String,
    /// The side label (`Job::side`).
    pub side: String,
    /// Its result's outcome, once it has one.
    pub outcome: Option<Outcome>,
    /// What its package tried that the consumer refused.
    pub refused: Vec<Refusal>,
}

/// A consumer of the fleet, as it registered and last reported.
#[derive(Debug, Clone, Serialize)]
pub struct FleetMember {
    pub id: Uuid,
    pub name: String,
    pub host: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub current_jobs: Vec<Uuid>,
    pub jobs_done: i64,
    pub stopped_at: Option<DateTime<Utc>>,
    /// The toolchains it has ready (`name: build`), as it last reported.
    pub toolchains: Vec<String>,
}

impl FleetMember {
    /// `stopped` (it said goodbye), `lost` (silent for over 30 s: three missed heartbeats) or
    /// `alive`.
    pub fn status(&self, now: DateTime<Utc>) -> &'static str {
        if self.stopped_at.is_some() {
            "stopped"
        } else if (now - self.heartbeat_at).num_seconds() > 30 {
            "lost"
        } else {
            "alive"
        }
    }
}

/// A job result worth a look, for the live view.
#[derive(Debug, Clone, Serialize)]
pub struct ResultBrief {
    pub crate_name: String,
    pub crate_version: String,
    pub toolchain: String,
    pub outcome: Outcome,
    pub at: DateTime<Utc>,
    /// Why, where there is a reason (a dead letter's).
    pub reason: Option<String>,
}

/// A package whose outcome differs between two runs.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub crate_name: String,
    pub crate_version: String,
    pub before: Outcome,
    pub after: Outcome,
}

/// One entry of a job's event log.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub attempt: Option<i32>,
    pub consumer: Option<String>,
    pub detail: Option<String>,
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

    // ---- runs -------------------------------------------------------------------------------

    /// Creates the run named `name`, or returns the existing one if its definition is the same
    /// (`true` in the second field). A different definition under the same name is an error.
    pub async fn create_or_resume_run(
        &self,
        name: &str,
        definition: &serde_json::Value,
    ) -> anyhow::Result<(Run, bool)> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                &client
                    .prepare_cached(
                        "INSERT INTO runs (id, name, definition) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                    )
                    .await?,
                &[&RunId::new().0, &name, definition],
            )
            .await?;
        let run = self
            .run_by_name(name)
            .await?
            .context("run vanished right after it was created")?;
        if inserted == 0 && &run.definition != definition {
            bail!(
                "a run named {name:?} already exists with a different definition; \
                 choose another name, or repeat the original definition to resume it.\n\
                 existing: {}\n   given: {}",
                run.definition,
                definition
            );
        }
        Ok((run, inserted == 0))
    }

    pub async fn run_by_name(&self, name: &str) -> anyhow::Result<Option<Run>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE name = $1"),
                &[&name],
            )
            .await?;
        Ok(row.map(run_from_row))
    }

    /// Finds a run by id or, failing that, by name.
    pub async fn find_run(&self, id_or_name: &str) -> anyhow::Result<Run> {
        if let Ok(id) = id_or_name.parse::<Uuid>() {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
                    &[&id],
                )
                .await?;
            if let Some(row) = row {
                return Ok(run_from_row(row));
            }
        }
        self.run_by_name(id_or_name)
            .await?
            .with_context(|| format!("no run with id or name {id_or_name:?}"))
    }

    /// Every run, newest first.
    pub async fn runs(&self) -> anyhow::Result<Vec<Run>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY created_at DESC"),
                &[],
            )
            .await?;
        Ok(rows.into_iter().map(run_from_row).collect())
    }

    /// Cancels a run. Returns false if it was already cancelled.
    pub async fn cancel_run(&self, run: RunId) -> anyhow::Result<bool> {
        let client = self.client().await?;
        let changed = client
            .execute(
                &client.prepare_cached("UPDATE runs SET cancelled_at = now() WHERE id = $1 AND cancelled_at IS NULL").await?,
                &[&run.0],
            )
            .await?;
        Ok(changed == 1)
    }

    /// Jobs recorded for a run, and the distinct package versions they cover.
    pub async fn recorded(&self, run: RunId) -> anyhow::Result<(i64, i64)> {
        let client = self.client().await?;
        let row = client
            .query_one(
                &client
                    .prepare_cached(
                        "SELECT count(*), count(DISTINCT (crate_name, crate_version))
                 FROM jobs WHERE run_id = $1",
                    )
                    .await?,
                &[&run.0],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Records that the producer has published every job of the run.
    pub async fn finish_publishing(
        &self,
        run: RunId,
        summary: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE runs SET published_at = now(), producer_summary = $2,
                     jobs_total = (SELECT count(*) FROM jobs WHERE run_id = $1)
                 WHERE id = $1",
                    )
                    .await?,
                &[&run.0, summary],
            )
            .await?;
        Ok(())
    }

    pub async fn progress(&self, run: RunId) -> anyhow::Result<Progress> {
        let client = self.client().await?;
        let row = client
            .query_one(
                // Once everything is published, every recorded job counts, including the
                // re-runs of regressions that consumers add as results come in.
                "WITH recorded AS (SELECT count(*) AS n FROM jobs WHERE run_id = $1)
                 SELECT recorded.n,
                        (SELECT count(*) FROM results WHERE run_id = $1),
                        CASE WHEN runs.published_at IS NOT NULL THEN recorded.n END
                 FROM runs, recorded WHERE runs.id = $1",
                &[&run.0],
            )
            .await?;
        Ok(Progress {
            recorded: row.get(0),
            finished: row.get(1),
            total: row.get(2),
        })
    }

    // ---- jobs (producer side) ---------------------------------------------------------------

    /// Records jobs (idempotently) and returns those still to publish: not yet confirmed by the
    /// broker and without a result, the longest expected first.
    pub async fn record_jobs(&self, jobs: &[Job]) -> anyhow::Result<Vec<JobId>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.id.0).collect();
        let runs: Vec<Uuid> = jobs.iter().map(|j| j.run_id.0).collect();
        let names: Vec<&str> = jobs.iter().map(|j| j.package.name.as_str()).collect();
        let versions: Vec<&str> = jobs.iter().map(|j| j.package.version.as_str()).collect();
        let checksums: Vec<&str> = jobs.iter().map(|j| j.package.checksum.as_str()).collect();
        // The column holds the job's side: its toolchain, and its patch if any.
        let sides: Vec<String> = jobs.iter().map(Job::side).collect();
        let toolchains: Vec<&str> = sides.iter().map(String::as_str).collect();
        let client = self.client().await?;
        // Each new job's expected duration: the latest computed result of the same crate in
        // another run, its own side's first (`jobs_crate_name`, then `results`' primary key).
        let inserted = client
            .query(
                &client.prepare_cached("WITH inserted AS (
                   INSERT INTO jobs (id, run_id, crate_name, crate_version, checksum, toolchain, expected_ms)
                   SELECT n.id, n.run_id, n.crate_name, n.crate_version, n.checksum, n.toolchain,
                          (SELECT r.duration_ms FROM jobs p JOIN results r ON r.job_id = p.id
                           WHERE p.crate_name = n.crate_name AND p.run_id <> n.run_id
                             AND r.reused_from IS NULL
                           ORDER BY p.toolchain = n.toolchain DESC, r.finished_at DESC LIMIT 1)
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])
                        AS n(id, run_id, crate_name, crate_version, checksum, toolchain)
                   ON CONFLICT (id) DO NOTHING
                   RETURNING id, expected_ms)
                 SELECT id, expected_ms FROM inserted").await?,
                &[&ids, &runs, &names, &versions, &checksums, &toolchains],
            )
            .await
            .context("cannot record jobs")?;
        // All new (the usual case on a first invocation): none can be published yet.
        let rows = if inserted.len() == ids.len() {
            inserted
        } else {
            client
                .query(
                    &client
                        .prepare_cached(
                            "SELECT j.id, j.expected_ms FROM jobs j
                 WHERE j.id = ANY($1) AND j.published_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)",
                        )
                        .await?,
                    &[&ids],
                )
                .await?
        };
        // Longest expected first; the others (never run before) after them, in the order given.
        let given: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut pending: Vec<(Uuid, Option<i64>)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        pending.sort_by_key(|(id, expected)| {
            (
                std::cmp::Reverse(expected.unwrap_or(-1)),
                given.get(id).copied(),
            )
        });
        Ok(pending.into_iter().map(|(id, _)| JobId(id)).collect())
    }

    /// The crates whose latest computed results took longest, longest first, at most `limit`:
    /// what a run publishes before it pages, so that its slowest jobs start first.
    pub async fn longest_packages(&self, limit: i64) -> anyhow::Result<Vec<String>> {
        let client = self.client().await?;
        Ok(client
            .query(
                &client
                    .prepare_cached(
                        "SELECT j.crate_name FROM results r JOIN jobs j ON j.id = r.job_id
                 WHERE r.reused_from IS NULL
                 GROUP BY j.crate_name ORDER BY max(r.duration_ms) DESC LIMIT $1",
                    )
                    .await?,
                &[&limit],
            )
            .await?
            .into_iter()
            .map(|row| row.get(0))
            .collect())
    }

    /// The run's jobs that have no result yet, as (id, package, side, the job it re-runs).
    pub async fn unfinished_jobs(&self, run: RunId) -> anyhow::Result<Vec<StoredJob>> {
        let client = self.client().await?;
        Ok(client
            .query(
                &client.prepare_cached("SELECT j.id, j.crate_name, j.crate_version, j.checksum, j.toolchain, j.recheck_of
                 FROM jobs j
                 WHERE j.run_id = $1
                   AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)
                 ORDER BY j.crate_name, j.crate_version, j.toolchain").await?,
                &[&run.0],
            )
            .await?
            .into_iter()
            .map(stored_job)
            .collect())
    }

    /// Marks jobs as published (after the broker confirmed them): the time is their `queued`
    /// event. With a paging position, saves it with the run in the same transaction.
    pub async fn mark_published(
        &self,
        jobs: &[JobId],
        position: Option<(RunId, &serde_json::Value)>,
    ) -> anyhow::Result<()> {
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.0).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some((run, position)) = position {
            tx.execute(
                &tx.prepare_cached("UPDATE runs SET paging_position = $2 WHERE id = $1")
                    .await?,
                &[&run.0, position],
            )
            .await?;
        }
        tx.execute(
            &tx.prepare_cached(
                "UPDATE jobs SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL",
            )
            .await?,
            &[&ids],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- results (consumer side) ------------------------------------------------------------

    /// What a consumer needs to know before taking a delivered job on, in one round trip.
    pub async fn job_state(&self, job: &Job) -> anyhow::Result<JobState> {
        let client = self.client().await?;
        // A start is ended by an `attempt-failed` or `finished` event before any later start;
        // one that is not was cut short by its consumer's death.
        let row = client
            .query_one(
                &client
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM results WHERE job_id = $1),
                        EXISTS (SELECT 1 FROM jobs WHERE id = $1),
                        EXISTS (SELECT 1 FROM runs WHERE id = $2 AND cancelled_at IS NOT NULL),
                        (SELECT count(*) FROM job_events s
                         WHERE s.job_id = $1 AND s.kind = 'started'
                           AND s.id > coalesce((SELECT max(q.id) FROM job_events q
                                                WHERE q.job_id = $1 AND q.kind = 'requeued'), 0)
                           AND NOT EXISTS (
                               SELECT 1 FROM job_events c
                               WHERE c.job_id = $1 AND c.id > s.id
                                 AND c.kind IN ('attempt-failed', 'finished')
                                 AND NOT EXISTS (SELECT 1 FROM job_events n
                                                 WHERE n.job_id = $1 AND n.kind = 'started'
                                                   AND n.id > s.id AND n.id < c.id)))",
                    )
                    .await?,
                &[&job.id.0, &job.run_id.0],
            )
            .await?;
        let (finished, recorded, cancelled): (bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2));
        Ok(if finished {
            JobState::Finished
        } else if !recorded {
            JobState::Unknown
        } else if cancelled {
            JobState::RunCancelled
        } else {
            JobState::ToDo {
                crashes: u32::try_from(row.get::<_, i64>(3)).unwrap_or(u32::MAX),
            }
        })
    }

    /// Logs the start of attempt number `attempt` (1 for the first).
    pub async fn start_attempt(
        &self,
        job: &Job,
        attempt: i32,
        consumer: &str,
    ) -> anyhow::Result<()> {
        self.append_event(job, "started", Some(attempt), consumer, "")
            .await
    }

    pub async fn record_attempt_failed(
        &self,
        job: &Job,
        attempt: i32,
        consumer: &str,
        reason: &str,
    ) -> anyhow::Result<()> {
        self.append_event(job, "attempt-failed", Some(attempt), consumer, reason)
            .await
    }

    /// Logs that the job waits for an identical job (`holder`) computing the same result.
    pub async fn record_waiting(
        &self,
        job: &Job,
        attempt: i32,
        consumer: &str,
        holder: JobId,
    ) -> anyhow::Result<()> {
        let detail =
            format!("waiting for the identical job {holder}, which is computing the same result");
        self.append_event(job, "waiting", Some(attempt), consumer, &detail)
            .await
    }

    /// Claims the computation of `memo_key` for `job`: returns `None` when it is ours (no one
    /// had it, its holder's heartbeat is older than `stale_after`, or it was already ours), or
    /// the job holding it.
    pub async fn claim_computation(
        &self,
        memo_key: &str,
        job: JobId,
        consumer: &str,
        stale_after: Duration,
    ) -> anyhow::Result<Option<JobId>> {
        let stale_secs = stale_after.as_secs_f64();
        let client = self.client().await?;
        // Twice at most: the holder may finish between the insert and the look-up.
        for _ in 0..2 {
            let claimed = client
                .query_opt(
                    &client.prepare_cached("INSERT INTO computations AS c (memo_key, job_id, consumer) VALUES ($1, $2, $3)
                     ON CONFLICT (memo_key) DO UPDATE
                       SET job_id = excluded.job_id, consumer = excluded.consumer,
                           heartbeat_at = now()
                       WHERE c.job_id = excluded.job_id
                          OR c.heartbeat_at < now() - make_interval(secs => $4)
                     RETURNING job_id").await?,
                    &[&memo_key, &job.0, &consumer, &stale_secs],
                )
                .await?;
            if claimed.is_some() {
                return Ok(None);
            }
            // The row was someone else's and fresh, so it was left alone: say whose.
            let holder = client
                .query_opt(
                    &client
                        .prepare_cached("SELECT job_id FROM computations WHERE memo_key = $1")
                        .await?,
                    &[&memo_key],
                )
                .await?;
            if let Some(holder) = holder {
                return Ok(Some(JobId(holder.get(0))));
            }
        }
        anyhow::bail!("the claim on computation {memo_key} keeps changing hands")
    }

    /// Keeps a claimed computation alive.
    pub async fn heartbeat_computation(&self, memo_key: &str, job: JobId) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &client.prepare_cached("UPDATE computations SET heartbeat_at = now() WHERE memo_key = $1 AND job_id = $2").await?,
                &[&memo_key, &job.0],
            )
            .await?;
        Ok(())
    }

    /// Gives up a claimed computation (done, or failed).
    pub async fn release_computation(&self, memo_key: &str, job: JobId) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached("DELETE FROM computations WHERE memo_key = $1 AND job_id = $2")
                    .await?,
                &[&memo_key, &job.0],
            )
            .await?;
        Ok(())
    }

    async fn append_event(
        &self,
        job: &Job,
        kind: &str,
        attempt: Option<i32>,
        consumer: &str,
        detail: &str,
    ) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "INSERT INTO job_events (job_id, run_id, kind, attempt, consumer, detail)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .await?,
                &[
                    &job.id.0,
                    &job.run_id.0,
                    &kind,
                    &attempt,
                    &consumer,
                    &detail,
                ],
            )
            .await?;
        Ok(())
    }

    /// Stores a job's final result and its `finished` event in one transaction. Returns false,
    /// changing nothing, when the job already had a result.
    ///
    /// With a `pairing` (a job of a two-sided run), the same transaction also decides whether
    /// the package regressed, now that this side has its result, and if so records the end
    /// side's re-run: returned when it still has to be published. The package's job rows are
    /// locked first, so when both sides finish at once the second to commit sees the first.
    pub async fn record_result(
        &self,
        result: &NewResult,
        pairing: Option<&Pairing>,
    ) -> anyhow::Result<(bool, Option<Job>)> {
        let duration_ms = i64::try_from(result.duration.as_millis()).unwrap_or(i64::MAX);
        let cost = result.cost.as_ref();
        let steps = cost
            .map(|c| serde_json::to_value(&c.steps))
            .transpose()
            .context("cannot encode the job's steps")?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some(pairing) = pairing {
            let package = &pairing.end_rerun.package;
            tx.execute(
                &tx.prepare_cached("SELECT 1 FROM jobs WHERE run_id = $1 AND crate_name = $2 AND crate_version = $3
                 FOR UPDATE").await?,
                &[&result.run_id.0, &package.name, &package.version],
            )
            .await
            .context("cannot lock the package's jobs")?;
        }
        let inserted = tx
            .execute(
                &tx.prepare_cached(
                    "INSERT INTO results (job_id, run_id, outcome, exit_code, duration_ms, attempt,
                                      consumer, log, log_key, memo_key, reused_from, environment,
                                      refused, broken_reason, toolchain_build, cpu_ms,
                                      peak_memory_bytes, disk_bytes, slot_wait_ms, steps)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                         $17, $18, $19, $20)
                 ON CONFLICT (job_id) DO NOTHING",
                )
                .await?,
                &[
                    &result.job_id.0,
                    &result.run_id.0,
                    &result.outcome.as_str(),
                    &result.exit_code,
                    &duration_ms,
                    &result.attempt,
                    &result.consumer,
                    &result.log,
                    &result.log_key,
                    &result.memo_key,
                    &result.reused_from.map(|j| j.0),
                    &result.environment,
                    &refusal_names(&result.refused),
                    &result.broken_reason.map(BrokenReason::as_str),
                    &result.toolchain_build,
                    &cost.and_then(|c| c.cpu_ms).map(bigint),
                    &cost.and_then(|c| c.peak_memory_bytes).map(bigint),
                    &cost.map(|c| bigint(c.disk_bytes)),
                    &cost.map(|c| bigint(c.slot_wait_ms)),
                    &steps,
                ],
            )
            .await
            .context("cannot record the result")?;
        if inserted == 1
            && let Some(reason) = &result.dead_lettered
        {
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO job_events (job_id, run_id, kind, consumer, detail)
                 VALUES ($1, $2, 'dead-lettered', $3, $4)",
                )
                .await?,
                &[&result.job_id.0, &result.run_id.0, &result.consumer, reason],
            )
            .await?;
        }
        if inserted == 1 {
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO job_events (job_id, run_id, kind, attempt, consumer, detail)
                 VALUES ($1, $2, 'finished', $3, $4, $5)",
                )
                .await?,
                &[
                    &result.job_id.0,
                    &result.run_id.0,
                    &result.attempt,
                    &result.consumer,
                    &result.outcome.as_str(),
                ],
            )
            .await?;
        }
        if result.releases_claim
            && let Some(memo_key) = &result.memo_key
        {
            tx.execute(
                &tx.prepare_cached("DELETE FROM computations WHERE memo_key = $1 AND job_id = $2")
                    .await?,
                &[memo_key, &result.job_id.0],
            )
            .await
            .context("cannot release the computation")?;
        }
        let rerun = match pairing {
            Some(pairing) => Self::record_rerun_if_regressed(&tx, pairing).await?,
            None => None,
        };
        // A re-run to publish keeps the lease until it is published: if the consumer dies
        // first, the lease lapses and the job's next delivery publishes it.
        if rerun.is_none()
            && let Some(holder) = result.lease_holder
        {
            tx.execute(
                &tx.prepare_cached("DELETE FROM leases WHERE job_id = $1 AND holder = $2")
                    .await?,
                &[&result.job_id.0, &holder],
            )
            .await
            .context("cannot release the job's lease")?;
        }
        tx.commit().await.context("cannot commit the result")?;
        Ok((inserted == 1, rerun))
    }

    /// Within `record_result`'s transaction: when the package's start side passed and its end
    /// side failed, records the end side's re-run (once) and returns it if it is unpublished.
    async fn record_rerun_if_regressed(
        tx: &deadpool_postgres::Transaction<'_>,
        pairing: &Pairing,
    ) -> anyhow::Result<Option<Job>> {
        let rerun = &pairing.end_rerun;
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT j.toolchain, r.outcome, r.environment IS NOT NULL
                 FROM jobs j JOIN results r ON r.job_id = j.id
                 WHERE j.run_id = $1 AND j.crate_name = $2 AND j.crate_version = $3
                   AND j.toolchain IN ($4, $5)",
                )
                .await?,
                &[
                    &rerun.run_id.0,
                    &rerun.package.name,
                    &rerun.package.version,
                    &pairing.start,
                    &pairing.end,
                ],
            )
            .await?;
        let side = |label: &str| -> anyhow::Result<Option<Verdict>> {
            rows.iter()
                .find(|row| row.get::<_, &str>(0) == label)
                .map(|row| {
                    Ok(Verdict {
                        outcome: row.get::<_, &str>(1).parse()?,
                        environmental: row.get(2),
                    })
                })
                .transpose()
        };
        let category = categorize(side(&pairing.start)?, side(&pairing.end)?, None);
        if category != Category::Regressed {
            return Ok(None);
        }
        let original = rerun
            .recheck_of
            .context("a pairing's end_rerun is a re-run")?;
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO jobs (id, run_id, crate_name, crate_version, checksum, toolchain,
                               recheck_of)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (id) DO NOTHING",
            )
            .await?,
            &[
                &rerun.id.0,
                &rerun.run_id.0,
                &rerun.package.name,
                &rerun.package.version,
                &rerun.package.checksum,
                &rerun.side(),
                &original.0,
            ],
        )
        .await
        .context("cannot record a regression's re-run")?;
        let unpublished = tx
            .query_one(
                &tx.prepare_cached("SELECT published_at IS NULL FROM jobs WHERE id = $1")
                    .await?,
                &[&rerun.id.0],
            )
            .await?;
        Ok(unpublished.get::<_, bool>(0).then(|| rerun.clone()))
    }

    /// Re-runs of `job`'s package recorded but not yet published (their consumer died between
    /// recording and publishing them): as `StoredJob`s, to publish again.
    pub async fn unpublished_reruns(&self, job: &Job) -> anyhow::Result<Vec<StoredJob>> {
        let client = self.client().await?;
        Ok(client
            .query(
                &client
                    .prepare_cached(
                        "SELECT id, toolchain, recheck_of FROM jobs
                 WHERE run_id = $1 AND crate_name = $2 AND crate_version = $3
                   AND recheck_of IS NOT NULL AND published_at IS NULL",
                    )
                    .await?,
                &[&job.run_id.0, &job.package.name, &job.package.version],
            )
            .await?
            .into_iter()
            .map(|row| {
                (
                    JobId(row.get(0)),
                    job.package.clone(),
                    row.get(1),
                    Some(JobId(row.get(2))),
                )
            })
            .collect())
    }

    /// A computed (not itself reused) result of an identical job, if any. Results that say
    /// nothing about the package (errors, skips) are never reused.
    pub async fn memoized_result(&self, memo_key: &str) -> anyhow::Result<Option<MemoizedResult>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client.prepare_cached("SELECT r.job_id, runs.name, r.outcome, r.exit_code, r.duration_ms, r.log_key,
                        r.log, r.environment, r.refused, r.broken_reason
                 FROM results r JOIN runs ON runs.id = r.run_id
                 WHERE r.memo_key = $1 AND r.reused_from IS NULL
                   AND r.outcome NOT IN ('error', 'skipped')
                 ORDER BY r.finished_at LIMIT 1").await?,
                &[&memo_key],
            )
            .await?;
        row.map(|row| {
            Ok(MemoizedResult {
                job_id: JobId(row.get(0)),
                run_name: row.get(1),
                outcome: row.get::<_, String>(2).parse()?,
                exit_code: row.get(3),
                duration_ms: row.get(4),
                log_key: row.get(5),
                log: row.get(6),
                environment: row.get(7),
                refused: parse_refusals(row.get(8))?,
                broken_reason: parse_broken_reason(row.get(9))?,
            })
        })
        .transpose()
    }

    // ---- leases (consumer side) ---------------------------------------------------------------

    /// Takes the lease of a delivered job for `holder`, valid for `ttl`: true if it is now
    /// `holder`'s (no one held it, or its lease had lapsed), false if another live lease holds
    /// it (this delivery is a copy of a job in hand somewhere: the holder finishes it, or its
    /// lease lapses and the job is published again).
    pub async fn take_lease(&self, lease: &NewLease<'_>, ttl: Duration) -> anyhow::Result<bool> {
        let client = self.client().await?;
        let taken = client
            .query_opt(
                &client
                    .prepare_cached(
                        "INSERT INTO leases AS l (job_id, run_id, holder, consumer, message,
                                              failed_attempts, expires_at)
                         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
                         ON CONFLICT (job_id) DO UPDATE
                           SET holder = excluded.holder, consumer = excluded.consumer,
                               message = excluded.message,
                               failed_attempts = excluded.failed_attempts,
                               taken_at = now(), expires_at = excluded.expires_at
                           WHERE l.expires_at <= now()
                         RETURNING 1",
                    )
                    .await?,
                &[
                    &lease.job.0,
                    &lease.run.0,
                    &lease.holder,
                    &lease.consumer,
                    &lease.message,
                    &(lease.failed_attempts as i32),
                    &ttl.as_secs_f64(),
                ],
            )
            .await
            .context("cannot take the job's lease")?;
        Ok(taken.is_some())
    }

    /// Renews `holder`'s leases of `jobs` (the jobs it has in hand) for another `ttl`.
    pub async fn renew_leases(
        &self,
        holder: Uuid,
        jobs: &[Uuid],
        ttl: Duration,
    ) -> anyhow::Result<u64> {
        let client = self.client().await?;
        Ok(client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE leases SET expires_at = now() + make_interval(secs => $3)
                         WHERE holder = $1 AND job_id = ANY($2)",
                    )
                    .await?,
                &[&holder, &jobs, &ttl.as_secs_f64()],
            )
            .await?)
    }

    /// Lets `holder`'s lease of `job` lapse at once (all of them with `None`): the step before
    /// a job is published again, so that the copy, whoever takes it, finds the lease free.
    pub async fn lapse_leases(&self, holder: Uuid, job: Option<JobId>) -> anyhow::Result<u64> {
        let client = self.client().await?;
        Ok(client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE leases SET expires_at = now()
                         WHERE holder = $1 AND ($2::uuid IS NULL OR job_id = $2)",
                    )
                    .await?,
                &[&holder, &job.map(|j| j.0)],
            )
            .await?)
    }

    /// Releases `holder`'s lease of `job`. With `lapsed_only`, only if it has lapsed (after
    /// handing the job back: taken over by the copy's consumer meanwhile, it is theirs).
    pub async fn release_lease(
        &self,
        holder: Uuid,
        job: JobId,
        lapsed_only: bool,
    ) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "DELETE FROM leases WHERE job_id = $1 AND holder = $2
                           AND (NOT $3 OR expires_at <= now())",
                    )
                    .await?,
                &[&job.0, &holder, &lapsed_only],
            )
            .await?;
        Ok(())
    }

    /// Publishes again the jobs of up to `limit` lapsed leases (their holders died, or handed
    /// them back and could not publish them), through `publish`, and removes each lease whose
    /// job `publish` took. The leases stay locked meanwhile, so no other sweeper publishes them
    /// too, and a consumer taking a copy waits for the removal and then holds a new lease.
    /// Returns the jobs published; one `publish` refused stops the sweep (the rest stay lapsed,
    /// for the next).
    pub async fn sweep_lapsed_leases<F, Fut>(
        &self,
        limit: i64,
        sweeper: &str,
        mut publish: F,
    ) -> anyhow::Result<Vec<LapsedLease>>
    where
        F: FnMut(LapsedLease) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT job_id, run_id, consumer, message, failed_attempts,
                            extract(epoch FROM now() - expires_at)::float8
                     FROM leases WHERE expires_at <= now()
                     ORDER BY expires_at LIMIT $1
                     FOR UPDATE SKIP LOCKED",
                )
                .await?,
                &[&limit],
            )
            .await
            .context("cannot read the lapsed leases")?;
        let mut published = Vec::new();
        for row in rows {
            let lapsed = LapsedLease {
                job: JobId(row.get(0)),
                run: RunId(row.get(1)),
                holder: row.get(2),
                message: row.get(3),
                failed_attempts: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
                lapsed_for: Duration::from_secs_f64(row.get::<_, f64>(5).max(0.0)),
            };
            if let Err(err) = publish(lapsed.clone()).await {
                tracing::warn!(job = %lapsed.job, error = %format!("{err:#}"), "cannot publish a lapsed lease's job; it stays lapsed");
                break;
            }
            tx.execute(
                &tx.prepare_cached("DELETE FROM leases WHERE job_id = $1")
                    .await?,
                &[&lapsed.job.0],
            )
            .await?;
            let detail = format!(
                "the lease of {} lapsed {:.0} s ago: published again by {sweeper}",
                lapsed.holder,
                lapsed.lapsed_for.as_secs_f64()
            );
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO job_events (job_id, run_id, kind, consumer, detail)
                     VALUES ($1, $2, 'lease-lapsed', $3, $4)",
                )
                .await?,
                &[&lapsed.job.0, &lapsed.run.0, &sweeper, &detail],
            )
            .await?;
            published.push(lapsed);
        }
        tx.commit()
            .await
            .context("cannot commit the sweep of lapsed leases")?;
        Ok(published)
    }

    /// Leases held now, per run: `(holder's name, job)` of a run's, for `status` and `verify`.
    pub async fn leases(&self, run: RunId) -> anyhow::Result<Vec<(String, JobId, bool)>> {
        let client = self.client().await?;
        Ok(client
            .query(
                &client
                    .prepare_cached(
                        "SELECT consumer, job_id, expires_at <= now() FROM leases
                         WHERE run_id = $1 ORDER BY taken_at",
                    )
                    .await?,
                &[&run.0],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), JobId(row.get(1)), row.get(2)))
            .collect())
    }

    // ---- the fleet ----------------------------------------------------------------------------

    /// Registers a consumer process; `secret` authenticates its later updates.
    pub async fn register_consumer(
        &self,
        id: Uuid,
        name: &str,
        secret: &str,
        host: &str,
    ) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "INSERT INTO consumers (id, name, secret, host) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO NOTHING",
                    )
                    .await?,
                &[&id, &name, &secret, &host],
            )
            .await?;
        Ok(())
    }

    /// Renews a consumer's heartbeat with the jobs it has in hand, its total so far and the
    /// toolchains it has ready.
    pub async fn consumer_heartbeat(
        &self,
        id: Uuid,
        secret: &str,
        current_jobs: &[Uuid],
        jobs_done: i64,
        toolchains: &[String],
    ) -> anyhow::Result<()> {
        let client = self.client().await?;
        let updated = client
            .execute(
                &client.prepare_cached("UPDATE consumers SET heartbeat_at = now(), current_jobs = $3, jobs_done = $4,
                        toolchains = $5
                 WHERE id = $1 AND secret = $2").await?,
                &[&id, &secret, &current_jobs, &jobs_done, &toolchains],
            )
            .await?;
        anyhow::ensure!(
            updated == 1,
            "consumer {id} is not registered (or its secret is wrong)"
        );
        Ok(())
    }

    pub async fn consumer_stopped(&self, id: Uuid, secret: &str) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE consumers SET stopped_at = now(), current_jobs = '{}'
                 WHERE id = $1 AND secret = $2",
                    )
                    .await?,
                &[&id, &secret],
            )
            .await?;
        Ok(())
    }

    /// Consumers seen since `since`, most recent heartbeat first.
    pub async fn fleet(&self, since: DateTime<Utc>) -> anyhow::Result<Vec<FleetMember>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client.prepare_cached("SELECT id, name, host, started_at, heartbeat_at, current_jobs, jobs_done, stopped_at,
                        toolchains
                 FROM consumers WHERE heartbeat_at >= $1 ORDER BY heartbeat_at DESC").await?,
                &[&since],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| FleetMember {
                id: row.get(0),
                name: row.get(1),
                host: row.get(2),
                started_at: row.get(3),
                heartbeat_at: row.get(4),
                current_jobs: row.get(5),
                jobs_done: row.get(6),
                stopped_at: row.get(7),
                toolchains: row.get(8),
            })
            .collect())
    }

    // ---- reports ----------------------------------------------------------------------------

    /// Records what packages of `run` depend on, as (package, dependency) crate names: the
    /// direct normal and build dependencies of the versions tested. Recorded again, nothing
    /// changes.
    pub async fn record_dependencies(
        &self,
        run: RunId,
        edges: &[(String, String)],
    ) -> anyhow::Result<()> {
        if edges.is_empty() {
            return Ok(());
        }
        let packages: Vec<&str> = edges.iter().map(|(p, _)| p.as_str()).collect();
        let dependencies: Vec<&str> = edges.iter().map(|(_, d)| d.as_str()).collect();
        let client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "INSERT INTO dependencies (run_id, crate_name, dependency)
                         SELECT $1, * FROM unnest($2::text[], $3::text[])
                         ON CONFLICT DO NOTHING",
                    )
                    .await?,
                &[&run.0, &packages, &dependencies],
            )
            .await
            .context("cannot record the packages' dependencies")?;
        Ok(())
    }

    /// How many of `run`'s packages depend directly on each crate (by lowercase name), as the
    /// index told the producer; crates nothing in the run depends on are absent.
    pub async fn dependent_counts(
        &self,
        run: RunId,
    ) -> anyhow::Result<std::collections::HashMap<String, i64>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT dependency, count(*) FROM dependencies WHERE run_id = $1
                 GROUP BY dependency",
                &[&run.0],
            )
            .await
            .context("cannot count the run's dependents")?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The outcomes of the packages named in `packages` in runs created before `run`, the
    /// `runs_each` most recent runs of each package, newest first.
    pub async fn package_history(
        &self,
        run: RunId,
        packages: &[String],
        runs_each: i64,
    ) -> anyhow::Result<Vec<HistoryRow>> {
        if packages.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT crate_name, crate_version, run_name, created_at, toolchain, outcome
                 FROM (
                     SELECT j.crate_name, j.crate_version, ru.name AS run_name, ru.created_at,
                            j.toolchain, r.outcome,
                            dense_rank() OVER (PARTITION BY j.crate_name
                                               ORDER BY ru.created_at DESC, ru.id) AS nth
                     FROM jobs j
                     JOIN results r ON r.job_id = j.id
                     JOIN runs ru ON ru.id = j.run_id
                     WHERE j.crate_name = ANY($2) AND j.run_id <> $1
                       AND ru.created_at < (SELECT created_at FROM runs WHERE id = $1)
                 ) h
                 WHERE nth <= $3
                 ORDER BY crate_name, created_at DESC, toolchain",
                &[&run.0, &packages, &runs_each],
            )
            .await
            .context("cannot read the packages' earlier results")?;
        rows.into_iter()
            .map(|r| {
                let outcome: String = r.get(5);
                Ok(HistoryRow {
                    crate_name: r.get(0),
                    crate_version: r.get(1),
                    run: r.get(2),
                    created_at: r.get(3),
                    side: r.get(4),
                    outcome: outcome.parse()?,
                })
            })
            .collect()
    }

    /// Every result of a run, ordered by package then toolchain.
    pub async fn results(&self, run: RunId) -> anyhow::Result<Vec<ResultRow>> {
        use futures::TryStreamExt as _;
        let client = self.client().await?;
        // Streamed, one row at a time into the result: a run's million rows are not held twice.
        let rows = client
            .query_raw(
                "SELECT j.id, j.crate_name, j.crate_version, j.toolchain, r.outcome, r.exit_code,
                        r.duration_ms, r.attempt, r.consumer, r.finished_at, r.log, r.log_key,
                        j.recheck_of, r.environment, r.refused, r.broken_reason, r.toolchain_build,
                        r.cpu_ms, r.peak_memory_bytes, r.disk_bytes, r.slot_wait_ms, r.steps
                 FROM results r JOIN jobs j ON j.id = r.job_id
                 WHERE r.run_id = $1
                 ORDER BY j.crate_name, j.crate_version, j.toolchain",
                [&run.0],
            )
            .await?;
        futures::pin_mut!(rows);
        let mut results = Vec::new();
        while let Some(row) = rows.try_next().await? {
            let outcome: String = row.get(4);
            results.push(ResultRow {
                job_id: row.get(0),
                crate_name: row.get(1),
                crate_version: row.get(2),
                toolchain: row.get(3),
                outcome: outcome.parse()?,
                exit_code: row.get(5),
                duration_ms: row.get(6),
                attempt: row.get(7),
                consumer: row.get(8),
                finished_at: row.get(9),
                log: row.get(10),
                log_key: row.get(11),
                recheck_of: row.get(12),
                environment: row.get(13),
                refused: parse_refusals(row.get(14))?,
                broken_reason: parse_broken_reason(row.get(15))?,
                toolchain_build: row.get(16),
                cost: cost_of(&row, 17)?,
            });
        }
        Ok(results)
    }

    /// Result counts per outcome, counted by the database (reports are checked against this).
    pub async fn outcome_counts(&self, run: RunId) -> anyhow::Result<Vec<(Outcome, i64)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client.prepare_cached("SELECT outcome, count(*) FROM results WHERE run_id = $1 GROUP BY outcome ORDER BY outcome").await?,
                &[&run.0],
            )
            .await?;
        rows.into_iter()
            .map(|row| Ok((row.get::<_, String>(0).parse()?, row.get(1))))
            .collect()
    }

    /// Progress, pace (results in the last `window`) and outcomes of a run, for the live view.
    pub async fn run_figures(&self, run: RunId, window: Duration) -> anyhow::Result<RunFigures> {
        let progress = self.progress(run).await?;
        let window_secs = window.as_secs() as i64;
        let client = self.client().await?;
        let row = client
            .query_one(
                &client.prepare_cached("WITH pending AS (
                   SELECT j.expected_ms FROM jobs j
                   WHERE j.run_id = $1 AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id))
                 SELECT (SELECT count(DISTINCT job_id) FROM dead_lettered WHERE run_id = $1),
                        (SELECT count(*) FROM results
                         WHERE run_id = $1 AND finished_at > now() - make_interval(secs => $2)),
                        (SELECT coalesce(sum(duration_ms), 0)::bigint FROM results
                         WHERE run_id = $1 AND finished_at > now() - make_interval(secs => $2)),
                        (SELECT coalesce(sum(expected_ms), 0)::bigint FROM pending),
                        (SELECT count(*) FROM pending WHERE expected_ms IS NULL),
                        (SELECT avg(duration_ms)::float8 FROM results
                         WHERE run_id = $1 AND reused_from IS NULL)").await?,
                &[&run.0, &(window_secs as f64)],
            )
            .await?;
        let outcomes = client
            .query(
                &client.prepare_cached("SELECT j.toolchain, r.outcome, count(*) FROM results r JOIN jobs j ON j.id = r.job_id
                 WHERE r.run_id = $1 GROUP BY 1, 2 ORDER BY 1, 2").await?,
                &[&run.0],
            )
            .await?
            .into_iter()
            .map(|row| Ok((row.get(0), row.get::<_, String>(1).parse()?, row.get(2))))
            .collect::<anyhow::Result<_>>()?;
        Ok(RunFigures {
            progress,
            dead_lettered: row.get(0),
            recent: row.get(1),
            window_secs,
            recent_work_ms: row.get(2),
            pending_expected_ms: row.get(3),
            pending_unknown: row.get(4),
            mean_ms: row.get(5),
            outcomes,
        })
    }

    /// For a run with two toolchains: how many packages have each triple of (start, end, end
    /// re-run) outcomes, `None` where there is no result yet. Aggregated in the database, so it
    /// stays cheap for runs of any size.
    pub async fn outcome_pairs(
        &self,
        run: RunId,
        start: &str,
        end: &str,
    ) -> anyhow::Result<Vec<OutcomePair>> {
        let client = self.client().await?;
        let parse = |o: Option<String>| o.map(|o| o.parse::<Outcome>()).transpose();
        client
            .query(
                &client
                    .prepare_cached(
                        "SELECT rs.outcome, rs.environment IS NOT NULL, re.outcome,
                        re.environment IS NOT NULL, rr.outcome, count(*)
                 FROM jobs js LEFT JOIN results rs ON rs.job_id = js.id
                 JOIN jobs je ON je.run_id = js.run_id AND je.toolchain = $3
                      AND je.crate_name = js.crate_name AND je.crate_version = js.crate_version
                 LEFT JOIN results re ON re.job_id = je.id
                 LEFT JOIN jobs jr ON jr.recheck_of = je.id
                 LEFT JOIN results rr ON rr.job_id = jr.id
                 WHERE js.run_id = $1 AND js.toolchain = $2
                 GROUP BY 1, 2, 3, 4, 5",
                    )
                    .await?,
                &[&run.0, &start, &end],
            )
            .await?
            .into_iter()
            .map(|row| {
                // An outcome's column, then whether it is environmental in the next.
                let verdict = |at: usize| -> anyhow::Result<Option<Verdict>> {
                    Ok(parse(row.get(at))?.map(|outcome| Verdict {
                        outcome,
                        environmental: row.get(at + 1),
                    }))
                };
                Ok((verdict(0)?, verdict(2)?, parse(row.get(4))?, row.get(5)))
            })
            .collect()
    }

    /// Every result of a run as (name, version, toolchain, verdict): what selecting from an
    /// earlier run needs, without the logs.
    pub async fn package_outcomes(
        &self,
        run: RunId,
    ) -> anyhow::Result<Vec<(String, String, String, Verdict)>> {
        let client = self.client().await?;
        client
            .query(
                &client
                    .prepare_cached(
                        "SELECT j.crate_name, j.crate_version, j.toolchain, r.outcome,
                        r.environment IS NOT NULL
                 FROM results r JOIN jobs j ON j.id = r.job_id WHERE r.run_id = $1
                 ORDER BY 1, 2, 3",
                    )
                    .await?,
                &[&run.0],
            )
            .await?
            .into_iter()
            .map(|row| {
                Ok((
                    row.get(0),
                    row.get(1),
                    row.get(2),
                    Verdict {
                        outcome: row.get::<_, String>(3).parse()?,
                        environmental: row.get(4),
                    },
                ))
            })
            .collect()
    }

    /// The latest results that failed (build, tests, limits, resolution, infrastructure).
    pub async fn recent_failures(
        &self,
        run: RunId,
        limit: i64,
    ) -> anyhow::Result<Vec<ResultBrief>> {
        let client = self.client().await?;
        client
            .query(
                &client.prepare_cached("SELECT j.crate_name, j.crate_version, j.toolchain, r.outcome, r.finished_at
                 FROM results r JOIN jobs j ON j.id = r.job_id
                 WHERE r.run_id = $1 AND r.outcome NOT IN ('build-pass', 'test-pass', 'skipped')
                 ORDER BY r.finished_at DESC LIMIT $2").await?,
                &[&run.0, &limit],
            )
            .await?
            .into_iter()
            .map(|row| {
                Ok(ResultBrief {
                    crate_name: row.get(0),
                    crate_version: row.get(1),
                    toolchain: row.get(2),
                    outcome: row.get::<_, String>(3).parse()?,
                    at: row.get(4),
                    reason: None,
                })
            })
            .collect()
    }

    /// The run's dead-lettered jobs (not since requeued), latest first, with the reason each
    /// was given up on.
    pub async fn dead_letters(&self, run: RunId, limit: i64) -> anyhow::Result<Vec<ResultBrief>> {
        let client = self.client().await?;
        client
            .query(
                &client
                    .prepare_cached(
                        "SELECT j.crate_name, j.crate_version, j.toolchain, e.at, e.detail
                 FROM dead_lettered e JOIN jobs j ON j.id = e.job_id
                 WHERE e.run_id = $1
                 ORDER BY e.at DESC LIMIT $2",
                    )
                    .await?,
                &[&run.0, &limit],
            )
            .await?
            .into_iter()
            .map(|row| {
                Ok(ResultBrief {
                    crate_name: row.get(0),
                    crate_version: row.get(1),
                    toolchain: row.get(2),
                    outcome: Outcome::Error,
                    at: row.get(3),
                    reason: row.get(4),
                })
            })
            .collect()
    }

    /// Takes the run's dead-lettered jobs (those not requeued since) out of the dead letters:
    /// removes their `error` results and logs a `requeued` event for each, in one transaction.
    /// Returns them, to publish again; until they are, `republish` finds them unfinished.
    pub async fn requeue_dead_letters(
        &self,
        run: RunId,
        by: &str,
    ) -> anyhow::Result<Vec<StoredJob>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "WITH dead AS (
                     SELECT DISTINCT job_id FROM dead_lettered WHERE run_id = $1
                 ), removed AS (
                     DELETE FROM results r USING dead
                     WHERE r.job_id = dead.job_id AND r.outcome = 'error'
                     RETURNING r.job_id
                 ), logged AS (
                     INSERT INTO job_events (job_id, run_id, kind, consumer, detail)
                     SELECT job_id, $1, 'requeued', $2, 'taken out of the dead letters'
                     FROM removed
                     RETURNING job_id
                 )
                 SELECT j.id, j.crate_name, j.crate_version, j.checksum, j.toolchain,
                        j.recheck_of
                 FROM jobs j JOIN logged ON logged.job_id = j.id
                 ORDER BY j.crate_name, j.crate_version, j.toolchain",
                )
                .await?,
                &[&run.0, &by],
            )
            .await
            .context("cannot requeue the dead letters")?;
        tx.commit().await?;
        Ok(rows.into_iter().map(stored_job).collect())
    }

    /// Packages whose outcome with `toolchain_a` in run `a` differs from that with `toolchain_b`
    /// in run `b` (the same name and version in both), and how many stayed the same.
    pub async fn changes(
        &self,
        (a, toolchain_a): (RunId, &str),
        (b, toolchain_b): (RunId, &str),
    ) -> anyhow::Result<(Vec<Change>, i64)> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "SELECT ja.crate_name, ja.crate_version, ra.outcome, rb.outcome
                 FROM jobs ja JOIN results ra ON ra.job_id = ja.id
                 JOIN jobs jb ON jb.run_id = $3 AND jb.toolchain = $4
                      AND jb.crate_name = ja.crate_name AND jb.crate_version = ja.crate_version
                 JOIN results rb ON rb.job_id = jb.id
                 WHERE ja.run_id = $1 AND ja.toolchain = $2
                 ORDER BY ja.crate_name, ja.crate_version",
                    )
                    .await?,
                &[&a.0, &toolchain_a, &b.0, &toolchain_b],
            )
            .await?;
        let mut changes = Vec::new();
        let mut same = 0;
        for row in rows {
            let before: Outcome = row.get::<_, String>(2).parse()?;
            let after: Outcome = row.get::<_, String>(3).parse()?;
            if before == after {
                same += 1;
            } else {
                changes.push(Change {
                    crate_name: row.get(0),
                    crate_version: row.get(1),
                    before,
                    after,
                });
            }
        }
        Ok((changes, same))
    }

    /// The figures that `quarry-reporter verify` checks a run's invariants against.
    pub async fn reconcile(&self, run: RunId) -> anyhow::Result<Reconciliation> {
        let client = self.client().await?;
        let row = client
            .query_one(
                &client
                    .prepare_cached(
                        "SELECT
                   (SELECT count(*) FROM jobs WHERE run_id = $1),
                   (SELECT count(*) FROM jobs WHERE run_id = $1 AND published_at IS NULL),
                   (SELECT count(*) FROM results WHERE run_id = $1),
                   (SELECT count(*) FROM jobs j WHERE j.run_id = $1
                      AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)),
                   (SELECT count(*) FROM results r WHERE r.run_id = $1
                      AND (SELECT count(*) FROM job_events e
                           WHERE e.job_id = r.job_id AND e.kind = 'finished'
                             AND e.id > coalesce((SELECT max(q.id) FROM job_events q
                                                  WHERE q.job_id = r.job_id
                                                    AND q.kind = 'requeued'), 0)) <> 1),
                   (SELECT count(DISTINCT e.job_id) FROM dead_lettered e
                      WHERE e.run_id = $1
                        AND NOT EXISTS (SELECT 1 FROM results r
                                        WHERE r.job_id = e.job_id AND r.outcome = 'error')),
                   (SELECT count(*) FROM jobs WHERE run_id = $1 AND recheck_of IS NOT NULL)",
                    )
                    .await?,
                &[&run.0],
            )
            .await?;
        let missing = client
            .query(
                &client.prepare_cached("SELECT j.crate_name || '@' || j.crate_version || ' (' || j.toolchain || ')'
                 FROM jobs j WHERE j.run_id = $1
                   AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)
                 ORDER BY 1 LIMIT 20").await?,
                &[&run.0],
            )
            .await?;
        Ok(Reconciliation {
            jobs: row.get(0),
            unpublished: row.get(1),
            results: row.get(2),
            jobs_without_result_count: row.get(3),
            results_without_one_finished_event: row.get(4),
            dead_letters_without_error_result: row.get(5),
            reruns: row.get(6),
            jobs_without_result: missing.into_iter().map(|r| r.get(0)).collect(),
        })
    }

    /// The jobs of a run for one package (every version, or just `version`): id, version and
    /// toolchain, and the outcome if it has one.
    pub async fn package_jobs(
        &self,
        run: RunId,
        name: &str,
        version: Option<&str>,
    ) -> anyhow::Result<Vec<PackageJob>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "SELECT j.id, j.crate_version, j.toolchain, r.outcome, r.refused
                 FROM jobs j LEFT JOIN results r ON r.job_id = j.id
                 WHERE j.run_id = $1 AND j.crate_name = $2
                   AND ($3::text IS NULL OR j.crate_version = $3)
                 ORDER BY j.crate_version, j.toolchain",
                    )
                    .await?,
                &[&run.0, &name, &version],
            )
            .await?;
        rows.into_iter()
            .map(|row| {
                let outcome: Option<String> = row.get(3);
                let refused: Option<Vec<String>> = row.get(4);
                Ok(PackageJob {
                    id: JobId(row.get(0)),
                    version: row.get(1),
                    side: row.get(2),
                    outcome: outcome.map(|o| o.parse()).transpose()?,
                    refused: parse_refusals(refused.unwrap_or_default())?,
                })
            })
            .collect()
    }

    /// A job's event log, oldest first.
    pub async fn events(&self, job: JobId) -> anyhow::Result<Vec<JobEvent>> {
        let client = self.client().await?;
        let rows = client
            .query(
                // The `queued` event is the job's published_at: not a row of its own, since
                // the producer writes it for every job of every run.
                "SELECT at, kind, attempt, consumer, detail FROM (
                     SELECT 0 AS position, published_at AS at, 'queued' AS kind,
                            NULL::integer AS attempt, NULL AS consumer, NULL AS detail
                     FROM jobs WHERE id = $1 AND published_at IS NOT NULL
                     UNION ALL
                     SELECT id, at, kind, attempt, consumer, detail FROM job_events
                     WHERE job_id = $1
                 ) events ORDER BY position",
                &[&job.0],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| JobEvent {
                at: row.get(0),
                kind: row.get(1),
                attempt: row.get(2),
                consumer: row.get(3),
                detail: row.get(4),
            })
            .collect())
    }
}

/// A `StoredJob` from a row of jobs.(id, crate_name, crate_version, checksum, toolchain, recheck_of).
fn stored_job(row: tokio_postgres::Row) -> StoredJob {
    (
        JobId(row.get(0)),
        PackageVersion {
            name: row.get(1),
            version: row.get(2),
            checksum: row.get(3),
        },
        row.get(4),
        row.get::<_, Option<Uuid>>(5).map(JobId),
    )
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
