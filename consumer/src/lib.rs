//! The consumer: takes jobs from the work queue and turns each into exactly one result.
//!
//! A job is taken off the work queue only when there is room for it. For each: parse it (poison
//! messages go to the dead-letter queue with the reason), skip it if it already has a result (a
//! redelivery), take its lease and ack the delivery (`lease.rs`: from then on the lease holds
//! the job, not the broker), fetch the `.crate` through the caches, unpack it into a scratch
//! directory, run the experiment, and write the result to PostgreSQL, releasing the lease in
//! the same transaction. An infrastructure failure is recorded as a failed attempt and the job
//! is handed over to the delay queue of its retry tier (it comes back to the work queue when
//! the delay expires); after the last tier the job gets an `error` result and its message is
//! dead-lettered with the reason.
//!
//! On SIGTERM the consumer stops taking jobs, hands back those waiting for a slot and lets the
//! running ones finish within the grace period; those still running after it are handed back.
//! A consumer killed outright leaves its leases to lapse, and another's sweeper publishes
//! those jobs again.

//!
//! Where each part lives: `delivery.rs` (the broker session: taking jobs, dead letters,
//! reconnecting), `process.rs` (a job's state machine, from taken to recorded), `claims.rs`
//! (reusing an identical job's result, or claiming its computation), `workspace.rs` (the job's
//! scratch directory: fetched, unpacked, patched, resolved, run), `fleet.rs` (the consumer in
//! the fleet table), `host.rs` (what this host offers the steps: sandbox, cgroups, confinement,
//! the store of sources). The steps themselves: `experiment.rs`, `prepare.rs`, `sandbox.rs`.

mod cgroup;
mod claims;
pub mod confine;
mod delivery;
mod experiment;
mod fetch;
mod fleet;
mod gateway;
mod host;
mod in_flight;
mod lease;
mod metrics;
mod mirror;
mod prepare;
mod process;
mod reap;
mod sandbox;
mod shared_target;
mod sources;
mod spawn;
mod target_info;
mod toolchains;
mod units;
pub mod unpack;
mod workspace;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quarry_core::job::{Job, JobId, RunId, StoredDefinition};
use quarry_infra::Config;
use quarry_infra::queue::{Broker, Publisher};
use quarry_infra::registry::RegistryClient;
use quarry_infra::s3::Bucket;
use quarry_infra::store::{JobState, Store};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::lease::{Lease, Leases};
use crate::mirror::Mirror;
use crate::toolchains::Toolchains;

pub use experiment::{CargoEnv, Execution};
pub use fetch::{DiskCache, FetchError, Fetcher, Source};
pub use metrics::Metrics;
pub use sandbox::{Mounts, Sandbox, find_on_path};

/// What one consumer did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    pub results: u64,
    pub duplicates_skipped: u64,
    pub dead_lettered: u64,
    pub attempts_failed: u64,
    /// `.crate` files (packages under test and their dependencies) found intact on local disk.
    pub disk_hits: u64,
    /// `.crate` files found intact in S3.
    pub s3_hits: u64,
    /// `.crate` files downloaded from the registry.
    pub registry_fetches: u64,
    /// Times S3 failed and the registry stood in.
    pub s3_unavailable: u64,
    /// Results reused from an identical job of an earlier run instead of computed.
    pub memoized: u64,
    /// Regressions whose failing side this consumer queued to run once more.
    pub reruns: u64,
    /// Connections made to the broker: more than one means it was lost and regained.
    pub broker_connections: u64,
    /// Times a job waited for an identical job of another run instead of computing.
    pub waits: u64,
    /// Jobs of lapsed leases (their consumer died) this consumer published again.
    pub leases_lapsed: u64,
    /// Toolchains it installed on demand.
    pub toolchain_installs: u64,
    /// Dependencies' sources it extracted into its store (`sources.rs`), once each.
    pub sources_extracted: u64,
    /// Dependencies' sources a job found in the store, extracted by an earlier job, when cargo
    /// downloaded them.
    pub sources_shared: u64,
    /// Stored versions linked into a job's cargo home as cargo read their index file, so that
    /// cargo downloads none of them.
    pub sources_linked_ahead: u64,
}

impl std::ops::AddAssign for ConsumerStats {
    /// Adds up the figures of several consumers.
    fn add_assign(&mut self, other: ConsumerStats) {
        self.results += other.results;
        self.duplicates_skipped += other.duplicates_skipped;
        self.dead_lettered += other.dead_lettered;
        self.attempts_failed += other.attempts_failed;
        self.disk_hits += other.disk_hits;
        self.s3_hits += other.s3_hits;
        self.registry_fetches += other.registry_fetches;
        self.s3_unavailable += other.s3_unavailable;
        self.memoized += other.memoized;
        self.toolchain_installs += other.toolchain_installs;
        self.reruns += other.reruns;
        self.broker_connections += other.broker_connections;
        self.waits += other.waits;
        self.leases_lapsed += other.leases_lapsed;
        self.sources_extracted += other.sources_extracted;
        self.sources_shared += other.sources_shared;
        self.sources_linked_ahead += other.sources_linked_ahead;
    }
}

/// Why a job could not be run this time: Quarry's fault, not the package's.
struct InfraError {
    why: String,
    /// This consumer's host could not set up the job's steps (its scratch directory, sandbox or
    /// cgroup), as opposed to a service failing: then the consumer checks whether it can set up
    /// any step at all.
    host: bool,
}

impl From<String> for InfraError {
    fn from(why: String) -> InfraError {
        InfraError { why, host: false }
    }
}

impl InfraError {
    fn host(why: String) -> InfraError {
        InfraError { why, host: true }
    }
}

struct Worker {
    name: String,
    store: Store,
    /// The leases of the jobs this consumer holds.
    leases: Leases,
    /// The current session's publishing channel (`None` between sessions). Jobs in hand run on
    /// across sessions, so each takes the current one when it publishes.
    publisher: std::sync::Mutex<Option<Arc<Publisher>>>,
    /// Where logs go.
    bucket: Bucket,
    fetcher: Arc<Fetcher>,
    /// The registry endpoint cargo resolves from, through each job's gateway.
    mirror: Mirror,
    cargo: CargoEnv,
    jobs_dir: PathBuf,
    /// Where each job's prepared package is kept, if anywhere (`consumer.keep_packages`).
    keep_packages: Option<PathBuf>,
    /// The toolchains jobs build with: the consumer's own, and those it installs on demand.
    toolchains: Toolchains,
    /// The stored definitions of the runs seen (`None`: unreadable), to pair a job's result
    /// with its package's other side.
    definitions: Mutex<HashMap<RunId, Option<Arc<StoredDefinition>>>>,
    metrics: Arc<Metrics>,
    /// One per experiment that may run at once (`consumer.concurrency`); the consumer holds
    /// twice as many jobs, preparing and recording the others meanwhile.
    slots: shared_target::Slots,
    /// How many: `consumer.concurrency`.
    concurrency: u16,
    /// The slots of the whole fleet alive at the last heartbeat, this consumer's included.
    fleet_slots: std::sync::atomic::AtomicU32,
    /// Who it is in the fleet, to say it is idle and ask whether another consumer is.
    identity: fleet::Identity,
    /// The jobs the work queue held at this consumer's last look (`u32::MAX`: none yet).
    queued: std::sync::atomic::AtomicU32,
    /// Jobs in hand, for the fleet table.
    in_hand: std::sync::Mutex<std::collections::BTreeSet<JobId>>,
    /// Cancelled when the consumer is told to stop: jobs still waiting for a slot are given
    /// back at once, rather than started only to be cut off at the end of the grace period.
    stopping: CancellationToken,
    /// Why this consumer can no longer set up any step, once it found so: it stops taking jobs.
    broken: std::sync::Mutex<Option<String>>,
}

/// A job taken off the queue: its state when it was taken, and its lease.
struct Taken {
    job: Job,
    state: JobState,
    lease: Lease,
}

/// Consumes jobs until `shutdown` is cancelled. A lost broker connection is re-established,
/// with backoff, as often as it takes.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<ConsumerStats> {
    // This consumer's own: it stops itself (a host that cannot run jobs) without stopping
    // whatever else the caller's token stops.
    let shutdown = shutdown.child_token();
    let name = config
        .consumer
        .name
        .clone()
        .unwrap_or_else(fleet::default_name);
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    // The first connection must work: a wrong URL is better reported at once.
    let first_broker = Broker::connect(&config.rabbitmq).await?;
    let bucket = Bucket::new(&config.s3)?;
    if let Err(err) = bucket.ensure_exists().await {
        tracing::warn!(error = %format!("{err:#}"), "S3 bucket unavailable; crates will come from the registry");
    }
    // Consumers sharing a work directory share its index cache too.
    let registry = RegistryClient::new(&config.registry)?
        .with_index_cache(config.consumer.work_dir.join("index"))?;
    // Consumers sharing a work directory share its disk cache.
    let disk = DiskCache::new(
        config.consumer.work_dir.join("crates"),
        config.consumer.disk_cache_mb.saturating_mul(1 << 20),
    )
    .context("cannot create the disk cache")?;
    let metrics = Arc::new(Metrics::new()?);
    let metrics_server = match &config.consumer.metrics_listen {
        Some(addr) => {
            let addr = addr
                .parse()
                .with_context(|| format!("consumer.metrics_listen {addr:?} is not an address"))?;
            let (addr, task) = metrics::serve(metrics.clone(), addr).await?;
            tracing::info!(%addr, "serving /metrics");
            Some(task)
        }
        None => None,
    };
    let fetcher = Arc::new(Fetcher::new(
        disk,
        bucket.clone(),
        registry,
        metrics.clone(),
    ));
    let identity = fleet::Identity::new();
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned());
    let own_toolchains = host::rustup_home()?;
    let on_demand = Toolchains::dir_of(&config.consumer.toolchains, &config.consumer.work_dir)?;
    let mut cargo = host::prepare_cargo_env(
        config,
        &identity.owner(&name),
        [&own_toolchains, &on_demand],
        path.clone(),
    )
    .await?;
    cargo.sources = host::open_sources(config, &name, &cargo.sandbox, metrics.clone())?;
    cargo.units = host::open_units(config, &cargo)?;
    let toolchains = Toolchains::new(
        (own_toolchains, on_demand),
        path,
        &config.consumer.toolchains,
        (bucket.clone(), cargo.sandbox.clone()),
        metrics.toolchain_installs.clone(),
    )?;
    let jobs_dir = config.consumer.work_dir.join(&name).join("jobs");
    std::fs::create_dir_all(&jobs_dir)
        .with_context(|| format!("cannot create {}", jobs_dir.display()))?;
    let jobs_dir = std::path::absolute(&jobs_dir)?;
    host::spread_trees(&jobs_dir);
    host::check_jobs_dir(&jobs_dir, &cargo.sandbox)?;
    workspace::remove_leftover_scratch(&jobs_dir);
    let concurrency = config.consumer.concurrency.max(1);
    let slots = shared_target::Slots::new(
        usize::from(concurrency),
        cargo.confine.as_ref().map(|_| {
            (
                config.consumer.work_dir.join(&name).join("targets"),
                config.consumer.shared_target_mb.saturating_mul(1 << 20),
            )
        }),
    )
    .context("cannot create the slots' target directories")?;

    let worker = Arc::new(Worker {
        name: name.clone(),
        leases: Leases::new(
            store.clone(),
            identity.id,
            name.clone(),
            Duration::from_secs(config.consumer.lease_secs),
        ),
        publisher: Default::default(),
        store,
        bucket: bucket.clone(),
        fetcher: fetcher.clone(),
        mirror: Mirror::new(fetcher.clone()),
        cargo,
        jobs_dir,
        keep_packages: config.consumer.keep_packages.clone(),
        toolchains,
        definitions: Mutex::new(HashMap::new()),
        metrics: metrics.clone(),
        slots,
        concurrency,
        fleet_slots: u32::from(concurrency).into(),
        identity: identity.clone(),
        queued: u32::MAX.into(),
        in_hand: Default::default(),
        stopping: shutdown.clone(),
        broken: Default::default(),
    });
    let heartbeat = fleet::join(worker.clone(), identity.clone());
    // The leases of the jobs in hand, renewed whatever the broker does (a job runs on while
    // the consumer connects again); it stops with the consumer, however that ends, so the
    // leases of a consumer that is gone always lapse.
    let _renewal = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
        let worker = worker.clone();
        async move {
            loop {
                tokio::time::sleep(worker.leases.interval()).await;
                let jobs: Vec<uuid::Uuid> = worker.in_hand_jobs().iter().map(|j| j.0).collect();
                worker.leases.renew(&jobs).await;
            }
        }
    }));
    let grace = Duration::from_secs(config.consumer.shutdown_grace_secs);
    let mut hand = delivery::Hand::new(worker.concurrency);
    let mut broker = Some(first_broker);
    loop {
        let current = match broker.take() {
            Some(broker) => broker,
            None => match delivery::reconnect(config, &shutdown).await {
                Some(broker) => broker,
                None => break,
            },
        };
        metrics.connections.inc();
        let session = delivery::consume(&worker, &current, &mut hand, &shutdown, grace).await;
        // Closing the connection returns every unacked delivery to the queue.
        current.close().await;
        if shutdown.is_cancelled() {
            break;
        }
        match session {
            Ok(()) => tracing::warn!("the broker ended the delivery stream; reconnecting"),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "lost the broker; reconnecting")
            }
        }
    }
    hand.finish_offline(&worker, grace).await;
    heartbeat.abort();
    fleet::leave(&worker, &identity).await;
    fetcher.finish_s3_writes().await;
    if let Some(cgroups) = &worker.cargo.cgroups {
        cgroups.remove();
    }
    if let Some(task) = metrics_server {
        task.abort();
    }
    let stats = metrics.stats();
    tracing::info!(consumer = %name, ?stats, "consumer stopped");
    if let Some(why) = worker.broken_why() {
        anyhow::bail!(why);
    }
    Ok(stats)
}
