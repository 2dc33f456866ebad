//! Resolution: a page's entries turned into jobs, one per package version and side, by
//! reading each package's index file (its versions, checksums and dependencies).

use std::collections::HashMap;

use futures::StreamExt as _;
use quarry_core::index::IndexEntry;
use quarry_core::job::{Job, PackageVersion, RunId};
use quarry_infra::registry::{RegistryClient, RegistryError};
use quarry_infra::store::Store;

use crate::definition::RunDefinition;
use crate::selection::Filter;
use crate::tree::Trees;

/// Index files fetched at once while expanding a page.
pub(crate) const INDEX_CONCURRENCY: usize = 8;

/// The jobs of a page's packages (one per version and toolchain), what the packages depend on,
/// and the packages left out with why.
pub(crate) async fn page_jobs(
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
    let sides = definition.stored().sides();
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
                    for (toolchain, patch) in &sides {
                        jobs.push(Job::patched(
                            run.id,
                            package.clone(),
                            toolchain.clone(),
                            definition.experiment.clone(),
                            patch.clone(),
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
pub(crate) struct PagedJobs {
    pub(crate) jobs: Vec<Job>,
    /// (package, dependency), by lowercase crate names.
    pub(crate) dependencies: Vec<(String, String)>,
    /// The packages left out, with why.
    pub(crate) left_out: Vec<(String, String)>,
}

impl PagedJobs {
    /// Records the page's jobs and what its packages depend on; returns the jobs still to
    /// publish, in the order to publish them: the longest expected from earlier runs first,
    /// then those no run has timed, the largest dependency tree first.
    pub(crate) async fn record(
        &self,
        (store, registry, trees): (&Store, &RegistryClient, &Trees),
        run: RunId,
    ) -> anyhow::Result<Vec<quarry_core::job::JobId>> {
        let pending = store.record_jobs(&self.jobs).await?;
        store.record_dependencies(run, &self.dependencies).await?;
        let timed = pending
            .iter()
            .take_while(|(_, expected)| expected.is_some());
        let mut order: Vec<quarry_core::job::JobId> = timed.map(|(id, _)| *id).collect();
        let names: HashMap<_, &str> = self
            .jobs
            .iter()
            .map(|j| (j.id, j.package.name.as_str()))
            .collect();
        let untimed = pending[order.len()..]
            .iter()
            .map(|(id, _)| (names.get(id).copied().unwrap_or_default().to_owned(), *id))
            .collect();
        order.extend(trees.largest_first(registry, untimed).await);
        Ok(order)
    }
}

/// A package to look up: a name, and optionally the exact version wanted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Request {
    pub(crate) name: String,
    pub(crate) version: Option<String>,
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

impl Request {
    /// The index entries this request takes: the version asked for, or else those the filter
    /// allows.
    pub(crate) fn versions_in<'e>(
        &self,
        entries: &'e [IndexEntry],
        filter: &Filter,
    ) -> Vec<&'e IndexEntry> {
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

pub(crate) fn parse_spec(spec: &str) -> Request {
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
pub(crate) struct Resolved {
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
