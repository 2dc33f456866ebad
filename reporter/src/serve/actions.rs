//! The requests that change state: cancelling a run, requeueing its dead-lettered jobs.

use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Redirect;

use super::{App, Failure, lookup};
use crate::escape_href;

pub(super) async fn cancel(
    State(app): State<Arc<App>>,
    Path(run): Path<String>,
) -> Result<Redirect, Failure> {
    let run = lookup(&app, &run).await?;
    if app.store.cancel_run(run.id).await? {
        tracing::info!(run = %run.name, "run cancelled through the reporter");
    }
    Ok(Redirect::to(&format!("/runs/{}", escape_href(&run.name))))
}

/// Requeues the run's dead-lettered jobs (see `quarry_infra::requeue`) and says what it did.
pub(super) async fn requeue(
    State(app): State<Arc<App>>,
    Path(run): Path<String>,
) -> Result<String, Failure> {
    let run = lookup(&app, &run).await?;
    let mut broker = app.broker().await?;
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
