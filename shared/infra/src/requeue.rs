//! Requeueing a run's dead-lettered jobs: once what made them fail is fixed (a registry outage,
//! a full disk, a bad toolchain), they get a fresh set of attempts. Shared by
//! `quarry-producer requeue` and the reporter's `POST /runs/RUN/requeue`.
//!
//! The database decides which jobs: those dead-lettered and not requeued since. In one
//! transaction their `error` results are removed and a `requeued` event is logged; then they are
//! published again (as new messages, so their attempts and the broker's delivery count start
//! over), and only then are their spent copies removed from the dead-letter queue. If publishing
//! fails part way, the jobs are simply unfinished: `quarry-producer republish RUN` puts them back.

use std::collections::HashSet;

use anyhow::Context as _;

use crate::queue::Broker;
use crate::store::{Run, Store};
use quarry_core::job::{Job, StoredDefinition};

/// What a requeue did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requeued {
    /// Jobs published again.
    pub jobs: u64,
    /// Their messages removed from the dead-letter queue.
    pub dead_letters_removed: u64,
}

/// Requeues the dead-lettered jobs of `run`; `by` says who asked, for the event log.
pub async fn requeue_dead_letters(
    store: &Store,
    broker: &Broker,
    run: &Run,
    by: &str,
) -> anyhow::Result<Requeued> {
    anyhow::ensure!(
        run.cancelled_at.is_none(),
        "run {} was cancelled: its jobs are not run again",
        run.name
    );
    let definition = StoredDefinition::of(&run.definition)?;
    let jobs = store
        .requeue_dead_letters(run.id, by)
        .await?
        .into_iter()
        .map(|stored| definition.job(run.id, stored))
        .collect::<Result<Vec<Job>, _>>()?;
    let publisher = broker.publisher().await?;
    for chunk in jobs.chunks(500) {
        publisher.publish_jobs(chunk).await.with_context(|| {
            format!(
                "the dead-lettered jobs of run {} were taken out of the dead letters but not \
                 all published: run `quarry-producer republish {}` to publish the rest",
                run.name, run.name
            )
        })?;
    }
    let ids: HashSet<_> = jobs.iter().map(|job| job.id).collect();
    let dead_letters_removed = broker.remove_dead_letters(&ids).await?;
    Ok(Requeued {
        jobs: jobs.len() as u64,
        dead_letters_removed,
    })
}
