//! The reporter's Prometheus figures, computed on each scrape.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use prometheus::{Encoder as _, GaugeVec, IntGaugeVec, Opts, Registry, TextEncoder};
use quarry_core::progress::Pace;
use quarry_infra::store::FleetState;

use super::{App, Failure, PACE_WINDOW, RECENT_RUNS};

/// The reporter's Prometheus figures: every recent run's progress, pace and outcomes, the
/// queues' depths and the fleet. Computed from the database (and the broker) on each scrape.
pub(super) async fn metrics(State(app): State<Arc<App>>) -> Result<Response, Failure> {
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
        "Results of a run by side (its toolchain, with its patch if any) and outcome",
        &["run", "side", "outcome"],
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
        if let [start, end] = crate::side_labels(&run.definition).as_slice() {
            let mut by_category: BTreeMap<&str, i64> = BTreeMap::new();
            for pair in app.store.outcome_pairs(run.id, start, end).await? {
                *by_category.entry(pair.category().as_str()).or_default() += pair.packages;
            }
            for (category, n) in by_category {
                categories.with_label_values(&[name, category]).set(n);
            }
        }
    }
    let now = Utc::now();
    let mut states: BTreeMap<FleetState, i64> =
        [(FleetState::Alive, 0), (FleetState::Lost, 0)].into();
    for member in app.store.fleet(now - chrono::Duration::hours(1)).await? {
        if let Some(n) = states.get_mut(&member.state(now)) {
            *n += 1;
        }
    }
    for (state, n) in states {
        fleet.with_label_values(&[state.as_str()]).set(n);
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

pub(super) async fn queue_depths(app: &App) -> anyhow::Result<Vec<(String, u32, u32)>> {
    let broker = app.broker().await?;
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
