//! The HTTP side of the local registry: routes, fault injection and counters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use futures::StreamExt as _;
use quarry_core::index::{CrateSummary, CratesPage, IndexConfig, PageMeta, index_path};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::corpus::Corpus;

/// A way to misbehave, applied to requests whose path contains `path_contains`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    /// Matches request paths containing this text; empty matches every request.
    pub path_contains: String,
    /// Answer with this status code instead of the real response.
    pub status: Option<u16>,
    /// With `status`, a `Retry-After` header in seconds.
    pub retry_after_secs: Option<u64>,
    /// Wait this long before answering.
    pub delay_ms: Option<u64>,
    /// Send only this many bytes of the body, then drop the connection.
    pub truncate_to: Option<usize>,
    /// Flip a byte of the body, so a download's checksum no longer matches.
    pub corrupt: bool,
    /// Apply to this many matching requests, then stop; `None` means always.
    pub times: Option<u32>,
}

/// What the registry has served since it started (faulted requests included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub downloads: u64,
    pub download_bytes: u64,
    pub index_requests: u64,
    pub index_not_modified: u64,
    pub api_requests: u64,
    pub faults_applied: u64,
}

struct Shared {
    corpus: Corpus,
    downloads_by_name: std::collections::BTreeMap<String, u64>,
    base_url: String,
    faults: Mutex<Vec<Fault>>,
    downloads: AtomicU64,
    download_bytes: AtomicU64,
    index_requests: AtomicU64,
    index_not_modified: AtomicU64,
    api_requests: AtomicU64,
    faults_applied: AtomicU64,
}

/// A registry serving in the background; it stops when this is dropped.
pub struct RunningRegistry {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningRegistry {
    /// Root of the sparse index, for `registry.index_url`.
    pub fn index_url(&self) -> String {
        format!("http://{}/index/", self.addr)
    }

    /// Root of the web API, for `registry.api_url`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    pub fn set_faults(&self, faults: Vec<Fault>) {
        *lock(&self.shared.faults) = faults;
    }
}

impl Drop for RunningRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shared {
    fn stats(&self) -> Stats {
        Stats {
            downloads: self.downloads.load(Ordering::Relaxed),
            download_bytes: self.download_bytes.load(Ordering::Relaxed),
            index_requests: self.index_requests.load(Ordering::Relaxed),
            index_not_modified: self.index_not_modified.load(Ordering::Relaxed),
            api_requests: self.api_requests.load(Ordering::Relaxed),
            faults_applied: self.faults_applied.load(Ordering::Relaxed),
        }
    }

    /// Takes the first fault matching `path`, counting down its remaining uses.
    fn take_fault(&self, path: &str) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let index = faults
            .iter()
            .position(|f| path.contains(&f.path_contains))?;
        let fault = faults[index].clone();
        if let Some(times) = &mut faults[index].times {
            *times = times.saturating_sub(1);
            if *times == 0 {
                faults.remove(index);
            }
        }
        self.faults_applied.fetch_add(1, Ordering::Relaxed);
        Some(fault)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the fault list half-updated.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Binds `addr` (port 0 picks a free one) and serves `corpus` in a background task.
pub async fn serve(corpus: Corpus, addr: SocketAddr) -> anyhow::Result<RunningRegistry> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    let downloads_by_name = corpus.dependents();
    let shared = Arc::new(Shared {
        corpus,
        downloads_by_name,
        base_url: format!("http://{addr}"),
        faults: Mutex::new(Vec::new()),
        downloads: AtomicU64::new(0),
        download_bytes: AtomicU64::new(0),
        index_requests: AtomicU64::new(0),
        index_not_modified: AtomicU64::new(0),
        api_requests: AtomicU64::new(0),
        faults_applied: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/index/config.json", get(config_json))
        .route("/index/{*path}", get(index_file))
        .route("/api/v1/crates", get(list_crates))
        .route("/api/v1/crates/{name}/{version}/download", get(download))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            inject_faults,
        ))
        // Control routes come after the fault layer so a fault can never lock tests out.
        .route("/-/stats", get(stats))
        .route(
            "/-/faults",
            get(get_faults).put(put_faults).delete(clear_faults),
        )
        .with_state(shared.clone());
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "registry server stopped");
        }
    });
    Ok(RunningRegistry { addr, shared, task })
}

async fn config_json(State(shared): State<Arc<Shared>>) -> Json<IndexConfig> {
    Json(IndexConfig {
        dl: format!("{}/api/v1/crates", shared.base_url),
        api: Some(shared.base_url.clone()),
    })
}

async fn index_file(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    shared.index_requests.fetch_add(1, Ordering::Relaxed);
    let name = path.rsplit('/').next().unwrap_or_default();
    let Some(versions) = shared.corpus.get(name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if index_path(name) != path.to_ascii_lowercase() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mut body = String::new();
    for published in versions {
        // Cannot fail: IndexEntry is plain data.
        body.push_str(&serde_json::to_string(&published.entry).expect("index entry serializes"));
        body.push('\n');
    }
    let etag = format!(
        "\"{}\"",
        hex::encode(&Sha256::digest(body.as_bytes())[..16])
    );
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        shared.index_not_modified.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        [
            (header::ETAG, etag),
            (header::CONTENT_TYPE, "text/plain".to_owned()),
        ],
        body,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    page: Option<u64>,
    per_page: Option<u64>,
    sort: Option<String>,
    q: Option<String>,
}

async fn list_crates(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<ListQuery>,
) -> Response {
    shared.api_requests.fetch_add(1, Ordering::Relaxed);
    let per_page = query.per_page.unwrap_or(10).clamp(1, 100);
    let page = query.page.unwrap_or(1).max(1);
    let sort = query.sort.as_deref().unwrap_or("alpha");
    if !matches!(sort, "alpha" | "downloads") {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"errors": [{"detail": format!("unsupported sort {sort:?}")}]})),
        )
            .into_response();
    }
    let mut crates: Vec<CrateSummary> = shared
        .corpus
        .crates
        .iter()
        .filter(|(name, _)| query.q.as_deref().is_none_or(|q| name.contains(q)))
        .filter_map(|(key, versions)| {
            let latest = versions.last()?;
            Some(CrateSummary {
                name: latest.entry.name.clone(),
                max_version: Some(latest.entry.vers.clone()),
                downloads: shared.downloads_by_name.get(key).copied().unwrap_or(0),
            })
        })
        .collect();
    if sort == "downloads" {
        crates.sort_by(|a, b| b.downloads.cmp(&a.downloads).then(a.name.cmp(&b.name)));
    }
    let total = crates.len() as u64;
    let start = usize::try_from((page - 1) * per_page).unwrap_or(usize::MAX);
    let page_crates: Vec<CrateSummary> = crates
        .into_iter()
        .skip(start)
        .take(per_page as usize)
        .collect();
    let next_page = (page * per_page < total).then(|| {
        let mut next = format!("?page={}&per_page={per_page}&sort={sort}", page + 1);
        if let Some(q) = &query.q {
            next.push_str(&format!("&q={q}"));
        }
        next
    });
    Json(CratesPage {
        crates: page_crates,
        meta: PageMeta { total, next_page },
    })
    .into_response()
}

async fn download(
    State(shared): State<Arc<Shared>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    let Some(published) = shared
        .corpus
        .get(&name)
        .and_then(|versions| versions.iter().find(|p| p.entry.vers == version))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match tokio::fs::read(&published.path).await {
        Ok(bytes) => {
            shared.downloads.fetch_add(1, Ordering::Relaxed);
            shared
                .download_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            ([(header::CONTENT_TYPE, "application/gzip")], bytes).into_response()
        }
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read {}: {err}", published.path.display()),
        )
            .into_response(),
    }
}

async fn inject_faults(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(fault) = shared.take_fault(request.uri().path()) else {
        return next.run(request).await;
    };
    if let Some(delay) = fault.delay_ms {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(status) = fault.status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, "fault injected by quarry-registry").into_response();
        if let Some(secs) = fault.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return response;
    }
    let response = next.run(request).await;
    if fault.truncate_to.is_none() && !fault.corrupt {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(mut bytes) = axum::body::to_bytes(body, usize::MAX).await.map(Vec::from) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let middle = bytes.len() / 2;
    if fault.corrupt
        && let Some(byte) = bytes.get_mut(middle)
    {
        *byte ^= 0xff;
    }
    match fault.truncate_to {
        Some(keep) if keep < bytes.len() => {
            // Announce the full length, send part of it, then fail the stream: the client sees
            // the connection close mid-body, as with a real network cut.
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            bytes.truncate(keep);
            // The pause lets the headers and the first bytes reach the client before the cut.
            let head = futures::stream::iter([Ok::<_, std::io::Error>(bytes)]);
            let cut = futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(std::io::Error::other("body cut short by an injected fault"))
            });
            Response::from_parts(parts, Body::from_stream(head.chain(cut)))
        }
        _ => {
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(bytes))
        }
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<Stats> {
    Json(shared.stats())
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Json<Vec<Fault>> {
    Json(lock(&shared.faults).clone())
}

async fn put_faults(
    State(shared): State<Arc<Shared>>,
    Json(faults): Json<Vec<Fault>>,
) -> StatusCode {
    *lock(&shared.faults) = faults;
    StatusCode::NO_CONTENT
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> StatusCode {
    lock(&shared.faults).clear();
    StatusCode::NO_CONTENT
}
