//! `quarry-reporter serve`: the live view of every run, the written reports, what changed
//! between two runs, and the figures for Prometheus.
//!
//! Every page is rendered from PostgreSQL when asked for (no cache to go stale) and refreshes
//! itself; nothing needs JavaScript. Requests that change state (cancelling a run, requeueing its
//! dead-lettered jobs) need the
//! configured bearer token, compared in constant time; the read-only pages are public unless
//! configured otherwise. Everything taken from a package or a log is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::Utc;
use prometheus::{Encoder as _, GaugeVec, IntGaugeVec, Opts, Registry, TextEncoder};
use quarry_core::progress::{Pace, human_duration};
use quarry_infra::Config;
use quarry_infra::config::Secret;
use quarry_infra::queue::Broker;
use quarry_infra::store::{Run, Store};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::compare::{Category, categorize};
use crate::{escape_href, escape_html as e};

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
        .route("/", get(index))
        .route("/runs/{run}", get(run_page))
        .route("/compare/{a}/{b}", get(compare_page))
        .route("/metrics", get(metrics))
        .nest_service("/reports", reports)
        .route_layer(middleware::from_fn_with_state(app.clone(), read_access));
    let write = Router::new()
        .route("/runs/{run}/cancel", post(cancel))
        .route("/runs/{run}/requeue", post(requeue))
        .route_layer(middleware::from_fn_with_state(app.clone(), write_access));
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
        let body = page("Error", false, &format!("<p>{}</p>", e(&self.1)));
        (self.0, body).into_response()
    }
}

/// Whether the request carries the token, compared in constant time.
fn authorized(app: &App, request: &Request) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some(token) = &app.token else {
        return false;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    bool::from(given.as_bytes().ct_eq(token.expose().as_bytes()))
}

async fn read_access(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if app.config.reporter.public || authorized(&app, &request) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

async fn write_access(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if app.token.is_none() {
        return Failure(
            StatusCode::FORBIDDEN,
            "changes are disabled: no reporter token is configured".into(),
        )
        .into_response();
    }
    if authorized(&app, &request) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a valid bearer token is required\n",
    )
        .into_response()
}

async fn lookup(app: &App, run: &str) -> Result<Run, Failure> {
    app.store
        .find_run(run)
        .await
        .map_err(|err| Failure(StatusCode::NOT_FOUND, format!("{err:#}")))
}

fn page(title: &str, refresh: bool, body: &str) -> Html<String> {
    let refresh = if refresh {
        "<meta http-equiv=\"refresh\" content=\"10\">"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
         <link rel=\"icon\" href=\"data:,\">\
         <title>{title} · Quarry</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;}}table{{border-collapse:collapse;margin-bottom:1.5em;}}\
         td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left;}}\
         progress{{width:20em;}}.lost{{color:#a11;}}.alive{{color:#16691c;}}\
         </style></head><body>\n<p><a href=\"/\">Quarry</a></p>\n<h1>{title}</h1>\n{body}</body></html>\n",
        title = e(title),
    ))
}

fn run_link(run: &Run) -> String {
    format!(
        "<a href=\"/runs/{}\">{}</a>",
        escape_href(&run.name),
        e(&run.name)
    )
}

async fn index(State(app): State<Arc<App>>) -> Result<Html<String>, Failure> {
    let mut body = String::from(
        "<h2>Runs</h2>\n<table id=\"runs\"><tr><th>run</th><th>progress</th><th>done</th>\
         <th>per minute</th><th>ETA</th><th>dead-lettered</th><th>state</th></tr>\n",
    );
    let runs = app.store.runs().await?;
    for run in runs.iter().rev().take(RECENT_RUNS) {
        let figures = app.store.run_figures(run.id, PACE_WINDOW).await?;
        let pace = Pace::of(&figures);
        let known = figures.progress.total.unwrap_or(figures.progress.recorded);
        let state = if run.cancelled_at.is_some() {
            "cancelled"
        } else if figures.progress.is_complete() {
            "complete"
        } else if figures.progress.total.is_none() {
            "publishing"
        } else {
            "running"
        };
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td><progress max=\"{known}\" value=\"{done}\"></progress></td>\
             <td data-run-finished=\"{name}\">{done}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{state}</td></tr>",
            run_link(run),
            pace.per_second * 60.0,
            pace.eta_secs.map_or("–".to_owned(), human_duration),
            figures.dead_lettered,
            done = figures.progress.finished,
            name = e(&run.name),
        );
    }
    body.push_str("</table>\n");
    render_fleet(&app, &mut body).await?;
    Ok(page("Runs", true, &body))
}

async fn render_fleet(app: &App, body: &mut String) -> anyhow::Result<()> {
    let now = Utc::now();
    let fleet = app.store.fleet(now - chrono::Duration::hours(1)).await?;
    let _ = write!(
        body,
        "<h2>Consumers</h2>\n<table id=\"fleet\"><tr><th>consumer</th><th>host</th><th>state</th>\
         <th>last heartbeat</th><th>jobs done</th><th>jobs in hand</th></tr>\n"
    );
    for member in fleet {
        let status = member.status(now);
        let in_hand: Vec<String> = member.current_jobs.iter().map(|j| j.to_string()).collect();
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"{status}\">{status}</td><td>{}s ago</td>\
             <td>{}</td><td>{}</td></tr>",
            e(&member.name),
            e(&member.host),
            (now - member.heartbeat_at).num_seconds(),
            member.jobs_done,
            e(&in_hand.join(", ")),
        );
    }
    body.push_str("</table>\n");
    Ok(())
}

async fn run_page(
    State(app): State<Arc<App>>,
    Path(run): Path<String>,
) -> Result<Html<String>, Failure> {
    let run = lookup(&app, &run).await?;
    let figures = app.store.run_figures(run.id, PACE_WINDOW).await?;
    let pace = Pace::of(&figures);
    let progress = figures.progress;
    let mut body = format!(
        "<p>{id} · created {created}</p>\n<p><progress max=\"{known}\" value=\"{done}\"></progress> \
         <span data-count=\"finished\">{done}</span> of <span data-count=\"total\">{total}</span> jobs · \
         {rate:.1} per minute · ETA {eta} · <span data-count=\"dead-lettered\">{dead}</span> dead-lettered</p>\n",
        id = run.id,
        created = run.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
        known = progress.total.unwrap_or(progress.recorded),
        done = progress.finished,
        total = progress
            .total
            .map_or_else(|| format!("{}+", progress.recorded), |t| t.to_string()),
        rate = pace.per_second * 60.0,
        eta = pace.eta_secs.map_or("–".to_owned(), human_duration),
        dead = figures.dead_lettered,
    );
    if run.cancelled_at.is_some() {
        body.push_str("<p><strong>Cancelled</strong>: its remaining jobs are skipped.</p>\n");
    }
    let report = app
        .config
        .reporter
        .output_dir
        .join(&run.name)
        .join("index.html");
    if report.is_file() {
        let _ = writeln!(
            body,
            "<p><a href=\"/reports/{}/index.html\">The written report</a></p>",
            escape_href(&run.name)
        );
    }
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    body.push_str(
        "<h2>Outcomes</h2>\n<table id=\"outcomes\"><tr><th>toolchain</th><th>outcome</th><th>jobs</th></tr>\n",
    );
    for (toolchain, outcome, count) in &figures.outcomes {
        *totals.entry(outcome.to_string()).or_default() += count;
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{outcome}</td><td data-count=\"{}/{outcome}\">{count}</td></tr>",
            e(toolchain),
            e(toolchain),
        );
    }
    for (outcome, count) in &totals {
        let _ = writeln!(
            body,
            "<tr><td>all</td><td>{outcome}</td><td data-count=\"{outcome}\">{count}</td></tr>"
        );
    }
    body.push_str("</table>\n");
    if let Some(snapshot) = app.live.get(run.id) {
        live_regressions(&mut body, &run, &snapshot);
    }
    let failures = app.store.recent_failures(run.id, 50).await?;
    body.push_str("<h2>Latest failures</h2>\n<table id=\"failures\"><tr><th>package</th><th>toolchain</th><th>outcome</th><th>at</th><th></th></tr>\n");
    for f in &failures {
        let package = format!("{}@{}", f.crate_name, f.crate_version);
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>quarry-reporter explain {} {}</code></td></tr>",
            e(&package),
            e(&f.toolchain),
            f.outcome,
            f.at.format("%H:%M:%S"),
            e(&run.name),
            e(&package),
        );
    }
    body.push_str("</table>\n");
    let dead = app.store.dead_letters(run.id, 50).await?;
    body.push_str("<h2>Dead-lettered</h2>\n");
    if !dead.is_empty() {
        let _ = writeln!(
            body,
            "<p>Fixed what made them fail? Requeue them: <code>quarry-producer requeue {}</code>, \
             or <code>POST /runs/{}/requeue</code> with the reporter's bearer token.</p>",
            e(&run.name),
            e(&escape_href(&run.name)),
        );
    }
    body.push_str("<table id=\"dead-letters\"><tr><th>package</th><th>toolchain</th><th>at</th><th>reason</th></tr>\n");
    for d in &dead {
        let _ = writeln!(
            body,
            "<tr><td>{}@{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e(&d.crate_name),
            e(&d.crate_version),
            e(&d.toolchain),
            d.at.format("%H:%M:%S"),
            e(d.reason.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</table>\n");
    render_fleet(&app, &mut body).await?;
    Ok(page(&format!("Run {}", run.name), true, &body))
}

/// The regressions of the run's latest partial report, grouped as the report groups them.
fn live_regressions(body: &mut String, run: &Run, snapshot: &crate::live::Snapshot) {
    if !snapshot.compared {
        return;
    }
    let _ = writeln!(
        body,
        "<h2>Regressions so far: <span data-count=\"live-regressed\">{}</span> crates, \
         <span data-count=\"live-causes\">{}</span> root causes</h2>\n<p>From the report written \
         at {} over {} of {} results: <a href=\"/reports/{}/index.html\">the {} report</a>.</p>\n<ol>",
        snapshot.regressed_crates,
        snapshot.causes,
        snapshot.at.format("%H:%M:%S UTC"),
        snapshot.finished,
        snapshot
            .total
            .map_or_else(|| "?".to_owned(), |t| t.to_string()),
        escape_href(&run.name),
        if snapshot.complete {
            "final"
        } else {
            "partial"
        },
    );
    for (n, group) in snapshot.groups.iter().enumerate() {
        let roots: Vec<String> = group
            .roots
            .iter()
            .map(|root| {
                let mut text = e(&format!("{}@{}", root.name, root.version));
                if !root.broken.is_empty() {
                    let _ = write!(text, " (and {} that depend on it)", root.broken.len());
                }
                text
            })
            .collect();
        let _ = writeln!(
            body,
            "<li><strong>{}</strong> · <span data-count=\"live-group-{}\">{}</span> crates: {}</li>",
            e(&group.cause),
            n + 1,
            group.crates,
            roots.join(", "),
        );
    }
    body.push_str("</ol>\n");
}

/// The toolchain a run's results are compared on: its *end* toolchain (its only one, for a
/// one-toolchain run).
fn end_toolchain(run: &Run) -> Option<String> {
    crate::toolchains(&run.definition).pop()
}

async fn compare_page(
    State(app): State<Arc<App>>,
    Path((a, b)): Path<(String, String)>,
) -> Result<Html<String>, Failure> {
    let (a, b) = (lookup(&app, &a).await?, lookup(&app, &b).await?);
    let (Some(toolchain_a), Some(toolchain_b)) = (end_toolchain(&a), end_toolchain(&b)) else {
        return Err(Failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "a run has no toolchain".into(),
        ));
    };
    let (changes, same) = app
        .store
        .changes((a.id, &toolchain_a), (b.id, &toolchain_b))
        .await?;
    let mut body = format!(
        "<p>{} ({}) → {} ({}): <span data-count=\"changed\">{}</span> packages changed outcome, \
         <span data-count=\"same\">{same}</span> did not.</p>\n\
         <table id=\"changes\"><tr><th>package</th><th>version</th><th>{}</th><th>{}</th><th>category</th></tr>\n",
        run_link(&a),
        e(&toolchain_a),
        run_link(&b),
        e(&toolchain_b),
        changes.len(),
        e(&a.name),
        e(&b.name),
    );
    for change in &changes {
        let category = categorize(Some(change.before.into()), Some(change.after.into()), None);
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e(&change.crate_name),
            e(&change.crate_version),
            change.before,
            change.after,
            category.as_str(),
        );
    }
    body.push_str("</table>\n");
    // Each run's own regressions (start to end side), by package: new in b, gone since a.
    if let (Some(before), Some(after)) = (
        regressed(&app.store, &a).await?,
        regressed(&app.store, &b).await?,
    ) {
        for (heading, key, names) in [
            (
                format!("New regressions: in {}, not in {}", b.name, a.name),
                "new-regressions",
                after.difference(&before).collect::<Vec<_>>(),
            ),
            (
                format!(
                    "Gone: regressions of {} that {} does not have",
                    a.name, b.name
                ),
                "gone-regressions",
                before.difference(&after).collect::<Vec<_>>(),
            ),
        ] {
            let _ = writeln!(
                body,
                "<h2>{} (<span data-count=\"{key}\">{}</span>)</h2>\n<ul id=\"{key}\">",
                e(&heading),
                names.len()
            );
            for name in names {
                let _ = writeln!(body, "<li>{}</li>", e(name));
            }
            body.push_str("</ul>\n");
        }
    }
    Ok(page(
        &format!("{} compared with {}", a.name, b.name),
        false,
        &body,
    ))
}

/// The packages (by name) that regressed between `run`'s two sides; `None` for a run of one.
async fn regressed(
    store: &Store,
    run: &Run,
) -> anyhow::Result<Option<std::collections::BTreeSet<String>>> {
    let [start, end] = match <[String; 2]>::try_from(crate::toolchains(&run.definition)) {
        Ok(sides) => sides,
        Err(_) => return Ok(None),
    };
    let rows = store.package_outcomes(run.id).await?;
    Ok(Some(
        quarry_core::category::package_categories(rows, &start, &end)
            .into_iter()
            .filter(|(_, category)| {
                matches!(category, Category::Regressed | Category::RegressedIce)
            })
            .map(|((name, _), _)| name)
            .collect(),
    ))
}

async fn cancel(State(app): State<Arc<App>>, Path(run): Path<String>) -> Result<Redirect, Failure> {
    let run = lookup(&app, &run).await?;
    if app.store.cancel_run(run.id).await? {
        tracing::info!(run = %run.name, "run cancelled through the reporter");
    }
    Ok(Redirect::to(&format!("/runs/{}", escape_href(&run.name))))
}

/// Requeues the run's dead-lettered jobs (see `quarry_infra::requeue`) and says what it did.
async fn requeue(State(app): State<Arc<App>>, Path(run): Path<String>) -> Result<String, Failure> {
    let run = lookup(&app, &run).await?;
    // Held throughout: two requeues at once would read the dead-letter queue against each other.
    let mut broker = app.broker.lock().await;
    if broker.is_none() {
        *broker = Some(Broker::connect(&app.config.rabbitmq).await?);
    }
    let connected = broker.as_ref().context("no broker")?;
    let requeued = quarry_infra::requeue::requeue_dead_letters(
        &app.store,
        connected,
        &run,
        "quarry-reporter serve (POST /runs/RUN/requeue)",
    )
    .await;
    let requeued = match requeued {
        Ok(requeued) => requeued,
        Err(err) => {
            // The connection may be what failed: the next request makes a new one.
            *broker = None;
            return Err(Failure(StatusCode::CONFLICT, format!("{err:#}")));
        }
    };
    tracing::info!(run = %run.name, jobs = requeued.jobs, "dead letters requeued through the reporter");
    Ok(format!(
        "requeued {} dead-lettered jobs of {} ({} messages removed from the dead-letter queue)\n",
        requeued.jobs, run.name, requeued.dead_letters_removed
    ))
}

/// The reporter's Prometheus figures: every recent run's progress, pace and outcomes, the
/// queues' depths and the fleet. Computed from the database (and the broker) on each scrape.
async fn metrics(State(app): State<Arc<App>>) -> Result<Response, Failure> {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| -> anyhow::Result<IntGaugeVec> {
        let gauge = IntGaugeVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(gauge.clone()))?;
        Ok(gauge)
    };
    let float = |name: &str, help: &str, labels: &[&str]| -> anyhow::Result<GaugeVec> {
        let gauge = GaugeVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(gauge.clone()))?;
        Ok(gauge)
    };
    let jobs = gauge(
        "quarry_run_jobs",
        "Jobs of a run: total (recorded so far), finished, pending, dead_lettered",
        &["run", "state"],
    )?;
    let outcomes = gauge(
        "quarry_run_outcomes",
        "Results of a run by toolchain and outcome",
        &["run", "toolchain", "outcome"],
    )?;
    let rate = float(
        "quarry_run_rate_jobs_per_second",
        "Results per second over the last five minutes",
        &["run"],
    )?;
    let eta = float(
        "quarry_run_eta_seconds",
        "Seconds until the run's last result at its current pace (absent when nothing moves)",
        &["run"],
    )?;
    let categories = gauge(
        "quarry_run_categories",
        "Packages of a two-toolchain run by category (regressed, fixed, ...)",
        &["run", "category"],
    )?;
    let ready = gauge(
        "quarry_queue_messages_ready",
        "Messages ready in a queue",
        &["queue"],
    )?;
    let queue_consumers = gauge(
        "quarry_queue_consumers",
        "Consumers attached to a queue",
        &["queue"],
    )?;
    let fleet = gauge(
        "quarry_fleet_consumers",
        "Consumers by state (alive, lost) among those heard from in the last hour",
        &["state"],
    )?;

    let runs = app.store.runs().await?;
    for run in runs.iter().rev().take(RECENT_RUNS) {
        let name = run.name.as_str();
        let figures = app.store.run_figures(run.id, PACE_WINDOW).await?;
        let pace = Pace::of(&figures);
        let progress = figures.progress;
        let total = progress.total.unwrap_or(progress.recorded);
        jobs.with_label_values(&[name, "total"]).set(total);
        jobs.with_label_values(&[name, "finished"])
            .set(progress.finished);
        jobs.with_label_values(&[name, "pending"]).set(pace.pending);
        jobs.with_label_values(&[name, "dead_lettered"])
            .set(figures.dead_lettered);
        for (toolchain, outcome, count) in &figures.outcomes {
            outcomes
                .with_label_values(&[name, toolchain.as_str(), outcome.as_str()])
                .set(*count);
        }
        rate.with_label_values(&[name]).set(pace.per_second);
        if let Some(secs) = pace.eta_secs {
            eta.with_label_values(&[name]).set(secs);
        }
        if let [start, end] = crate::toolchains(&run.definition).as_slice() {
            let mut by_category: BTreeMap<&str, i64> = BTreeMap::new();
            for (s, t, rerun, n) in app.store.outcome_pairs(run.id, start, end).await? {
                *by_category
                    .entry(categorize(s, t, rerun).as_str())
                    .or_default() += n;
            }
            for (category, n) in by_category {
                categories.with_label_values(&[name, category]).set(n);
            }
        }
    }
    let now = Utc::now();
    let mut states: BTreeMap<&str, i64> = [("alive", 0), ("lost", 0)].into();
    for member in app.store.fleet(now - chrono::Duration::hours(1)).await? {
        if let Some(n) = states.get_mut(member.status(now)) {
            *n += 1;
        }
    }
    for (state, n) in states {
        fleet.with_label_values(&[state]).set(n);
    }
    // The broker may be down while the database is not: the run figures still go out.
    match queue_depths(&app).await {
        Ok(depths) => {
            for (queue, messages, consumers) in depths {
                ready.with_label_values(&[&queue]).set(i64::from(messages));
                queue_consumers
                    .with_label_values(&[&queue])
                    .set(i64::from(consumers));
            }
        }
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "cannot read the queues' depths");
            *app.broker.lock().await = None;
        }
    }
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .context("cannot encode the metrics")?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn queue_depths(app: &App) -> anyhow::Result<Vec<(String, u32, u32)>> {
    let mut broker = app.broker.lock().await;
    if broker.is_none() {
        *broker = Some(Broker::connect(&app.config.rabbitmq).await?);
    }
    let broker = broker.as_ref().context("no broker")?;
    let topology = broker.topology().clone();
    let mut queues = vec![topology.jobs.clone(), topology.dead.clone()];
    queues.extend(topology.retries.iter().map(|(name, _)| name.clone()));
    let mut depths = Vec::new();
    for queue in queues {
        let (messages, consumers) = broker.queue_status(&queue).await?;
        depths.push((queue, messages, consumers));
    }
    Ok(depths)
}
