//! Jobs: recorded before they are published, marked published, their state when delivered, their attempts, and the slowest packages of earlier runs.

use super::*;

impl Store {
    /// Records jobs (idempotently) and returns those still to publish (not yet confirmed by the
    /// broker and without a result) with their expected durations: the longest expected first,
    /// then those no earlier run timed, in the order given.
    pub async fn record_jobs(&self, jobs: &[Job]) -> anyhow::Result<Vec<(JobId, Option<i64>)>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.id.0).collect();
        let runs: Vec<Uuid> = jobs.iter().map(|j| j.run_id.0).collect();
        let names: Vec<&str> = jobs.iter().map(|j| j.package.name.as_str()).collect();
        let versions: Vec<&str> = jobs.iter().map(|j| j.package.version.as_str()).collect();
        let checksums: Vec<&str> = jobs.iter().map(|j| j.package.checksum.as_str()).collect();
        let sides: Vec<String> = jobs.iter().map(Job::side).collect();
        let sides: Vec<&str> = sides.iter().map(String::as_str).collect();
        let client = self.client().await?;
        // Each new job's expected duration: the latest computed result of the same crate in
        // another run, its own side's first (`jobs_crate_name`, then `results`' primary key).
        let inserted = client
            .query(
                &client.prepare_cached("WITH inserted AS (
                   INSERT INTO jobs (id, run_id, crate_name, crate_version, checksum, side, expected_ms)
                   SELECT n.id, n.run_id, n.crate_name, n.crate_version, n.checksum, n.side,
                          (SELECT r.duration_ms FROM jobs p JOIN results r ON r.job_id = p.id
                           WHERE p.crate_name = n.crate_name AND p.run_id <> n.run_id
                             AND r.reused_from IS NULL
                           ORDER BY p.side = n.side DESC, r.finished_at DESC LIMIT 1)
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])
                        AS n(id, run_id, crate_name, crate_version, checksum, side)
                   ON CONFLICT (id) DO NOTHING
                   RETURNING id, expected_ms)
                 SELECT id, expected_ms FROM inserted").await?,
                &[&ids, &runs, &names, &versions, &checksums, &sides],
            )
            .await
            .context("cannot record jobs")?;
        // All new (the usual case on a first invocation): none can be published yet.
        let rows = if inserted.len() == ids.len() {
            inserted
        } else {
            client
                .query(
                    &client
                        .prepare_cached(
                            "SELECT j.id, j.expected_ms FROM jobs j
                 WHERE j.id = ANY($1) AND j.published_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)",
                        )
                        .await?,
                    &[&ids],
                )
                .await?
        };
        // Longest expected first; the others (never run before) after them, in the order given.
        let given: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut pending: Vec<(Uuid, Option<i64>)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        pending.sort_by_key(|(id, expected)| {
            (
                std::cmp::Reverse(expected.unwrap_or(-1)),
                given.get(id).copied(),
            )
        });
        Ok(pending
            .into_iter()
            .map(|(id, expected)| (JobId(id), expected))
            .collect())
    }

    /// The crates whose latest computed results took longest, longest first, at most `limit`:
    /// what a run publishes before it pages, so that its slowest jobs start first.
    pub async fn longest_packages(&self, limit: i64) -> anyhow::Result<Vec<String>> {
        let client = self.client().await?;
        Ok(client
            .query(
                &client
                    .prepare_cached(
                        "SELECT j.crate_name FROM results r JOIN jobs j ON j.id = r.job_id
                 WHERE r.reused_from IS NULL
                 GROUP BY j.crate_name ORDER BY max(r.duration_ms) DESC LIMIT $1",
                    )
                    .await?,
                &[&limit],
            )
            .await?
            .into_iter()
            .map(|row| row.get(0))
            .collect())
    }

    /// Of `names`, the crates with a computed result in a run other than `run`: those whose
    /// jobs in `run` get an expected duration.
    pub async fn timed_packages(
        &self,
        names: &[String],
        run: RunId,
    ) -> anyhow::Result<std::collections::HashSet<String>> {
        let client = self.client().await?;
        Ok(client
            .query(
                &client
                    .prepare_cached(
                        "SELECT DISTINCT j.crate_name FROM jobs j
                 WHERE j.crate_name = ANY($1) AND j.run_id <> $2
                   AND EXISTS (SELECT 1 FROM results r
                               WHERE r.job_id = j.id AND r.reused_from IS NULL)",
                    )
                    .await?,
                &[&names, &run.0],
            )
            .await?
            .into_iter()
            .map(|row| row.get(0))
            .collect())
    }

    /// The run's jobs that have no result yet, as (id, package, side, the job it re-runs).
    pub async fn unfinished_jobs(&self, run: RunId) -> anyhow::Result<Vec<StoredJob>> {
        let client = self.client().await?;
        Ok(client
            .query(
                &client
                    .prepare_cached(
                        "SELECT j.id, j.crate_name, j.crate_version, j.checksum, j.side, j.rerun_of
                 FROM jobs j
                 WHERE j.run_id = $1
                   AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)
                 ORDER BY j.crate_name, j.crate_version, j.side",
                    )
                    .await?,
                &[&run.0],
            )
            .await?
            .into_iter()
            .map(stored_job)
            .collect())
    }

    /// Marks jobs as published (after the broker confirmed them): the time is their `queued`
    /// event. With a paging position, saves it with the run in the same transaction.
    pub async fn mark_published(
        &self,
        jobs: &[JobId],
        position: Option<(RunId, &serde_json::Value)>,
    ) -> anyhow::Result<()> {
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.0).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some((run, position)) = position {
            tx.execute(
                &tx.prepare_cached("UPDATE runs SET paging_position = $2 WHERE id = $1")
                    .await?,
                &[&run.0, position],
            )
            .await?;
        }
        tx.execute(
            &tx.prepare_cached(
                "UPDATE jobs SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL",
            )
            .await?,
            &[&ids],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// What a consumer needs to know before taking a delivered job on, in one round trip.
    pub async fn job_state(&self, job: &Job) -> anyhow::Result<JobState> {
        let client = self.client().await?;
        // A start is ended by an `attempt-failed` or `finished` event before any later start;
        // one that is not was cut short by its consumer's death.
        let row = client
            .query_one(
                &client
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM results WHERE job_id = $1),
                        EXISTS (SELECT 1 FROM jobs WHERE id = $1),
                        EXISTS (SELECT 1 FROM runs WHERE id = $2 AND cancelled_at IS NOT NULL),
                        (SELECT count(*) FROM job_events s
                         WHERE s.job_id = $1 AND s.kind = 'started'
                           AND s.id > coalesce((SELECT max(q.id) FROM job_events q
                                                WHERE q.job_id = $1 AND q.kind = 'requeued'), 0)
                           AND NOT EXISTS (
                               SELECT 1 FROM job_events c
                               WHERE c.job_id = $1 AND c.id > s.id
                                 AND c.kind IN ('attempt-failed', 'finished')
                                 AND NOT EXISTS (SELECT 1 FROM job_events n
                                                 WHERE n.job_id = $1 AND n.kind = 'started'
                                                   AND n.id > s.id AND n.id < c.id)))",
                    )
                    .await?,
                &[&job.id.0, &job.run_id.0],
            )
            .await?;
        let (finished, recorded, cancelled): (bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2));
        Ok(if finished {
            JobState::Finished
        } else if !recorded {
            JobState::Unknown
        } else if cancelled {
            JobState::RunCancelled
        } else {
            JobState::ToDo {
                crashes: u32::try_from(row.get::<_, i64>(3)).unwrap_or(u32::MAX),
            }
        })
    }

    /// Logs the start of attempt number `attempt` (1 for the first).
    pub async fn start_attempt(
        &self,
        job: &Job,
        attempt: i32,
        consumer: &str,
    ) -> anyhow::Result<()> {
        self.append_event(job, EventKind::Started, Some(attempt), consumer, "")
            .await
    }

    pub async fn record_attempt_failed(
        &self,
        job: &Job,
        attempt: i32,
        consumer: &str,
        reason: &str,
    ) -> anyhow::Result<()> {
        self.append_event(
            job,
            EventKind::AttemptFailed,
            Some(attempt),
            consumer,
            reason,
        )
        .await
    }

    /// Logs that the job waits for an identical job (`holder`) computing the same result.
    pub async fn record_waiting(
        &self,
        job: &Job,
        attempt: i32,
        consumer: &str,
        holder: JobId,
    ) -> anyhow::Result<()> {
        let detail =
            format!("waiting for the identical job {holder}, which is computing the same result");
        self.append_event(job, EventKind::Waiting, Some(attempt), consumer, &detail)
            .await
    }

    /// Re-runs of `job`'s package recorded but not yet published (their consumer died between
    /// recording and publishing them): as `StoredJob`s, to publish again.
    pub async fn unpublished_reruns(&self, job: &Job) -> anyhow::Result<Vec<StoredJob>> {
        Ok(self
            .query(
                "SELECT id, side, rerun_of FROM jobs
                 WHERE run_id = $1 AND crate_name = $2 AND crate_version = $3
                   AND rerun_of IS NOT NULL AND published_at IS NULL",
                &[&job.run_id.0, &job.package.name, &job.package.version],
            )
            .await?
            .into_iter()
            .map(|row| StoredJob {
                id: JobId(row.get(0)),
                package: job.package.clone(),
                side: row.get(1),
                rerun_of: Some(JobId(row.get(2))),
            })
            .collect())
    }

    /// The jobs of a run for one package (every version, or just `version`): id, version and
    /// side, and the outcome if it has one.
    pub async fn package_jobs(
        &self,
        run: RunId,
        name: &str,
        version: Option<&str>,
    ) -> anyhow::Result<Vec<PackageJob>> {
        let rows = self
            .query(
                "SELECT j.id, j.crate_version, j.side, r.outcome, r.refused
                 FROM jobs j LEFT JOIN results r ON r.job_id = j.id
                 WHERE j.run_id = $1 AND j.crate_name = $2
                   AND ($3::text IS NULL OR j.crate_version = $3)
                 ORDER BY j.crate_version, j.side",
                &[&run.0, &name, &version],
            )
            .await?;
        rows.into_iter()
            .map(|row| {
                let outcome: Option<String> = row.get(3);
                let refused: Option<Vec<String>> = row.get(4);
                Ok(PackageJob {
                    id: JobId(row.get(0)),
                    version: row.get(1),
                    side: row.get(2),
                    outcome: outcome.map(|o| o.parse()).transpose()?,
                    refused: parse_refusals(refused.unwrap_or_default())?,
                })
            })
            .collect()
    }
}
