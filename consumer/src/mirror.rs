//! The consumer's own crates.io-compatible endpoint, the only registry cargo knows while it
//! resolves and downloads a package's dependencies (inside the sandbox, through the job's
//! [`Gateway`]). Index files are kept in the work directory and revalidated with the registry
//! (`If-None-Match`: an unchanged file costs a 304 and no body; an unreachable registry, the
//! cached copy). Downloads go through the same cache layers as the packages under test (disk,
//! S3, registry), checked against the index's checksum. So a dependency is downloaded from the
//! registry once, ever, and a second run downloads no `.crate` from it. A dependency whose
//! sources the work directory's store holds is not downloaded by the job at all: serving its
//! index file links it into the job's cargo home first ([`crate::sources`]).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use quarry_core::index::{IndexConfig, is_crate_name, parse_checksums};
use quarry_core::job::PackageVersion;
use quarry_infra::registry::RegistryError;
use tokio::sync::RwLock;

use crate::fetch::{FetchError, Fetcher};
use crate::gateway::{Gateway, REGISTRY_HOST};
use crate::sources::JobSources;

struct Shared {
    fetcher: Arc<Fetcher>,
    /// The versions' checksums of the index files served so far, by crate (lowercase name).
    versions: RwLock<HashMap<String, Versions>>,
}

/// One crate's versions and their checksums, as read from one index file.
struct Versions {
    /// Which file they were read from (its length and hash): a file served again unchanged,
    /// as in every job that resolves this crate, is not read again.
    file: (usize, u64),
    read: Arc<Read>,
}

/// What an index file says of its crate's versions.
struct Read {
    /// The crate's name as published (cargo's directories carry it; the file's path is
    /// lowercase).
    name: String,
    /// Each version's checksum.
    checksums: HashMap<String, String>,
}

/// Crates whose versions are kept; past it the memory starts over (each file is then read once
/// more). A whole registry's run serves far more crates than one machine's jobs reuse.
const CRATES_KEPT: usize = 50_000;

/// The endpoint, served on each job's gateway.
pub struct Mirror {
    endpoint: Router,
}

impl Mirror {
    pub fn new(fetcher: Arc<Fetcher>) -> Mirror {
        let shared = Arc::new(Shared {
            fetcher,
            versions: RwLock::default(),
        });
        let endpoint = Router::new()
            .route("/index/config.json", get(config_json))
            .route("/index/{*path}", get(index_file))
            .route("/dl/{name}/{version}", get(download))
            .with_state(shared);
        Mirror { endpoint }
    }

    /// Opens a job's gateway to the endpoint at `socket` (see [`Gateway::open`]); with
    /// `sources`, each dependency cargo downloads through it is linked to the consumer's
    /// extracted copy first.
    pub fn gateway(
        &self,
        socket: &std::path::Path,
        sources: Option<Arc<JobSources>>,
    ) -> std::io::Result<Gateway> {
        Gateway::open(
            socket,
            self.endpoint.clone().layer(Extension(JobLinks(sources))),
        )
    }
}

/// The job a gateway serves, for its downloads.
#[derive(Clone)]
struct JobLinks(Option<Arc<JobSources>>);

async fn config_json() -> Json<IndexConfig> {
    Json(IndexConfig {
        dl: format!("http://{REGISTRY_HOST}/dl/{{crate}}/{{version}}"),
        api: None,
    })
}

/// Whether `version` can be a semver version (letters, digits, `.`, `-`, `+`).
fn is_version(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= 128
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
}

async fn index_file(
    State(shared): State<Arc<Shared>>,
    Extension(JobLinks(sources)): Extension<JobLinks>,
    Path(path): Path<String>,
) -> Response {
    let name = path.rsplit('/').next().unwrap_or_default().to_owned();
    if !is_crate_name(&name) {
        return (StatusCode::NOT_FOUND, "not a crate's name").into_response();
    }
    match shared.fetcher.registry().index_file_cached(&name).await {
        Ok((body, how)) => {
            shared.fetcher.count_index_file(how);
            let read = versions_of(&shared, &name, &body).await;
            // Before cargo has the file, so before it resolves with it and downloads.
            if let (Some(sources), Some(read)) = (sources, read) {
                link_stored(&shared, &sources, &read);
            }
            ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
        }
        Err(RegistryError::NotFound(_)) => StatusCode::NOT_FOUND.into_response(),
        // Cargo retries 5xx answers itself.
        Err(err) => (StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
    }
}

/// The versions and checksums of `name`'s index file `body`, read once per file, whichever
/// job is served it; `None` if the file cannot be read (cargo will say so).
async fn versions_of(shared: &Shared, name: &str, body: &[u8]) -> Option<Arc<Read>> {
    use std::hash::{Hash as _, Hasher as _};
    let key = name.to_ascii_lowercase();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    let file = (body.len(), hasher.finish());
    if let Some(known) = shared.versions.read().await.get(&key)
        && known.file == file
    {
        return Some(known.read.clone());
    }
    let read = Arc::new(Read::of(name, parse_checksums(body).ok()?));
    let mut versions = shared.versions.write().await;
    if versions.len() >= CRATES_KEPT {
        versions.clear();
    }
    versions.insert(
        key,
        Versions {
            file,
            read: read.clone(),
        },
    );
    Some(read)
}

impl Read {
    /// What the lines of the index file asked for as `requested` say. Their name and versions
    /// become paths in a job's cargo home (`<name>-<version>`), so only a crate name that is
    /// `requested` but for case, and versions that can be semver versions, are taken from them.
    fn of(requested: &str, lines: Vec<(String, String, String)>) -> Read {
        let name = lines
            .first()
            .map(|(name, _, _)| name)
            .filter(|name| is_crate_name(name) && name.eq_ignore_ascii_case(requested))
            .map_or_else(|| requested.to_owned(), String::clone);
        Read {
            name,
            checksums: lines
                .into_iter()
                .filter(|(_, version, _)| is_version(version))
                .map(|(_, version, checksum)| (version, checksum))
                .collect(),
        }
    }
}

/// Links, in the job's cargo home, each version of the crate whose sources the store holds,
/// with its archive, as a download would (`download` below): cargo then finds those versions
/// downloaded and extracted, and asks for none of them. Which of them the resolution picks is
/// not known yet; a version linked and not picked costs two links in a cargo home that goes
/// with the job. Versions the store lacks are downloaded as ever.
fn link_stored(shared: &Shared, sources: &JobSources, read: &Read) {
    for package in sources.stored(&read.name, &read.checksums) {
        let cached = shared.fetcher.cached_file(&package);
        if let Err(why) = sources.link_stored(&package, &cached) {
            tracing::debug!(%package, %why, "cargo downloads it");
        }
    }
}

async fn checksum_of(shared: &Shared, name: &str, version: &str) -> Option<String> {
    let known = shared
        .versions
        .read()
        .await
        .get(&name.to_ascii_lowercase())
        .and_then(|known| known.read.checksums.get(version).cloned());
    if known.is_some() {
        return known;
    }
    // Cargo normally reads the index first; if not, read it now.
    let body = shared.fetcher.registry().index_file(name).await.ok()?;
    versions_of(shared, name, &body)
        .await?
        .checksums
        .get(version)
        .cloned()
}

async fn download(
    State(shared): State<Arc<Shared>>,
    Extension(JobLinks(sources)): Extension<JobLinks>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if !is_crate_name(&name) || !is_version(&version) {
        return (StatusCode::NOT_FOUND, "not a crate's name and version").into_response();
    }
    let Some(checksum) = checksum_of(&shared, &name, &version).await else {
        return (
            StatusCode::NOT_FOUND,
            format!("{name}@{version} is not in the index"),
        )
            .into_response();
    };
    let package = PackageVersion {
        name,
        version,
        checksum,
    };
    match shared.fetcher.fetch(&package).await {
        Ok((bytes, _)) => {
            // Before cargo has the file, so that it finds the sources extracted and the
            // archive in place.
            if let Some(sources) = sources {
                if let Err(why) = sources.link(&package, &bytes).await {
                    tracing::debug!(%package, %why, "cargo extracts the sources itself");
                }
                let cached = shared.fetcher.cached_file(&package);
                if let Err(why) = sources.link_archive(&package, &cached) {
                    tracing::debug!(%package, %why, "cargo writes the archive itself");
                }
            }
            ([(header::CONTENT_TYPE, "application/gzip")], bytes).into_response()
        }
        Err(FetchError::Missing(why)) => (StatusCode::NOT_FOUND, why).into_response(),
        Err(FetchError::Unavailable(why)) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions_that_could_be_paths_are_refused() {
        for name in ["serde", "serde_json", "a-b", "Inflector"] {
            assert!(is_crate_name(name), "{name}");
        }
        for name in ["", "..", "a/b", "a%2Fb", "a\\b", ".cargo", &"x".repeat(65)] {
            assert!(!is_crate_name(name), "{name}");
        }
        for version in ["1.0.0", "1.0.0-alpha.1+build.5"] {
            assert!(is_version(version), "{version}");
        }
        for version in ["", "../1", "1/0", "1 0"] {
            assert!(!is_version(version), "{version}");
        }
    }

    #[test]
    fn an_index_files_lines_name_no_path_outside_the_crates_own() {
        let line =
            |name: &str, version: &str| (name.to_owned(), version.to_owned(), "c".repeat(64));
        // The name as published, when it is the one asked for.
        let read = Read::of("inflector", vec![line("Inflector", "0.11.4")]);
        assert_eq!(read.name, "Inflector");
        assert_eq!(read.checksums.keys().collect::<Vec<_>>(), ["0.11.4"]);
        // Another name, or one that is a path, is not taken; nor is a version that is a path.
        for hostile in ["../../x", "serde"] {
            let read = Read::of(
                "inflector",
                vec![line(hostile, "1.0.0"), line(hostile, "../../1")],
            );
            assert_eq!(read.name, "inflector", "{hostile}");
            assert_eq!(read.checksums.keys().collect::<Vec<_>>(), ["1.0.0"]);
        }
    }
}
