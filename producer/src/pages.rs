//! Pages of work from the run's source (the registry's listing, a package list, a database
//! dump, or a choice made over the whole registry), narrowed by the run's filter, and where
//! paging has got to.

use anyhow::Context as _;
use futures::StreamExt as _;
use quarry_infra::registry::RegistryClient;
use serde::{Deserialize, Serialize};

use crate::definition::{Selection, Sort};
use crate::dump;
use crate::resolution::{INDEX_CONCURRENCY, Item, Request, parse_spec};
use crate::selection::{self, Filter, NamePatterns};

/// Where paging has got to: saved with the run after every published page.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PagingPosition {
    /// The registry's query for the next page (`None` before the first).
    pub(crate) next: Option<String>,
    /// Entries taken so far: crates from the listing (counts towards the limit), packages from
    /// a list, package versions from a dump.
    pub(crate) taken: u64,
    pub(crate) done: bool,
    /// The timestamp of the database dump being read: a run continues only over the same dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dump: Option<String>,
}

/// Pages of work from the run's source, narrowed by its filter.
pub(crate) struct Pages<'a> {
    pub(crate) registry: &'a RegistryClient,
    pub(crate) selection: &'a Selection,
    pub(crate) filter: Filter,
    pub(crate) patterns: NamePatterns,
    pub(crate) page_size: u32,
    pub(crate) dump_page_size: usize,
    pub(crate) position: PagingPosition,
    /// The packages chosen over the whole registry, for a filter that needs it (a sample,
    /// reverse dependencies). Recomputed when a run resumes: it is deterministic.
    pub(crate) chosen: Option<Vec<Request>>,
    /// Pages read from a database dump by a blocking thread.
    pub(crate) dump: Option<tokio::sync::mpsc::Receiver<anyhow::Result<dump::Page>>>,
    /// Crates the filter set aside so far (the dump's reader thread adds its count).
    pub(crate) filtered_out: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<'a> Pages<'a> {
    pub(crate) fn new(
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
    pub(crate) fn expected_pages(&self) -> Option<u64> {
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

    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Vec<Item>>> {
        if self.position.done {
            return Ok(None);
        }
        if let Selection::Dump { path, sort, limit } = self.selection {
            return self.next_from_dump(path, *sort, *limit).await;
        }
        self.chosen().await?;
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

    pub(crate) fn filtered_out(&self) -> u64 {
        self.filtered_out.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The packages a sample or reverse dependencies choose over the whole registry, chosen
    /// once (before the first page, or before that for the stragglers); `None` for a run that
    /// pages without choosing first (a dump chooses as it reads).
    pub(crate) async fn chosen(&mut self) -> anyhow::Result<Option<&[Request]>> {
        if !self.filter.needs_whole_registry() || matches!(self.selection, Selection::Dump { .. }) {
            return Ok(None);
        }
        if self.chosen.is_none() {
            self.chosen = Some(self.choose_over_registry().await?);
        }
        Ok(self.chosen.as_deref())
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
