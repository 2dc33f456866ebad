//! The producer: turns an experiment definition into a run and its jobs.
//!
//! One invocation creates (or resumes) the run in PostgreSQL, pages the registry, and for each
//! page: reads every selected crate's versions from the sparse index, records the page's jobs in
//! PostgreSQL, publishes those not yet published, waits for the broker's confirms, and marks them
//! published. Only then does it ask for the next page, so an interrupted producer loses at most
//! the page in hand, and a re-run publishes nothing twice.

use std::collections::BTreeMap;

use anyhow::Context as _;
use futures::StreamExt as _;
use quarry_shared::Config;
use quarry_shared::job::{Experiment, Job, PackageVersion, RunId, Toolchain};
use quarry_shared::queue::{Broker, Publisher};
use quarry_shared::registry::{IndexEntry, RegistryClient, RegistryError};
use quarry_shared::store::Store;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Index files fetched at once while expanding a page.
const INDEX_CONCURRENCY: usize = 8;

/// Which packages a run covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Selection {
    /// Page the registry's crate listing, in `sort` order, stopping after `limit` crates.
    Listing { sort: Sort, limit: Option<u64> },
    /// Exactly these packages (`name` for the newest version, or `name@version`).
    Packages { packages: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Sort {
    /// Alphabetical, as the registry lists them.
    Alpha,
    /// Most downloaded first.
    Downloads,
}

impl Sort {
    fn as_query(self) -> &'static str {
        match self {
            Sort::Alpha => "alpha",
            Sort::Downloads => "downloads",
        }
    }
}

/// Everything that defines a run; stored with it, and compared when a run is resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDefinition {
    pub toolchains: Vec<Toolchain>,
    pub experiment: Experiment,
    pub selection: Selection,
}

impl RunDefinition {
    /// The definition stored with `run`.
    pub fn of(run: &quarry_shared::store::Run) -> anyhow::Result<RunDefinition> {
        serde_json::from_value(run.definition.clone()).with_context(|| {
            format!(
                "run {} has a definition this producer cannot read",
                run.name
            )
        })
    }
}

/// What one producer invocation did: the outcome output, printed and stored with the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishSummary {
    pub run_id: RunId,
    pub run_name: String,
    /// The run existed and this invocation continued it.
    pub resumed: bool,
    /// Pages read by this invocation.
    pub pages: u64,
    /// Package versions selected for the run so far (by every invocation).
    pub packages_selected: u64,
    /// Jobs of the run so far (by every invocation).
    pub jobs_total: u64,
    /// Jobs this invocation published.
    pub jobs_queued: u64,
    /// Jobs already published (or finished) before this invocation.
    pub jobs_already_queued_or_done: u64,
    /// Packages left out, with why (no usable version, index unreadable, ...).
    pub packages_failed: BTreeMap<String, String>,
    /// False when interrupted: re-run the same command to continue.
    pub complete: bool,
}

impl std::fmt::Display for PublishSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "run {} ({}){}",
            self.run_name,
            self.run_id,
            if self.resumed { ", resumed" } else { "" }
        )?;
        writeln!(
            f,
            "{} packages selected over {} page(s): {} jobs, {} queued now, {} already queued or done",
            self.packages_selected,
            self.pages,
            self.jobs_total,
            self.jobs_queued,
            self.jobs_already_queued_or_done
        )?;
        if !self.packages_failed.is_empty() {
            writeln!(f, "{} packages left out:", self.packages_failed.len())?;
            for (name, why) in &self.packages_failed {
                writeln!(f, "  {name}: {why}")?;
            }
        }
        if !self.complete {
            writeln!(
                f,
                "interrupted: run the same command again to continue where this one stopped"
            )?;
        }
        Ok(())
    }
}

/// Reads a package list: one `name` or `name@version` per line; blank lines and `#` comments
/// are ignored. Every line is checked, and the first bad one is named in the error.
pub fn read_package_list(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the package list {}", path.display()))?;
    let mut packages = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        check_package_spec(line).with_context(|| {
            format!("{}:{}: invalid entry {line:?}", path.display(), number + 1)
        })?;
        packages.push(line.to_owned());
    }
    anyhow::ensure!(
        !packages.is_empty(),
        "the package list {} names no package",
        path.display()
    );
    Ok(packages)
}

/// `name` or `name@version`, as crates.io allows them.
pub fn check_package_spec(spec: &str) -> anyhow::Result<()> {
    let (name, version) = match spec.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    };
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{name:?} is not a crate name"
    );
    if let Some(version) = version {
        semver::Version::parse(version)
            .with_context(|| format!("{version:?} is not a semver version"))?;
    }
    Ok(())
}

/// Run names become directory names in reports: keep them plain.
pub fn validate_run_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    anyhow::ensure!(
        ok,
        "invalid run name {name:?}: use 1 to 64 letters, digits, '.', '-' or '_', not starting with '.'"
    );
    Ok(())
}

/// Creates or resumes the run `name` and publishes its jobs, page by page, until the selection is
/// exhausted or `shutdown` is cancelled (then the page in hand is finished first).
pub async fn publish_run(
    config: &Config,
    name: &str,
    definition: &RunDefinition,
    shutdown: &CancellationToken,
) -> anyhow::Result<PublishSummary> {
    validate_run_name(name)?;
    anyhow::ensure!(
        !definition.toolchains.is_empty(),
        "a run needs at least one toolchain"
    );
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    let broker = Broker::connect(&config.rabbitmq).await?;
    let publisher = broker.publisher().await?;
    let registry = RegistryClient::new(&config.registry)?
        .with_index_cache(config.registry.producer_index_cache())?;

    let definition_json = serde_json::to_value(definition)?;
    let (run, resumed) = store.create_or_resume_run(name, &definition_json).await?;
    anyhow::ensure!(
        run.cancelled_at.is_none(),
        "run {name} was cancelled; start a run under another name"
    );
    tracing::info!(run = %run.id, name, resumed, "publishing run");

    let mut summary = PublishSummary {
        run_id: run.id,
        run_name: run.name.clone(),
        resumed,
        ..PublishSummary::default()
    };
    let mut pages = Pages::new(&registry, &definition.selection, config.registry.page_size);
    // A resumed run continues from the page after the last one it published.
    if let Some(position) = run
        .paging_position
        .as_ref()
        .and_then(|p| serde_json::from_value::<PagingPosition>(p.clone()).ok())
    {
        tracing::info!(?position, "continuing from the saved paging position");
        pages.position = position;
    }
    let mut interrupted = false;
    while let Some(page) = pages.next().await? {
        summary.pages += 1;
        let mut jobs = Vec::new();
        let resolved = futures::stream::iter(page)
            .map(|request| resolve(&registry, request))
            .buffered(INDEX_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for (name, resolution) in resolved {
            match resolution {
                Ok(package) => {
                    for toolchain in &definition.toolchains {
                        jobs.push(Job::new(
                            run.id,
                            package.clone(),
                            toolchain.clone(),
                            definition.experiment.clone(),
                        ));
                    }
                }
                Err(why) => {
                    tracing::warn!(package = %name, %why, "package left out");
                    summary.packages_failed.insert(name, why);
                }
            }
        }
        let published = publish_page(&store, &publisher, &jobs).await?;
        store
            .save_paging_position(run.id, &serde_json::to_value(&pages.position)?)
            .await?;
        summary.jobs_queued += published;
        tracing::info!(
            page = summary.pages,
            jobs = jobs.len(),
            queued = summary.jobs_queued,
            "page published"
        );
        if shutdown.is_cancelled() {
            interrupted = true;
            break;
        }
    }
    let (jobs, packages) = store.recorded(run.id).await?;
    summary.jobs_total = jobs as u64;
    summary.packages_selected = packages as u64;
    summary.jobs_already_queued_or_done = summary.jobs_total - summary.jobs_queued;
    summary.complete = !interrupted;
    if summary.complete {
        store
            .finish_publishing(run.id, &serde_json::to_value(&summary)?)
            .await?;
    }
    broker.close().await;
    Ok(summary)
}

/// Records a page's jobs, publishes the ones not yet published, and marks them once confirmed.
/// Returns how many were published.
async fn publish_page(store: &Store, publisher: &Publisher, jobs: &[Job]) -> anyhow::Result<u64> {
    let pending = store.record_jobs(jobs).await?;
    let to_publish: Vec<&Job> = jobs.iter().filter(|j| pending.contains(&j.id)).collect();
    publisher
        .publish_jobs(to_publish.iter().copied())
        .await
        .context("publishing a page of jobs failed; re-run the producer to continue")?;
    store.mark_published(&pending).await?;
    Ok(pending.len() as u64)
}

/// A package to look up: a name, and optionally the exact version wanted.
#[derive(Debug, Clone)]
struct Request {
    name: String,
    version: Option<String>,
}

/// Where paging has got to: saved with the run after every published page.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PagingPosition {
    /// The registry's query for the next page (`None` before the first).
    next: Option<String>,
    /// Crates taken from the listing so far (counts towards the limit).
    taken: u64,
    done: bool,
}

/// Pages of package requests, from the registry listing or from an explicit list.
struct Pages<'a> {
    registry: &'a RegistryClient,
    selection: &'a Selection,
    page_size: u32,
    position: PagingPosition,
}

impl<'a> Pages<'a> {
    fn new(registry: &'a RegistryClient, selection: &'a Selection, page_size: u32) -> Pages<'a> {
        Pages {
            registry,
            selection,
            page_size: page_size.clamp(1, 100),
            position: PagingPosition::default(),
        }
    }

    async fn next(&mut self) -> anyhow::Result<Option<Vec<Request>>> {
        if self.position.done {
            return Ok(None);
        }
        match self.selection {
            Selection::Packages { packages } => {
                self.position.done = true;
                Ok(Some(packages.iter().map(|spec| parse_spec(spec)).collect()))
            }
            Selection::Listing { sort, limit } => {
                let remaining = limit.map_or(u64::MAX, |l| l.saturating_sub(self.position.taken));
                if remaining == 0 {
                    self.position.done = true;
                    return Ok(None);
                }
                let per_page = self
                    .page_size
                    .min(u32::try_from(remaining).unwrap_or(u32::MAX));
                let first = format!("?page=1&per_page={per_page}&sort={}", sort.as_query());
                let query = self.position.next.clone().unwrap_or(first);
                let page = self
                    .registry
                    .crates_page(Some(&query), per_page)
                    .await
                    .context("cannot read the registry's crate listing")?;
                let requests: Vec<Request> = page
                    .crates
                    .into_iter()
                    .take(usize::try_from(remaining).unwrap_or(usize::MAX))
                    .map(|c| Request {
                        name: c.name,
                        version: None,
                    })
                    .collect();
                self.position.taken += requests.len() as u64;
                self.position.next = page.meta.next_page;
                self.position.done = self.position.next.is_none()
                    || requests.is_empty()
                    || limit.is_some_and(|l| self.position.taken >= l);
                Ok(Some(requests))
            }
        }
    }
}

fn parse_spec(spec: &str) -> Request {
    match spec.split_once('@') {
        Some((name, version)) => Request {
            name: name.trim().to_owned(),
            version: Some(version.trim().to_owned()),
        },
        None => Request {
            name: spec.trim().to_owned(),
            version: None,
        },
    }
}

/// Looks the request up in the index: the exact version asked for, or else the newest version
/// that is neither yanked nor a pre-release.
async fn resolve(
    registry: &RegistryClient,
    request: Request,
) -> (String, Result<PackageVersion, String>) {
    let label = match &request.version {
        Some(v) => format!("{}@{v}", request.name),
        None => request.name.clone(),
    };
    let entries = match registry.index_entries(&request.name).await {
        Ok(entries) => entries,
        Err(RegistryError::NotFound(_)) => {
            return (label, Err("not in the registry's index".to_owned()));
        }
        Err(err) => return (label, Err(err.to_string())),
    };
    let chosen = match &request.version {
        Some(version) => entries.iter().find(|e| &e.vers == version),
        None => newest_stable(&entries),
    };
    let result = chosen
        .map(|e| PackageVersion {
            name: e.name.clone(),
            version: e.vers.clone(),
            checksum: e.cksum.clone(),
        })
        .ok_or_else(|| match &request.version {
            Some(v) => format!("version {v} is not in the index"),
            None => "no version that is neither yanked nor a pre-release".to_owned(),
        });
    (label, result)
}

fn newest_stable(entries: &[IndexEntry]) -> Option<&IndexEntry> {
    entries
        .iter()
        .filter(|e| !e.yanked)
        .filter_map(|e| Some((semver::Version::parse(&e.vers).ok()?, e)))
        .filter(|(v, _)| v.pre.is_empty())
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, e)| e)
}

/// Which packages of an earlier run a new run takes (`--from-run RUN --only ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Only {
    /// Passed with the start toolchain, failed with the end one (two-toolchain runs).
    Regressed,
    /// Hit a limit (time, memory) on one side only: confirm or dismiss them.
    Spurious,
    /// Failed to build or test, or hit a limit, with any toolchain.
    Failed,
    /// Got an `error` (Quarry's infrastructure) with any toolchain.
    Errored,
    /// Could not be unpacked or resolved.
    Broken,
}

/// The packages (`name@version`) of an earlier run that match any of `only`, to start a run of
/// just those: confirming a fix or a flaky result without re-running everything.
pub async fn packages_from_run(
    config: &Config,
    run: &str,
    only: &[Only],
) -> anyhow::Result<Vec<String>> {
    use quarry_shared::category::{Category, categorize};
    use quarry_shared::job::Outcome;
    let store = Store::connect(&config.database).await?;
    let run = store.find_run(run).await?;
    let definition = RunDefinition::of(&run)?;
    let pair = match definition.toolchains.as_slice() {
        [start, end] => Some((start.to_string(), end.to_string())),
        _ => None,
    };
    if pair.is_none()
        && only
            .iter()
            .any(|o| matches!(o, Only::Regressed | Only::Spurious))
    {
        anyhow::bail!(
            "run {} has one toolchain: nothing in it regressed; use --only failed, errored or broken",
            run.name
        );
    }
    let mut packages: BTreeMap<(String, String), Vec<(String, Outcome)>> = BTreeMap::new();
    for (name, version, toolchain, outcome) in store.package_outcomes(run.id).await? {
        packages
            .entry((name, version))
            .or_default()
            .push((toolchain, outcome));
    }
    let selected = packages
        .into_iter()
        .filter(|(_, sides)| {
            let category = pair.as_ref().map(|(start, end)| {
                let side = |t: &str| sides.iter().find(|(s, _)| s == t).map(|(_, o)| *o);
                categorize(side(start), side(end))
            });
            let any = |wanted: &[Outcome]| sides.iter().any(|(_, o)| wanted.contains(o));
            only.iter().any(|only| match only {
                Only::Regressed => category == Some(Category::Regressed),
                Only::Spurious => matches!(
                    category,
                    Some(Category::SpuriousRegressed | Category::SpuriousFixed)
                ),
                Only::Failed => any(&[
                    Outcome::BuildFail,
                    Outcome::TestFail,
                    Outcome::Timeout,
                    Outcome::OutOfMemory,
                ]),
                Only::Errored => any(&[Outcome::Error]),
                Only::Broken => any(&[Outcome::Broken]),
            })
        })
        .map(|((name, version), _)| format!("{name}@{version}"))
        .collect();
    Ok(selected)
}

/// What `republish` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Republished {
    /// Jobs put back on the work queue.
    pub jobs: u64,
    /// Unfinished jobs left alone because a live consumer has them in hand.
    pub in_hand: u64,
}

/// Puts back on the work queue every job of `run` that has no result and that no live consumer
/// has in hand: the way to recover after the broker lost its queues. Refuses, unless `force`,
/// while the work and retry queues still hold messages, since jobs among them would then be
/// queued twice (harmless to the results, which stay one per job, but wasted work).
pub async fn republish(config: &Config, run: &str, force: bool) -> anyhow::Result<Republished> {
    let store = Store::connect(&config.database).await?;
    let run = store.find_run(run).await?;
    anyhow::ensure!(
        run.cancelled_at.is_none(),
        "run {} was cancelled: there is nothing to republish",
        run.name
    );
    let definition = RunDefinition::of(&run)?;
    let broker = Broker::connect(&config.rabbitmq).await?;
    let topology = broker.topology().clone();
    let mut queued = 0;
    for queue in std::iter::once(&topology.jobs).chain(topology.retries.iter().map(|(q, _)| q)) {
        queued += broker.ready_messages(queue).await?;
    }
    if queued > 0 && !force {
        anyhow::bail!(
            "{queued} messages are still queued (work and retry queues): jobs among them would \
             be queued twice. Wait until the queues are empty, or pass --force"
        );
    }
    let now = chrono::Utc::now();
    let in_hand: std::collections::HashSet<uuid::Uuid> = store
        .fleet(now - chrono::Duration::hours(1))
        .await?
        .into_iter()
        .filter(|member| member.status(now) == "alive")
        .flat_map(|member| member.current_jobs)
        .collect();
    let mut republished = Republished::default();
    let mut jobs = Vec::new();
    for (id, package, toolchain) in store.unfinished_jobs(run.id).await? {
        if in_hand.contains(&id.0) {
            republished.in_hand += 1;
            continue;
        }
        let toolchain: Toolchain = toolchain.parse()?;
        let job = Job::new(run.id, package, toolchain, definition.experiment.clone());
        anyhow::ensure!(
            job.id == id,
            "job {id} of run {} does not match its own definition (was the run's definition \
             changed by hand?)",
            run.name
        );
        jobs.push(job);
    }
    let publisher = broker.publisher().await?;
    for chunk in jobs.chunks(500) {
        publisher
            .publish_jobs(chunk)
            .await
            .context("republishing failed part way; run it again to finish")?;
        let ids: Vec<_> = chunk.iter().map(|j| j.id).collect();
        store.mark_published(&ids).await?;
        republished.jobs += chunk.len() as u64;
    }
    broker.close().await;
    Ok(republished)
}

/// Polls the run's progress until every job has a result, logging it as it goes.
pub async fn wait_for_run(
    config: &Config,
    run: RunId,
    shutdown: &CancellationToken,
) -> anyhow::Result<quarry_shared::store::Progress> {
    let store = Store::connect(&config.database).await?;
    let started = std::time::Instant::now();
    let mut last = None;
    loop {
        let progress = store.progress(run).await?;
        if last != Some(progress.finished) {
            let rate = progress.finished as f64 / started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "{}/{} jobs finished ({:.1}/s)",
                progress.finished,
                progress
                    .total
                    .map_or_else(|| "?".to_owned(), |t| t.to_string()),
                rate
            );
            last = Some(progress.finished);
        }
        if progress.is_complete() || shutdown.is_cancelled() {
            return Ok(progress);
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vers: &str, yanked: bool) -> IndexEntry {
        IndexEntry {
            name: "a".into(),
            vers: vers.into(),
            deps: vec![],
            cksum: "00".into(),
            features: Default::default(),
            features2: None,
            yanked,
            links: None,
            rust_version: None,
            v: None,
        }
    }

    #[test]
    fn newest_stable_skips_yanked_and_prereleases() {
        let entries = [
            entry("1.0.0", false),
            entry("1.2.0", true),
            entry("1.10.0", false),
            entry("2.0.0-rc.1", false),
        ];
        assert_eq!(newest_stable(&entries).unwrap().vers, "1.10.0");
        assert!(newest_stable(&[entry("1.0.0", true)]).is_none());
    }

    #[test]
    fn package_lists_are_checked_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.txt");
        std::fs::write(&good, "# popular\nserde\n\nitoa@1.0.15  # pinned\n").unwrap();
        assert_eq!(read_package_list(&good).unwrap(), ["serde", "itoa@1.0.15"]);

        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "serde\nitoa@one\n").unwrap();
        let err = format!("{:#}", read_package_list(&bad).unwrap_err());
        assert!(err.contains("bad.txt:2"), "{err}");
        assert!(err.contains("not a semver version"), "{err}");

        let err = format!(
            "{:#}",
            read_package_list(&dir.path().join("none.txt")).unwrap_err()
        );
        assert!(err.contains("none.txt"), "{err}");
    }

    #[test]
    fn run_names_are_plain() {
        assert!(validate_run_name("nightly-2026-11-23.check").is_ok());
        assert!(validate_run_name("../etc").is_err());
        assert!(validate_run_name("").is_err());
    }
}
