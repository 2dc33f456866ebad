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
use quarry_core::index::IndexEntry;
use quarry_core::job::{
    Experiment, Job, PackageVersion, Patch, RunId, StoredDefinition, Toolchain, ToolchainFile,
};
use quarry_infra::Config;
use quarry_infra::queue::{Broker, Publisher};
use quarry_infra::registry::{RegistryClient, RegistryError};
use quarry_infra::store::Store;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

mod dump;
pub mod selection;

use selection::{Filter, NamePatterns};

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
    /// The crates of a crates.io database dump (`db-dump.tar.gz`), in `sort` order, stopping
    /// after `limit` crates.
    Dump {
        path: std::path::PathBuf,
        sort: Sort,
        limit: Option<u64>,
    },
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
    /// What is taken of each selected crate, and which crates are kept.
    #[serde(default, skip_serializing_if = "Filter::is_default")]
    pub filter: Filter,
    /// A dependency-patch run: each package is tested as published (*start*) and with this
    /// dependency replaced (*end*), with the run's one toolchain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<Patch>,
    /// Toolchains given as files (`--toolchain-file`), uploaded with the run: each names one of
    /// `toolchains`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub toolchain_files: Vec<quarry_core::job::ToolchainFile>,
}

impl RunDefinition {
    /// The run's sides, in order (start, then end): one per toolchain, or for a patch run the
    /// toolchain without and with the patch.
    pub fn sides(&self) -> Vec<(Toolchain, Option<Patch>)> {
        quarry_core::job::run_sides(&self.toolchains, self.patch.as_ref())
    }

    /// The sides' labels, as the database and the report name them.
    pub fn side_labels(&self) -> Vec<String> {
        quarry_core::job::side_labels(&self.sides())
    }

    /// The definition stored with `run`.
    pub fn of(run: &quarry_infra::store::Run) -> anyhow::Result<RunDefinition> {
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
    /// Crates the filter set aside, read by this invocation: not matching the name patterns, not
    /// depending on the crate asked for, not in the sample, past the limit of a dump.
    #[serde(default)]
    pub crates_filtered_out: u64,
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
        if self.crates_filtered_out > 0 {
            writeln!(
                f,
                "{} crates filtered out (name patterns, reverse dependencies, sample, limit)",
                self.crates_filtered_out
            )?;
        }
        if !self.packages_failed.is_empty() {
            writeln!(f, "{} packages left out:", self.packages_failed.len())?;
            for (name, why) in &self.packages_failed {
                writeln!(f, "  {name}: {why}")?;
            }
            writeln!(
                f,
                "the run is incomplete without them: run the same command again to retry them"
            )?;
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

/// Turns `--patch NAME=VERSION` (a version the registry serves) or `--patch NAME=FILE.crate` (a
/// package made by `cargo package`, uploaded to S3 with the run) into the run's patch.
pub async fn resolve_patch(config: &Config, spec: &str) -> anyhow::Result<Patch> {
    let (name, with) = spec
        .split_once('=')
        .with_context(|| format!("--patch {spec:?}: give NAME=VERSION or NAME=FILE.crate"))?;
    check_package_spec(name).context("--patch: the dependency to replace")?;
    let file = std::path::Path::new(with);
    if with.ends_with(".crate") || file.is_file() {
        let not_readable = || format!("--patch: {} is not a readable .crate file", file.display());
        let bytes = std::fs::read(file).with_context(not_readable)?;
        let entry = quarry_core::archive::index_entry(&bytes).with_context(not_readable)?;
        anyhow::ensure!(
            entry.name.eq_ignore_ascii_case(name),
            "--patch: {} is package {}, not {name}",
            file.display(),
            entry.name
        );
        let bucket = quarry_infra::s3::Bucket::new(&config.s3)?;
        bucket.ensure_exists().await?;
        let key = bucket
            .put_patch(&entry.cksum, bytes.into())
            .await
            .context("--patch: cannot upload the package to S3")?;
        return Ok(Patch {
            name: entry.name,
            version: entry.vers,
            checksum: entry.cksum,
            source: quarry_core::job::PatchSource::Upload { key },
        });
    }
    semver::Version::parse(with)
        .with_context(|| format!("--patch: {with:?} is neither a version nor a .crate file"))?;
    let registry = RegistryClient::new(&config.registry)?;
    let entries = registry
        .index_entries(name)
        .await
        .with_context(|| format!("--patch: cannot read {name} from the registry's index"))?;
    let entry = entries
        .iter()
        .find(|e| e.vers == with)
        .with_context(|| format!("--patch: the registry has no {name}@{with}"))?;
    Ok(Patch {
        name: entry.name.clone(),
        version: entry.vers.clone(),
        checksum: entry.cksum.clone(),
        source: quarry_core::job::PatchSource::Registry,
    })
}

/// Turns `--toolchain-file NAME=FILE` into the run's toolchain file: checked to be a tar archive
/// (plain, gzip or xz, as rustup's dist tarballs and CI artifacts are), checksummed, and uploaded
/// to S3 once (a file already there under its checksum is not sent again).
pub async fn resolve_toolchain_file(config: &Config, spec: &str) -> anyhow::Result<ToolchainFile> {
    use std::io::Read as _;
    let (name, path) = spec.split_once('=').with_context(|| {
        format!("--toolchain-file {spec:?}: give NAME=FILE (pr-12345=rust-nightly-x86_64-unknown-linux-gnu.tar.xz)")
    })?;
    let toolchain: Toolchain = name
        .parse()
        .with_context(|| format!("--toolchain-file {spec:?}: the name"))?;
    anyhow::ensure!(
        toolchain.name() == toolchain.as_str(),
        "--toolchain-file {spec:?}: name the toolchain without variants (give those with \
         --toolchain {name}+...)"
    );
    let path = std::path::Path::new(path);
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("--toolchain-file: cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(512);
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("--toolchain-file: cannot read {}", path.display()))?;
        if read == 0 {
            break;
        }
        if head.len() < 512 {
            let wanted = (512 - head.len()).min(read);
            head.extend_from_slice(&buffer[..wanted]);
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    let compressed = head.starts_with(&[0x1f, 0x8b]) || head.starts_with(b"\xfd7zXZ\0");
    let tar = head.get(257..262) == Some(b"ustar");
    anyhow::ensure!(
        compressed || tar,
        "--toolchain-file: {} is not a tar archive (plain, gzip or xz): give a rustup dist \
         tarball, a CI artifact or a toolchain directory packed with tar",
        path.display()
    );
    let checksum = hex::encode(hasher.finalize());
    let bucket = quarry_infra::s3::Bucket::new(&config.s3)?;
    bucket.ensure_exists().await?;
    let key = bucket
        .put_toolchain(&checksum, path, bytes)
        .await
        .context("--toolchain-file: cannot upload the toolchain to S3")?;
    Ok(ToolchainFile {
        name: name.to_owned(),
        checksum,
        bytes,
        key,
    })
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
    anyhow::ensure!(
        definition.patch.is_none() || definition.toolchains.len() == 1,
        "a dependency-patch run has one toolchain: its two sides are without and with the patch"
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
    let mut pages = Pages::new(
        &registry,
        &definition.selection,
        &definition.filter,
        config.registry.page_size,
        config.registry.dump_page_size,
    )?;
    // A resumed run continues from the page after the last one it published.
    if let Some(position) = run
        .paging_position
        .as_ref()
        .and_then(|p| serde_json::from_value::<PagingPosition>(p.clone()).ok())
    {
        tracing::info!(?position, "continuing from the saved paging position");
        pages.position = position;
    }
    let page_size = usize::try_from(config.registry.page_size)?;
    // The crates slowest in earlier runs go first, before paging, so that the run does not
    // end waiting on one of them started last (as PkgEvalFarm orders its jobs).
    let longest = store.longest_packages(STRAGGLERS).await?;
    let stragglers = straggler_requests(&definition.selection, &definition.filter, &longest)?;
    if !stragglers.is_empty() {
        tracing::info!(
            packages = stragglers.len(),
            "publishing first the packages slowest in earlier runs"
        );
        let position = serde_json::to_value(&pages.position)?;
        let (queued, left_out) = publish_out_of_order(
            (&store, &publisher, &registry),
            (&run, definition),
            stragglers,
            (&position, page_size),
        )
        .await?;
        summary.jobs_queued += queued;
        // Paging will come to them again and say so.
        drop(left_out);
    }
    let mut progress = PublishProgress::new();
    let interrupted;
    // Three pages at a time: while the broker confirms one page, the page before it is marked
    // published (and the position after it saved) and the page after it is read, resolved and
    // recorded. Each page is still recorded before it is published and marked only after its
    // confirms, so a stop anywhere loses nothing and publishes nothing twice.
    let mut recorded: Option<RecordedPage> = None;
    let mut confirmed: Option<RecordedPage> = None;
    loop {
        // Every invocation reads at least one page, so that even one stopped at once moves on.
        let reading = !pages.position.done && (summary.pages == 0 || !shutdown.is_cancelled());
        let next = async {
            if !reading {
                return Ok(None);
            }
            let Some(page) = pages.next().await? else {
                return Ok(None);
            };
            let position = serde_json::to_value(&pages.position)?;
            let paged = page_jobs(&registry, &run, definition, page).await;
            let pending = paged.record(&store, run.id).await?;
            anyhow::Ok(Some((
                RecordedPage {
                    jobs: paged.jobs,
                    pending,
                    position,
                },
                paged.left_out,
            )))
        };
        let publish = async {
            match recorded.take() {
                Some(page) => page.publish(&publisher).await.map(|()| Some(page)),
                None => Ok(None),
            }
        };
        let mark = async {
            match confirmed.take() {
                Some(page) => page.mark_published(&store, run.id).await,
                None => Ok(0),
            }
        };
        let (next, published, marked) = tokio::join!(next, publish, mark);
        summary.jobs_queued += marked?;
        confirmed = published?;
        if summary.pages > 0 {
            progress.page(&summary, pages.expected_pages());
        }
        if let Some((page, left_out)) = next? {
            summary.pages += 1;
            for (package, why) in left_out {
                tracing::warn!(%package, %why, "package left out");
                summary.packages_failed.insert(package, why);
            }
            recorded = Some(page);
        } else if recorded.is_none() && confirmed.is_none() {
            interrupted = !pages.position.done;
            break;
        }
    }
    // Packages the last complete invocation had to leave out (an index that kept failing, a
    // dump row without a checksum) are tried again, through the index.
    let left_out_before: Vec<String> = run
        .producer_summary
        .as_ref()
        .and_then(|s| serde_json::from_value::<PublishSummary>(s.clone()).ok())
        .map(|s| s.packages_failed.into_keys().collect())
        .unwrap_or_default();
    if !interrupted && !left_out_before.is_empty() {
        tracing::info!(
            packages = left_out_before.len(),
            "trying again the packages left out before"
        );
        let position = serde_json::to_value(&pages.position)?;
        let page = left_out_before
            .iter()
            .map(|label| Item::Request(parse_spec(label)))
            .collect();
        let (queued, left_out) = publish_out_of_order(
            (&store, &publisher, &registry),
            (&run, definition),
            page,
            (&position, page_size),
        )
        .await?;
        summary.jobs_queued += queued;
        summary.packages_failed.extend(left_out);
    }
    progress.finish();
    summary.crates_filtered_out = pages.filtered_out();
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

/// How many of the crates slowest in earlier runs a run publishes before it pages.
const STRAGGLERS: i64 = 1000;

/// Of `longest` (crate names, slowest first), those the run selects whatever the paging
/// order, as requests: the packages of a list, or every crate of a whole registry when only
/// name patterns filter it (a limit, a sample or a dependents filter decides by the paging).
fn straggler_requests(
    selection: &Selection,
    filter: &Filter,
    longest: &[String],
) -> anyhow::Result<Vec<Item>> {
    let order: std::collections::HashMap<&str, usize> = longest
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    let mut requests: Vec<(usize, Request)> = match selection {
        Selection::Packages { packages } => packages
            .iter()
            .map(|spec| parse_spec(spec))
            .filter_map(|request| order.get(request.name.as_str()).map(|&i| (i, request)))
            .collect(),
        Selection::Listing { limit: None, .. } | Selection::Dump { limit: None, .. }
            if filter.sample.is_none() && filter.dependents.is_none() =>
        {
            let patterns = NamePatterns::new(&filter.patterns)?;
            longest
                .iter()
                .enumerate()
                .filter(|(_, name)| patterns.matches(name))
                .map(|(i, name)| {
                    (
                        i,
                        Request {
                            name: name.clone(),
                            version: None,
                        },
                    )
                })
                .collect()
        }
        _ => Vec::new(),
    };
    requests.sort_by_key(|(i, _)| *i);
    Ok(requests
        .into_iter()
        .map(|(_, request)| Item::Request(request))
        .collect())
}

/// Records and publishes `page` outside the paging order (the slowest crates first, the
/// packages left out before), in pages of the configured size, leaving the paging position as
/// it is: how many jobs it queued, and the packages it had to leave out.
async fn publish_out_of_order(
    (store, publisher, registry): (&Store, &Publisher, &RegistryClient),
    (run, definition): (&quarry_infra::store::Run, &RunDefinition),
    page: Vec<Item>,
    (position, page_size): (&serde_json::Value, usize),
) -> anyhow::Result<(u64, Vec<(String, String)>)> {
    let (mut queued, mut left_out) = (0, Vec::new());
    let mut items = page.into_iter().peekable();
    while items.peek().is_some() {
        let chunk: Vec<Item> = items.by_ref().take(page_size.max(1)).collect();
        let paged = page_jobs(registry, run, definition, chunk).await;
        let pending = paged.record(store, run.id).await?;
        let page = RecordedPage {
            jobs: paged.jobs,
            pending,
            position: position.clone(),
        };
        page.publish(publisher).await?;
        queued += page.mark_published(store, run.id).await?;
        left_out.extend(paged.left_out);
    }
    Ok((queued, left_out))
}

/// A page whose jobs are recorded in PostgreSQL, waiting to be published.
struct RecordedPage {
    jobs: Vec<Job>,
    /// The jobs not yet published (nor finished) by an earlier invocation.
    pending: Vec<quarry_core::job::JobId>,
    /// The paging position after this page, saved once it is published.
    position: serde_json::Value,
}

impl RecordedPage {
    /// Publishes the pending jobs, in their order (the longest expected first), and waits for
    /// every confirm.
    async fn publish(&self, publisher: &Publisher) -> anyhow::Result<()> {
        let jobs: std::collections::HashMap<_, _> = self.jobs.iter().map(|j| (j.id, j)).collect();
        publisher
            .publish_jobs(self.pending.iter().filter_map(|id| jobs.get(id).copied()))
            .await
            .context("publishing a page of jobs failed; re-run the producer to continue")
    }

    /// After the confirms: marks the jobs published and saves the position, in one transaction.
    /// Returns how many were published.
    async fn mark_published(self, store: &Store, run: RunId) -> anyhow::Result<u64> {
        store
            .mark_published(&self.pending, Some((run, &self.position)))
            .await?;
        Ok(self.pending.len() as u64)
    }
}

/// The jobs of a page's packages (one per version and toolchain), what the packages depend on,
/// and the packages left out with why.
async fn page_jobs(
    registry: &RegistryClient,
    run: &quarry_infra::store::Run,
    definition: &RunDefinition,
    page: Vec<Item>,
) -> PagedJobs {
    let resolved = futures::stream::iter(page)
        .map(|item| async {
            match item {
                Item::Request(request) => resolve(registry, &definition.filter, request).await,
                Item::Resolved {
                    package,
                    dependencies,
                } => (
                    package.to_string(),
                    Ok(vec![Resolved {
                        package,
                        dependencies,
                    }]),
                ),
                Item::LeftOut { package, why } => (package, Err(why)),
            }
        })
        .buffered(INDEX_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let mut jobs = Vec::new();
    let mut dependencies = Vec::new();
    let mut left_out = Vec::new();
    for (name, resolution) in resolved {
        match resolution {
            Ok(packages) => {
                for Resolved {
                    package,
                    dependencies: depends_on,
                } in packages
                {
                    let dependent = package.name.to_ascii_lowercase();
                    dependencies.extend(depends_on.into_iter().map(|d| (dependent.clone(), d)));
                    for (toolchain, patch) in definition.sides() {
                        jobs.push(Job::patched(
                            run.id,
                            package.clone(),
                            toolchain,
                            definition.experiment.clone(),
                            patch,
                        ));
                    }
                }
            }
            Err(why) => left_out.push((name, why)),
        }
    }
    PagedJobs {
        jobs,
        dependencies,
        left_out,
    }
}

/// What a page of packages comes to.
struct PagedJobs {
    jobs: Vec<Job>,
    /// (package, dependency), by lowercase crate names.
    dependencies: Vec<(String, String)>,
    /// The packages left out, with why.
    left_out: Vec<(String, String)>,
}

impl PagedJobs {
    /// Records the page's jobs and what its packages depend on; returns the jobs still to
    /// publish.
    async fn record(
        &self,
        store: &Store,
        run: RunId,
    ) -> anyhow::Result<Vec<quarry_core::job::JobId>> {
        let pending = store.record_jobs(&self.jobs).await?;
        store.record_dependencies(run, &self.dependencies).await?;
        Ok(pending)
    }
}

/// A package to look up: a name, and optionally the exact version wanted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Request {
    name: String,
    version: Option<String>,
}

/// One entry of a page.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    /// To be looked up in the index.
    Request(Request),
    /// Already known with its checksum and dependencies (a database dump carries them).
    Resolved {
        package: PackageVersion,
        /// Its direct normal and build dependencies, by lowercase name.
        dependencies: Vec<String>,
    },
    /// Left out of the run, with why.
    LeftOut { package: String, why: String },
}

/// Where paging has got to: saved with the run after every published page.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PagingPosition {
    /// The registry's query for the next page (`None` before the first).
    next: Option<String>,
    /// Entries taken so far: crates from the listing (counts towards the limit), packages from
    /// a list, package versions from a dump.
    taken: u64,
    done: bool,
    /// The timestamp of the database dump being read: a run continues only over the same dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dump: Option<String>,
}

/// Pages of work from the run's source, narrowed by its filter.
struct Pages<'a> {
    registry: &'a RegistryClient,
    selection: &'a Selection,
    filter: Filter,
    patterns: NamePatterns,
    page_size: u32,
    dump_page_size: usize,
    position: PagingPosition,
    /// The packages chosen over the whole registry, for a filter that needs it (a sample,
    /// reverse dependencies). Recomputed when a run resumes: it is deterministic.
    chosen: Option<Vec<Request>>,
    /// Pages read from a database dump by a blocking thread.
    dump: Option<tokio::sync::mpsc::Receiver<anyhow::Result<dump::Page>>>,
    /// Crates the filter set aside so far (the dump's reader thread adds its count).
    filtered_out: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<'a> Pages<'a> {
    fn new(
        registry: &'a RegistryClient,
        selection: &'a Selection,
        filter: &Filter,
        page_size: u32,
        dump_page_size: usize,
    ) -> anyhow::Result<Pages<'a>> {
        filter.check()?;
        Ok(Pages {
            registry,
            selection,
            filter: filter.clone(),
            patterns: NamePatterns::new(&filter.patterns)?,
            page_size: page_size.clamp(1, 100),
            dump_page_size: dump_page_size.max(1),
            position: PagingPosition::default(),
            chosen: None,
            dump: None,
            filtered_out: Default::default(),
        })
    }

    /// How many pages the whole selection makes, when that is known before paging it.
    fn expected_pages(&self) -> Option<u64> {
        let per_page = u64::from(self.page_size);
        match (self.selection, &self.chosen) {
            (_, Some(chosen)) => Some((chosen.len() as u64).div_ceil(per_page)),
            (Selection::Packages { packages }, None) => {
                Some((packages.len() as u64).div_ceil(per_page))
            }
            (Selection::Listing { limit, .. }, None) if self.filter.patterns.is_empty() => {
                limit.map(|l| l.div_ceil(per_page))
            }
            _ => None,
        }
    }

    async fn next(&mut self) -> anyhow::Result<Option<Vec<Item>>> {
        if self.position.done {
            return Ok(None);
        }
        if let Selection::Dump { path, sort, limit } = self.selection {
            return self.next_from_dump(path, *sort, *limit).await;
        }
        if self.filter.needs_whole_registry() && self.chosen.is_none() {
            self.chosen = Some(self.choose_over_registry().await?);
        }
        let list: Option<Vec<Request>> = match (&self.chosen, self.selection) {
            (Some(chosen), _) => Some(chosen.clone()),
            (None, Selection::Packages { packages }) => {
                let matching: Vec<Request> = packages
                    .iter()
                    .map(|spec| parse_spec(spec))
                    .filter(|r| self.patterns.matches(&r.name))
                    .collect();
                if self.position.taken == 0 {
                    self.count_filtered_out(packages.len() - matching.len());
                }
                Some(matching)
            }
            _ => None,
        };
        if let Some(list) = list {
            let start = usize::try_from(self.position.taken).unwrap_or(usize::MAX);
            let page: Vec<Item> = list
                .into_iter()
                .skip(start)
                .take(self.page_size as usize)
                .map(Item::Request)
                .collect();
            self.position.taken += page.len() as u64;
            self.position.done = page.len() < self.page_size as usize;
            return Ok((!page.is_empty()).then_some(page));
        }
        let Selection::Listing { sort, limit } = self.selection else {
            unreachable!("lists and dumps are paged above");
        };
        self.next_from_listing(*sort, *limit).await
    }

    /// The next page of the registry's crate listing, keeping the names that match.
    async fn next_from_listing(
        &mut self,
        sort: Sort,
        limit: Option<u64>,
    ) -> anyhow::Result<Option<Vec<Item>>> {
        loop {
            if self.position.done {
                return Ok(None);
            }
            let remaining = limit.map_or(u64::MAX, |l| l.saturating_sub(self.position.taken));
            if remaining == 0 {
                self.position.done = true;
                return Ok(None);
            }
            let per_page = if self.filter.patterns.is_empty() {
                self.page_size
                    .min(u32::try_from(remaining).unwrap_or(u32::MAX))
            } else {
                self.page_size
            };
            let first = format!("?page=1&per_page={per_page}&sort={}", sort.as_query());
            let query = self.position.next.clone().unwrap_or(first);
            let page = self
                .registry
                .crates_page(Some(&query), per_page)
                .await
                .context("cannot read the registry's crate listing")?;
            let listed = page.crates.len();
            let matching: Vec<_> = page
                .crates
                .into_iter()
                .filter(|c| self.patterns.matches(&c.name))
                .collect();
            self.count_filtered_out(listed - matching.len());
            let requests: Vec<Item> = matching
                .into_iter()
                .take(usize::try_from(remaining).unwrap_or(usize::MAX))
                .map(|c| {
                    Item::Request(Request {
                        name: c.name,
                        version: None,
                    })
                })
                .collect();
            self.position.taken += requests.len() as u64;
            self.position.next = page.meta.next_page;
            self.position.done = self.position.next.is_none()
                || listed == 0
                || limit.is_some_and(|l| self.position.taken >= l);
            // A page where no name matched is not worth a round of publishing.
            if !requests.is_empty() || self.position.done {
                return Ok((!requests.is_empty()).then_some(requests));
            }
        }
    }

    /// The next page read from a database dump; the reader starts on the first call, after the
    /// entries an earlier invocation already took.
    async fn next_from_dump(
        &mut self,
        path: &std::path::Path,
        sort: Sort,
        limit: Option<u64>,
    ) -> anyhow::Result<Option<Vec<Item>>> {
        if self.dump.is_none() {
            let path = path.to_owned();
            let timestamp = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || dump::timestamp(&path)).await??
            };
            if let (Some(before), Some(now)) = (&self.position.dump, &timestamp) {
                anyhow::ensure!(
                    before == now,
                    "this run started from the database dump of {before}, and {} is the dump of \
                     {now}: continue it with the same file, or start a new run",
                    path.display()
                );
            }
            self.position.dump = timestamp;
            let (sender, receiver) = tokio::sync::mpsc::channel(2);
            let filter = self.filter.clone();
            let skip = self.position.taken;
            let page_size = self.dump_page_size;
            let filtered_out = self.filtered_out.clone();
            tokio::task::spawn_blocking(move || {
                let selection = dump::DumpSelection {
                    path: &path,
                    filter: &filter,
                    sort,
                    limit,
                    page_size,
                    skip,
                    filtered_out: &filtered_out,
                };
                let read = dump::select(&selection, |page| {
                    match sender.blocking_send(Ok(page)) {
                        Ok(()) => std::ops::ControlFlow::Continue(()),
                        // The producer stopped listening (interrupted): stop reading.
                        Err(_) => std::ops::ControlFlow::Break(()),
                    }
                });
                if let Err(err) = read {
                    let _ = sender.blocking_send(Err(err));
                }
            });
            self.dump = Some(receiver);
        }
        let receiver = self
            .dump
            .as_mut()
            .expect("the dump reader was started above");
        match receiver.recv().await {
            Some(page) => {
                let page = page?;
                self.position.taken += page.len() as u64;
                Ok(Some(page))
            }
            None => {
                self.position.done = true;
                Ok(None)
            }
        }
    }

    fn count_filtered_out(&self, crates: usize) {
        self.filtered_out
            .fetch_add(crates as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn filtered_out(&self) -> u64 {
        self.filtered_out.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// For a sample or reverse dependencies: every crate the source offers (matching the name
    /// patterns), narrowed to the dependents of a crate and then sampled; sorted by name.
    async fn choose_over_registry(&self) -> anyhow::Result<Vec<Request>> {
        let mut universe: Vec<Request> = match self.selection {
            Selection::Packages { packages } => packages
                .iter()
                .map(|spec| parse_spec(spec))
                .filter(|r| self.patterns.matches(&r.name))
                .collect(),
            Selection::Dump { .. } => unreachable!("a dump selects its own crates"),
            Selection::Listing { sort, limit } => {
                let mut listing = Pages::new(
                    self.registry,
                    self.selection,
                    &Filter {
                        dependents: None,
                        sample: None,
                        ..self.filter.clone()
                    },
                    self.page_size,
                    self.dump_page_size,
                )?;
                listing.filtered_out = self.filtered_out.clone();
                let mut all = Vec::new();
                while let Some(page) = listing.next_from_listing(*sort, *limit).await? {
                    all.extend(page.into_iter().filter_map(|item| match item {
                        Item::Request(request) => Some(request),
                        _ => None,
                    }));
                }
                all
            }
        };
        tracing::info!(crates = universe.len(), "read the whole crate list");
        let read = universe.len();
        if let Some(dependents) = &self.filter.dependents {
            let graph = self.dependency_graph(&universe).await;
            // Crate names are compared ignoring case, as crates.io does.
            let found = graph.of(&dependents.name.to_ascii_lowercase(), dependents.depth);
            universe.retain(|r| found.contains(&r.name.to_ascii_lowercase()));
            tracing::info!(
                dependents = universe.len(),
                of = %dependents.name,
                depth = dependents.depth,
                "found the reverse dependencies"
            );
        }
        if let Some(wanted) = self.filter.sample {
            universe = selection::sample(universe, |r| r.name.clone(), wanted);
        }
        universe.sort();
        self.count_filtered_out(read - universe.len());
        Ok(universe)
    }

    /// Who depends on whom among `crates`, from their index files: the dependencies of the
    /// versions the filter takes. A crate whose index cannot be read is left out with a warning.
    async fn dependency_graph(&self, crates: &[Request]) -> selection::ReverseDependencies<String> {
        let mut graph = selection::ReverseDependencies::default();
        let mut entries =
            futures::stream::iter(crates)
                .map(|request| async move {
                    (request, self.registry.index_entries(&request.name).await)
                })
                .buffered(INDEX_CONCURRENCY);
        while let Some((request, read)) = entries.next().await {
            let entries = match read {
                Ok(entries) => entries,
                Err(err) => {
                    tracing::warn!(package = %request.name, %err, "cannot read its dependencies");
                    continue;
                }
            };
            for entry in request.versions_in(&entries, &self.filter) {
                // Dependencies from other registries are other crates that happen to share
                // a name.
                for dep in entry.deps.iter().filter(|d| d.registry.is_none()) {
                    let dependency = dep.crate_name();
                    graph.add(
                        request.name.to_ascii_lowercase(),
                        dependency.to_ascii_lowercase(),
                    );
                }
            }
        }
        graph
    }
}

impl Request {
    /// The index entries this request takes: the version asked for, or else those the filter
    /// allows.
    fn versions_in<'e>(&self, entries: &'e [IndexEntry], filter: &Filter) -> Vec<&'e IndexEntry> {
        match &self.version {
            Some(version) => entries.iter().filter(|e| &e.vers == version).collect(),
            None => filter
                .choose(entries.iter().map(|e| (e.vers.as_str(), e.yanked, e)))
                .into_iter()
                .map(|(_, e)| e)
                .collect(),
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

/// Looks the request up in the index: the exact version asked for, or else the versions the
/// filter takes (by default the newest that is neither yanked nor a pre-release).
async fn resolve(
    registry: &RegistryClient,
    filter: &Filter,
    request: Request,
) -> (String, Result<Vec<Resolved>, String>) {
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
    let chosen = request.versions_in(&entries, filter);
    if chosen.is_empty() {
        let why = match (&request.version, filter.yanked, filter.prereleases) {
            (Some(v), _, _) => format!("version {v} is not in the index"),
            (None, false, false) => "no version that is neither yanked nor a pre-release".into(),
            (None, true, false) => "no version that is not a pre-release".into(),
            (None, false, true) => "no version that is not yanked".into(),
            (None, true, true) => "no version that is valid semver".into(),
        };
        return (label, Err(why));
    }
    let packages = chosen
        .into_iter()
        .map(|e| Resolved {
            package: PackageVersion {
                name: e.name.clone(),
                version: e.vers.clone(),
                checksum: e.cksum.clone(),
            },
            dependencies: build_dependencies(e),
        })
        .collect();
    (label, Ok(packages))
}

/// A package version to test, with what it depends on where the index told.
struct Resolved {
    package: PackageVersion,
    /// Its direct normal and build dependencies on crates of the same registry, by lowercase
    /// name (a failure of one breaks its build; a dev-dependency's only its tests).
    dependencies: Vec<String>,
}

fn build_dependencies(entry: &IndexEntry) -> Vec<String> {
    let mut names: Vec<String> = entry
        .deps
        .iter()
        .filter(|d| d.registry.is_none() && d.kind.as_deref() != Some("dev"))
        .map(|d| d.crate_name().to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Progress on stderr while paging: a spinner line on a terminal, a log line every ten seconds
/// otherwise.
struct PublishProgress {
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    last_line: std::time::Instant,
}

impl PublishProgress {
    fn new() -> PublishProgress {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(250));
            bar
        });
        let now = std::time::Instant::now();
        PublishProgress {
            bar,
            started: now,
            last_line: now,
        }
    }

    fn page(&mut self, summary: &PublishSummary, expected_pages: Option<u64>) {
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = summary.jobs_queued as f64 / elapsed;
        let eta = expected_pages
            .filter(|&total| total > summary.pages)
            .map(|total| {
                let per_page = elapsed / summary.pages.max(1) as f64;
                format!(
                    ", ETA {}",
                    indicatif::HumanDuration(std::time::Duration::from_secs_f64(
                        per_page * (total - summary.pages) as f64
                    ))
                )
            })
            .unwrap_or_default();
        let pages = match expected_pages {
            Some(total) => format!("{}/{total}", summary.pages),
            None => summary.pages.to_string(),
        };
        let line = format!(
            "pages {pages}, {} jobs queued, {rate:.0} jobs/s{eta}",
            summary.jobs_queued
        );
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None if self.last_line.elapsed() >= std::time::Duration::from_secs(10) => {
                self.last_line = std::time::Instant::now();
                tracing::info!("{line}");
            }
            None => tracing::debug!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Which packages of an earlier run a new run takes (`--from-run RUN --only ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Only {
    /// Passed with the start toolchain, failed with the end one, or crashed it (two-toolchain
    /// runs).
    Regressed,
    /// Hit a limit (time, memory) on one side only, or regressed then passed when run again
    /// (flaky): confirm or dismiss them.
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
    use quarry_core::category::{Category, Verdict, package_categories};
    use quarry_core::job::Outcome;
    let store = Store::connect(&config.database).await?;
    let run = store.find_run(run).await?;
    let definition = RunDefinition::of(&run)?;
    let pair = match definition.side_labels().as_slice() {
        [start, end] => Some((start.clone(), end.clone())),
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
    let rows = store.package_outcomes(run.id).await?;
    let categories = pair
        .as_ref()
        .map(|(start, end)| package_categories(rows.clone(), start, end))
        .unwrap_or_default();
    let mut packages: BTreeMap<(String, String), Vec<Verdict>> = BTreeMap::new();
    for (name, version, _, outcome) in rows {
        packages.entry((name, version)).or_default().push(outcome);
    }
    let selected = packages
        .into_iter()
        .filter(|(package, sides)| {
            let category = categories.get(package).copied();
            let any = |wanted: &[Outcome]| sides.iter().any(|v| wanted.contains(&v.outcome));
            only.iter().any(|only| match only {
                Only::Regressed => {
                    matches!(category, Some(Category::Regressed | Category::RegressedIce))
                }
                Only::Spurious => matches!(
                    category,
                    Some(Category::SpuriousRegressed | Category::SpuriousFixed | Category::Flaky)
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
    let definition = StoredDefinition::of(&run.definition)?;
    for stored in store.unfinished_jobs(run.id).await? {
        if in_hand.contains(&stored.id.0) {
            republished.in_hand += 1;
            continue;
        }
        jobs.push(
            definition
                .job(run.id, stored)
                .with_context(|| format!("cannot republish a job of run {}", run.name))?,
        );
    }
    let publisher = broker.publisher().await?;
    for chunk in jobs.chunks(500) {
        publisher
            .publish_jobs(chunk)
            .await
            .context("republishing failed part way; run it again to finish")?;
        let ids: Vec<_> = chunk.iter().map(|j| j.id).collect();
        store.mark_published(&ids, None).await?;
        republished.jobs += chunk.len() as u64;
    }
    broker.close().await;
    Ok(republished)
}

#[cfg(test)]
mod tests {
    use super::*;

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
