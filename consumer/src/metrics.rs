//! The consumer's figures, kept as Prometheus metrics and served at `/metrics`: jobs by outcome
//! and their durations, fetches and bytes per cache layer, retries, dead letters, memoized
//! results, sandbox kills, what packages tried that was refused. They are also the source of the `ConsumerStats` a consumer returns
//! when it stops, so there is one count of each thing.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Counter, CounterVec, Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use quarry_core::job::{Outcome, Refusal};

use crate::ConsumerStats;
use crate::fetch::Source;
use quarry_core::cost::Cost;

pub struct Metrics {
    registry: Registry,
    jobs: IntCounterVec,
    job_seconds: HistogramVec,
    /// What the jobs that ran here used (`quarry_core::cost`).
    cpu_seconds: Counter,
    step_cpu_seconds: CounterVec,
    peak_memory: Histogram,
    disk: Histogram,
    slot_wait: Histogram,
    pub in_progress: IntGauge,
    /// 1 while the consumer consumes from the broker (a session is up), else 0: what `/ready`
    /// answers.
    pub consuming: IntGauge,
    fetches: IntCounterVec,
    fetch_bytes: IntCounterVec,
    pub s3_unavailable: IntCounter,
    pub attempts_failed: IntCounter,
    pub dead_lettered: IntCounter,
    pub broker_dead_letters: IntCounter,
    pub duplicates_skipped: IntCounter,
    pub memoized: IntCounter,
    pub reruns: IntCounter,
    pub sandbox_kills: IntCounter,
    pub logs_in_database: IntCounter,
    pub index_files: IntCounterVec,
    refused: IntCounterVec,
    pub connections: IntCounter,
    pub channels_lost: IntCounter,
    pub leases_lapsed: IntCounter,
    pub waits: IntCounter,
    /// Jobs handed back while waiting for a slot, for another consumer's free one.
    pub given_way: IntCounter,
    pub toolchain_installs: IntCounter,
    /// The slots' kept target directories (`shared_target.rs`).
    shared_target_bytes: IntGauge,
    shared_target_removals: IntCounter,
    /// The dependency sources extracted once and shared (`sources.rs`).
    sources: IntCounterVec,
    sources_bytes: IntGauge,
    /// The pool of compiled units (`units.rs`).
    units: IntCounterVec,
    unit_pool_bytes: IntGauge,
}

const LAYERS: [&str; 3] = ["disk", "s3", "registry"];

/// What became of a dependency's sources (`quarry_consumer_sources_total`).
const SOURCES: [&str; 5] = [
    "extracted",
    "shared",
    "linked-ahead",
    "left-to-cargo",
    "removed",
];

/// What became of a compiled unit (`quarry_consumer_units_total`).
const UNITS: [&str; 5] = ["reused", "added", "run-reused", "run-added", "removed"];

fn layer(source: Source) -> &'static str {
    match source {
        Source::Disk => "disk",
        Source::S3 => "s3",
        Source::Registry => "registry",
    }
}

impl Metrics {
    pub fn new() -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> anyhow::Result<IntCounter> {
            let counter = IntCounter::new(name, help)?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let metrics = Metrics {
            jobs: IntCounterVec::new(
                Opts::new(
                    "quarry_consumer_jobs_total",
                    "Job results recorded, by outcome",
                ),
                &["outcome"],
            )?,
            job_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "quarry_consumer_job_duration_seconds",
                    "Time from taking a job to its result, by outcome",
                )
                .buckets(vec![
                    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                ]),
                &["outcome"],
            )?,
            cpu_seconds: Counter::new(
                "quarry_consumer_job_cpu_seconds_total",
                "CPU time (user and system) of the steps of the jobs that ran here, where it is \
                 counted (a step's cgroup)",
            )?,
            step_cpu_seconds: CounterVec::new(
                Opts::new(
                    "quarry_consumer_step_cpu_seconds_total",
                    "CPU time of the jobs' steps, by step (fetch, check, build, test, ...)",
                ),
                &["step"],
            )?,
            peak_memory: Histogram::with_opts(
                HistogramOpts::new(
                    "quarry_consumer_job_peak_memory_bytes",
                    "The most memory one step of a job used (its whole process tree where it \
                     had a cgroup, else its largest process)",
                )
                .buckets(prometheus::exponential_buckets(
                    16.0 * 1024.0 * 1024.0,
                    2.0,
                    10,
                )?),
            )?,
            disk: Histogram::with_opts(
                HistogramOpts::new(
                    "quarry_consumer_job_disk_bytes",
                    "Disk a job's scratch directory took at its end (package, dependencies, \
                     target directory), with what it added to its slot's kept target directory",
                )
                .buckets(prometheus::exponential_buckets(
                    1024.0 * 1024.0,
                    4.0,
                    10,
                )?),
            )?,
            slot_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "quarry_consumer_slot_wait_seconds",
                    "Time a prepared job waited for an experiment slot",
                )
                .buckets(vec![
                    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                ]),
            )?,
            in_progress: IntGauge::new("quarry_consumer_jobs_in_progress", "Jobs being worked on")?,
            consuming: IntGauge::new(
                "quarry_consumer_consuming",
                "1 while the consumer consumes jobs from the broker, 0 while it has no channel to \
                 consume from (connecting again, stopping)",
            )?,
            fetches: IntCounterVec::new(
                Opts::new(
                    "quarry_consumer_fetches_total",
                    "Crate files served, by the cache layer that had them (disk, s3, registry)",
                ),
                &["layer"],
            )?,
            fetch_bytes: IntCounterVec::new(
                Opts::new(
                    "quarry_consumer_fetch_bytes_total",
                    "Bytes of crate files served, by cache layer",
                ),
                &["layer"],
            )?,
            s3_unavailable: counter(
                "quarry_consumer_s3_unavailable_total",
                "Fetches for which S3 failed and the registry stood in",
            )?,
            attempts_failed: counter(
                "quarry_consumer_attempts_failed_total",
                "Job attempts that failed for infrastructure reasons (each is retried or dead-lettered)",
            )?,
            dead_lettered: counter(
                "quarry_consumer_dead_lettered_total",
                "Messages moved to the dead-letter queue",
            )?,
            broker_dead_letters: counter(
                "quarry_consumer_broker_dead_letters_recorded_total",
                "Jobs the broker dead-lettered itself (past the delivery limit), recorded as errors",
            )?,
            duplicates_skipped: counter(
                "quarry_consumer_duplicates_skipped_total",
                "Deliveries of jobs that already had a result, or that another consumer's live \
                 lease held (a copy of a job in hand)",
            )?,
            memoized: counter(
                "quarry_consumer_memoized_total",
                "Results reused from an identical job of an earlier run",
            )?,
            reruns: counter(
                "quarry_consumer_reruns_total",
                "Regressions whose failing side was queued to run once more",
            )?,
            index_files: IntCounterVec::new(
                Opts::new(
                    "quarry_consumer_index_files_total",
                    "Index files cargo asked for: downloaded, not-modified (revalidated, no body), \
                     fresh (confirmed within registry.index_fresh_secs, not asked) or stale \
                     (registry unreachable, cached copy used)",
                ),
                &["result"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "quarry_consumer_refused_total",
                    "Jobs whose package tried what the trust boundary refused, by refusal \
                     (override-file, hostile-config, git-dependency, network, ...)",
                ),
                &["refusal"],
            )?,
            logs_in_database: counter(
                "quarry_consumer_logs_in_database_total",
                "Logs kept in PostgreSQL because S3 would not take them",
            )?,
            sandbox_kills: counter(
                "quarry_consumer_sandbox_kills_total",
                "Experiments killed with their whole process tree at the time limit",
            )?,
            shared_target_bytes: IntGauge::new(
                "quarry_consumer_shared_target_bytes",
                "Disk the target directory of the slot that ran the last job takes, after it",
            )?,
            shared_target_removals: counter(
                "quarry_consumer_shared_target_removals_total",
                "Slots' kept target directories removed for passing consumer.shared_target_mb",
            )?,
            sources: IntCounterVec::new(
                Opts::new(
                    "quarry_consumer_sources_total",
                    "Dependency sources cargo downloaded, by what became of them: extracted \
                     (into the work directory's store, once), shared (linked to the stored copy), \
                     linked-ahead (a stored version linked as cargo read its index file, so \
                     that cargo downloads none it picks), left-to-cargo (not storable: cargo extracted it in the job); and removed \
                     (stored copies removed past consumer.sources_mb)",
                ),
                &["how"],
            )?,
            sources_bytes: IntGauge::new(
                "quarry_consumer_sources_bytes",
                "Disk the consumer's store of extracted dependency sources takes",
            )?,
            units: IntCounterVec::new(
                Opts::new(
                    "quarry_consumer_units_total",
                    "Dependencies' compiled units of this consumer's jobs, by what became of them: \
                     reused (copied from the pool, rustc not run), added (compiled and pooled), \
                     run-reused and run-added (a build script's output taken from the pool, or \
                     run and pooled); and removed (pool entries removed past \
                     consumer.unit_pool_mb)",
                ),
                &["how"],
            )?,
            unit_pool_bytes: IntGauge::new(
                "quarry_consumer_unit_pool_bytes",
                "Disk the pool of compiled units on the consumer's work directory takes: as \
                 measured at most ten minutes ago, plus what this consumer added since",
            )?,
            toolchain_installs: counter(
                "quarry_consumer_toolchain_installs_total",
                "Toolchains this consumer installed on demand (with rustup, or from a run's toolchain file)",
            )?,
            given_way: counter(
                "quarry_consumer_jobs_given_way_total",
                "Jobs handed back while waiting for this consumer's busy slot, for another consumer of the fleet that was idle",
            )?,
            waits: counter(
                "quarry_consumer_waits_total",
                "Jobs put aside to wait for an identical job of another run computing the same result",
            )?,
            connections: counter(
                "quarry_consumer_broker_connections_total",
                "Connections made to the broker (more than one means it was lost and regained)",
            )?,
            channels_lost: counter(
                "quarry_consumer_channels_lost_total",
                "Channels to the broker found closed (a delivery held past the broker's \
                 consumer_timeout, a channel error): each ends the session, and the consumer \
                 consumes again on a new connection",
            )?,
            leases_lapsed: counter(
                "quarry_consumer_leases_lapsed_total",
                "Jobs whose lease lapsed (their consumer died, or could not hand them back) \
                 that this consumer's sweeper published again",
            )?,
            registry,
        };
        metrics.registry.register(Box::new(metrics.jobs.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.job_seconds.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.cpu_seconds.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.step_cpu_seconds.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.peak_memory.clone()))?;
        metrics.registry.register(Box::new(metrics.disk.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.slot_wait.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.in_progress.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.shared_target_bytes.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.consuming.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.sources.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.sources_bytes.clone()))?;
        metrics.registry.register(Box::new(metrics.units.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.unit_pool_bytes.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.fetches.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.fetch_bytes.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.index_files.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.refused.clone()))?;
        // Export every series from the start, so dashboards see zeros rather than nothing.
        for outcome in Outcome::ALL {
            metrics.jobs.with_label_values(&[outcome.as_str()]);
        }
        for refusal in Refusal::ALL {
            metrics.refused.with_label_values(&[refusal.as_str()]);
        }
        for how in SOURCES {
            metrics.sources.with_label_values(&[how]);
        }
        for how in UNITS {
            metrics.units.with_label_values(&[how]);
        }
        for layer in LAYERS {
            metrics.fetches.with_label_values(&[layer]);
            metrics.fetch_bytes.with_label_values(&[layer]);
        }
        Ok(metrics)
    }

    pub fn job_done(&self, outcome: Outcome, seconds: f64) {
        self.jobs.with_label_values(&[outcome.as_str()]).inc();
        self.job_seconds
            .with_label_values(&[outcome.as_str()])
            .observe(seconds);
    }

    /// A job that ran here used `cost`.
    pub fn observe_cost(&self, cost: &Cost) {
        let seconds = |ms: u64| ms as f64 / 1000.0;
        self.cpu_seconds.inc_by(seconds(cost.cpu_ms.unwrap_or(0)));
        for step in &cost.steps {
            if let Some(cpu_ms) = step.cpu_ms {
                self.step_cpu_seconds
                    .with_label_values(&[step.name.as_str()])
                    .inc_by(seconds(cpu_ms));
            }
        }
        if let Some(peak) = cost.peak_memory_bytes {
            self.peak_memory.observe(peak as f64);
        }
        self.disk.observe(cost.disk_bytes as f64);
        self.slot_wait.observe(seconds(cost.slot_wait_ms));
    }

    /// A job's slot's kept target directory came to `kept` after it.
    pub fn shared_target_observe(&self, kept: crate::shared_target::AfterJob) {
        self.shared_target_bytes
            .set(i64::try_from(kept.size_bytes).unwrap_or(i64::MAX));
        if kept.removed {
            self.shared_target_removals.inc();
        }
    }

    /// A dependency's sources were `how` (one of [`SOURCES`]).
    pub fn source(&self, how: &str) {
        debug_assert!(SOURCES.contains(&how), "{how}");
        self.sources.with_label_values(&[how]).inc();
    }

    /// A job's units came to `counts`.
    pub fn units(&self, counts: crate::units::Counts) {
        self.units
            .with_label_values(&["reused"])
            .inc_by(counts.reused);
        self.units
            .with_label_values(&["added"])
            .inc_by(counts.added);
        self.units
            .with_label_values(&["run-reused"])
            .inc_by(counts.runs_reused);
        self.units
            .with_label_values(&["run-added"])
            .inc_by(counts.runs_added);
    }

    /// The pool of units takes `bytes` now (measured or estimated), `removed` entries fewer.
    pub fn unit_pool_trimmed(&self, bytes: u64, removed: usize) {
        self.unit_pool_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.units
            .with_label_values(&["removed"])
            .inc_by(removed as u64);
    }

    /// The store of extracted sources takes `bytes` now.
    pub fn sources_size(&self, bytes: u64) {
        self.sources_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A job's result was recorded with these refusals.
    pub fn refused(&self, refusals: &[Refusal]) {
        for refusal in refusals {
            self.refused.with_label_values(&[refusal.as_str()]).inc();
        }
    }

    pub fn fetched(&self, source: Source, bytes: usize) {
        self.fetches.with_label_values(&[layer(source)]).inc();
        self.fetch_bytes
            .with_label_values(&[layer(source)])
            .inc_by(bytes as u64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Cannot fail: the text encoder writes into a Vec.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The totals a consumer reports when it stops.
    pub fn stats(&self) -> ConsumerStats {
        let fetches = |layer: &str| self.fetches.with_label_values(&[layer]).get();
        ConsumerStats {
            results: Outcome::ALL
                .iter()
                .map(|o| self.jobs.with_label_values(&[o.as_str()]).get())
                .sum(),
            duplicates_skipped: self.duplicates_skipped.get(),
            dead_lettered: self.dead_lettered.get(),
            attempts_failed: self.attempts_failed.get(),
            disk_hits: fetches("disk"),
            s3_hits: fetches("s3"),
            registry_fetches: fetches("registry"),
            s3_unavailable: self.s3_unavailable.get(),
            memoized: self.memoized.get(),
            reruns: self.reruns.get(),
            broker_connections: self.connections.get(),
            waits: self.waits.get(),
            leases_lapsed: self.leases_lapsed.get(),
            toolchain_installs: self.toolchain_installs.get(),
            sources_extracted: self.sources.with_label_values(&["extracted"]).get(),
            sources_shared: self.sources.with_label_values(&["shared"]).get(),
            sources_linked_ahead: self.sources.with_label_values(&["linked-ahead"]).get(),
        }
    }
}

/// Serves `/metrics` on `addr` until the returned task is aborted.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/ready", get(ready))
        .with_state(metrics);
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "the metrics endpoint stopped");
        }
    });
    Ok((addr, task))
}

/// For a readiness probe: 200 while the consumer consumes, 503 while it does not (a consumer
/// alive but consuming nothing is not ready, so it is seen).
async fn ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.consuming.get() > 0 {
        (axum::http::StatusCode::OK, "consuming\n")
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not consuming: connecting to the broker, or stopping\n",
        )
    }
}

async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
}
