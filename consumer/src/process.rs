//! A job's state machine, from taken to recorded: `Next` says what to do with the job, each
//! step returns the next, until the job's lease is gone (with its result, handed over to a
//! delay queue, or handed back). Recording the result, pairing it with its package's other
//! side, and publishing a regression's re-run are here too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use quarry_core::job::{Job, JobId, Outcome, RunId, StoredDefinition};
use quarry_infra::queue::{self, Publisher};
use quarry_infra::store::{JobState, NewResult, Pairing, Recorded};

use crate::claims::Claim;
use crate::toolchains::Leased;
use crate::{Execution, InfraError, Taken, Worker};

/// What to do next with a job in hand. `Worker::process` starts from its state when it was
/// taken (`Next::first`); each step does one thing and returns the next, until the job's lease
/// is gone with it (`Done`).
pub(crate) enum Next {
    /// Reuse an identical job's result, or run its experiment (`Worker::execute`).
    Run,
    /// An identical job of another run is computing the same result: wait for it in the delay
    /// queue, or compute it after all where there is none.
    Wait { holder: JobId, toolchain: Leased },
    /// The attempt failed, Quarry's fault and not the package's: retried after its tier's
    /// delay, or given up on after the last.
    Failed(InfraError),
    /// Not run again (a job that crashes consumers): its message is dead-lettered with this
    /// reason and it is recorded as an `error`.
    GiveUp(String),
    /// Record a result decided without running the job, `why` its whole log.
    Verdict {
        outcome: Outcome,
        why: String,
        dead_lettered: bool,
    },
    /// Record this result.
    Record(Box<Done>),
    /// Give it back to the work queue as it came (no attempt counted): the consumer is
    /// stopping, or this host cannot set up its steps.
    HandBack,
    /// The lease went with the job: recorded, handed over to a delay queue, or handed back.
    Done,
}

impl Next {
    /// Where a job starts, from its state when it was taken.
    fn first(state: JobState) -> Next {
        match state {
            // Recorded, not dropped: the run still ends with one result per job.
            JobState::RunCancelled => Next::Verdict {
                outcome: Outcome::Skipped,
                why: "skipped, the run was cancelled".to_owned(),
                dead_lettered: false,
            },
            JobState::ToDo { crashes } if crashes >= queue::CRASH_LIMIT => Next::GiveUp(format!(
                "started {crashes} times without ending: each time its consumer died while it \
                 ran (a job that crashes consumers?); not run again"
            )),
            JobState::ToDo { .. } => Next::Run,
            // Never taken: `take` settles a job that has its result or is of no run.
            JobState::Finished | JobState::Unknown => Next::Done,
        }
    }
}

/// A job's result as computed (or reused), before it is recorded.
pub(crate) struct Done {
    pub(crate) execution: Execution,
    /// The computation this job claimed, released once its result is recorded.
    pub(crate) claim: Option<Claim>,
    /// How long its experiment ran, if it ran.
    pub(crate) ran_for: Option<Duration>,
    pub(crate) memo_key: Option<String>,
    pub(crate) reused_from: Option<JobId>,
    /// For a reused result: the S3 log of the earlier job (`execution.log` is then only a note
    /// that goes before it).
    pub(crate) reused_log_key: Option<String>,
    /// Given up on, its message dead-lettered with this reason.
    pub(crate) dead_lettered: Option<String>,
    /// The exact build of the toolchain it ran with (`rustc -vV`), where one was found.
    pub(crate) toolchain_build: Option<String>,
}

impl Worker {
    /// Runs a job this consumer holds the lease of and records its result (or hands it over
    /// to a delay queue, or back): its state machine, one step at a time.
    pub(crate) async fn process(&self, taken: &Taken) -> anyhow::Result<()> {
        let started = Instant::now();
        let attempt = taken.lease.failed_attempts + 1;
        let mut next = Next::first(taken.state);
        loop {
            next = match next {
                Next::Run => self
                    .execute(&taken.job, attempt)
                    .await
                    .unwrap_or_else(Next::Failed),
                Next::Wait { holder, toolchain } => self.wait(taken, holder, toolchain).await?,
                Next::Failed(failure) => self.attempt_failed(taken, failure).await?,
                Next::GiveUp(reason) => self.give_up(taken, reason).await?,
                Next::Verdict {
                    outcome,
                    why,
                    dead_lettered,
                } => {
                    let holder = Some(self.leases.holder());
                    self.record_verdict(&taken.job, attempt, outcome, &why, dead_lettered, holder)
                        .await?;
                    Next::Done
                }
                // How long it ran where it did not run: from when it was taken.
                Next::Record(done) => self.record(taken, *done, started.elapsed()).await?,
                Next::HandBack => {
                    self.hand_back(&taken.lease).await?;
                    Next::Done
                }
                Next::Done => return Ok(()),
            };
        }
    }

    /// Waits for the identical job `holder` computing the same result: the job is deferred to
    /// the delay queue and looks again when it comes back. Without a delay queue (none
    /// configured), it is computed after all.
    async fn wait(&self, taken: &Taken, holder: JobId, toolchain: Leased) -> anyhow::Result<Next> {
        let Taken { job, lease, .. } = taken;
        let attempt = lease.failed_attempts + 1;
        self.store
            .record_waiting(job, attempt as i32, &self.name, holder)
            .await?;
        self.metrics.waits.inc();
        let publisher = self.publisher()?;
        if publisher.can_defer() {
            let defer = publisher.defer(&lease.message, lease.failed_attempts);
            self.leases.hand_over(lease, defer).await?;
            return Ok(Next::Done);
        }
        let (execution, ran_for) = match self
            .run_experiment(job, attempt, &toolchain.installed)
            .await
        {
            Ok(Some((execution, ran_for))) => (execution, Some(ran_for)),
            Ok(None) => return Ok(Next::HandBack),
            Err(InfraError { why, .. }) => (Execution::error(why), None),
        };
        Ok(Next::Record(Box::new(Done {
            execution,
            claim: None,
            ran_for,
            memo_key: None,
            reused_from: None,
            reused_log_key: None,
            dead_lettered: None,
            toolchain_build: Some(toolchain.installed.build.clone()),
        })))
    }

    /// After an attempt failed for Quarry's reasons: recorded as a failed attempt, then handed
    /// over to its retry tier's delay queue, or, after the last, dead-lettered and recorded as
    /// an `error`. A host that cannot set up any step hands the job back instead (not the
    /// job's fault: another consumer takes it, and this one stops).
    async fn attempt_failed(&self, taken: &Taken, failure: InfraError) -> anyhow::Result<Next> {
        let Taken { job, lease, .. } = taken;
        let attempt = lease.failed_attempts + 1;
        let InfraError { why: reason, host } = failure;
        if host && self.cannot_set_up_steps(&reason).await {
            return Ok(Next::HandBack);
        }
        self.store
            .record_attempt_failed(job, attempt as i32, &self.name, &reason)
            .await?;
        self.metrics.attempts_failed.inc();
        let publisher = self.publisher()?;
        if publisher.retries_left(attempt) {
            tracing::warn!(job = %job.id, attempt, %reason, "attempt failed; retrying after a delay");
            let retry = publisher.retry_later(&lease.message, attempt);
            self.leases.hand_over(lease, retry).await?;
            return Ok(Next::Done);
        }
        let reason = format!("gave up after {attempt} attempts: {reason}");
        publisher.dead_letter(&lease.message, &reason).await?;
        self.metrics.dead_lettered.inc();
        Ok(Next::Record(Box::new(Done {
            execution: Execution::error(reason.clone()),
            claim: None,
            ran_for: None,
            memo_key: None,
            reused_from: None,
            reused_log_key: None,
            dead_lettered: Some(reason),
            toolchain_build: None,
        })))
    }

    /// Dead-letters a job that is not run again, with `reason`, to be recorded as an `error`.
    async fn give_up(&self, taken: &Taken, reason: String) -> anyhow::Result<Next> {
        let job = &taken.job;
        tracing::error!(job = %job.id, package = %job.package, %reason, "dead-lettering a crash-looping job");
        self.publisher()?
            .dead_letter(&taken.lease.message, &reason)
            .await?;
        self.metrics.dead_lettered.inc();
        Ok(Next::Verdict {
            outcome: Outcome::Error,
            why: reason,
            dead_lettered: true,
        })
    }

    /// Records a job's result (computed, reused or given up on), its log in S3 where S3 takes
    /// it, and publishes the re-run of its package's failing side if it regressed. `elapsed`:
    /// since the job was taken, its duration where it did not run.
    async fn record(&self, taken: &Taken, done: Done, elapsed: Duration) -> anyhow::Result<Next> {
        let Taken { job, lease, .. } = taken;
        let attempt = lease.failed_attempts + 1;
        let holder = Some(self.leases.holder());
        let Done {
            execution,
            claim,
            ran_for,
            memo_key,
            reused_from,
            reused_log_key,
            dead_lettered,
            toolchain_build,
        } = done;
        // How long it ran, not counting the wait for an experiment slot.
        let duration = ran_for.unwrap_or(elapsed);
        let environment = execution.environment();
        let broken_reason = execution.broken_reason();
        let (log, log_key, uploaded) = match reused_log_key {
            Some(key) => (Some(execution.log), Some(key), false),
            None => match self.save_log(job, &execution.log).await {
                Some(key) => (None, Some(key), true),
                None => (Some(execution.log), None, false),
            },
        };
        let refused = execution.refused.clone();
        // A job whose steps never ran here (reused, or ended before the first) cost nothing
        // worth recording.
        let cost = (!execution.cost.steps.is_empty()).then(|| (*execution.cost).clone());
        if let Some(cost) = &cost {
            self.metrics.observe_cost(cost);
        }
        let pairing = self.pairing(job).await;
        let Recorded {
            new: recorded,
            rerun,
        } = self
            .store
            .record_result(
                &NewResult {
                    job_id: job.id,
                    run_id: job.run_id,
                    outcome: execution.outcome,
                    exit_code: execution.exit_code,
                    duration,
                    attempt: attempt as i32,
                    consumer: self.name.clone(),
                    log,
                    log_key: log_key.clone(),
                    memo_key,
                    reused_from,
                    environment,
                    refused: execution.refused,
                    broken_reason,
                    dead_lettered,
                    toolchain_build,
                    cost,
                    releases_claim: claim.is_some(),
                    lease_holder: holder,
                },
                pairing.as_ref(),
            )
            .await?;
        if let Some(claim) = claim {
            claim.released();
        }
        if let Some(rerun) = rerun {
            tracing::info!(package = %job.package, rerun = %rerun.id, side = %rerun.side(), "regressed; running its failing side once more");
            self.publish_rerun(&*self.publisher()?, &rerun).await?;
            // Kept until now, so that if this consumer died before publishing, the job's next
            // delivery would.
            self.leases.release(lease).await?;
        }
        if recorded {
            self.metrics
                .job_done(execution.outcome, duration.as_secs_f64());
            self.metrics.refused(&refused);
            if execution.outcome == Outcome::Timeout {
                self.metrics.sandbox_kills.inc();
            }
            tracing::info!(job = %job.id, package = %job.package, outcome = %execution.outcome, ?duration, "job finished");
        } else {
            self.metrics.duplicates_skipped.inc();
            if let (true, Some(key)) = (uploaded, &log_key)
                && let Err(err) = self.bucket.delete_log(key).await
            {
                tracing::warn!(error = %format!("{err:#}"), "cannot remove the log of a duplicate result");
            }
        }
        // The lease went with the result (or the re-run's publication).
        Ok(Next::Done)
    }

    /// For a job of a two-sided run (not itself a re-run): what `Store::record_result` needs to
    /// decide whether its package regressed. `None` for one-sided runs, and where the run's
    /// definition cannot be read (then nothing is re-run; the report still categorizes).
    async fn pairing(&self, job: &Job) -> Option<Pairing> {
        if job.rerun_of.is_some() {
            return None;
        }
        let definition = self.definition(job.run_id).await?;
        let [start, end] = <[String; 2]>::try_from(definition.side_labels()).ok()?;
        let (toolchain, patch) = definition.sides().pop()?;
        let end_job = Job::patched(
            job.run_id,
            job.package.clone(),
            toolchain,
            job.experiment.clone(),
            patch,
        );
        Some(Pairing {
            start,
            end,
            end_rerun: end_job.rerun(),
        })
    }

    /// A run's stored definition, read once per consumer.
    pub(crate) async fn definition(&self, run: RunId) -> Option<Arc<StoredDefinition>> {
        if let Some(known) = self.definitions.lock().await.get(&run) {
            return known.clone();
        }
        let read = match self.store.find_run(&run.to_string()).await {
            Ok(stored) => match StoredDefinition::of(&stored.definition) {
                Ok(definition) => Some(Arc::new(definition)),
                Err(err) => {
                    tracing::warn!(%run, %err, "cannot read the run's definition; its regressions will not be re-run");
                    None
                }
            },
            // The database hiccuped: try again with the next job.
            Err(err) => {
                tracing::warn!(%run, error = %format!("{err:#}"), "cannot read the run's definition");
                return None;
            }
        };
        self.definitions.lock().await.insert(run, read.clone());
        read
    }

    /// Publishes a regression's re-run and marks it published.
    async fn publish_rerun(&self, publisher: &Publisher, rerun: &Job) -> anyhow::Result<()> {
        publisher.publish_jobs([rerun]).await?;
        self.store.mark_published(&[rerun.id], None).await?;
        self.metrics.reruns.inc();
        Ok(())
    }

    /// Publishes the re-runs of `job`'s package that were recorded but never published.
    pub(crate) async fn publish_unpublished_reruns(
        &self,
        publisher: &Publisher,
        job: &Job,
    ) -> anyhow::Result<()> {
        if job.rerun_of.is_some() {
            return Ok(());
        }
        let reruns = self.store.unpublished_reruns(job).await?;
        if reruns.is_empty() {
            return Ok(());
        }
        let definition = self
            .definition(job.run_id)
            .await
            .context("cannot read the run's definition to publish a re-run")?;
        for stored in reruns {
            let rerun = definition.job(job.run_id, stored)?;
            self.publish_rerun(publisher, &rerun).await?;
        }
        Ok(())
    }

    /// Records a result Quarry decided without running the job (skipped, given up on), with
    /// `why` as its whole log, and as the reason it was dead-lettered if it was.
    pub(crate) async fn record_verdict(
        &self,
        job: &Job,
        attempt: u32,
        outcome: Outcome,
        why: &str,
        dead_lettered: bool,
        lease_holder: Option<uuid::Uuid>,
    ) -> anyhow::Result<()> {
        // An error or a skip is never a regression: nothing to pair.
        let Recorded { new: recorded, .. } = self
            .store
            .record_result(
                &NewResult {
                    job_id: job.id,
                    run_id: job.run_id,
                    outcome,
                    exit_code: None,
                    duration: Duration::ZERO,
                    attempt: attempt as i32,
                    consumer: self.name.clone(),
                    log: Some(format!("quarry: {why}\n")),
                    log_key: None,
                    memo_key: None,
                    reused_from: None,
                    environment: None,
                    refused: Vec::new(),
                    broken_reason: None,
                    dead_lettered: dead_lettered.then(|| why.to_owned()),
                    toolchain_build: None,
                    cost: None,
                    releases_claim: false,
                    lease_holder,
                },
                None,
            )
            .await?;
        if recorded {
            self.metrics.job_done(outcome, 0.0);
        }
        Ok(())
    }

    /// Stores a job's log in S3, compressed, and returns its key; `None` when S3 would not take
    /// it after a few tries (the log is then kept in PostgreSQL: never lost for S3's sake).
    async fn save_log(&self, job: &Job, log: &str) -> Option<String> {
        use backon::Retryable as _;
        let key = self.bucket.log_key(job.run_id, job.id);
        let stored = (|| self.bucket.put_log(&key, log))
            .retry(
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_times(3)
                    .with_jitter(),
            )
            .await;
        match stored {
            Ok(()) => Some(key),
            Err(err) => {
                tracing::warn!(job = %job.id, error = %format!("{err:#}"), "S3 would not take the log; keeping it in PostgreSQL");
                self.metrics.logs_in_database.inc();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_starts_from_its_state_when_taken() {
        assert!(matches!(
            Next::first(JobState::ToDo { crashes: 0 }),
            Next::Run
        ));
        assert!(matches!(
            Next::first(JobState::RunCancelled),
            Next::Verdict {
                outcome: Outcome::Skipped,
                dead_lettered: false,
                ..
            }
        ));
        let crashes = queue::CRASH_LIMIT;
        match Next::first(JobState::ToDo { crashes }) {
            Next::GiveUp(reason) => assert!(
                reason.starts_with(&format!("started {crashes} times without ending")),
                "{reason}"
            ),
            _ => panic!("a job that crashed its consumers {crashes} times is run again"),
        }
        assert!(matches!(Next::first(JobState::Finished), Next::Done));
        assert!(matches!(Next::first(JobState::Unknown), Next::Done));
    }
}
