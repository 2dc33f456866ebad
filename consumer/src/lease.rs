//! A job's lease: how a consumer holds a job it took off the work queue.
//!
//! The broker closes a channel whose delivery stays unacknowledged past its `consumer_timeout`
//! (30 minutes by default, often less), and a job may run longer than that. So a consumer acks a
//! delivery as soon as it holds the job's lease in PostgreSQL (`leases`), and the lease, not the
//! delivery, keeps the job from being lost: it is renewed while the job is in hand, released in
//! the transaction that records the result, and handed over when the job goes back to a queue.
//! A lease that lapses (its consumer died) is found by any consumer's sweeper, which publishes
//! the job again from the message kept with the lease. A delivery that finds another live lease
//! on its job is a copy (a redelivery, a sweep racing a hand-over) and is dropped: the holder
//! finishes the job or its lease lapses.

use std::future::Future;
use std::time::Duration;

use quarry_core::job::{Job, JobId};
use quarry_infra::queue::Publisher;
use quarry_infra::store::{NewLease, Store};
use uuid::Uuid;

use crate::metrics::Metrics;

/// A job held by this consumer: what is needed to hand it back.
pub(crate) struct Lease {
    pub job: JobId,
    /// The message as delivered, and its count of failed attempts.
    pub message: Vec<u8>,
    pub failed_attempts: u32,
}

/// This consumer's side of the leases table.
pub(crate) struct Leases {
    store: Store,
    /// The consumer's fleet id and name.
    holder: Uuid,
    name: String,
    ttl: Duration,
}

/// Lapsed leases published again per sweep, at most (the next sweep takes the rest).
const SWEEP_LIMIT: i64 = 200;

impl Leases {
    pub fn new(store: Store, holder: Uuid, name: String, ttl: Duration) -> Leases {
        Leases {
            store,
            holder,
            name,
            // Renewed every third of it: one missed renewal never lets it lapse.
            ttl: ttl.max(Duration::from_secs(1)),
        }
    }

    pub fn holder(&self) -> Uuid {
        self.holder
    }

    /// How often leases are renewed, and lapsed ones swept.
    pub fn interval(&self) -> Duration {
        self.ttl / 3
    }

    /// Takes the lease of a delivered job: `None` when another live lease holds it.
    pub async fn take(
        &self,
        job: &Job,
        message: &[u8],
        failed_attempts: u32,
    ) -> anyhow::Result<Option<Lease>> {
        let taken = self
            .store
            .take_lease(
                &NewLease {
                    job: job.id,
                    run: job.run_id,
                    holder: self.holder,
                    consumer: &self.name,
                    message,
                    failed_attempts,
                },
                self.ttl,
            )
            .await?;
        Ok(taken.then(|| Lease {
            job: job.id,
            message: message.to_vec(),
            failed_attempts,
        }))
    }

    /// Hands a job over to a queue: `publish` puts its message there, while the lease is
    /// lapsed and locked (`Store::hand_over_lease`), and then it is removed: the copy's
    /// consumer, however soon it comes, waits for that and holds a new lease, and no sweeper
    /// publishes the job a second time meanwhile. If `publish` fails, the lease stays lapsed
    /// and a sweep publishes the job.
    pub async fn hand_over(
        &self,
        lease: &Lease,
        publish: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        self.store
            .hand_over_lease(self.holder, lease.job, publish)
            .await
    }

    /// Releases a lease whose job has its result (and nothing left to publish).
    pub async fn release(&self, lease: &Lease) -> anyhow::Result<()> {
        self.store.release_lease(self.holder, lease.job).await
    }

    /// Renews the leases of the jobs in hand.
    pub async fn renew(&self, jobs: &[Uuid]) {
        if jobs.is_empty() {
            return;
        }
        if let Err(err) = self.store.renew_leases(self.holder, jobs, self.ttl).await {
            tracing::warn!(error = %format!("{err:#}"), "cannot renew the leases of the jobs in hand; they lapse if this lasts");
        }
    }

    /// Lets every lease of this consumer lapse: it is stopping and holds jobs it will not finish
    /// (still running at the end of its grace period).
    pub async fn lapse_all(&self) {
        match self.store.lapse_leases(self.holder, None).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(jobs = n, "handing back the jobs still running"),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "cannot hand back the jobs still running; their leases lapse")
            }
        }
    }

    /// Publishes again the jobs of lapsed leases, anyone's.
    pub async fn sweep(&self, publisher: &Publisher, metrics: &Metrics) {
        let swept = self
            .store
            .sweep_lapsed_leases(SWEEP_LIMIT, &self.name, |lapsed| async move {
                publisher
                    .put_back(&lapsed.message, lapsed.failed_attempts)
                    .await
            })
            .await;
        match swept {
            Ok(swept) => {
                for lapsed in swept {
                    tracing::warn!(job = %lapsed.job, holder = %lapsed.holder, lapsed_for = ?lapsed.lapsed_for, "a job's lease lapsed (its consumer died?); published it again");
                    metrics.leases_lapsed.inc();
                }
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "cannot sweep the lapsed leases")
            }
        }
    }
}
