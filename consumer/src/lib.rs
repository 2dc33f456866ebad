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

mod cgroup;
pub mod confine;
mod experiment;
mod fetch;
mod gateway;
mod in_flight;
mod lease;
mod metrics;
mod mirror;
mod prepare;
mod sandbox;
mod shared_target;
mod sources;
mod spawn;
mod toolchains;
mod unpack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use quarry_core::job::{
    BrokenReason, Job, JobId, Outcome, PackageVersion, Patch, PatchSource, Refusal, RunId,
    StoredDefinition,
};
use quarry_infra::Config;
use quarry_infra::queue::{self, Broker, Publisher};
use quarry_infra::registry::RegistryClient;
use quarry_infra::s3::Bucket;
use quarry_infra::store::{JobState, NewResult, Pairing, Store};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::lease::{Lease, Leases};
use crate::mirror::Mirror;
use crate::prepare::Refused;
use crate::toolchains::{Installed, Leased, Toolchains};

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
    /// Dependencies' sources a job found in the store, extracted by an earlier job.
    pub sources_shared: u64,
}

/// Heartbeat of a claimed computation, and when a silent claim may be taken over.
const CLAIM_HEARTBEAT: Duration = Duration::from_secs(20);
const CLAIM_STALE_AFTER: Duration = Duration::from_secs(120);

/// How often a consumer tells the fleet table it is alive and what it has in hand.
const FLEET_HEARTBEAT: Duration = Duration::from_secs(10);

/// What to do with a job.
enum Plan {
    /// Record this result.
    Record(Box<Done>),
    /// An identical job (of another run) is computing the same result: wait for it.
    Wait { holder: JobId, toolchain: Leased },
    /// The consumer is stopping and the job had not started: give it back to the queue.
    GiveBack,
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
    }
}

/// A computation claimed for a job (`Store::claim_computation`), renewed by a heartbeat until
/// it is released: with the job's result, in the same transaction, so that an identical job of
/// another run always finds one or the other and never computes the same result a second time.
struct Claim {
    store: Store,
    memo_key: String,
    job: JobId,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Claim {
    fn hold(store: Store, memo_key: String, job: JobId) -> Claim {
        let heartbeat = tokio::spawn({
            let (store, memo_key) = (store.clone(), memo_key.clone());
            async move {
                loop {
                    tokio::time::sleep(CLAIM_HEARTBEAT).await;
                    if let Err(err) = store.heartbeat_computation(&memo_key, job).await {
                        tracing::warn!(error = %format!("{err:#}"), "cannot renew a computation claim");
                    }
                }
            }
        });
        Claim {
            store,
            memo_key,
            job,
            heartbeat: Some(heartbeat),
        }
    }

    async fn release(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
        if let Err(err) = self
            .store
            .release_computation(&self.memo_key, self.job)
            .await
        {
            tracing::warn!(error = %format!("{err:#}"), "cannot release a computation claim; it will go stale");
        }
    }

    /// Released with the job's result, in its transaction: only the heartbeat stops.
    fn released(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
    }
}

impl Drop for Claim {
    /// Not released on the way (the result could not be recorded): released in the
    /// background, or else it goes stale and is taken over.
    fn drop(&mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
            let (store, memo_key, job) = (self.store.clone(), self.memo_key.clone(), self.job);
            tokio::spawn(async move { store.release_computation(&memo_key, job).await });
        }
    }
}

/// A job's result as computed (or reused), before it is recorded.
struct Done {
    execution: Execution,
    /// The computation this job claimed, released once its result is recorded.
    claim: Option<Claim>,
    /// How long its experiment ran, if it ran.
    ran_for: Option<Duration>,
    memo_key: Option<String>,
    reused_from: Option<JobId>,
    /// For a reused result: the S3 log of the earlier job (`execution.log` is then only a note
    /// that goes before it).
    reused_log_key: Option<String>,
    /// Given up on, its message dead-lettered with this reason.
    dead_lettered: Option<String>,
    /// The exact build of the toolchain it ran with (`rustc -vV`), where one was found.
    toolchain_build: Option<String>,
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

/// Marks a job as in hand until dropped.
struct InHand<'a> {
    worker: &'a Worker,
    job: JobId,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        self.worker.in_hand_jobs().remove(&self.job);
    }
}

/// Consumes jobs until `shutdown` is cancelled. A lost broker connection is re-established,
/// with backoff, as often as it takes.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<ConsumerStats> {
    // This consumer's own: it stops itself (a host that cannot run jobs) without stopping
    // whatever else the caller's token stops.
    let shutdown = shutdown.child_token();
    let name = config.consumer.name.clone().unwrap_or_else(default_name);
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
    // Who this process is in the fleet: two consumers may share a name (a restart while the
    // old process is still in its grace period), never an id.
    let identity = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4().simple().to_string(),
    );
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned());
    let own_toolchains = rustup_home()?;
    let on_demand = Toolchains::dir_of(&config.consumer.toolchains, &config.consumer.work_dir)?;
    let mut cargo = prepare_cargo_env(
        config,
        &owner_of(&name, identity.0),
        [&own_toolchains, &on_demand],
        path.clone(),
    )
    .await?;
    cargo.sources = open_sources(config, &name, &cargo.sandbox, metrics.clone())?;
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
    check_jobs_dir(&jobs_dir, &cargo.sandbox)?;
    remove_leftover_scratch(&jobs_dir);
    let slots = shared_target::Slots::new(
        usize::from(config.consumer.concurrency.max(1)),
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
            identity.0,
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
        in_hand: Default::default(),
        stopping: shutdown.clone(),
        broken: Default::default(),
    });
    // Join the fleet: registered, then a heartbeat with the jobs in hand until we stop.
    // The database may be down for a while (restarting): registering is retried with each
    // heartbeat rather than keeping the consumer from working.
    let heartbeat = tokio::spawn({
        let worker = worker.clone();
        let identity = identity.clone();
        let host = host_name();
        async move {
            let mut registered = false;
            loop {
                if !registered {
                    match worker
                        .store
                        .register_consumer(identity.0, &worker.name, &identity.1, &host)
                        .await
                    {
                        Ok(()) => registered = true,
                        Err(err) => {
                            tracing::warn!(error = %format!("{err:#}"), "cannot register in the fleet yet")
                        }
                    }
                }
                if registered {
                    worker.fleet_heartbeat(&identity).await;
                }
                tokio::time::sleep(FLEET_HEARTBEAT).await;
            }
        }
    });
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
    let concurrency = config.consumer.concurrency.max(1);
    let grace = Duration::from_secs(config.consumer.shutdown_grace_secs);
    let mut hand = Hand::new(concurrency);
    let mut broker = Some(first_broker);
    loop {
        let current = match broker.take() {
            Some(broker) => broker,
            None => match reconnect(config, &shutdown).await {
                Some(broker) => broker,
                None => break,
            },
        };
        metrics.connections.inc();
        let session = consume(&worker, &current, &mut hand, &shutdown, grace).await;
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
    if !hand.tasks.is_empty() {
        // Stopped without a connection to the broker: what is in hand has its grace period,
        // and what cannot publish what it needs to lets its lease lapse.
        if tokio::time::timeout(grace, hand.finish()).await.is_err() {
            hand.tasks.abort_all();
            hand.finish().await;
            worker.leases.lapse_all().await;
        }
    }
    heartbeat.abort();
    worker.fleet_heartbeat(&identity).await;
    if let Err(err) = worker.store.consumer_stopped(identity.0, &identity.1).await {
        tracing::warn!(error = %format!("{err:#}"), "cannot record that the consumer stopped");
    }
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

/// The jobs a consumer has in hand, across sessions with the broker: each runs as a task of its
/// own, holding one of `room`'s permits (twice the slots: while one job holds a slot, another is
/// fetched, prepared or recorded).
struct Hand {
    tasks: tokio::task::JoinSet<()>,
    room: Arc<tokio::sync::Semaphore>,
}

impl Hand {
    fn new(concurrency: u16) -> Hand {
        Hand {
            tasks: tokio::task::JoinSet::new(),
            room: Arc::new(tokio::sync::Semaphore::new(usize::from(
                concurrency.saturating_mul(2),
            ))),
        }
    }

    /// Forgets the tasks that ended.
    fn reap(&mut self) {
        while let Some(ended) = self.tasks.try_join_next() {
            if let Err(err) = ended
                && err.is_panic()
            {
                tracing::error!(%err, "a job's task panicked; its lease lapses and it is published again");
            }
        }
    }

    /// Waits until every job in hand has ended.
    async fn finish(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Consumes from one broker connection until it fails or `shutdown` is cancelled. The jobs it
/// took go on in `hand` when the session ends (their leases hold them, not the connection); on
/// shutdown, they are given `grace` to finish while the connection is still there to publish
/// what they need to, and those still running after it are handed back.
async fn consume(
    worker: &Arc<Worker>,
    broker: &Broker,
    hand: &mut Hand,
    shutdown: &CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let publisher = Arc::new(broker.publisher().await?);
    // A job is taken only when there is room for it, and acked once its lease is held: the
    // broker holds no delivery for this consumer longer than that.
    let (channel, deliveries) = broker.take_jobs().await?;
    let (dead_channel, dead_letters) = broker.consume_dead_letters(&worker.name).await?;
    worker.set_publisher(Some(publisher.clone()));
    tracing::info!(consumer = %worker.name, "consuming jobs");
    worker.metrics.consuming.set(1);
    // The session lasts while every channel it uses does. One closed from the broker's side (a
    // broker restarting, a channel error) ends it: no job is taken any more, the connection is
    // closed and the consumer connects and consumes again, while the jobs in hand go on.
    // Waiting on the other channels alone would leave a consumer alive that consumes nothing.
    let session = shutdown.child_token();
    let lost: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let end_session = |why: String| {
        worker.metrics.consuming.set(0);
        let mut lost = lost.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_none() && !shutdown.is_cancelled() {
            tracing::warn!(consumer = %worker.name, %why, "a channel to the broker was lost; consuming again on a new connection");
            worker.metrics.channels_lost.inc();
            *lost = Some(why);
        }
        session.cancel();
    };
    // Jobs whose lease lapsed (their consumer died) are published again by whichever
    // consumer sweeps first.
    let sweeper = async {
        loop {
            tokio::time::sleep(worker.leases.interval()).await;
            worker.leases.sweep(&publisher, &worker.metrics).await;
        }
    };
    let watchdog = async {
        loop {
            tokio::time::sleep(CHANNEL_CHECK).await;
            let open = [
                ("the jobs", channel.status().connected()),
                ("the dead letters'", dead_channel.status().connected()),
                ("the publishing", publisher.is_open()),
            ];
            if let Some((which, _)) = open.iter().find(|(_, open)| !open) {
                end_session(format!("{which} channel was closed"));
                break;
            }
        }
        // Done: the session is over.
        std::future::pending::<()>().await
    };
    let taking = async {
        let mut deliveries = std::pin::pin!(deliveries);
        loop {
            hand.reap();
            let room = tokio::select! {
                room = hand.room.clone().acquire_owned() => room.expect("the room is never closed"),
                () = session.cancelled() => break,
            };
            let delivery = tokio::select! {
                delivery = deliveries.next() => delivery,
                () = session.cancelled() => break,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    let worker = worker.clone();
                    hand.tasks.spawn(async move {
                        worker.handle(delivery).await;
                        drop(room);
                    });
                }
                Some(Err(err)) => {
                    end_session(format!("the jobs channel failed: {err}"));
                    break;
                }
                None => {
                    end_session("the jobs channel ended".to_owned());
                    break;
                }
            }
        }
    };
    let dead_letters = dead_letters
        .take_until(session.clone().cancelled_owned())
        .for_each(|delivery| {
            let worker = worker.clone();
            let delivery = delivery.map_err(|err| {
                end_session(format!("the dead letters' channel failed: {err}"));
            });
            async move {
                if let Ok(delivery) = delivery {
                    worker.handle_dead_letter(delivery).await;
                }
            }
        });
    // The dead letters' stream ending (its channel gone) ends the session too.
    let dead_letters = async {
        dead_letters.await;
        end_session("the broker ended the dead letters' delivery stream".to_owned());
    };
    tokio::select! {
        ((), ()) = futures::future::join(taking, dead_letters) => {}
        // Never ends: it cancels the session, which ends the others.
        () = watchdog => {}
        // Never ends.
        () = sweeper => {}
    }
    worker.metrics.consuming.set(0);
    if shutdown.is_cancelled() {
        // The jobs still waiting for a slot hand themselves back at once; the running ones
        // have the grace period, publishing through this session meanwhile.
        let finished = tokio::time::timeout(grace, async {
            tokio::select! {
                () = hand.finish() => {}
                // Never ends.
                () = async {
                    loop {
                        tokio::time::sleep(worker.leases.interval()).await;
                        worker.leases.sweep(&publisher, &worker.metrics).await;
                    }
                } => {}
            }
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                ?grace,
                "jobs still running after the grace period are given back to the queue"
            );
            hand.tasks.abort_all();
            hand.finish().await;
            worker.leases.lapse_all().await;
            worker.leases.sweep(&publisher, &worker.metrics).await;
        }
    }
    worker.set_publisher(None);
    // Closed one after the other before the connection is (rather than left to their drop,
    // which closes them as the connection goes and makes the client log an error).
    for channel in [dead_channel, channel] {
        channel.close(200, "consumer stopping".into()).await.ok();
    }
    publisher.close().await;
    let lost = lost.lock().unwrap_or_else(|p| p.into_inner()).take();
    match lost {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// How often a consumer checks that its channels to the broker are still open.
const CHANNEL_CHECK: Duration = Duration::from_secs(1);

/// Connects to the broker again, waiting longer after each failure (1 s up to 30 s), until it
/// works or `shutdown` is cancelled (`None`).
async fn reconnect(config: &Config, shutdown: &CancellationToken) -> Option<Broker> {
    use backon::BackoffBuilder as _;
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return None,
        }
        match Broker::connect(&config.rabbitmq).await {
            Ok(broker) => {
                tracing::info!("reconnected to the broker");
                return Some(broker);
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), ?delay, "cannot reach the broker yet")
            }
        }
    }
}

impl Worker {
    /// The current session's publisher.
    fn publisher(&self) -> anyhow::Result<Arc<Publisher>> {
        self.publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .context("no connection to the broker at the moment")
    }

    fn set_publisher(&self, publisher: Option<Arc<Publisher>>) {
        *self.publisher.lock().unwrap_or_else(|p| p.into_inner()) = publisher;
    }

    fn in_hand_jobs(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<JobId>> {
        // A set of ids cannot be left half-updated by a panic.
        self.in_hand.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_in_hand(&self, job: JobId) -> InHand<'_> {
        self.in_hand_jobs().insert(job);
        InHand { worker: self, job }
    }

    async fn fleet_heartbeat(&self, (id, secret): &(uuid::Uuid, String)) {
        let current: Vec<uuid::Uuid> = self.in_hand_jobs().iter().map(|j| j.0).collect();
        let done = self.metrics.stats().results as i64;
        let toolchains = self.toolchains.known();
        if let Err(err) = self
            .store
            .consumer_heartbeat(*id, secret, &current, done, &toolchains)
            .await
        {
            tracing::warn!(error = %format!("{err:#}"), "cannot renew the fleet heartbeat");
        }
    }

    async fn handle(&self, delivery: Delivery) {
        self.metrics.in_progress.inc();
        // The job's trace, continued from the context its producer put in the headers.
        let span = tracing::info_span!("run job", job = tracing::field::Empty);
        quarry_infra::telemetry::extract(delivery.properties.headers().as_ref(), &span);
        async {
            match self.take(&delivery).await {
                Ok(None) => {}
                Ok(Some(taken)) => {
                    let _in_hand = self.take_in_hand(taken.job.id);
                    if let Err(err) = self.process(&taken).await {
                        // The result could not be recorded (database down?): let another
                        // attempt do it.
                        tracing::error!(error = %format!("{err:#}"), "job not processed; handing it back to the queue");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Err(err) = self.hand_back(&taken.lease).await {
                            tracing::error!(error = %format!("{err:#}"), "cannot hand the job back; its lease lapses and it is published again");
                        }
                    }
                }
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "job not taken; returning it to the queue");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Err(err) = give_back(&delivery).await {
                        tracing::error!(error = %format!("{err:#}"), "cannot return the delivery; the broker will redeliver it");
                    }
                }
            }
        }
        .instrument(span)
        .await;
        self.metrics.in_progress.dec();
    }

    /// Takes a delivered job on: holds its lease, then acks the delivery. `None` when there is
    /// nothing to do (an invalid message or a job of no run, dead-lettered; a job that has its
    /// result; a copy of a job another consumer holds), the delivery acked.
    async fn take(&self, delivery: &Delivery) -> anyhow::Result<Option<Taken>> {
        let publisher = self.publisher()?;
        let job = match Job::from_message(&delivery.data) {
            Ok(job) => job,
            Err(invalid) => {
                tracing::warn!(reason = %invalid, "dead-lettering an invalid message");
                publisher.dead_letter(&delivery.data, &invalid.0).await?;
                self.metrics.dead_lettered.inc();
                ack(delivery).await?;
                return Ok(None);
            }
        };
        tracing::Span::current().record("job", tracing::field::display(job.id));
        let state = self.store.job_state(&job).await?;
        if state == JobState::Finished {
            tracing::info!(job = %job.id, package = %job.package, "already has a result; skipping");
            self.metrics.duplicates_skipped.inc();
            // Its first delivery may have died after recording a regression's re-run and
            // before publishing it.
            self.publish_unpublished_reruns(&publisher, &job).await?;
            ack(delivery).await?;
            return Ok(None);
        }
        if state == JobState::Unknown {
            let reason = format!(
                "job {} is not recorded in the database (run deleted?)",
                job.id
            );
            publisher.dead_letter(&delivery.data, &reason).await?;
            self.metrics.dead_lettered.inc();
            ack(delivery).await?;
            return Ok(None);
        }
        let failed_attempts = queue::failed_attempts(&delivery.properties);
        let Some(lease) = self
            .leases
            .take(&job, &delivery.data, failed_attempts)
            .await?
        else {
            tracing::info!(job = %job.id, package = %job.package, "another consumer holds this job; dropping the copy");
            self.metrics.duplicates_skipped.inc();
            ack(delivery).await?;
            return Ok(None);
        };
        // The lease holds the job from now on. A failed ack only means the broker delivers
        // the message again: that copy finds the lease and is dropped.
        if let Err(err) = ack(delivery).await {
            tracing::warn!(job = %job.id, error = %format!("{err:#}"), "cannot ack a job taken on; its copy will be dropped");
        }
        Ok(Some(Taken { job, state, lease }))
    }

    /// Hands a job back to the work queue as it came (no attempt counted against it), for this
    /// or another consumer to take again.
    async fn hand_back(&self, lease: &Lease) -> anyhow::Result<()> {
        let publisher = self.publisher()?;
        let put_back = publisher.put_back(&lease.message, lease.failed_attempts);
        self.leases.hand_over(lease, put_back).await
    }

    /// A copy of a dead letter: recorded if the broker made it, then acked. A failure to record
    /// it gives it back, to be tried again.
    async fn handle_dead_letter(&self, delivery: Delivery) {
        let handled = match self.record_broker_dead_letter(&delivery).await {
            Ok(()) => ack(&delivery).await,
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "cannot record a dead letter; returning it");
                tokio::time::sleep(Duration::from_secs(1)).await;
                give_back(&delivery).await
            }
        };
        if let Err(err) = handled {
            tracing::error!(error = %format!("{err:#}"), "cannot settle a dead letter; the broker will deliver it again");
        }
    }

    /// Records the job of a message the broker dead-lettered itself (past the work queue's
    /// delivery limit, so no consumer got to record it) as an `error`, dead-lettered with the
    /// broker's reason. The consumers' own dead letters carry their reason and were recorded
    /// by them; those, and messages that are not jobs, need nothing.
    async fn record_broker_dead_letter(&self, delivery: &Delivery) -> anyhow::Result<()> {
        if queue::dead_letter_reason(&delivery.properties).is_some() {
            return Ok(());
        }
        let Some((why, _)) = queue::broker_death(&delivery.properties) else {
            return Ok(());
        };
        let Ok(job) = Job::from_message(&delivery.data) else {
            return Ok(());
        };
        if matches!(
            self.store.job_state(&job).await?,
            JobState::Finished | JobState::Unknown
        ) {
            return Ok(());
        }
        let reason = format!(
            "dead-lettered by the broker ({why}, after {} deliveries): each ended with its \
             consumer dying or giving it back (PostgreSQL unreachable, or a job that crashes \
             consumers?)",
            queue::previous_deliveries(&delivery.properties)
        );
        tracing::error!(job = %job.id, package = %job.package, %reason, "recording a job the broker gave up on");
        let attempt = queue::failed_attempts(&delivery.properties) + 1;
        self.record_verdict(&job, attempt, Outcome::Error, &reason, true, None)
            .await?;
        self.metrics.broker_dead_letters.inc();
        Ok(())
    }

    /// Runs a job this consumer holds the lease of and records its result (or hands it over
    /// to a delay queue, or back).
    async fn process(&self, taken: &Taken) -> anyhow::Result<()> {
        let Taken { job, state, lease } = taken;
        let state = *state;
        let holder = Some(self.leases.holder());
        let attempt = lease.failed_attempts + 1;
        if state == JobState::RunCancelled {
            // Recorded, not dropped: the run still ends with one result per job.
            return self
                .record_verdict(
                    job,
                    attempt,
                    Outcome::Skipped,
                    "skipped, the run was cancelled",
                    false,
                    holder,
                )
                .await;
        }
        let JobState::ToDo { crashes } = state else {
            unreachable!("every other state returned above")
        };
        if crashes >= queue::CRASH_LIMIT {
            let reason = format!(
                "started {crashes} times without ending: each time its consumer died while it \
                 ran (a job that crashes consumers?); not run again"
            );
            tracing::error!(job = %job.id, package = %job.package, %reason, "dead-lettering a crash-looping job");
            self.publisher()?
                .dead_letter(&lease.message, &reason)
                .await?;
            self.metrics.dead_lettered.inc();
            return self
                .record_verdict(job, attempt, Outcome::Error, &reason, true, holder)
                .await;
        }
        let started = Instant::now();
        let execution = self.execute(job, attempt).await;
        let elapsed = started.elapsed();
        let done = match execution {
            Ok(Plan::Record(done)) => *done,
            Ok(Plan::GiveBack) => return self.hand_back(lease).await,
            Ok(Plan::Wait { holder, toolchain }) => {
                self.store
                    .record_waiting(job, attempt as i32, &self.name, holder)
                    .await?;
                self.metrics.waits.inc();
                let publisher = self.publisher()?;
                if publisher.can_defer() {
                    let defer = publisher.defer(&lease.message, lease.failed_attempts);
                    return self.leases.hand_over(lease, defer).await;
                }
                // No delay queue to wait in (none configured): compute it after all.
                let (execution, ran_for) = match self
                    .run_experiment(job, attempt, &toolchain.installed)
                    .await
                {
                    Ok(Some((execution, ran_for))) => (execution, Some(ran_for)),
                    Ok(None) => return self.hand_back(lease).await,
                    Err(InfraError { why, .. }) => (Execution::error(why), None),
                };
                Done {
                    execution,
                    claim: None,
                    ran_for,
                    memo_key: None,
                    reused_from: None,
                    reused_log_key: None,
                    dead_lettered: None,
                    toolchain_build: Some(toolchain.installed.build.clone()),
                }
            }
            Err(InfraError { why: reason, host }) => {
                if host && self.cannot_set_up_steps(&reason).await {
                    // Not the job's fault: another consumer takes it, and this one stops.
                    return self.hand_back(lease).await;
                }
                self.store
                    .record_attempt_failed(job, attempt as i32, &self.name, &reason)
                    .await?;
                self.metrics.attempts_failed.inc();
                let publisher = self.publisher()?;
                if publisher.retries_left(attempt) {
                    tracing::warn!(job = %job.id, attempt, %reason, "attempt failed; retrying after a delay");
                    let retry = publisher.retry_later(&lease.message, attempt);
                    return self.leases.hand_over(lease, retry).await;
                }
                let reason = format!("gave up after {attempt} attempts: {reason}");
                self.publisher()?
                    .dead_letter(&lease.message, &reason)
                    .await?;
                self.metrics.dead_lettered.inc();
                Done {
                    execution: Execution::error(reason.clone()),
                    claim: None,
                    ran_for: None,
                    memo_key: None,
                    reused_from: None,
                    reused_log_key: None,
                    dead_lettered: Some(reason),
                    toolchain_build: None,
                }
            }
        };
        let Done {
            execution,
            claim,
            ran_for,
            memo_key,
            reused_from,
            reused_log_key,
            dead_lettered,
            toolchain_build,
        } = done;
        // How long it ran, not counting the wait for an experiment slot.
        let duration = ran_for.unwrap_or(elapsed);
        let environment = execution.environment();
        let broken_reason = execution.broken_reason();
        let (log, log_key, uploaded) = match reused_log_key {
            Some(key) => (Some(execution.log), Some(key), false),
            None => match self.save_log(job, &execution.log).await {
                Some(key) => (None, Some(key), true),
                None => (Some(execution.log), None, false),
            },
        };
        let refused = execution.refused.clone();
        // A job whose steps never ran here (reused, or ended before the first) cost nothing
        // worth recording.
        let cost = (!execution.cost.steps.is_empty()).then(|| (*execution.cost).clone());
        if let Some(cost) = &cost {
            self.metrics.observe_cost(cost);
        }
        let pairing = self.pairing(job).await;
        let (recorded, rerun) = self
            .store
            .record_result(
                &NewResult {
                    job_id: job.id,
                    run_id: job.run_id,
                    outcome: execution.outcome,
                    exit_code: execution.exit_code,
                    duration,
                    attempt: attempt as i32,
                    consumer: self.name.clone(),
                    log,
                    log_key: log_key.clone(),
                    memo_key,
                    reused_from,
                    environment,
                    refused: execution.refused,
                    broken_reason,
                    dead_lettered,
                    toolchain_build,
                    cost,
                    releases_claim: claim.is_some(),
                    lease_holder: holder,
                },
                pairing.as_ref(),
            )
            .await?;
        if let Some(claim) = claim {
            claim.released();
        }
        if let Some(rerun) = rerun {
            tracing::info!(package = %job.package, rerun = %rerun.id, side = %rerun.side(), "regressed; running its failing side once more");
            self.publish_rerun(&*self.publisher()?, &rerun).await?;
            // Kept until now, so that if this consumer died before publishing, the job's next
            // delivery would.
            self.leases.release(lease).await?;
        }
        if recorded {
            self.metrics
                .job_done(execution.outcome, duration.as_secs_f64());
            self.metrics.refused(&refused);
            if execution.outcome == Outcome::Timeout {
                self.metrics.sandbox_kills.inc();
            }
            tracing::info!(job = %job.id, package = %job.package, outcome = %execution.outcome, ?duration, "job finished");
        } else {
            self.metrics.duplicates_skipped.inc();
            if let (true, Some(key)) = (uploaded, &log_key)
                && let Err(err) = self.bucket.delete_log(key).await
            {
                tracing::warn!(error = %format!("{err:#}"), "cannot remove the log of a duplicate result");
            }
        }
        // The lease went with the result (or the re-run's publication): done.
        Ok(())
    }

    /// After a job's steps could not be set up (`why`): whether this consumer can set up any
    /// step at all (a scratch directory, the sandbox, a cgroup). If it cannot, it stops taking
    /// jobs and says why, rather than failing every job of the queue as an `error`; its run
    /// ends with that error, so a supervisor sees it.
    async fn cannot_set_up_steps(&self, why: &str) -> bool {
        if self.broken_why().is_some() {
            return true;
        }
        let Err(check) = experiment::check_host(&self.cargo, &self.jobs_dir).await else {
            return false;
        };
        let why = format!(
            "this consumer can no longer set up a job's steps ({why}; a check step failed too: \
             {check}): it stops taking jobs"
        );
        tracing::error!(consumer = %self.name, %why, "stopping");
        *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.stopping.cancel();
        true
    }

    fn broken_why(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn execute(&self, job: &Job, attempt: u32) -> Result<Plan, InfraError> {
        let file = self.definition(job.run_id).await.and_then(|definition| {
            quarry_core::job::toolchain_file(&definition.toolchain_files, &job.toolchain).cloned()
        });
        // The package downloads while the toolchain is found (installed, the first time). The
        // download lands in the disk cache, where the experiment finds it; a failed one is
        // tried again there and reported as such.
        let (leased, _) = tokio::join!(
            self.toolchains.lease(&job.toolchain, file.as_ref()),
            self.fetcher.fetch(&job.package)
        );
        let toolchain = leased.map_err(InfraError::from)?;
        let build = toolchain.installed.build.clone();
        let memo_key = job.memo_key(&build);
        // A re-run exists to see whether the first result happens again: never reused.
        let fresh = job.experiment.fresh || job.recheck_of.is_some();
        if !fresh {
            if let Some(reused) = self.reuse(&memo_key, &build).await? {
                return Ok(Plan::Record(Box::new(reused)));
            }
            let holder = self
                .store
                .claim_computation(&memo_key, job.id, &self.name, CLAIM_STALE_AFTER)
                .await
                .map_err(|e| InfraError::from(format!("cannot claim the computation: {e:#}")))?;
            if let Some(holder) = holder {
                return Ok(Plan::Wait { holder, toolchain });
            }
            // The twin that held the claim may have recorded its result, then released the
            // claim, between the look-up above and this claim: look again.
            if let Some(reused) = self.reuse(&memo_key, &build).await? {
                self.store
                    .release_computation(&memo_key, job.id)
                    .await
                    .map_err(|e| {
                        InfraError::from(format!("cannot release the computation: {e:#}"))
                    })?;
                return Ok(Plan::Record(Box::new(reused)));
            }
        }
        // Kept alive while computing and until the result is recorded.
        let claim = (!fresh).then(|| Claim::hold(self.store.clone(), memo_key.clone(), job.id));
        let (execution, ran_for) = match self
            .run_experiment(job, attempt, &toolchain.installed)
            .await
        {
            Ok(Some(ran)) => ran,
            // The claim goes with its drop.
            Ok(None) => return Ok(Plan::GiveBack),
            Err(failed) => {
                if let Some(claim) = claim {
                    claim.release().await;
                }
                return Err(failed);
            }
        };
        Ok(Plan::Record(Box::new(Done {
            execution,
            claim,
            ran_for: Some(ran_for),
            memo_key: Some(memo_key),
            reused_from: None,
            reused_log_key: None,
            dead_lettered: None,
            toolchain_build: Some(build),
        })))
    }

    /// The result of an identical job computed earlier, as this job's, if there is one.
    async fn reuse(&self, memo_key: &str, build: &str) -> Result<Option<Done>, InfraError> {
        let earlier = self
            .store
            .memoized_result(memo_key)
            .await
            .map_err(|e| InfraError::from(format!("cannot look up earlier results: {e:#}")))?;
        let Some(earlier) = earlier else {
            return Ok(None);
        };
        self.metrics.memoized.inc();
        Ok(Some(Done {
            claim: None,
            ran_for: None,
            execution: Execution {
                outcome: earlier.outcome,
                exit_code: earlier.exit_code,
                log: format!(
                    "quarry: reused the result of job {} (run {}): same package checksum, \
                     toolchain build ({}) and experiment\n\n{}",
                    earlier.job_id,
                    earlier.run_name,
                    build.lines().next().unwrap_or_default(),
                    earlier.log.unwrap_or_default()
                ),
                refused: earlier.refused,
                broken_reason: earlier.broken_reason,
                environment: earlier.environment,
                // It ran nothing here.
                cost: Default::default(),
            },
            memo_key: Some(memo_key.to_owned()),
            reused_from: Some(earlier.job_id),
            reused_log_key: earlier.log_key,
            dead_lettered: None,
            toolchain_build: Some(build.to_owned()),
        }))
    }

    /// For a job of a two-sided run (not itself a re-run): what `Store::record_result` needs to
    /// decide whether its package regressed. `None` for one-sided runs, and where the run's
    /// definition cannot be read (then nothing is re-run; the report still categorizes).
    async fn pairing(&self, job: &Job) -> Option<Pairing> {
        if job.recheck_of.is_some() {
            return None;
        }
        let definition = self.definition(job.run_id).await?;
        let [start, end] = <[String; 2]>::try_from(definition.side_labels()).ok()?;
        let (toolchain, patch) = definition.sides().pop()?;
        let end_job = Job::patched(
            job.run_id,
            job.package.clone(),
            toolchain,
            job.experiment.clone(),
            patch,
        );
        Some(Pairing {
            start,
            end,
            end_rerun: end_job.recheck(),
        })
    }

    /// A run's stored definition, read once per consumer.
    async fn definition(&self, run: RunId) -> Option<Arc<StoredDefinition>> {
        if let Some(known) = self.definitions.lock().await.get(&run) {
            return known.clone();
        }
        let read = match self.store.find_run(&run.to_string()).await {
            Ok(stored) => match StoredDefinition::of(&stored.definition) {
                Ok(definition) => Some(Arc::new(definition)),
                Err(err) => {
                    tracing::warn!(%run, %err, "cannot read the run's definition; its regressions will not be re-run");
                    None
                }
            },
            // The database hiccuped: try again with the next job.
            Err(err) => {
                tracing::warn!(%run, error = %format!("{err:#}"), "cannot read the run's definition");
                return None;
            }
        };
        self.definitions.lock().await.insert(run, read.clone());
        read
    }

    /// Publishes a regression's re-run and marks it published.
    async fn publish_rerun(&self, publisher: &Publisher, rerun: &Job) -> anyhow::Result<()> {
        publisher.publish_jobs([rerun]).await?;
        self.store.mark_published(&[rerun.id], None).await?;
        self.metrics.reruns.inc();
        Ok(())
    }

    /// Publishes the re-runs of `job`'s package that were recorded but never published.
    async fn publish_unpublished_reruns(
        &self,
        publisher: &Publisher,
        job: &Job,
    ) -> anyhow::Result<()> {
        if job.recheck_of.is_some() {
            return Ok(());
        }
        let reruns = self.store.unpublished_reruns(job).await?;
        if reruns.is_empty() {
            return Ok(());
        }
        let definition = self
            .definition(job.run_id)
            .await
            .context("cannot read the run's definition to publish a re-run")?;
        for stored in reruns {
            let rerun = definition.job(job.run_id, stored)?;
            self.publish_rerun(publisher, &rerun).await?;
        }
        Ok(())
    }

    /// Records a result Quarry decided without running the job (skipped, given up on), with
    /// `why` as its whole log, and as the reason it was dead-lettered if it was.
    async fn record_verdict(
        &self,
        job: &Job,
        attempt: u32,
        outcome: Outcome,
        why: &str,
        dead_lettered: bool,
        lease_holder: Option<uuid::Uuid>,
    ) -> anyhow::Result<()> {
        // An error or a skip is never a regression: nothing to pair.
        let (recorded, _) = self
            .store
            .record_result(
                &NewResult {
                    job_id: job.id,
                    run_id: job.run_id,
                    outcome,
                    exit_code: None,
                    duration: Duration::ZERO,
                    attempt: attempt as i32,
                    consumer: self.name.clone(),
                    log: Some(format!("quarry: {why}\n")),
                    log_key: None,
                    memo_key: None,
                    reused_from: None,
                    environment: None,
                    refused: Vec::new(),
                    broken_reason: None,
                    dead_lettered: dead_lettered.then(|| why.to_owned()),
                    toolchain_build: None,
                    cost: None,
                    releases_claim: false,
                    lease_holder,
                },
                None,
            )
            .await?;
        if recorded {
            self.metrics.job_done(outcome, 0.0);
        }
        Ok(())
    }

    /// Stores a job's log in S3, compressed, and returns its key; `None` when S3 would not take
    /// it after a few tries (the log is then kept in PostgreSQL: never lost for S3's sake).
    async fn save_log(&self, job: &Job, log: &str) -> Option<String> {
        use backon::Retryable as _;
        let key = self.bucket.log_key(job.run_id, job.id);
        let stored = (|| self.bucket.put_log(&key, log))
            .retry(
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_times(3)
                    .with_jitter(),
            )
            .await;
        match stored {
            Ok(()) => Some(key),
            Err(err) => {
                tracing::warn!(job = %job.id, error = %format!("{err:#}"), "S3 would not take the log; keeping it in PostgreSQL");
                self.metrics.logs_in_database.inc();
                None
            }
        }
    }

    /// Fetches the package and prepares its workspace (unpacked, patched, its dependencies
    /// resolved and downloaded), then, once one of the consumer's experiment slots is free, logs
    /// the attempt's `started` event and runs the experiment's steps that run the package's
    /// code: returns what it came to and how long it ran (resolving included, waiting for the
    /// slot not). Preparing runs none of the package's code, so it happens while other jobs hold
    /// the slots: a slot never waits on a download or a resolution, and a consumer's death is
    /// counted against the jobs whose code was running, not the ones it was preparing. `None`:
    /// the consumer is stopping and the job had not started.
    async fn run_experiment(
        &self,
        job: &Job,
        attempt: u32,
        toolchain: &Installed,
    ) -> Result<Option<(Execution, Duration)>, InfraError> {
        let archive = match self.fetcher.fetch(&job.package).await {
            Ok((bytes, source)) => {
                tracing::debug!(package = %job.package, ?source, "crate fetched");
                bytes
            }
            Err(FetchError::Missing(why)) => return Ok(Some((broken(&why), Duration::ZERO))),
            Err(FetchError::Unavailable(why)) => return Err(InfraError::from(why)),
        };
        let preparing = Instant::now();
        let (scratch, package_dir, resolved) = match self.prepare(job, archive, toolchain).await? {
            Ok(workspace) => workspace,
            Err(ended) => return Ok(Some((ended, preparing.elapsed()))),
        };
        let waiting = Instant::now();
        let slot = tokio::select! {
            // Biased: a stopping consumer starts nothing, even where a slot is free.
            biased;
            () = self.stopping.cancelled() => {
                tracing::info!(job = %job.id, package = %job.package, "stopping before the job started; giving it back");
                return Ok(None);
            }
            slot = self.slots.acquire() => slot,
        };
        self.store
            .start_attempt(job, attempt as i32, &self.name)
            .await
            .map_err(|e| InfraError::from(format!("cannot record the attempt's start: {e:#}")))?;
        tracing::info!(job = %job.id, package = %job.package, toolchain = %job.toolchain, attempt, "job started");
        let started = Instant::now();
        let slot_wait = started - waiting;
        let resolving = resolved.spent;
        let variant = format!("{} {:?}", job.toolchain, job.experiment.cap_lints);
        let shared_target =
            self.slots
                .target(&slot, job.experiment.mode, &toolchain.rustup_name, &variant);
        let workspace = experiment::Workspace {
            scratch: scratch.path(),
            package_dir: &package_dir,
            shared_target: shared_target.as_deref(),
        };
        let mut execution = experiment::run(
            &self.cargo,
            workspace,
            toolchain,
            resolved,
            self.limits(job),
        )
        .await
        .map_err(|e| InfraError::host(format!("cannot set up or run the job's steps: {e}")))?;
        let ran_for = resolving + started.elapsed();
        // Measured before the slot's next job adds to it.
        let kept = self.slots.after_job(&slot).await;
        if shared_target.is_some() {
            self.metrics.shared_target_observe(kept);
        }
        // The next job's code may start while this one's files are measured and removed.
        drop(slot);
        execution.cost.slot_wait_ms = u64::try_from(slot_wait.as_millis()).unwrap_or(u64::MAX);
        execution.cost.disk_bytes = scratch.disk_used().await + kept.added_bytes;
        scratch.remove_in_background();
        Ok(Some((execution, ran_for)))
    }

    /// What a job's experiment may use.
    fn limits(&self, job: &Job) -> experiment::Limits {
        experiment::Limits {
            time: Duration::from_secs(job.experiment.timeout_secs),
            memory_bytes: job.experiment.memory_limit_mb.saturating_mul(1 << 20),
            tasks: self.cargo.task_limit,
        }
    }

    /// The job's scratch directory with the package unpacked (and patched) in it and its
    /// dependencies resolved, the package's directory, and the experiment so far; `Err` holds
    /// the job's outcome when the package cannot be unpacked, patched or resolved.
    async fn prepare(
        &self,
        job: &Job,
        archive: bytes::Bytes,
        toolchain: &Installed,
    ) -> Result<Result<(ScratchDir, PathBuf, experiment::Resolved), Execution>, InfraError> {
        let scratch = self.jobs_dir.join(job.id.to_string());
        let keep = self
            .keep_packages
            .as_ref()
            .map(|dir| dir.join(job.id.to_string()));
        let scratch = ScratchDir::create(&scratch, keep)
            .map_err(|e| InfraError::host(format!("cannot create {}: {e}", scratch.display())))?;
        let root = format!("{}-{}", job.package.name, job.package.version);
        let package_dir = match unpack_off_thread(archive, scratch.path().join("src"), root).await?
        {
            Ok(dir) => dir,
            Err(why) => {
                let mut refused = Refused::default();
                refused.add(Refusal::UnpackRefused, why);
                return Ok(Err(Execution::broken(
                    "cannot unpack the package",
                    &refused,
                )));
            }
        };
        // The trust boundary: what the package ships for cargo to obey is removed or refused
        // before cargo reads any of it.
        let mut refused = Refused::default();
        if let Err(why) = prepare::package(scratch.path(), &package_dir, &mut refused) {
            return Ok(Err(
                Execution::broken(&why, &refused).because(BrokenReason::InvalidManifest)
            ));
        }
        if let Some(patch) = &job.patch
            && let Err(not_applied) = self
                .apply_patch(patch, scratch.path(), &package_dir, &mut refused)
                .await
        {
            return not_applied.map(Err);
        }
        if refused.ends_the_job() {
            return Ok(Err(Execution::broken(
                "not resolved: the package needs what Quarry does not fetch",
                &refused,
            )));
        }
        let workspace = experiment::Workspace {
            scratch: scratch.path(),
            package_dir: &package_dir,
            shared_target: None,
        };
        let resolved = experiment::resolve(
            &self.cargo,
            &self.mirror,
            workspace,
            toolchain,
            &job.experiment,
            self.limits(job),
            refused,
        )
        .await
        .map_err(|e| InfraError::host(format!("cannot set up or run the job's steps: {e}")))?;
        Ok(resolved.map(|resolved| (scratch, package_dir, resolved)))
    }

    /// Replaces a dependency of the unpacked package, before anything resolves it: the patch's
    /// `.crate` (through the caches, or as uploaded with the run) is unpacked beside the package,
    /// its manifest checked as the package's is (into `refused`), and named in a
    /// `[patch.crates-io]` table appended to the package's manifest (`cargo package` strips any
    /// the author had). `Err` holds what the job comes to when that cannot be done.
    async fn apply_patch(
        &self,
        patch: &Patch,
        scratch: &std::path::Path,
        package_dir: &std::path::Path,
        refused: &mut Refused,
    ) -> Result<(), Result<Execution, InfraError>> {
        let replacement = PackageVersion {
            name: patch.name.clone(),
            version: patch.version.clone(),
            checksum: patch.checksum.clone(),
        };
        fn not_applied(
            why: String,
            refused: &Refused,
        ) -> Result<(), Result<Execution, InfraError>> {
            Err(Ok(
                Execution::broken(&why, refused).because(BrokenReason::PatchNotApplied)
            ))
        }
        let archive = match &patch.source {
            PatchSource::Registry => match self.fetcher.fetch(&replacement).await {
                Ok((bytes, _)) => bytes,
                Err(FetchError::Missing(why)) => {
                    return not_applied(format!("cannot fetch the patch {patch}: {why}"), refused);
                }
                Err(FetchError::Unavailable(why)) => return Err(Err(InfraError::from(why))),
            },
            PatchSource::Upload { key } => match self.bucket.get_patch(key).await {
                Ok(Some(bytes)) if fetch::checksum_matches(&bytes, &patch.checksum) => bytes,
                Ok(Some(_)) => {
                    return Err(Err(InfraError::from(format!(
                        "the uploaded patch s3://{}/{key} does not match its checksum",
                        self.bucket.bucket()
                    ))));
                }
                Ok(None) => {
                    return not_applied(
                        format!(
                            "the uploaded patch {patch} is gone from s3://{}/{key}",
                            self.bucket.bucket()
                        ),
                        refused,
                    );
                }
                Err(err) => return Err(Err(InfraError::from(format!("{err:#}")))),
            },
        };
        let root = format!("{}-{}", patch.name, patch.version);
        let patch_dir = match unpack_off_thread(archive, scratch.join("patches"), root).await {
            Ok(Ok(dir)) => dir,
            Ok(Err(why)) => {
                refused.add(Refusal::UnpackRefused, format!("the patch {patch}: {why}"));
                return not_applied(format!("cannot unpack the patch {patch}"), refused);
            }
            Err(infra) => return Err(Err(infra)),
        };
        if let Err(why) = prepare::patch(&patch_dir, &patch.to_string(), refused) {
            return not_applied(format!("the patch {patch}: {why}"), refused);
        }
        let manifest = package_dir.join("Cargo.toml");
        let table = format!(
            "\n[patch.crates-io]\n{} = {{ path = {} }}\n",
            toml::Value::String(patch.name.clone()),
            toml::Value::String(patch_dir.display().to_string()),
        );
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(&manifest)
            .and_then(|mut file| std::io::Write::write_all(&mut file, table.as_bytes()));
        if let Err(err) = appended {
            return not_applied(
                format!("cannot add the patch to {}: {err}", manifest.display()),
                refused,
            );
        }
        Ok(())
    }
}

/// Unpacks a `.crate` (see [`unpack::unpack`]) on a blocking thread: the package's directory, or
/// why the archive was refused.
async fn unpack_off_thread(
    archive: bytes::Bytes,
    into: PathBuf,
    root: String,
) -> Result<Result<PathBuf, String>, InfraError> {
    tokio::task::spawn_blocking(move || unpack::unpack(&archive, &into, &root))
        .await
        .map_err(|err| InfraError::from(format!("unpacking panicked: {err}")))
}

fn broken(why: &str) -> Execution {
    Execution::broken(why, &Refused::default())
}

/// Returns a delivery to the queue, for this or another consumer to take again.
async fn give_back(delivery: &Delivery) -> anyhow::Result<()> {
    delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .context("cannot give the delivery back")?;
    Ok(())
}

async fn ack(delivery: &Delivery) -> anyhow::Result<()> {
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .context("cannot ack the delivery")?;
    Ok(())
}

/// A job's scratch directory, removed when the job is done with it (whatever happened).
struct ScratchDir(PathBuf, Option<PathBuf>);

/// Scratch directories being removed are first renamed to a name starting with this, so a job
/// that comes back to the same consumer at once gets a fresh directory under its own name.
const REMOVED_SCRATCH: &str = ".removed-";

impl ScratchDir {
    /// A fresh scratch directory at `path`; `keep`, where its unpacked package goes when it is
    /// removed (`consumer.keep_packages`).
    fn create(path: &std::path::Path, keep: Option<PathBuf>) -> std::io::Result<ScratchDir> {
        if path.exists() {
            std::fs::remove_dir_all(path)?;
        }
        std::fs::create_dir_all(path)?;
        Ok(ScratchDir(path.to_owned(), keep))
    }

    /// Moves the unpacked package (as prepared and resolved) to where it is kept, if anywhere.
    fn keep_package(&mut self) {
        let Some(keep) = self.1.take() else {
            return;
        };
        let src = self.0.join("src");
        if !src.exists() {
            return;
        }
        let moved = keep
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                if keep.exists() {
                    std::fs::remove_dir_all(&keep)?;
                }
                std::fs::rename(&src, &keep)
            });
        if let Err(err) = moved {
            tracing::warn!(dir = %keep.display(), %err, "cannot keep the job's package");
        }
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// The disk its files take, walked off the runtime's threads.
    async fn disk_used(&self) -> u64 {
        let dir = self.0.clone();
        tokio::task::spawn_blocking(move || shared_target::disk_used(&dir))
            .await
            .unwrap_or(0)
    }

    /// Removes the directory on a blocking thread, without waiting for it: a job's files can be
    /// many, and removing them holds up nothing. Falls back to removing it here when it cannot
    /// be moved aside.
    fn remove_in_background(mut self) {
        self.keep_package();
        let path = std::mem::take(&mut self.0);
        let aside = path.with_file_name(format!(
            "{REMOVED_SCRATCH}{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        match std::fs::rename(&path, &aside) {
            Ok(()) => {
                tokio::task::spawn_blocking(move || remove_scratch(&aside));
            }
            Err(_) => remove_scratch(&path),
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Empty once removed in the background.
        if !self.0.as_os_str().is_empty() {
            self.keep_package();
            remove_scratch(&self.0);
        }
    }
}

fn remove_scratch(dir: &std::path::Path) {
    if let Err(err) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), %err, "cannot remove a scratch directory");
    }
}

/// Removes what a consumer of the same name left in its jobs directory when it died: scratch
/// directories being removed.
fn remove_leftover_scratch(jobs_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(jobs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Not gateway sockets: a consumer of the same name may still be using them (one left by
        // a consumer that died is an empty file, replaced when its job's name comes again).
        if name.starts_with(REMOVED_SCRATCH) {
            remove_scratch(&entry.path());
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}

fn default_name() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

/// What names the host resources a consumer process owns alone (its steps' cgroups): its name
/// and the start of its fleet id, so that two consumers of one name never share them.
fn owner_of(name: &str, id: uuid::Uuid) -> String {
    let id = id.simple().to_string();
    format!("{name}-{}", &id[..8])
}

/// The environment of the consumer's cargo steps: the toolchains (its own rustup home and those
/// installed on demand, read-only), the sandbox and the cgroups its steps run in (`owner` names
/// the consumer's own). Each job has a cargo home of its own (`prepare::write_cargo_home`).
async fn prepare_cargo_env(
    config: &Config,
    owner: &str,
    toolchains: [&PathBuf; 2],
    path: String,
) -> anyhow::Result<CargoEnv> {
    let sandbox = if config.consumer.unsandboxed {
        tracing::warn!(
            "RUNNING UNSANDBOXED: packages' build scripts and tests run with this consumer's \
             privileges, network and files"
        );
        Sandbox::Unsandboxed
    } else {
        // The toolchains and cargo's rustup proxy, read-only.
        let cargo_bin = sandbox::find_on_path("cargo")
            .and_then(|cargo| cargo.parent().map(PathBuf::from))
            .context("cargo is not on PATH")?;
        // Those installed on demand too: the directory must exist to be mounted.
        std::fs::create_dir_all(toolchains[1])
            .with_context(|| format!("cannot create {}", toolchains[1].display()))?;
        let mut read_only: Vec<PathBuf> = toolchains.into_iter().cloned().collect();
        read_only.push(cargo_bin);
        let mut sandbox = Sandbox::bubblewrap(read_only).await?;
        sandbox.hide(&config.secret_files());
        sandbox
    };
    let cgroups = match cgroup::Cgroups::detect(owner) {
        Ok(cgroups) => {
            tracing::info!(
                cgroups = %cgroups.describe(),
                "each experiment step gets its own cgroup: memory and processes limited for \
                 its whole process tree"
            );
            Some(cgroups)
        }
        Err(why) if sandbox.limits_tasks() => {
            tracing::warn!(
                %why,
                "no cgroups: memory is limited per process (address space), processes per step \
                 (RLIMIT_NPROC in its sandbox)"
            );
            None
        }
        Err(why) => {
            tracing::warn!(
                %why,
                "no cgroups: memory is limited per process (address space), processes are not \
                 (unsandboxed, or no prlimit)"
            );
            None
        }
    };
    let confine = if config.consumer.shared_target_mb == 0 {
        None
    } else {
        match confine_here(&sandbox).await {
            Ok(confine) => {
                tracing::info!(
                    confine = %confine.display(),
                    "slots keep their target directories across jobs: build scripts and rustc \
                     confined with Landlock"
                );
                Some(confine)
            }
            Err(why) => {
                tracing::warn!(
                    %why,
                    "every job builds its dependencies from nothing: no target directory is kept \
                     across jobs"
                );
                None
            }
        }
    };
    Ok(CargoEnv {
        path,
        log_limit_bytes: config.consumer.log_limit_bytes,
        task_limit: config.consumer.task_limit,
        sandbox,
        cgroups,
        confine,
        sources: None,
    })
}

/// The consumer's store of extracted dependency sources (`sources.rs`), where jobs can share
/// one: only in the sandbox (unsandboxed, a build script could write it), within
/// `consumer.sources_mb`, and owned by this process alone.
fn open_sources(
    config: &Config,
    name: &str,
    sandbox: &Sandbox,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Arc<sources::Sources>>> {
    if config.consumer.sources_mb == 0 {
        tracing::info!("consumer.sources_mb is 0: every job extracts its dependencies' sources");
        return Ok(None);
    }
    if matches!(sandbox, Sandbox::Unsandboxed) {
        tracing::warn!(
            "unsandboxed: every job extracts its dependencies' sources (a package's code could \
             write a shared copy)"
        );
        return Ok(None);
    }
    let dir = std::path::absolute(config.consumer.work_dir.join(name).join("sources"))?;
    let opened = sources::Sources::open(
        dir.clone(),
        config.consumer.sources_mb.saturating_mul(1 << 20),
        metrics,
    )
    .with_context(|| format!("cannot open the store of sources {}", dir.display()))?;
    match opened {
        Some(sources) => {
            tracing::info!(
                dir = %dir.display(),
                "dependencies' sources are extracted once and shared read-only by every job"
            );
            Ok(Some(Arc::new(sources)))
        }
        None => {
            tracing::warn!(
                dir = %dir.display(),
                "another consumer of this name owns the store of sources: every job extracts \
                 its dependencies' sources"
            );
            Ok(None)
        }
    }
}

/// `quarry-confine`, found and checked to confine on this machine (`confine.rs`): beside this
/// program (or, for a test binary, one directory up), else on `PATH`.
async fn confine_here(sandbox: &Sandbox) -> Result<PathBuf, String> {
    if matches!(sandbox, Sandbox::Unsandboxed) {
        return Err("unsandboxed: nothing would hold the package's code to it".to_owned());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let confine = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("quarry-confine"))
        .find(|path| path.is_file())
        .or_else(|| sandbox::find_on_path("quarry-confine"))
        .ok_or("quarry-confine is not installed beside the consumer nor on PATH")?;
    let probe = tokio::process::Command::new(&confine)
        .arg("probe")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", confine.display()))?;
    if !probe.status.success() {
        return Err(format!(
            "Landlock cannot confine here (Linux 6.2 or later, with Landlock enabled, is needed): \
             {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    Ok(confine)
}

/// The consumer's own rustup home: where the toolchains it comes with are.
fn rustup_home() -> anyhow::Result<PathBuf> {
    std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")))
        .context("cannot find the rustup home: set RUSTUP_HOME")
}

/// Refuses a jobs directory the trust boundary cannot hold in: one whose gateway sockets would
/// not fit a Unix socket's path, or with a cargo configuration above it that the steps would
/// see (cargo reads one in every directory from the package's up). Nothing a job runs can
/// write above its scratch directory; this makes sure nothing else left one there either.
fn check_jobs_dir(jobs_dir: &std::path::Path, sandbox: &Sandbox) -> anyhow::Result<()> {
    // A job's socket: `<jobs dir>/<uuid>.sock`.
    let socket = jobs_dir.join(format!("{}.sock", uuid::Uuid::nil()));
    if socket.as_os_str().len() > gateway::MAX_SOCKET_PATH {
        anyhow::bail!(
            "the jobs directory {} is too long a path for the jobs' registry sockets ({} bytes \
             at most, with a job's name): choose a shorter consumer.work_dir",
            jobs_dir.display(),
            gateway::MAX_SOCKET_PATH
        );
    }
    for dir in jobs_dir.ancestors() {
        for config in [".cargo/config", ".cargo/config.toml"] {
            let config = dir.join(config);
            if config.exists() && sandbox.shows(&config) {
                anyhow::bail!(
                    "{} would be read by cargo in every job (it is above the jobs directory {}): \
                     remove it, or choose a consumer.work_dir outside {}",
                    config.display(),
                    jobs_dir.display(),
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cargo_configuration_above_the_jobs_directory_keeps_the_consumer_from_starting() {
        let root = tempfile::tempdir().unwrap();
        let jobs = root.path().join("work/consumer/jobs");
        std::fs::create_dir_all(&jobs).unwrap();
        check_jobs_dir(&jobs, &Sandbox::Unsandboxed).unwrap();
        std::fs::create_dir_all(root.path().join("work/.cargo")).unwrap();
        std::fs::write(root.path().join("work/.cargo/config.toml"), "[alias]\n").unwrap();
        let err = check_jobs_dir(&jobs, &Sandbox::Unsandboxed)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("work/.cargo/config.toml would be read by cargo"),
            "{err}"
        );
        let long = root.path().join("x".repeat(100));
        let err = check_jobs_dir(&long, &Sandbox::Unsandboxed)
            .unwrap_err()
            .to_string();
        assert!(err.contains("too long a path"), "{err}");
    }
}
