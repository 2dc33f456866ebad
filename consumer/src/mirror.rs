//! The consumer's own crates.io-compatible endpoint, the only registry cargo knows while it
//! resolves and downloads a package's dependencies (inside the sandbox, through the job's
//! [`Gateway`]). Index files are kept in the work directory and revalidated with the registry
//! (`If-None-Match`: an unchanged file costs a 304 and no body; an unreachable registry, the
//! cached copy). Downloads go through the same cache layers as the packages under test (disk,
//! S3, registry), checked against the index's checksum. So a dependency is downloaded from the
//! registry once, ever, and a second run downloads no `.crate` from it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use quarry_core::index::{IndexConfig, is_crate_name, parse_index_file};
use quarry_core::job::PackageVersion;
use quarry_infra::registry::RegistryError;
use tokio::sync::RwLock;

use crate::fetch::{FetchError, Fetcher};
use crate::gateway::{Gateway, REGISTRY_HOST};
use crate::sources::JobSources;

struct Shared {
    fetcher: Arc<Fetcher>,
    /// Checksums from the index files served so far, by (name, version).
    checksums: RwLock<HashMap<(String, String), String>>,
}

/// The endpoint, served on each job's gateway.
pub struct Mirror {
    endpoint: Router,
}

impl Mirror {
    pub fn new(fetcher: Arc<Fetcher>) -> Mirror {
        let shared = Arc::new(Shared {
            fetcher,
            checksums: RwLock::default(),
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

async fn index_file(State(shared): State<Arc<Shared>>, Path(path): Path<String>) -> Response {
    let name = path.rsplit('/').next().unwrap_or_default().to_owned();
    if !is_crate_name(&name) {
        return (StatusCode::NOT_FOUND, "not a crate's name").into_response();
    }
    match shared.fetcher.registry().index_file_cached(&name).await {
        Ok((body, how)) => {
            shared.fetcher.count_index_file(how);
            remember_checksums(&shared, &body).await;
            ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
        }
        Err(RegistryError::NotFound(_)) => StatusCode::NOT_FOUND.into_response(),
        // Cargo retries 5xx answers itself.
        Err(err) => (StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
    }
}

async fn remember_checksums(shared: &Shared, body: &[u8]) {
    let Ok(entries) = parse_index_file(body) else {
        return;
    };
    let mut checksums = shared.checksums.write().await;
    for entry in entries {
        checksums.insert((entry.name.to_ascii_lowercase(), entry.vers), entry.cksum);
    }
}

async fn checksum_of(shared: &Shared, name: &str, version: &str) -> Option<String> {
    let key = (name.to_ascii_lowercase(), version.to_owned());
    if let Some(cksum) = shared.checksums.read().await.get(&key) {
        return Some(cksum.clone());
    }
    // Cargo normally reads the index first; if not, read it now.
    let body = shared.fetcher.registry().index_file(name).await.ok()?;
    remember_checksums(shared, &body).await;
    shared.checksums.read().await.get(&key).cloned()
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
}
