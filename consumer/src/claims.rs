//! Claims and reuse: a job whose identical twin (same package checksum, toolchain build and
//! experiment) already has a result reuses it; otherwise it claims the computation, so that a
//! twin of another run waits for it instead of computing the same result a second time.

use std::time::Duration;

use quarry_core::job::{Job, JobId};
use quarry_infra::store::Store;

use crate::process::{Done, Next};
use crate::{Execution, InfraError, Worker};

/// Heartbeat of a claimed computation, and when a silent claim may be taken over.
const CLAIM_HEARTBEAT: Duration = Duration::from_secs(20);
const CLAIM_STALE_AFTER: Duration = Duration::from_secs(120);

/// A computation claimed for a job (`Store::claim_computation`), renewed by a heartbeat until
/// it is released: with the job's result, in the same transaction, so that an identical job of
/// another run always finds one or the other and never computes the same result a second time.
pub(crate) struct Claim {
    store: Store,
    memo_key: String,
    job: JobId,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Claim {
    fn hold(store: Store, memo_key: String, job: JobId) -> Claim {
        let heartbeat = tokio::spawn({
            let (store, memo_key) = (store.clone(), memo_key.clone());
            async move {
                loop {
                    tokio::time::sleep(CLAIM_HEARTBEAT).await;
                    if let Err(err) = store.heartbeat_computation(&memo_key, job).await {
                        tracing::warn!(error = %format!("{err:#}"), "cannot renew a computation claim");
                    }
                }
            }
        });
        Claim {
            store,
            memo_key,
            job,
            heartbeat: Some(heartbeat),
        }
    }

    async fn release(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
        if let Err(err) = self
            .store
            .release_computation(&self.memo_key, self.job)
            .await
        {
            tracing::warn!(error = %format!("{err:#}"), "cannot release a computation claim; it will go stale");
        }
    }

    /// Released with the job's result, in its transaction: only the heartbeat stops.
    pub(crate) fn released(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
    }
}

impl Drop for Claim {
    /// Not released on the way (the result could not be recorded): released in the
    /// background, or else it goes stale and is taken over.
    fn drop(&mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
            let (store, memo_key, job) = (self.store.clone(), self.memo_key.clone(), self.job);
            tokio::spawn(async move { store.release_computation(&memo_key, job).await });
        }
    }
}

impl Worker {
    pub(crate) async fn execute(&self, job: &Job, attempt: u32) -> Result<Next, InfraError> {
        let file = self.definition(job.run_id).await.and_then(|definition| {
            quarry_core::job::toolchain_file(&definition.toolchain_files, &job.toolchain).cloned()
        });
        // The package downloads while the toolchain is found (installed, the first time). The
        // download lands in the disk cache, where the experiment finds it; a failed one is
        // tried again there and reported as such.
        let (leased, _) = tokio::join!(
            self.toolchains.lease(&job.toolchain, file.as_ref()),
            self.fetcher.fetch(&job.package)
        );
        let toolchain = leased.map_err(InfraError::from)?;
        let build = toolchain.installed.build.clone();
        let memo_key = job.memo_key(&build);
        // A re-run exists to see whether the first result happens again: never reused.
        let fresh = job.experiment.fresh || job.rerun_of.is_some();
        if !fresh {
            if let Some(reused) = self.reuse(&memo_key, &build).await? {
                return Ok(Next::Record(Box::new(reused)));
            }
            let holder = self
                .store
                .claim_computation(&memo_key, job.id, &self.name, CLAIM_STALE_AFTER)
                .await
                .map_err(|e| InfraError::from(format!("cannot claim the computation: {e:#}")))?;
            if let Some(holder) = holder {
                return Ok(Next::Wait { holder, toolchain });
            }
            // The twin that held the claim may have recorded its result, then released the
            // claim, between the look-up above and this claim: look again.
            if let Some(reused) = self.reuse(&memo_key, &build).await? {
                self.store
                    .release_computation(&memo_key, job.id)
                    .await
                    .map_err(|e| {
                        InfraError::from(format!("cannot release the computation: {e:#}"))
                    })?;
                return Ok(Next::Record(Box::new(reused)));
            }
        }
        // Kept alive while computing and until the result is recorded.
        let claim = (!fresh).then(|| Claim::hold(self.store.clone(), memo_key.clone(), job.id));
        let (execution, ran_for) = match self
            .run_experiment(job, attempt, &toolchain.installed)
            .await
        {
            Ok(Some(ran)) => ran,
            // The claim goes with its drop.
            Ok(None) => return Ok(Next::HandBack),
            Err(failed) => {
                if let Some(claim) = claim {
                    claim.release().await;
                }
                return Err(failed);
            }
        };
        Ok(Next::Record(Box::new(Done {
            execution,
            claim,
            ran_for: Some(ran_for),
            memo_key: Some(memo_key),
            reused_from: None,
            reused_log_key: None,
            dead_lettered: None,
            toolchain_build: Some(build),
        })))
    }

    /// The result of an identical job computed earlier, as this job's, if there is one.
    async fn reuse(&self, memo_key: &str, build: &str) -> Result<Option<Done>, InfraError> {
        let earlier = self
            .store
            .memoized_result(memo_key)
            .await
            .map_err(|e| InfraError::from(format!("cannot look up earlier results: {e:#}")))?;
        let Some(earlier) = earlier else {
            return Ok(None);
        };
        self.metrics.memoized.inc();
        Ok(Some(Done {
            claim: None,
            ran_for: None,
            execution: Execution {
                outcome: earlier.outcome,
                exit_code: earlier.exit_code,
                log: format!(
                    "quarry: reused the result of job {} (run {}): same package checksum, \
                     toolchain build ({}) and experiment\n\n{}",
                    earlier.job_id,
                    earlier.run_name,
                    build.lines().next().unwrap_or_default(),
                    earlier.log.unwrap_or_default()
                ),
                refused: earlier.refused,
                broken_reason: earlier.broken_reason,
                environment: earlier.environment,
                // It ran nothing here.
                cost: Default::default(),
            },
            memo_key: Some(memo_key.to_owned()),
            reused_from: Some(earlier.job_id),
            reused_log_key: earlier.log_key,
            dead_lettered: None,
            toolchain_build: Some(build.to_owned()),
        }))
    }
}
