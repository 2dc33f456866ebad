//! `quarry-reporter serve`: the live view of every run, the written reports, what changed
//! between two runs, and the figures for Prometheus.
//!
//! Every page is rendered from PostgreSQL when asked for (no cache to go stale) and refreshes
//! itself; nothing needs JavaScript. Requests that change state (cancelling a run, requeueing its
//! dead-lettered jobs) need the
//! configured bearer token, compared in constant time; the read-only pages are public unless
//! configured otherwise. Everything taken from a package or a log is escaped.
//!
//! This file holds the routes; `auth.rs` who may use them, `pages.rs` the pages, `actions.rs`
//! the changes, `metrics.rs` the Prometheus figures.

mod actions;
mod auth;
mod metrics;
mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::http::StatusCode;
use axum::middleware::{self};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use quarry_infra::Config;
use quarry_infra::config::Secret;
use quarry_infra::queue::Broker;
use quarry_infra::store::{Run, Store};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::escape_html as e;

/// Results counted over this window make a run's current pace.
const PACE_WINDOW: Duration = Duration::from_secs(300);

/// Runs shown in the live view and exported as metrics: the most recent ones.
const RECENT_RUNS: usize = 50;

struct App {
    store: Store,
    config: Config,
    /// Connected on first need (queue depths), again after a failure.
    broker: Mutex<Option<Broker>>,
    token: Option<Secret>,
    /// The latest partial report of each running run (see `live.rs`).
    live: Arc<crate::live::LiveReports>,
}

impl App {
    /// The broker connection, made on first need and again after a failure (the caller drops
    /// it with `*guard = None`). Held while used: two requeues at once would read the
    /// dead-letter queue against each other.
    async fn broker(&self) -> anyhow::Result<tokio::sync::MutexGuard<'_, Option<Broker>>> {
        let mut broker = self.broker.lock().await;
        if broker.is_none() {
            *broker = Some(Broker::connect(&self.config.rabbitmq).await?);
        }
        Ok(broker)
    }
}

/// Starts the server on the configured address; runs until `shutdown` is cancelled. Returns
/// the address it listens on (for tests binding port 0) and the server's task.
pub async fn start(
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let store = Store::connect(&config.database).await?;
    // A service that may start before anything else: the schema must be there to read.
    store.migrate().await?;
    // Read from reporter.token_file, if given, by Config::load.
    let token = config.reporter.token.clone();
    if token.as_ref().is_some_and(|t| t.expose().len() < 16) {
        anyhow::bail!("the reporter token is too short: use at least 16 characters");
    }
    if token.is_none() && !config.reporter.public {
        anyhow::bail!(
            "reporter.public = false needs a token (QUARRY_REPORTER_TOKEN or token_file)"
        );
    }
    let live = Arc::new(crate::live::LiveReports::default());
    let refresher = (config.reporter.live_report_secs > 0).then(|| {
        crate::live::spawn(
            config.clone(),
            store.clone(),
            live.clone(),
            Duration::from_secs(config.reporter.live_report_secs),
            RECENT_RUNS,
            shutdown.clone(),
        )
    });
    let app = Arc::new(App {
        store,
        config: config.clone(),
        broker: Mutex::new(None),
        token,
        live,
    });
    let reports = tower_http::services::ServeDir::new(&config.reporter.output_dir);
    let read = Router::new()
        .route("/", get(pages::index))
        .route("/runs/{run}", get(pages::run_page))
        .route("/compare/{a}/{b}", get(pages::compare_page))
        .route("/metrics", get(metrics::metrics))
        .nest_service("/reports", reports)
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            auth::read_access,
        ));
    let write = Router::new()
        .route("/runs/{run}/cancel", post(actions::cancel))
        .route("/runs/{run}/requeue", post(actions::requeue))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            auth::write_access,
        ));
    // For probes: open whatever `public` says, and touching nothing behind the server.
    let health = Router::new().route("/healthz", get(|| async { "ok\n" }));
    let router = read.merge(write).with_state(app).merge(health);
    let addr: SocketAddr = config.reporter.listen.parse().with_context(|| {
        format!(
            "reporter.listen {:?} is not an address",
            config.reporter.listen
        )
    })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "the reporter's server stopped");
        }
        // A partial report being written is finished, not cut off.
        if let Some(refresher) = refresher
            && let Err(err) = refresher.await
        {
            tracing::error!(%err, "the partial reports' writer failed");
        }
    });
    Ok((addr, task))
}

/// An error page: the status and a message safe to show.
struct Failure(StatusCode, String);

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Failure {
        tracing::error!(error = %format!("{err:#}"), "request failed");
        Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("{err:#}"))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = pages::page("Error", false, &format!("<p>{}</p>", e(&self.1)));
        (self.0, body).into_response()
    }
}

async fn lookup(app: &App, run: &str) -> Result<Run, Failure> {
    app.store
        .find_run(run)
        .await
        .map_err(|err| Failure(StatusCode::NOT_FOUND, format!("{err:#}")))
}
