//! The reporter: reads a run's results from PostgreSQL and writes its report, a directory holding
//! `index.html` and its pages (open it offline; see `site.rs`), `report.json` (for machines),
//! `results.csv` (for spreadsheets), `summary.md` (to paste into an issue) and `logs/`, one text
//! file per job (for large runs, per job that did not pass).
//!
//! Counts come from the database's own aggregation, and every row from the same snapshot, so the
//! report's numbers are the database's numbers. Everything taken from a package or a log is
//! escaped before it goes into HTML.

mod cause;
mod compare;
mod live;
mod serve;
mod site;
mod summary;
mod triage;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use quarry_core::cost::Cost;
use quarry_core::job::{BrokenReason, EventKind, Outcome, Refusal};
use quarry_core::progress::Progress;
use quarry_infra::Config;
use quarry_infra::s3::Bucket;
use quarry_infra::store::{PackageJob, ResultRow, Run, Store};
use serde::{Deserialize, Serialize};

pub use cause::root_cause;
pub use compare::{Category, ComparedPackage, Comparison, categorize};
pub use serve::start as serve;
pub use triage::{Earlier, Regression, RegressionGroup};

/// The machine-readable report (`report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub run: RunInfo,
    pub progress: ProgressInfo,
    /// Results per outcome, as counted by the database.
    pub counts: BTreeMap<String, i64>,
    /// For runs with two toolchains: each package's start and end outcomes, compared.
    pub comparison: Option<Comparison>,
    /// For two toolchains: the regressions grouped by root cause, the group that broke most
    /// crates first (see `triage.rs`).
    #[serde(default)]
    pub regressions: Vec<RegressionGroup>,
    /// The commands that re-run this run's packages of a kind (`regressed`, `spurious`), by
    /// kind; only kinds the run has.
    #[serde(default)]
    pub reruns: BTreeMap<String, String>,
    /// Failed jobs grouped by root cause (a dependency that broke them, their first error),
    /// the largest group first.
    #[serde(default)]
    pub causes: Vec<CauseGroup>,
    /// The packages that tried what the consumer refused (an override file, a git dependency,
    /// a connection elsewhere), per refusal: what a security team reads first.
    #[serde(default)]
    pub refused: Vec<RefusalGroup>,
    /// Broken jobs per reason (`BrokenReason` names, `unknown` where none was told), the
    /// largest group first: what a triager sorts thousands of them by.
    #[serde(default)]
    pub broken: Vec<ReasonGroup>,
    /// Jobs that failed for a reason in the environment, per kind (`out of memory`, `timeout`,
    /// `network denied`, `no space left`, `sandbox error`), the largest group first: shown
    /// apart, never mixed with regressions.
    #[serde(default)]
    pub spurious: Vec<ReasonGroup>,
    /// What the run's jobs used.
    #[serde(default)]
    pub cost: RunCost,
    pub packages: Vec<PackageRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub id: String,
    pub name: String,
    pub definition: serde_json::Value,
    pub created_at: String,
    /// Each side's exact toolchain build(s) (the first line of `rustc -vV`), as its results
    /// recorded them: two builds for one side mean its consumers did not agree on it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub builds: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressInfo {
    pub finished: i64,
    pub total: Option<i64>,
    pub complete: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackageRow {
    pub name: String,
    pub version: String,
    /// The job's side (`Job::side`): its toolchain, with its patch if any. Reports written
    /// before it was named so call it `toolchain`.
    #[serde(alias = "toolchain")]
    pub side: String,
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub duration_ms: i64,
    pub attempt: i32,
    pub consumer: String,
    /// Path of the job's log, relative to the report directory; `None` when it was left in S3
    /// (a passing job of a large run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// For a failed build or test: its root cause, as read from the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// For a job that did not pass: the first error of its log, as printed (bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// For a failure that points at the environment rather than the code: why
    /// (`network denied: ...`). The comparison counts it as spurious.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// What the package tried that the consumer refused (`Refusal` names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// For a broken job: why it could not be prepared (a `BrokenReason` name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_reason: Option<String>,
    /// What the job used, where it ran (not for a reused result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
}

/// What a run's jobs used, over those whose cost was recorded (a reused result ran nothing):
/// what the run cost, and what a larger one would.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunCost {
    /// Jobs whose cost was recorded.
    pub jobs: u64,
    /// Those of them whose CPU time was counted (`Cost::cpu_ms`), their CPU time (user and
    /// system), and its mean per job.
    pub cpu_jobs: u64,
    pub cpu_seconds: f64,
    pub cpu_seconds_per_job: f64,
    /// Their wall-clock time, summed.
    pub wall_seconds: f64,
    /// The most memory any one step used.
    pub peak_memory_bytes: u64,
    /// Disk their scratch directories took, summed, and the largest.
    pub disk_bytes: u64,
    pub largest_disk_bytes: u64,
    /// Time prepared jobs waited for a slot, summed.
    pub slot_wait_seconds: f64,
    /// CPU seconds per step name (`fetch`, `check`, ...).
    pub steps: BTreeMap<String, f64>,
}

impl RunCost {
    fn add(&mut self, cost: &Cost, duration_ms: i64) {
        let seconds = |ms: u64| ms as f64 / 1000.0;
        self.jobs += 1;
        if let Some(cpu_ms) = cost.cpu_ms {
            self.cpu_jobs += 1;
            self.cpu_seconds += seconds(cpu_ms);
            self.cpu_seconds_per_job = self.cpu_seconds / self.cpu_jobs as f64;
        }
        self.wall_seconds += duration_ms.max(0) as f64 / 1000.0;
        self.peak_memory_bytes = self
            .peak_memory_bytes
            .max(cost.peak_memory_bytes.unwrap_or(0));
        self.disk_bytes += cost.disk_bytes;
        self.largest_disk_bytes = self.largest_disk_bytes.max(cost.disk_bytes);
        self.slot_wait_seconds += seconds(cost.slot_wait_ms);
        for step in &cost.steps {
            if let Some(cpu_ms) = step.cpu_ms {
                *self.steps.entry(step.name.clone()).or_default() += seconds(cpu_ms);
            }
        }
    }
}

impl PackageRow {
    /// The kind of its environmental failure, if it failed for a reason in the environment.
    pub fn spurious(&self) -> Option<String> {
        let outcome: Outcome = self.outcome.parse().ok()?;
        quarry_core::category::spurious_kind(outcome, self.environment.as_deref())
    }
}

/// The jobs that share a reason (a broken reason, a kind of spurious failure).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReasonGroup {
    pub reason: String,
    /// `name@version (toolchain)` of each job.
    pub jobs: Vec<String>,
}

/// The jobs whose package tried what one refusal names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefusalGroup {
    pub refusal: String,
    /// `name@version (toolchain)` of each job.
    pub jobs: Vec<String>,
}

/// Failed jobs that share a root cause.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CauseGroup {
    pub cause: String,
    /// `name@version (toolchain)` of each job.
    pub jobs: Vec<String>,
}

/// Where a report was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub dir: PathBuf,
    pub html: PathBuf,
    pub json: PathBuf,
    pub markdown: PathBuf,
    pub csv: PathBuf,
    pub report: Report,
}

impl Written {
    /// Each package's outcome, by name: what a test of a one-sided run compares (with two
    /// sides, the last one's).
    pub fn outcomes(&self) -> BTreeMap<&str, &str> {
        self.report
            .packages
            .iter()
            .map(|p| (p.name.as_str(), p.outcome.as_str()))
            .collect()
    }

    /// The text of a log the report copied, given its `PackageRow::log` (or a comparison's
    /// `start_log` / `end_log`).
    pub fn read_log(&self, log: Option<&str>) -> anyhow::Result<String> {
        let log = log.context("this job's log was left in S3 (a passing job of a large run)")?;
        std::fs::read_to_string(self.dir.join(log)).with_context(|| format!("cannot read {log}"))
    }
}

/// How many earlier runs of each regressed package the report shows.
const HISTORY_RUNS: i64 = 5;

/// Writes the report of `run` (an id or a name) under `output_dir/<run name>/`.
pub async fn generate(config: &Config, run: &str, output_dir: &Path) -> anyhow::Result<Written> {
    let store = Store::connect(&config.database).await?;
    let run = store.find_run(run).await?;
    let progress = store.progress(run.id).await?;
    let counts = store.outcome_counts(run.id).await?;
    let rows = store.results(run.id).await?;
    let dir = output_dir.join(&run.name);
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    // Every log of a small run; of a large one, those people open: the jobs that did not pass,
    // and the other sides of their packages (a regression's passing log is half its diff).
    let every_log = rows.len() as u64 <= config.reporter.copy_passing_logs_up_to;
    let failing: std::collections::HashSet<(&str, &str)> = rows
        .iter()
        .filter(|row| !row.outcome.is_pass())
        .map(|row| (row.crate_name.as_str(), row.crate_version.as_str()))
        .collect();
    let copied: Vec<bool> = rows
        .iter()
        .map(|row| {
            every_log || failing.contains(&(row.crate_name.as_str(), row.crate_version.as_str()))
        })
        .collect();
    // The packages that may have regressed (failed on a side, passed on another): their
    // earlier runs are the report's history of each regression.
    let mut candidates: Vec<String> = rows
        .iter()
        .filter(|row| {
            row.outcome.is_pass()
                && failing.contains(&(row.crate_name.as_str(), row.crate_version.as_str()))
        })
        .map(|row| row.crate_name.clone())
        .collect();
    candidates.dedup();
    drop(failing);
    let history = store
        .package_history(run.id, &candidates, HISTORY_RUNS)
        .await?;
    let dependents = store.dependent_counts(run.id).await?;
    let read = copy_logs(&Bucket::new(&config.s3)?, &rows, &copied, &logs).await?;
    write_report(
        &dir,
        &run,
        Gathered {
            progress,
            counts: &counts,
            rows,
            copied: &copied,
            read,
            dependents,
            history,
        },
        config.reporter.report_url.as_deref().map(|url| {
            format!(
                "{}/{}/index.html",
                url.trim_end_matches('/'),
                escape_href(&run.name)
            )
        }),
    )
}

/// What the report is written from, gathered from PostgreSQL and the logs.
struct Gathered<'a> {
    progress: Progress,
    counts: &'a [(Outcome, i64)],
    rows: Vec<ResultRow>,
    /// Which rows' logs were copied beside the report.
    copied: &'a [bool],
    /// What was read from each row's log.
    read: Vec<ReadLog>,
    /// How many of the run's packages depend on each crate, by lowercase name.
    dependents: std::collections::HashMap<String, i64>,
    /// Earlier results of the packages that may have regressed.
    history: Vec<quarry_infra::store::HistoryRow>,
}

/// What the report takes from a job's log.
#[derive(Default)]
struct ReadLog {
    cause: Option<String>,
    first_error: Option<String>,
}

/// The file name of a job's log in the report's `logs/` directory.
fn log_file(row: &ResultRow) -> String {
    format!("{}-{}-{}.txt", row.crate_name, row.crate_version, row.side)
}

/// Writes the log of every job marked in `copy` into `logs`: what PostgreSQL keeps of it (all
/// of it, or a note of Quarry's), then the compressed log from S3. Logs are fetched a few at a
/// time. Returns what is read from each failed job's log while it is at hand (its root cause,
/// its first error; failures are always copied).
async fn copy_logs(
    bucket: &Bucket,
    rows: &[ResultRow],
    copy: &[bool],
    logs: &Path,
) -> anyhow::Result<Vec<ReadLog>> {
    use futures::StreamExt as _;
    // By index: a closure over borrowed pairs would make the future not `Send` for the live
    // view's task (a higher-ranked lifetime the compiler cannot prove general).
    let mut writes = futures::stream::iter(0..rows.len())
        .map(|i| async move {
            let (row, copy) = (&rows[i], copy[i]);
            if !copy {
                return anyhow::Ok(ReadLog::default());
            }
            let text = bucket
                .result_log(row.log.as_deref(), row.log_key.as_deref())
                .await
                .with_context(|| {
                    format!(
                        "cannot fetch the log of {}@{} ({})",
                        row.crate_name, row.crate_version, row.side
                    )
                })?;
            let cause = match row.outcome {
                Outcome::BuildFail | Outcome::TestFail => root_cause(&row.crate_name, &text),
                // Results recorded before reasons were stored: told from the log.
                Outcome::Broken => row
                    .broken_reason
                    .or_else(|| BrokenReason::from_log(&text))
                    .map(|why| format!("broken: {why}")),
                _ => None,
            };
            let first_error = (!row.outcome.is_pass())
                .then(|| cause::first_error(&text))
                .flatten();
            let file = log_file(row);
            tokio::fs::write(logs.join(&file), text)
                .await
                .with_context(|| format!("cannot write the log {file}"))?;
            anyhow::Ok(ReadLog { cause, first_error })
        })
        .buffered(16);
    let mut read = Vec::with_capacity(rows.len());
    while let Some(log) = writes.next().await {
        read.push(log?);
    }
    Ok(read)
}

/// Writes the report's files under `dir`; `link` is the address of its `index.html` where the
/// reports are published.
fn write_report(
    dir: &Path,
    run: &Run,
    gathered: Gathered<'_>,
    link: Option<String>,
) -> anyhow::Result<Written> {
    let Gathered {
        progress,
        counts,
        rows,
        copied,
        read,
        dependents,
        history,
    } = gathered;
    let mut packages = Vec::with_capacity(rows.len());
    let mut run_cost = RunCost::default();
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut refusals: BTreeMap<Refusal, Vec<String>> = BTreeMap::new();
    let mut broken: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut spurious_groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Each side's builds, without an allocation per row (a million rows share one or two).
    let mut builds: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    // Rows are consumed as they are turned into the report's: a million of them is memory.
    for ((row, ReadLog { cause, first_error }), copied) in rows.into_iter().zip(read).zip(copied) {
        if let Some(build) = row
            .toolchain_build
            .as_deref()
            .and_then(|b| b.lines().next())
            && !builds
                .get(&row.side)
                .is_some_and(|seen| seen.contains(build))
        {
            builds
                .entry(row.side.clone())
                .or_default()
                .insert(build.to_owned());
        }
        let job = || format!("{}@{} ({})", row.crate_name, row.crate_version, row.side);
        for refusal in &row.refused {
            refusals.entry(*refusal).or_default().push(job());
        }
        // A package broken by what was refused is broken for that reason, named as such.
        let broken_reason = (row.outcome == Outcome::Broken).then(|| {
            row.broken_reason
                .or_else(|| {
                    row.refused
                        .iter()
                        .find_map(|r| BrokenReason::of_refusal(*r))
                })
                .or_else(|| {
                    cause
                        .as_deref()
                        .and_then(|c| c.strip_prefix("broken: "))
                        .and_then(|r| r.parse().ok())
                })
        });
        let cause = cause.or_else(|| {
            broken_reason
                .flatten()
                .map(|reason| format!("broken: {reason}"))
        });
        let spurious =
            quarry_core::category::spurious_kind(row.outcome, row.environment.as_deref());
        // A re-run's failure is its package's failure again: counted once, with the first.
        if row.rerun_of.is_none() {
            if let Some(cause) = &cause {
                groups.entry(cause.clone()).or_default().push(job());
            }
            if let Some(reason) = broken_reason {
                let name = reason.map_or("unknown", BrokenReason::as_str);
                broken.entry(name.to_owned()).or_default().push(job());
            }
            if let Some(kind) = spurious {
                spurious_groups.entry(kind).or_default().push(job());
            }
        }
        let log = copied.then(|| format!("logs/{}", log_file(&row)));
        if let Some(cost) = &row.cost {
            run_cost.add(cost, row.duration_ms);
        }
        packages.push(PackageRow {
            name: row.crate_name,
            version: row.crate_version,
            side: row.side,
            outcome: row.outcome.to_string(),
            exit_code: row.exit_code,
            duration_ms: row.duration_ms,
            attempt: row.attempt,
            consumer: row.consumer,
            log,
            cause,
            first_error,
            environment: row.environment,
            refused: row.refused.iter().map(|r| r.to_string()).collect(),
            broken_reason: broken_reason.flatten().map(|r| r.to_string()),
            cost: row.cost,
        });
    }
    let comparison = compare_sides(&run.definition, &packages);
    let mut regressions = comparison
        .as_ref()
        .map(|c| triage::group(&c.packages, &packages, &c.end, &dependents))
        .unwrap_or_default();
    triage::attach_history(&mut regressions, history);
    triage::assign_pages(&mut regressions);
    let reruns = comparison
        .as_ref()
        .map(|c| triage::reruns(&run.name, &run.definition, &c.categories))
        .unwrap_or_default();
    let report = Report {
        run: RunInfo {
            id: run.id.to_string(),
            name: run.name.clone(),
            definition: run.definition.clone(),
            created_at: run.created_at.to_rfc3339(),
            builds: builds
                .into_iter()
                .map(|(side, builds)| (side, builds.into_iter().collect()))
                .collect(),
        },
        progress: ProgressInfo {
            finished: progress.finished,
            total: progress.total,
            complete: progress.is_complete(),
        },
        counts: counts
            .iter()
            .map(|(outcome, n)| (outcome.to_string(), *n))
            .collect(),
        comparison,
        regressions,
        reruns,
        causes: {
            let mut causes: Vec<CauseGroup> = groups
                .into_iter()
                .map(|(cause, jobs)| CauseGroup { cause, jobs })
                .collect();
            causes.sort_by(|a, b| b.jobs.len().cmp(&a.jobs.len()).then(a.cause.cmp(&b.cause)));
            causes
        },
        broken: reason_groups(broken),
        spurious: reason_groups(spurious_groups),
        cost: run_cost,
        refused: refusals
            .into_iter()
            .map(|(refusal, jobs)| RefusalGroup {
                refusal: refusal.to_string(),
                jobs,
            })
            .collect(),
        packages,
    };
    let json = dir.join("report.json");
    write_file(&json, |out| Ok(serde_json::to_writer(out, &report)?))?;
    let html = site::write(dir, &report)?;
    let markdown = dir.join("summary.md");
    std::fs::write(&markdown, summary::render(&report, link.as_deref()))
        .with_context(|| format!("cannot write {}", markdown.display()))?;
    let csv = dir.join("results.csv");
    write_file(&csv, |out| render_csv(&report, out))?;
    Ok(Written {
        dir: dir.to_owned(),
        csv,
        html,
        json,
        markdown,
        report,
    })
}

/// Groups by reason, the largest first.
fn reason_groups(groups: BTreeMap<String, Vec<String>>) -> Vec<ReasonGroup> {
    let mut groups: Vec<ReasonGroup> = groups
        .into_iter()
        .map(|(reason, jobs)| ReasonGroup { reason, jobs })
        .collect();
    groups.sort_by(|a, b| {
        b.jobs
            .len()
            .cmp(&a.jobs.len())
            .then(a.reason.cmp(&b.reason))
    });
    groups
}

/// Why a package is where it is in a run, told from its jobs' event logs: one paragraph per
/// toolchain, each event on its own line, and what the job is waiting for if it is not done.
pub async fn explain(config: &Config, run: &str, package: &str) -> anyhow::Result<String> {
    let store = Store::connect(&config.database).await?;
    let run = store.find_run(run).await?;
    let (name, version) = match package.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (package, None),
    };
    let jobs = store.package_jobs(run.id, name, version).await?;
    anyhow::ensure!(
        !jobs.is_empty(),
        "run {} has no job for {package}",
        run.name
    );
    let mut text = String::new();
    for PackageJob {
        id: job,
        version,
        side,
        outcome,
        refused,
    } in jobs
    {
        let events = store.events(job).await?;
        let _ = writeln!(text, "{name}@{version} with {side} (job {job}):");
        for event in &events {
            let _ = write!(
                text,
                "  {}  {}",
                event.at.format("%Y-%m-%d %H:%M:%S%.3f"),
                event.kind
            );
            if let Some(attempt) = event.attempt {
                let _ = write!(text, ", attempt {attempt}");
            }
            if let Some(consumer) = event.consumer.as_deref().filter(|c| !c.is_empty()) {
                let _ = write!(text, ", on {consumer}");
            }
            if let Some(detail) = event.detail.as_deref().filter(|d| !d.is_empty()) {
                let _ = write!(text, ": {detail}");
            }
            text.push('\n');
        }
        let now = match (outcome, events.last().map(|e| e.kind)) {
            (Some(outcome), _) => format!("finished as {outcome}"),
            (None, None) => "recorded but not yet published: the producer has not got to it".into(),
            (None, Some(EventKind::Queued)) => "in the work queue, waiting for a consumer".into(),
            (None, Some(EventKind::Started)) => {
                "running (or its consumer died and the broker will hand it to another)".into()
            }
            (None, Some(EventKind::AttemptFailed)) => {
                "waiting in a retry delay queue before its next attempt".into()
            }
            (None, Some(EventKind::Requeued)) => {
                "requeued from the dead letters: in the work queue, waiting for a consumer".into()
            }
            (None, Some(EventKind::Waiting)) => {
                "waiting for an identical job of another run to finish, to reuse its result".into()
            }
            (None, Some(other)) => format!("last event: {other}"),
        };
        let _ = write!(text, "  → {now}");
        if !refused.is_empty() {
            let names: Vec<&str> = refused.iter().map(|r| r.as_str()).collect();
            let _ = write!(text, "; refused: {}", names.join(", "));
        }
        text.push_str("\n\n");
    }
    Ok(text)
}

/// What `verify` found wrong with a run; empty when every invariant holds.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub run: String,
    pub jobs: i64,
    pub results: i64,
    pub problems: Vec<String>,
}

impl Verification {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Reconciles a run: every job the producer recorded was published and has exactly one result
/// with exactly one `finished` event, dead-lettered jobs have an `error` result, and a report
/// written under `output_dir` (if any) counts what the database counts.
pub async fn verify(config: &Config, run: &str, output_dir: &Path) -> anyhow::Result<Verification> {
    let store = Store::connect(&config.database).await?;
    let run = store.find_run(run).await?;
    let figures = store.reconcile(run.id).await?;
    let mut problems = Vec::new();
    match run.jobs_total {
        None => problems.push("the producer has not finished publishing this run".to_owned()),
        // Consumers add the re-runs of regressions after the producer is done.
        Some(total) if total != figures.jobs - figures.reruns => problems.push(format!(
            "the producer published {total} jobs but {} are recorded",
            figures.jobs - figures.reruns
        )),
        Some(_) => {}
    }
    if figures.unpublished > 0 {
        problems.push(format!(
            "{} jobs were recorded but never published (re-run the producer)",
            figures.unpublished
        ));
    }
    if figures.jobs_without_result_count > 0 {
        problems.push(format!(
            "{} jobs have no result, for example: {}",
            figures.jobs_without_result_count,
            figures.jobs_without_result.join(", ")
        ));
    }
    if figures.results_without_one_finished_event > 0 {
        problems.push(format!(
            "{} results do not have exactly one `finished` event",
            figures.results_without_one_finished_event
        ));
    }
    if figures.dead_letters_without_error_result > 0 {
        problems.push(format!(
            "{} dead-lettered jobs have no `error` result",
            figures.dead_letters_without_error_result
        ));
    }
    let report_json = output_dir.join(&run.name).join("report.json");
    if report_json.exists() {
        let report: Report = serde_json::from_slice(&std::fs::read(&report_json)?)
            .with_context(|| format!("{} is not a Quarry report", report_json.display()))?;
        let database: BTreeMap<String, i64> = store
            .outcome_counts(run.id)
            .await?
            .into_iter()
            .map(|(outcome, n)| (outcome.to_string(), n))
            .collect();
        if report.counts != database {
            problems.push(format!(
                "the report at {} counts {:?} but the database counts {database:?} (regenerate it)",
                report_json.display(),
                report.counts
            ));
        }
    }
    Ok(Verification {
        run: run.name,
        jobs: figures.jobs,
        results: figures.results,
        problems,
    })
}

/// The run's sides, in order (start, then end), from its stored definition: its toolchains, or
/// for a dependency-patch run its toolchain without and with the patch (as jobs are labelled).
pub(crate) fn side_labels(definition: &serde_json::Value) -> Vec<String> {
    quarry_core::job::StoredDefinition::of(definition)
        .map(|definition| definition.side_labels())
        .unwrap_or_default()
}

fn compare_sides(definition: &serde_json::Value, packages: &[PackageRow]) -> Option<Comparison> {
    let [start, end] = <[String; 2]>::try_from(side_labels(definition)).ok()?;
    let end_rerun = quarry_core::job::rerun_label(&end);
    let mut by_package: BTreeMap<(String, String), compare::Sides<'_>> = BTreeMap::new();
    for p in packages {
        let Ok(outcome) = p.outcome.parse() else {
            continue;
        };
        let side = compare::Side {
            verdict: quarry_core::category::Verdict {
                outcome,
                environmental: p.environment.is_some(),
            },
            log: p.log.as_deref(),
            ice: p.cause.as_deref() == Some(cause::ICE),
        };
        let entry = by_package
            .entry((p.name.clone(), p.version.clone()))
            .or_default();
        if p.side == start {
            entry.start = Some(side);
        } else if p.side == end {
            entry.end = Some(side);
        } else if p.side == end_rerun {
            entry.end_rerun = Some(side);
        }
    }
    Some(compare::compare(&start, &end, by_package))
}

/// `one` for a count of one, else `many` (`1 crate`, `2 crates`).
pub(crate) fn plural(count: usize, one: &'static str, many: &'static str) -> &'static str {
    if count == 1 { one } else { many }
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a relative link's path segments, so a file name cannot break out of `href`.
pub(crate) fn escape_href(path: &str) -> String {
    let mut out = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b'~' | b'+') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

pub(crate) fn progress_line(report: &Report) -> String {
    match report.progress.total {
        Some(total) if report.progress.complete => format!("complete: {total} jobs"),
        Some(total) => format!("in progress: {} of {total} jobs", report.progress.finished),
        None => format!(
            "in progress: {} jobs finished, still publishing",
            report.progress.finished
        ),
    }
}

pub(crate) fn category_rank(category: &str) -> usize {
    [
        "regressed-ice",
        "regressed",
        "fixed",
        "spurious-regressed",
        "spurious-fixed",
        "error",
        "broken",
        "still-failing",
        "pending",
        "skipped",
        "still-passing",
    ]
    .iter()
    .position(|c| *c == category)
    .unwrap_or(usize::MAX)
}

/// One row per job, for spreadsheets: fields quoted as RFC 4180 says, so a comma or quote in a
/// crate's metadata cannot shift the columns.
fn render_csv(report: &Report, csv: &mut dyn std::io::Write) -> anyhow::Result<()> {
    fn field(text: &str) -> String {
        if text.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text.to_owned()
        }
    }
    csv.write_all(
        b"name,version,side,outcome,exit_code,duration_ms,attempt,consumer,log,refused,\
          broken_reason,environment,cpu_ms,peak_memory_bytes,disk_bytes,slot_wait_ms\n",
    )?;
    for p in &report.packages {
        let exit_code = p.exit_code.map(|c| c.to_string()).unwrap_or_default();
        let row = [
            field(&p.name),
            field(&p.version),
            field(&p.side),
            field(&p.outcome),
            exit_code,
            p.duration_ms.to_string(),
            p.attempt.to_string(),
            field(&p.consumer),
            field(p.log.as_deref().unwrap_or("")),
            // Refusal names need no quoting: kebab-case words, separated by spaces.
            p.refused.join(" "),
            p.broken_reason.clone().unwrap_or_default(),
            field(p.environment.as_deref().unwrap_or("")),
        ];
        let cost = p.cost.as_ref().map_or_else(
            || [String::new(), String::new(), String::new(), String::new()],
            |c| {
                [
                    c.cpu_ms.map_or_else(String::new, |n| n.to_string()),
                    c.peak_memory_bytes
                        .map_or_else(String::new, |n| n.to_string()),
                    c.disk_bytes.to_string(),
                    c.slot_wait_ms.to_string(),
                ]
            },
        );
        let row: Vec<String> = row.into_iter().chain(cost).collect();
        csv.write_all(row.join(",").as_bytes())?;
        csv.write_all(b"\n")?;
    }
    Ok(())
}

/// Writes `path` through a buffer with `write`.
fn write_file(
    path: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    write(&mut out).with_context(|| format!("cannot write {}", path.display()))?;
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A complete run of `packages` with nothing else in it, for tests to fill in.
    pub(crate) fn report_of(packages: Vec<PackageRow>) -> Report {
        let n = packages.len() as i64;
        Report {
            run: RunInfo {
                id: "id".into(),
                name: "run".into(),
                definition: serde_json::Value::Null,
                created_at: String::new(),
                builds: BTreeMap::new(),
            },
            progress: ProgressInfo {
                finished: n,
                total: Some(n),
                complete: true,
            },
            counts: BTreeMap::new(),
            comparison: None,
            regressions: Vec::new(),
            reruns: BTreeMap::new(),
            causes: Vec::new(),
            refused: Vec::new(),
            broken: Vec::new(),
            spurious: Vec::new(),
            cost: RunCost::default(),
            packages,
        }
    }

    /// A job of `name` 1.0.0 on `toolchain` that failed to build.
    pub(crate) fn failed(name: &str, toolchain: &str) -> PackageRow {
        PackageRow {
            name: name.into(),
            version: "1.0.0".into(),
            side: toolchain.into(),
            outcome: "build-fail".into(),
            exit_code: Some(101),
            duration_ms: 1500,
            attempt: 1,
            consumer: "c".into(),
            log: None,
            cause: None,
            first_error: None,
            environment: None,
            refused: Vec::new(),
            broken_reason: None,
            cost: None,
        }
    }

    /// `name` 1.0.0, regressed from build-pass to build-fail, with nothing else known.
    pub(crate) fn regression(name: &str) -> Regression {
        Regression {
            name: name.into(),
            version: "1.0.0".into(),
            category: "regressed".into(),
            start: Some("build-pass".into()),
            end: Some("build-fail".into()),
            dependents: 0,
            first_error: None,
            start_log: None,
            end_log: None,
            end_rerun: None,
            page: None,
            broken: Vec::new(),
            history: Vec::new(),
        }
    }

    #[test]
    fn csv_fields_with_separators_are_quoted() {
        let report = report_of(vec![PackageRow {
            side: "stable".into(),
            consumer: "host,\"1\"".into(),
            log: Some("logs/a.txt".into()),
            cause: Some("E0308".into()),
            ..failed("a", "stable")
        }]);
        let mut csv = Vec::new();
        render_csv(&report, &mut csv).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        let row = csv.lines().nth(1).unwrap();
        assert_eq!(
            row,
            // No cost recorded: the last four columns are empty.
            "a,1.0.0,stable,build-fail,101,1500,1,\"host,\"\"1\"\"\",logs/a.txt,,,,,,,"
        );
    }

    #[test]
    fn markup_in_names_and_paths_is_neutralised() {
        assert_eq!(
            escape_html("<script>alert('x')</script>&"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;"
        );
        assert_eq!(escape_href("logs/a\"b c.txt"), "logs/a%22b%20c.txt");
    }
}
