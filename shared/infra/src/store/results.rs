//! Results: recorded once with their `finished` event (and, in a two-sided run, a regression's re-run, decided in the same transaction), reused from an earlier run, read back.

use super::*;

impl Store {
    /// Stores a job's final result and its `finished` event in one transaction. Returns false,
    /// changing nothing, when the job already had a result.
    ///
    /// With a `pairing` (a job of a two-sided run), the same transaction also reads both sides'
    /// results, now that this one has its result, and where the domain wants the package run
    /// again (`category::rerun_wanted`) records the end side's re-run: returned when it still
    /// has to be published. The package's job rows are
    /// locked first, so when both sides finish at once the second to commit sees the first.
    pub async fn record_result(
        &self,
        result: &NewResult,
        pairing: Option<&Pairing>,
    ) -> anyhow::Result<Recorded> {
        let duration_ms = i64::try_from(result.duration.as_millis()).unwrap_or(i64::MAX);
        let cost = result.cost.as_ref();
        let steps = cost
            .map(|c| serde_json::to_value(&c.steps))
            .transpose()
            .context("cannot encode the job's steps")?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some(pairing) = pairing {
            let package = &pairing.end_rerun.package;
            tx.execute(
                &tx.prepare_cached("SELECT 1 FROM jobs WHERE run_id = $1 AND crate_name = $2 AND crate_version = $3
                 FOR UPDATE").await?,
                &[&result.run_id.0, &package.name, &package.version],
            )
            .await
            .context("cannot lock the package's jobs")?;
        }
        let inserted = tx
            .execute(
                &tx.prepare_cached(
                    "INSERT INTO results (job_id, run_id, outcome, exit_code, duration_ms, attempt,
                                      consumer, log, log_key, memo_key, reused_from, environment,
                                      refused, broken_reason, toolchain_build, cpu_ms,
                                      peak_memory_bytes, disk_bytes, slot_wait_ms, steps)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                         $17, $18, $19, $20)
                 ON CONFLICT (job_id) DO NOTHING",
                )
                .await?,
                &[
                    &result.job_id.0,
                    &result.run_id.0,
                    &result.outcome.as_str(),
                    &result.exit_code,
                    &duration_ms,
                    &result.attempt,
                    &result.consumer,
                    &result.log,
                    &result.log_key,
                    &result.memo_key,
                    &result.reused_from.map(|j| j.0),
                    &result.environment,
                    &refusal_names(&result.refused),
                    &result.broken_reason.map(BrokenReason::as_str),
                    &result.toolchain_build,
                    &cost.and_then(|c| c.cpu_ms).map(bigint),
                    &cost.and_then(|c| c.peak_memory_bytes).map(bigint),
                    &cost.map(|c| bigint(c.disk_bytes)),
                    &cost.map(|c| bigint(c.slot_wait_ms)),
                    &steps,
                ],
            )
            .await
            .context("cannot record the result")?;
        if inserted == 1
            && let Some(reason) = &result.dead_lettered
        {
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO job_events (job_id, run_id, kind, consumer, detail)
                 VALUES ($1, $2, 'dead-lettered', $3, $4)",
                )
                .await?,
                &[&result.job_id.0, &result.run_id.0, &result.consumer, reason],
            )
            .await?;
        }
        if inserted == 1 {
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO job_events (job_id, run_id, kind, attempt, consumer, detail)
                 VALUES ($1, $2, 'finished', $3, $4, $5)",
                )
                .await?,
                &[
                    &result.job_id.0,
                    &result.run_id.0,
                    &result.attempt,
                    &result.consumer,
                    &result.outcome.as_str(),
                ],
            )
            .await?;
        }
        if result.releases_claim
            && let Some(memo_key) = &result.memo_key
        {
            tx.execute(
                &tx.prepare_cached("DELETE FROM computations WHERE memo_key = $1 AND job_id = $2")
                    .await?,
                &[memo_key, &result.job_id.0],
            )
            .await
            .context("cannot release the computation")?;
        }
        let rerun = match pairing {
            Some(pairing) => Self::record_rerun_if_wanted(&tx, pairing).await?,
            None => None,
        };
        // A re-run to publish keeps the lease until it is published: if the consumer dies
        // first, the lease lapses and the job's next delivery publishes it.
        if rerun.is_none()
            && let Some(holder) = result.lease_holder
        {
            tx.execute(
                &tx.prepare_cached("DELETE FROM leases WHERE job_id = $1 AND holder = $2")
                    .await?,
                &[&result.job_id.0, &holder],
            )
            .await
            .context("cannot release the job's lease")?;
        }
        tx.commit().await.context("cannot commit the result")?;
        Ok(Recorded {
            new: inserted == 1,
            rerun,
        })
    }

    /// Within `record_result`'s transaction: when the package's start side passed and its end
    /// side failed, records the end side's re-run (once) and returns it if it is unpublished.
    pub(super) async fn record_rerun_if_wanted(
        tx: &deadpool_postgres::Transaction<'_>,
        pairing: &Pairing,
    ) -> anyhow::Result<Option<Job>> {
        let rerun = &pairing.end_rerun;
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT j.side, r.outcome, r.environment IS NOT NULL
                 FROM jobs j JOIN results r ON r.job_id = j.id
                 WHERE j.run_id = $1 AND j.crate_name = $2 AND j.crate_version = $3
                   AND j.side IN ($4, $5)",
                )
                .await?,
                &[
                    &rerun.run_id.0,
                    &rerun.package.name,
                    &rerun.package.version,
                    &pairing.start,
                    &pairing.end,
                ],
            )
            .await?;
        let side = |label: &str| -> anyhow::Result<Option<Verdict>> {
            rows.iter()
                .find(|row| row.get::<_, &str>(0) == label)
                .map(|row| {
                    Ok(Verdict {
                        outcome: row.get::<_, &str>(1).parse()?,
                        environmental: row.get(2),
                    })
                })
                .transpose()
        };
        // The domain decides; the transaction only makes sure the two sides' results are read
        // together, once (the package's jobs are locked), so that one of them adds the re-run.
        if !quarry_core::category::rerun_wanted(side(&pairing.start)?, side(&pairing.end)?) {
            return Ok(None);
        }
        let original = rerun
            .rerun_of
            .context("a pairing's end_rerun is a re-run")?;
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO jobs (id, run_id, crate_name, crate_version, checksum, side,
                               rerun_of)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (id) DO NOTHING",
            )
            .await?,
            &[
                &rerun.id.0,
                &rerun.run_id.0,
                &rerun.package.name,
                &rerun.package.version,
                &rerun.package.checksum,
                &rerun.side(),
                &original.0,
            ],
        )
        .await
        .context("cannot record a regression's re-run")?;
        let unpublished = tx
            .query_one(
                &tx.prepare_cached("SELECT published_at IS NULL FROM jobs WHERE id = $1")
                    .await?,
                &[&rerun.id.0],
            )
            .await?;
        Ok(unpublished.get::<_, bool>(0).then(|| rerun.clone()))
    }

    /// A computed (not itself reused) result of an identical job, if any. Results that say
    /// nothing about the package (errors, skips) are never reused.
    pub async fn memoized_result(&self, memo_key: &str) -> anyhow::Result<Option<MemoizedResult>> {
        let row = self
            .query_opt(
                "SELECT r.job_id, runs.name, r.outcome, r.exit_code, r.duration_ms, r.log_key,
                        r.log, r.environment, r.refused, r.broken_reason
                 FROM results r JOIN runs ON runs.id = r.run_id
                 WHERE r.memo_key = $1 AND r.reused_from IS NULL
                   AND r.outcome NOT IN ('error', 'skipped')
                 ORDER BY r.finished_at LIMIT 1",
                &[&memo_key],
            )
            .await?;
        row.map(|row| {
            Ok(MemoizedResult {
                job_id: JobId(row.get(0)),
                run_name: row.get(1),
                outcome: row.get::<_, String>(2).parse()?,
                exit_code: row.get(3),
                duration_ms: row.get(4),
                log_key: row.get(5),
                log: row.get(6),
                environment: row.get(7),
                refused: parse_refusals(row.get(8))?,
                broken_reason: parse_broken_reason(row.get(9))?,
            })
        })
        .transpose()
    }

    /// Every result of a run, ordered by package then side.
    pub async fn results(&self, run: RunId) -> anyhow::Result<Vec<ResultRow>> {
        use futures::TryStreamExt as _;
        let client = self.client().await?;
        // Streamed, one row at a time into the result: a run's million rows are not held twice.
        let rows = client
            .query_raw(
                "SELECT j.id, j.crate_name, j.crate_version, j.side, r.outcome, r.exit_code,
                        r.duration_ms, r.attempt, r.consumer, r.finished_at, r.log, r.log_key,
                        j.rerun_of, r.environment, r.refused, r.broken_reason, r.toolchain_build,
                        r.cpu_ms, r.peak_memory_bytes, r.disk_bytes, r.slot_wait_ms, r.steps
                 FROM results r JOIN jobs j ON j.id = r.job_id
                 WHERE r.run_id = $1
                 ORDER BY j.crate_name, j.crate_version, j.side",
                [&run.0],
            )
            .await?;
        futures::pin_mut!(rows);
        let mut results = Vec::new();
        while let Some(row) = rows.try_next().await? {
            let outcome: String = row.get(4);
            results.push(ResultRow {
                job_id: row.get(0),
                crate_name: row.get(1),
                crate_version: row.get(2),
                side: row.get(3),
                outcome: outcome.parse()?,
                exit_code: row.get(5),
                duration_ms: row.get(6),
                attempt: row.get(7),
                consumer: row.get(8),
                finished_at: row.get(9),
                log: row.get(10),
                log_key: row.get(11),
                rerun_of: row.get(12),
                environment: row.get(13),
                refused: parse_refusals(row.get(14))?,
                broken_reason: parse_broken_reason(row.get(15))?,
                toolchain_build: row.get(16),
                cost: cost_of(&row, 17)?,
            });
        }
        Ok(results)
    }

    /// Result counts per outcome, counted by the database (reports are checked against this).
    pub async fn outcome_counts(&self, run: RunId) -> anyhow::Result<Vec<(Outcome, i64)>> {
        let rows = self.query("SELECT outcome, count(*) FROM results WHERE run_id = $1 GROUP BY outcome ORDER BY outcome", &[&run.0]).await?;
        rows.into_iter()
            .map(|row| Ok((row.get::<_, String>(0).parse()?, row.get(1))))
            .collect()
    }
}
