//! The rows the store reads and writes, named: what each method of the store takes or
//! returns, beside the domain's own types.

use super::*;

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

/// A job as the database keeps it: (id, package, side label, the job it re-runs), from which
/// `StoredDefinition::job` rebuilds it.
pub use quarry_core::job::StoredJob;

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

/// What decides, when a job of a two-sided run gets its result, whether its package regressed
/// and must be run again: the labels of the run's two sides, and the re-run to add if so.
#[derive(Debug, Clone)]
pub struct Pairing {
    pub start: String,
    pub end: String,
    /// The end side's job of this package, re-run (`Job::rerun`).
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
    pub side: String,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub duration_ms: i64,
    pub attempt: i32,
    pub consumer: String,
    pub finished_at: DateTime<Utc>,
    /// For a regression's re-run: the job it ran again.
    pub rerun_of: Option<Uuid>,
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

/// One entry of a job's event log.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub at: DateTime<Utc>,
    pub kind: EventKind,
    pub attempt: Option<i32>,
    pub consumer: Option<String>,
    pub detail: Option<String>,
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
    /// Where it is at `now` (`FleetState::of`).
    pub fn state(&self, now: DateTime<Utc>) -> FleetState {
        let silent_for = (now - self.heartbeat_at).to_std().unwrap_or_default();
        FleetState::of(self.stopped_at.is_some(), silent_for)
    }
}

/// How many packages of a two-sided run have these start and end results and end re-run
/// outcome (`None` where there is no result yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutcomePair {
    pub start: Option<Verdict>,
    pub end: Option<Verdict>,
    pub end_rerun: Option<Outcome>,
    pub packages: i64,
}

impl OutcomePair {
    /// These packages' category (`categorize`).
    pub fn category(&self) -> Category {
        categorize(self.start, self.end, self.end_rerun)
    }
}

/// A lease held on a job (`Store::leases`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The name of the consumer holding it.
    pub holder: String,
    pub job: JobId,
    /// Past its expiry: the sweeper publishes the job again.
    pub lapsed: bool,
}

/// What recording a result did.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The result is new: `false` when the job already had one (a duplicate), which is kept.
    pub new: bool,
    /// The regression's re-run it added, still to publish (the lease is kept until it is).
    pub rerun: Option<Job>,
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
    /// Up to 20 jobs without a result, as `name@version (side)`.
    pub jobs_without_result: Vec<String>,
    pub jobs_without_result_count: i64,
    /// Results whose job has no `finished` event, or more than one.
    pub results_without_one_finished_event: i64,
    /// Dead-lettered jobs without an `error` result.
    pub dead_letters_without_error_result: i64,
}

/// A job result worth a look, for the live view.
#[derive(Debug, Clone, Serialize)]
pub struct ResultBrief {
    pub crate_name: String,
    pub crate_version: String,
    pub side: String,
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
