//! Publishing a run: created or resumed, its stragglers first, then page by page, each page's
//! jobs recorded, published, confirmed and marked published before the next is asked for.
//! What an invocation did is its `PublishSummary`.

use std::collections::BTreeMap;

use anyhow::Context as _;
use quarry_core::job::{Job, RunId};
use quarry_infra::Config;
use quarry_infra::queue::{Broker, Publisher};
use quarry_infra::registry::RegistryClient;
use quarry_infra::store::Store;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::definition::{RunDefinition, Selection, validate_run_name};
use crate::pages::{Pages, PagingPosition};
use crate::progress::PublishProgress;
use crate::resolution::{Item, Request, page_jobs, parse_spec};
use crate::selection::{Filter, NamePatterns};
use crate::tree::Trees;

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
    // The dependency trees read so far, for the jobs no earlier run timed.
    let trees = Trees::default();
    // The crates slowest in earlier runs go first, before paging, so that the run does not
    // end waiting on one of them started last (as PkgEvalFarm orders its jobs).
    let longest = store.longest_packages(STRAGGLERS).await?;
    let chosen = pages.chosen().await?.map(<[Request]>::to_vec);
    let mut stragglers = straggler_requests(
        &definition.selection,
        &definition.filter,
        &longest,
        chosen.as_deref(),
    )?;
    let timed = stragglers.len();
    stragglers.extend(
        largest_trees_first(
            (&store, &registry, &trees),
            run.id,
            &definition.selection,
            chosen.as_deref(),
        )
        .await?,
    );
    if !stragglers.is_empty() {
        tracing::info!(
            timed,
            untimed = stragglers.len() - timed,
            "publishing first the packages slowest in earlier runs, then the largest trees \
             of those no run timed"
        );
        let position = serde_json::to_value(&pages.position)?;
        let (queued, left_out) = publish_out_of_order(
            (&store, &publisher, &registry, &trees),
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
            let pending = paged.record((&store, &registry, &trees), run.id).await?;
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
            (&store, &publisher, &registry, &trees),
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
/// order, as requests: the packages a sample or a dependents filter `chosen` over the whole
/// registry, the packages of a list, or every crate of a whole registry when only name
/// patterns filter it (a limit alone, or a dump's sample, decides by the paging).
fn straggler_requests(
    selection: &Selection,
    filter: &Filter,
    longest: &[String],
    chosen: Option<&[Request]>,
) -> anyhow::Result<Vec<Item>> {
    let order: std::collections::HashMap<&str, usize> = longest
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    let mut requests: Vec<(usize, Request)> = match selection {
        _ if chosen.is_some() => chosen
            .unwrap_or_default()
            .iter()
            .filter_map(|request| {
                order
                    .get(request.name.as_str())
                    .map(|&i| (i, request.clone()))
            })
            .collect(),
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

/// The packages of a list known before paging (a package list, or what a sample or a
/// dependents filter chose over the whole registry) that no earlier run timed, largest
/// dependency tree first: published before paging like the stragglers, so that a first run of a
/// list starts its slowest crates first too, not only within each page. Only for lists of up to
/// `STRAGGLERS` such packages, whose trees can be read before the first job goes out; longer
/// ones are ordered page by page (`PagedJobs::record`).
async fn largest_trees_first(
    (store, registry, trees): (&Store, &RegistryClient, &Trees),
    run: RunId,
    selection: &Selection,
    chosen: Option<&[Request]>,
) -> anyhow::Result<Vec<Item>> {
    let listed: Vec<Request> = match (selection, chosen) {
        (_, Some(chosen)) => chosen.to_vec(),
        (Selection::Packages { packages }, None) => {
            packages.iter().map(|spec| parse_spec(spec)).collect()
        }
        _ => return Ok(Vec::new()),
    };
    let names: Vec<String> = listed.iter().map(|r| r.name.clone()).collect();
    let timed = store.timed_packages(&names, run).await?;
    let untimed: Vec<Request> = listed
        .into_iter()
        .filter(|r| !timed.contains(&r.name))
        .collect();
    if untimed.len() < 2 || untimed.len() > STRAGGLERS as usize {
        return Ok(Vec::new());
    }
    let untimed = untimed
        .into_iter()
        .map(|r| (r.name.clone(), Item::Request(r)))
        .collect();
    Ok(trees.largest_first(registry, untimed).await)
}

/// Records and publishes `page` outside the paging order (the slowest crates first, the
/// packages left out before), in pages of the configured size, leaving the paging position as
/// it is: how many jobs it queued, and the packages it had to leave out.
async fn publish_out_of_order(
    (store, publisher, registry, trees): (&Store, &Publisher, &RegistryClient, &Trees),
    (run, definition): (&quarry_infra::store::Run, &RunDefinition),
    page: Vec<Item>,
    (position, page_size): (&serde_json::Value, usize),
) -> anyhow::Result<(u64, Vec<(String, String)>)> {
    let (mut queued, mut left_out) = (0, Vec::new());
    let mut items = page.into_iter().peekable();
    while items.peek().is_some() {
        let chunk: Vec<Item> = items.by_ref().take(page_size.max(1)).collect();
        let paged = page_jobs(registry, run, definition, chunk).await;
        let pending = paged.record((store, registry, trees), run.id).await?;
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
pub(crate) struct RecordedPage {
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
