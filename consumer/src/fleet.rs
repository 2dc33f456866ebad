//! The consumer as a member of the fleet: who it is (`Identity`), the jobs it has in hand, and
//! the heartbeat that tells the fleet table both until it leaves. The reporter's fleet page and
//! `quarry-reporter explain` read what this writes.

use std::sync::Arc;

use quarry_core::job::JobId;

use crate::Worker;

/// Who this process is in the fleet: two consumers may share a name (a restart while the old
/// process is still in its grace period), never an id. The secret keeps another process from
/// writing as this one.
#[derive(Clone)]
pub(crate) struct Identity {
    pub(crate) id: uuid::Uuid,
    secret: String,
}

impl Identity {
    pub(crate) fn new() -> Identity {
        Identity {
            id: uuid::Uuid::new_v4(),
            secret: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// What names the host resources a consumer process owns alone (its steps' cgroups): its
    /// name and the start of its fleet id, so that two consumers of one name never share them.
    pub(crate) fn owner(&self, name: &str) -> String {
        let id = self.id.simple().to_string();
        format!("{name}-{}", &id[..8])
    }
}

/// Joins the fleet: registered, then a heartbeat with the jobs in hand until the task is
/// aborted. The database may be down for a while (restarting): registering is retried with
/// each heartbeat rather than keeping the consumer from working.
pub(crate) fn join(worker: Arc<Worker>, identity: Identity) -> tokio::task::JoinHandle<()> {
    let host = host_name();
    tokio::spawn(async move {
        let mut registered = false;
        loop {
            if !registered {
                match worker
                    .store
                    .register_consumer(
                        identity.id,
                        &worker.name,
                        &identity.secret,
                        &host,
                        worker.concurrency,
                    )
                    .await
                {
                    Ok(()) => registered = true,
                    Err(err) => {
                        tracing::warn!(error = %format!("{err:#}"), "cannot register in the fleet yet")
                    }
                }
            }
            if registered {
                worker.fleet_heartbeat(&identity).await;
            }
            tokio::time::sleep(quarry_core::fleet::HEARTBEAT).await;
        }
    })
}

/// Leaves the fleet: a last heartbeat (the jobs still in hand, the results done), then marked
/// stopped.
pub(crate) async fn leave(worker: &Worker, identity: &Identity) {
    worker.fleet_heartbeat(identity).await;
    if let Err(err) = worker
        .store
        .consumer_stopped(identity.id, &identity.secret)
        .await
    {
        tracing::warn!(error = %format!("{err:#}"), "cannot record that the consumer stopped");
    }
}

/// Marks a job as in hand until dropped.
pub(crate) struct InHand<'a> {
    worker: &'a Worker,
    job: JobId,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        self.worker.in_hand_jobs().remove(&self.job);
    }
}

impl Worker {
    pub(crate) fn in_hand_jobs(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<JobId>> {
        // A set of ids cannot be left half-updated by a panic.
        self.in_hand.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn take_in_hand(&self, job: JobId) -> InHand<'_> {
        self.in_hand_jobs().insert(job);
        InHand { worker: self, job }
    }

    /// Says in the fleet table whether this consumer has a free slot and nothing to take.
    pub(crate) async fn say_idle(&self, idle: bool) {
        let said = self
            .store
            .consumer_idle(self.identity.id, &self.identity.secret, idle)
            .await;
        if let Err(err) = said {
            tracing::debug!(error = %format!("{err:#}"), idle, "cannot say whether the consumer is idle");
        }
    }

    async fn fleet_heartbeat(&self, identity: &Identity) {
        let current: Vec<uuid::Uuid> = self.in_hand_jobs().iter().map(|j| j.0).collect();
        let done = self.metrics.stats().results as i64;
        let toolchains = self.toolchains.known();
        match self
            .store
            .consumer_heartbeat(identity.id, &identity.secret, &current, done, &toolchains)
            .await
        {
            Ok(slots) => self
                .fleet_slots
                .store(slots, std::sync::atomic::Ordering::Relaxed),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "cannot renew the fleet heartbeat")
            }
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}

/// A consumer's name when it is given none: its host's and its process id.
pub(crate) fn default_name() -> String {
    format!("{}-{}", host_name(), std::process::id())
}
