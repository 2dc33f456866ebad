//! A client for crates.io-compatible registries: the web API's paged crate listing, the sparse
//! index, and downloads. The index's data types are `quarry_core::index`.
//!
//! Every request carries the configured User-Agent and is retried with exponential backoff and
//! jitter when the failure is transient (connection errors, timeouts, 429 and 5xx).

use std::time::Duration;

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable as _};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;

use quarry_core::index::{
    CratesPage, IndexConfig, IndexEntry, download_url, index_path, parse_index_file,
};

use crate::config::RegistryConfig;

/// Why a registry request failed, sorted by whether trying again could help.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Transient(String),
    /// HTTP 429: the registry asked us to slow down, perhaps saying for how long.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Permanent(String),
    #[error("not found: {0}")]
    NotFound(String),
}

impl RegistryError {
    fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Transient(_) | RegistryError::RateLimited { .. }
        )
    }

    /// The wait before the next try: the registry's `Retry-After` when it gave one (capped, and
    /// never shorter than the backoff's), else the backoff's. `None` means no retry is left.
    fn next_delay(&self, backoff: Option<Duration>) -> Option<Duration> {
        const LONGEST_WAIT: Duration = Duration::from_secs(300);
        match (self, backoff) {
            (
                RegistryError::RateLimited {
                    retry_after: Some(asked),
                    ..
                },
                Some(backoff),
            ) => Some((*asked).min(LONGEST_WAIT).max(backoff)),
            (_, backoff) => backoff,
        }
    }
}

#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    index_url: String,
    api_url: String,
    index_config: std::sync::Arc<OnceCell<IndexConfig>>,
    backoff: ExponentialBuilder,
    /// Politeness towards the web API: the earliest moment the next API request may start.
    api_slot: std::sync::Arc<tokio::sync::Mutex<tokio::time::Instant>>,
    api_interval: Duration,
    /// Index files kept on disk with their validators, so an unchanged file is not downloaded
    /// again (conditional requests: `If-None-Match`, `If-Modified-Since`).
    index_cache: Option<std::path::PathBuf>,
    /// How long a confirmed index file is used without asking (`index_fresh_secs`).
    index_fresh: Duration,
    /// When the registry last confirmed each cached index file, by file name.
    confirmed:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
}

/// What `index_file` had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexFetch {
    /// The registry sent the file.
    Downloaded,
    /// The registry said the cached copy is current (304): nothing downloaded.
    NotModified,
    /// The registry could not be reached; the cached copy was used.
    Stale,
    /// The registry confirmed the cached copy less than `index_fresh_secs` ago: not asked.
    Fresh,
}

impl RegistryClient {
    pub fn new(config: &RegistryConfig) -> anyhow::Result<RegistryClient> {
        let http = reqwest::Client::builder()
            .user_agent(&config.user_agent)
            .timeout(config.request_timeout())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(RegistryClient {
            http,
            index_url: with_trailing_slash(&config.index_url),
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            index_config: Default::default(),
            backoff: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(30))
                .with_max_times(5)
                .with_jitter(),
            api_slot: std::sync::Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now())),
            api_interval: Duration::from_millis(config.api_min_interval_ms),
            index_cache: None,
            index_fresh: Duration::from_secs(config.index_fresh_secs),
            confirmed: Default::default(),
        })
    }

    /// Keeps index files in `dir` and asks the registry only whether they changed.
    pub fn with_index_cache(mut self, dir: std::path::PathBuf) -> anyhow::Result<RegistryClient> {
        // One directory per registry: the same crate name means another file elsewhere.
        let registry = hex::encode(&Sha256::digest(self.index_url.as_bytes())[..8]);
        let dir = dir.join(registry);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the index cache {}", dir.display()))?;
        self.index_cache = Some(dir);
        Ok(self)
    }

    /// Waits for this client's turn at the web API (at most one request per interval).
    async fn api_turn(&self) {
        let mut next = self.api_slot.lock().await;
        tokio::time::sleep_until(*next).await;
        *next = tokio::time::Instant::now() + self.api_interval;
    }

    /// Overrides the retry policy (tests use short delays).
    pub fn with_backoff(mut self, backoff: ExponentialBuilder) -> RegistryClient {
        self.backoff = backoff;
        self
    }

    pub async fn index_config(&self) -> Result<&IndexConfig, RegistryError> {
        self.index_config
            .get_or_try_init(|| async {
                let url = format!("{}config.json", self.index_url);
                let body = self.get(&url).await?;
                serde_json::from_slice(&body).map_err(|e| {
                    RegistryError::Permanent(format!("{url} is not a registry config.json: {e}"))
                })
            })
            .await
    }

    /// Every version of `name` listed in the index, oldest first.
    pub async fn index_entries(&self, name: &str) -> Result<Vec<IndexEntry>, RegistryError> {
        let body = self.index_file(name).await?;
        parse_index_file(&body)
            .map_err(|e| RegistryError::Permanent(format!("malformed index file for {name}: {e}")))
    }

    /// The raw index file of `name`, as the registry serves it.
    pub async fn index_file(&self, name: &str) -> Result<Bytes, RegistryError> {
        Ok(self.index_file_cached(name).await?.0)
    }

    /// An index file and how it was had. With an index cache, a cached file is used as it is
    /// for `index_fresh_secs` after the registry confirmed it, then revalidated (a 304 costs no
    /// body), and used as it is when the registry cannot be reached.
    pub async fn index_file_cached(
        &self,
        name: &str,
    ) -> Result<(Bytes, IndexFetch), RegistryError> {
        // A name from a dependency list is a manifest's: never a path in the cache, nor a URL.
        if !quarry_core::index::is_crate_name(name) {
            return Err(RegistryError::Permanent(format!(
                "{name:?} is not a crate name"
            )));
        }
        let url = format!("{}{}", self.index_url, index_path(name));
        let Some(dir) = &self.index_cache else {
            return Ok((self.get(&url).await?, IndexFetch::Downloaded));
        };
        // One file per index file: its validators as a JSON line, then the body, replaced
        // whole (written beside, then renamed) so validators and body always go together.
        let file_name = name.to_ascii_lowercase();
        let file = dir.join(&file_name);
        let fresh = self
            .confirmed
            .lock()
            .expect("no panic holds the lock")
            .get(&file_name)
            .is_some_and(|at| at.elapsed() < self.index_fresh);
        let cached: Option<(Bytes, Vec<(String, String)>)> =
            tokio::fs::read(&file).await.ok().and_then(|stored| {
                let stored = Bytes::from(stored);
                let end = stored.iter().position(|b| *b == b'\n')?;
                let validators = serde_json::from_slice(&stored[..end]).ok()?;
                Some((stored.slice(end + 1..), validators))
            });
        if fresh && let Some((body, _)) = &cached {
            return Ok((body.clone(), IndexFetch::Fresh));
        }
        let validators = cached.as_ref().map(|(_, v)| v.clone()).unwrap_or_default();
        let fetched = (|| self.get_conditional(&url, &validators))
            .retry(self.backoff)
            .when(RegistryError::is_transient)
            .adjust(|err, backoff| err.next_delay(backoff))
            .await;
        if matches!((&fetched, &cached), (Ok(Some(_)), _) | (Ok(None), Some(_))) {
            self.confirmed
                .lock()
                .expect("no panic holds the lock")
                .insert(file_name, std::time::Instant::now());
        }
        match (fetched, cached) {
            (Ok(None), Some((body, _))) => Ok((body, IndexFetch::NotModified)),
            (Ok(None), None) => Err(RegistryError::Permanent(format!(
                "GET {url}: 304 for a file that is not cached"
            ))),
            (Ok(Some((body, validators))), _) => {
                let mut stored = serde_json::to_vec(&validators).unwrap_or_default();
                stored.push(b'\n');
                stored.extend_from_slice(&body);
                let temp = file.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
                let stored = async {
                    tokio::fs::write(&temp, &stored).await?;
                    tokio::fs::rename(&temp, &file).await
                };
                if let Err(err) = stored.await {
                    tracing::warn!(file = %file.display(), %err, "cannot cache an index file");
                }
                Ok((body, IndexFetch::Downloaded))
            }
            (Err(err), Some((body, _))) if err.is_transient() => {
                tracing::warn!(%url, %err, "registry unreachable; using the cached index file");
                Ok((body, IndexFetch::Stale))
            }
            (Err(err), _) => Err(err),
        }
    }

    /// A GET that sends the cached file's validators: `None` when the registry answers 304.
    async fn get_conditional(
        &self,
        url: &str,
        validators: &[(String, String)],
    ) -> Result<Option<(Bytes, Vec<(String, String)>)>, RegistryError> {
        let mut request = self.http.get(url);
        for (name, value) in validators {
            match name.as_str() {
                "etag" => request = request.header(reqwest::header::IF_NONE_MATCH, value),
                "last-modified" => {
                    request = request.header(reqwest::header::IF_MODIFIED_SINCE, value)
                }
                _ => {}
            }
        }
        let response = request
            .send()
            .await
            .map_err(|e| RegistryError::Transient(format!("GET {url}: {}", error_chain(&e))))?;
        if response.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let validators = [
            ("etag", reqwest::header::ETAG),
            ("last-modified", reqwest::header::LAST_MODIFIED),
        ]
        .into_iter()
        .filter_map(|(name, header)| {
            let value = response.headers().get(header)?.to_str().ok()?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect();
        let body = check_response(url, response).await?;
        Ok(Some((body, validators)))
    }

    /// One page of the crate listing; `next` is the previous page's `meta.next_page`.
    pub async fn crates_page(
        &self,
        next: Option<&str>,
        per_page: u32,
    ) -> Result<CratesPage, RegistryError> {
        let query = match next {
            Some(query) => query.to_owned(),
            None => format!("?page=1&per_page={per_page}&sort=alpha"),
        };
        let url = format!("{}/api/v1/crates{query}", self.api_url);
        let body = self.get_api(&url).await?;
        serde_json::from_slice(&body).map_err(|e| {
            RegistryError::Permanent(format!("{url} is not a crates.io listing page: {e}"))
        })
    }

    /// Downloads a `.crate` file. The caller checks its checksum.
    pub async fn download(&self, name: &str, version: &str) -> Result<Bytes, RegistryError> {
        let config = self.index_config().await?;
        let url = download_url(&config.dl, name, version);
        self.get(&url).await
    }

    async fn get(&self, url: &str) -> Result<Bytes, RegistryError> {
        self.get_with_retries(url, false).await
    }

    /// A web API request: spaced out by the configured interval, retries included.
    async fn get_api(&self, url: &str) -> Result<Bytes, RegistryError> {
        self.get_with_retries(url, true).await
    }

    async fn get_with_retries(&self, url: &str, api: bool) -> Result<Bytes, RegistryError> {
        (|| async {
            if api {
                self.api_turn().await;
            }
            self.get_once(url).await
        })
        .retry(self.backoff)
        .when(RegistryError::is_transient)
        .adjust(|err, backoff| err.next_delay(backoff))
        .notify(
            |err, delay| tracing::warn!(%url, %err, ?delay, "registry request failed, retrying"),
        )
        .await
    }

    async fn get_once(&self, url: &str) -> Result<Bytes, RegistryError> {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| RegistryError::Transient(format!("GET {url}: {}", error_chain(&e))))?;
        check_response(url, response).await
    }
}

/// The body of a response, or the error its status means (404, 429 with `Retry-After`, 5xx).
async fn check_response(url: &str, response: reqwest::Response) -> Result<Bytes, RegistryError> {
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(RegistryError::NotFound(url.to_owned()));
    }
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        // Retry-After in seconds; the HTTP-date form is rare enough to fall back to backoff.
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(RegistryError::RateLimited {
            message: format!("GET {url}: HTTP {status}"),
            retry_after,
        });
    }
    if status.is_server_error() {
        return Err(RegistryError::Transient(format!(
            "GET {url}: HTTP {status}"
        )));
    }
    if !status.is_success() {
        return Err(RegistryError::Permanent(format!(
            "GET {url}: HTTP {status}"
        )));
    }
    response.bytes().await.map_err(|e| {
        RegistryError::Transient(format!("GET {url}: body cut short: {}", error_chain(&e)))
    })
}

fn with_trailing_slash(url: &str) -> String {
    let url = url.strip_prefix("sparse+").unwrap_or(url);
    if url.ends_with('/') {
        url.to_owned()
    } else {
        format!("{url}/")
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dependency lists are manifests': a name that is not a crate name is refused before it
    /// becomes a URL or a file of the index cache (a path out of it, or bytes that would split a
    /// character where the index path cuts the name).
    #[tokio::test]
    async fn a_name_that_is_not_a_crate_name_is_never_asked_for() {
        let cache = tempfile::tempdir().unwrap();
        // Nothing listens there: asking would end in another error than this one.
        let config = RegistryConfig {
            index_url: "http://127.0.0.1:9/index/".into(),
            ..Default::default()
        };
        let client = RegistryClient::new(&config)
            .unwrap()
            .with_index_cache(cache.path().join("index"))
            .unwrap();
        for name in ["../../escaped", "a/b", "a\u{e9}b", "", &"a".repeat(65)] {
            match client.index_entries(name).await {
                Err(RegistryError::Permanent(why)) => {
                    assert!(why.contains("is not a crate name"), "{why}")
                }
                other => panic!("{name:?}: {other:?}"),
            }
        }
        let written: Vec<_> = walk(cache.path());
        assert_eq!(
            written.len(),
            2,
            "the cache's directories only: {written:?}"
        );
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.extend(walk(&path));
            }
            found.push(path);
        }
        found
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let limited = |secs| RegistryError::RateLimited {
            message: String::new(),
            retry_after: Some(Duration::from_secs(secs)),
        };
        let backoff = Some(Duration::from_millis(200));
        assert_eq!(limited(7).next_delay(backoff), Some(Duration::from_secs(7)));
        assert_eq!(
            limited(86_400).next_delay(backoff),
            Some(Duration::from_secs(300)),
            "a huge Retry-After is capped"
        );
        assert_eq!(limited(7).next_delay(None), None, "no retries left");
        assert_eq!(
            RegistryError::Transient(String::new()).next_delay(backoff),
            backoff
        );
    }
}
