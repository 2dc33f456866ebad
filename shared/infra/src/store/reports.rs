//! What reports and the live view read: figures, pairs of outcomes, history, dependents, dead letters (and requeueing them), changes since a time, and the reconciliation `verify` checks.

use super::*;

impl Store {
    /// Records what packages of `run` depend on, as (package, dependency) crate names: the
    /// direct normal and build dependencies of the versions tested. Recorded again, nothing
    /// changes.
    pub async fn record_dependencies(
        &self,
        run: RunId,
        edges: &[(String, String)],
    ) -> anyhow::Result<()> {
        if edges.is_empty() {
            return Ok(());
        }
        let packages: Vec<&str> = edges.iter().map(|(p, _)| p.as_str()).collect();
        let dependencies: Vec<&str> = edges.iter().map(|(_, d)| d.as_str()).collect();
        self.execute(
            "INSERT INTO dependencies (run_id, crate_name, dependency)
                         SELECT $1, * FROM unnest($2::text[], $3::text[])
                         ON CONFLICT DO NOTHING",
            &[&run.0, &packages, &dependencies],
        )
        .await
        .context("cannot record the packages' dependencies")?;
        Ok(())
    }

    /// How many of `run`'s packages depend directly on each crate (by lowercase name), as the
    /// index told the producer; crates nothing in the run depends on are absent.
    pub async fn dependent_counts(
        &self,
        run: RunId,
    ) -> anyhow::Result<std::collections::HashMap<String, i64>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT dependency, count(*) FROM dependencies WHERE run_id = $1
                 GROUP BY dependency",
                &[&run.0],
            )
            .await
            .context("cannot count the run's dependents")?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The outcomes of the packages named in `packages` in runs created before `run`, the
    /// `runs_each` most recent runs of each package, newest first.
    pub async fn package_history(
        &self,
        run: RunId,
        packages: &[String],
        runs_each: i64,
    ) -> anyhow::Result<Vec<HistoryRow>> {
        if packages.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT crate_name, crate_version, run_name, created_at, side, outcome
                 FROM (
                     SELECT j.crate_name, j.crate_version, ru.name AS run_name, ru.created_at,
                            j.side, r.outcome,
                            dense_rank() OVER (PARTITION BY j.crate_name
                                               ORDER BY ru.created_at DESC, ru.id) AS nth
                     FROM jobs j
                     JOIN results r ON r.job_id = j.id
                     JOIN runs ru ON ru.id = j.run_id
                     WHERE j.crate_name = ANY($2) AND j.run_id <> $1
                       AND ru.created_at < (SELECT created_at FROM runs WHERE id = $1)
                 ) h
                 WHERE nth <= $3
                 ORDER BY crate_name, created_at DESC, side",
                &[&run.0, &packages, &runs_each],
            )
            .await
            .context("cannot read the packages' earlier results")?;
        rows.into_iter()
            .map(|r| {
                let outcome: String = r.get(5);
                Ok(HistoryRow {
                    crate_name: r.get(0),
                    crate_version: r.get(1),
                    run: r.get(2),
                    created_at: r.get(3),
                    side: r.get(4),
                    outcome: outcome.parse()?,
                })
            })
            .collect()
    }

    /// Progress, pace (results in the last `window`) and outcomes of a run, for the live view.
    pub async fn run_figures(&self, run: RunId, window: Duration) -> anyhow::Result<RunFigures> {
        let progress = self.progress(run).await?;
        let window_secs = window.as_secs() as i64;
        let row = self.query_one("WITH pending AS (
                   SELECT j.expected_ms FROM jobs j
                   WHERE j.run_id = $1 AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id))
                 SELECT (SELECT count(DISTINCT job_id) FROM dead_lettered WHERE run_id = $1),
                        (SELECT count(*) FROM results
                         WHERE run_id = $1 AND finished_at > now() - make_interval(secs => $2)),
                        (SELECT coalesce(sum(duration_ms), 0)::bigint FROM results
                         WHERE run_id = $1 AND finished_at > now() - make_interval(secs => $2)),
                        (SELECT coalesce(sum(expected_ms), 0)::bigint FROM pending),
                        (SELECT count(*) FROM pending WHERE expected_ms IS NULL),
                        (SELECT avg(duration_ms)::float8 FROM results
                         WHERE run_id = $1 AND reused_from IS NULL)", &[&run.0, &(window_secs as f64)]).await?;
        let outcomes = self
            .query(
                "SELECT j.side, r.outcome, count(*) FROM results r JOIN jobs j ON j.id = r.job_id
                 WHERE r.run_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
                &[&run.0],
            )
            .await?
            .into_iter()
            .map(|row| Ok((row.get(0), row.get::<_, String>(1).parse()?, row.get(2))))
            .collect::<anyhow::Result<_>>()?;
        Ok(RunFigures {
            progress,
            dead_lettered: row.get(0),
            recent: row.get(1),
            window_secs,
            recent_work_ms: row.get(2),
            pending_expected_ms: row.get(3),
            pending_unknown: row.get(4),
            mean_ms: row.get(5),
            outcomes,
        })
    }

    /// For a run with two toolchains: how many packages have each triple of (start, end, end
    /// re-run) outcomes, `None` where there is no result yet. Aggregated in the database, so it
    /// stays cheap for runs of any size.
    pub async fn outcome_pairs(
        &self,
        run: RunId,
        start: &str,
        end: &str,
    ) -> anyhow::Result<Vec<OutcomePair>> {
        let client = self.client().await?;
        let parse = |o: Option<String>| o.map(|o| o.parse::<Outcome>()).transpose();
        client
            .query(
                &client
                    .prepare_cached(
                        "SELECT rs.outcome, rs.environment IS NOT NULL, re.outcome,
                        re.environment IS NOT NULL, rr.outcome, count(*)
                 FROM jobs js LEFT JOIN results rs ON rs.job_id = js.id
                 JOIN jobs je ON je.run_id = js.run_id AND je.side = $3
                      AND je.crate_name = js.crate_name AND je.crate_version = js.crate_version
                 LEFT JOIN results re ON re.job_id = je.id
                 LEFT JOIN jobs jr ON jr.rerun_of = je.id
                 LEFT JOIN results rr ON rr.job_id = jr.id
                 WHERE js.run_id = $1 AND js.side = $2
                 GROUP BY 1, 2, 3, 4, 5",
                    )
                    .await?,
                &[&run.0, &start, &end],
            )
            .await?
            .into_iter()
            .map(|row| {
                // An outcome's column, then whether it is environmental in the next.
                let verdict = |at: usize| -> anyhow::Result<Option<Verdict>> {
                    Ok(parse(row.get(at))?.map(|outcome| Verdict {
                        outcome,
                        environmental: row.get(at + 1),
                    }))
                };
                Ok(OutcomePair {
                    start: verdict(0)?,
                    end: verdict(2)?,
                    end_rerun: parse(row.get(4))?,
                    packages: row.get(5),
                })
            })
            .collect()
    }

    /// Every result of a run as a side's verdict: what selecting from an earlier run needs,
    /// without the logs.
    pub async fn package_outcomes(&self, run: RunId) -> anyhow::Result<Vec<SideVerdict>> {
        self.query(
            "SELECT j.crate_name, j.crate_version, j.side, r.outcome,
                        r.environment IS NOT NULL
                 FROM results r JOIN jobs j ON j.id = r.job_id WHERE r.run_id = $1
                 ORDER BY 1, 2, 3",
            &[&run.0],
        )
        .await?
        .into_iter()
        .map(|row| {
            Ok(SideVerdict {
                name: row.get(0),
                version: row.get(1),
                side: row.get(2),
                verdict: Verdict {
                    outcome: row.get::<_, String>(3).parse()?,
                    environmental: row.get(4),
                },
            })
        })
        .collect()
    }

    /// The latest results that failed (build, tests, limits, resolution, infrastructure).
    pub async fn recent_failures(
        &self,
        run: RunId,
        limit: i64,
    ) -> anyhow::Result<Vec<ResultBrief>> {
        self.query(
            "SELECT j.crate_name, j.crate_version, j.side, r.outcome, r.finished_at, NULL
                 FROM results r JOIN jobs j ON j.id = r.job_id
                 WHERE r.run_id = $1 AND r.outcome NOT IN ('build-pass', 'test-pass', 'skipped')
                 ORDER BY r.finished_at DESC LIMIT $2",
            &[&run.0, &limit],
        )
        .await?
        .iter()
        .map(brief_of)
        .collect()
    }

    /// The run's dead-lettered jobs (not since requeued), latest first, with the reason each
    /// was given up on.
    pub async fn dead_letters(&self, run: RunId, limit: i64) -> anyhow::Result<Vec<ResultBrief>> {
        self.query(
            "SELECT j.crate_name, j.crate_version, j.side, 'error', e.at, e.detail
                 FROM dead_lettered e JOIN jobs j ON j.id = e.job_id
                 WHERE e.run_id = $1
                 ORDER BY e.at DESC LIMIT $2",
            &[&run.0, &limit],
        )
        .await?
        .iter()
        .map(brief_of)
        .collect()
    }

    /// Takes the run's dead-lettered jobs (those not requeued since) out of the dead letters:
    /// removes their `error` results and logs a `requeued` event for each, in one transaction.
    /// Returns them, to publish again; until they are, `republish` finds them unfinished.
    pub async fn requeue_dead_letters(
        &self,
        run: RunId,
        by: &str,
    ) -> anyhow::Result<Vec<StoredJob>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "WITH dead AS (
                     SELECT DISTINCT job_id FROM dead_lettered WHERE run_id = $1
                 ), removed AS (
                     DELETE FROM results r USING dead
                     WHERE r.job_id = dead.job_id AND r.outcome = 'error'
                     RETURNING r.job_id
                 ), logged AS (
                     INSERT INTO job_events (job_id, run_id, kind, consumer, detail)
                     SELECT job_id, $1, 'requeued', $2, 'taken out of the dead letters'
                     FROM removed
                     RETURNING job_id
                 )
                 SELECT j.id, j.crate_name, j.crate_version, j.checksum, j.side,
                        j.rerun_of
                 FROM jobs j JOIN logged ON logged.job_id = j.id
                 ORDER BY j.crate_name, j.crate_version, j.side",
                )
                .await?,
                &[&run.0, &by],
            )
            .await
            .context("cannot requeue the dead letters")?;
        tx.commit().await?;
        Ok(rows.into_iter().map(stored_job).collect())
    }

    /// Packages whose outcome on side `side_a` in run `a` differs from that on side `side_b`
    /// in run `b` (the same name and version in both), and how many stayed the same.
    pub async fn changes(
        &self,
        (a, side_a): (RunId, &str),
        (b, side_b): (RunId, &str),
    ) -> anyhow::Result<(Vec<Change>, i64)> {
        let rows = self
            .query(
                "SELECT ja.crate_name, ja.crate_version, ra.outcome, rb.outcome
                 FROM jobs ja JOIN results ra ON ra.job_id = ja.id
                 JOIN jobs jb ON jb.run_id = $3 AND jb.side = $4
                      AND jb.crate_name = ja.crate_name AND jb.crate_version = ja.crate_version
                 JOIN results rb ON rb.job_id = jb.id
                 WHERE ja.run_id = $1 AND ja.side = $2
                 ORDER BY ja.crate_name, ja.crate_version",
                &[&a.0, &side_a, &b.0, &side_b],
            )
            .await?;
        let mut changes = Vec::new();
        let mut same = 0;
        for row in rows {
            let before: Outcome = row.get::<_, String>(2).parse()?;
            let after: Outcome = row.get::<_, String>(3).parse()?;
            if before == after {
                same += 1;
            } else {
                changes.push(Change {
                    crate_name: row.get(0),
                    crate_version: row.get(1),
                    before,
                    after,
                });
            }
        }
        Ok((changes, same))
    }

    /// The figures that `quarry-reporter verify` checks a run's invariants against.
    pub async fn reconcile(&self, run: RunId) -> anyhow::Result<Reconciliation> {
        let row = self
            .query_one(
                "SELECT
                   (SELECT count(*) FROM jobs WHERE run_id = $1),
                   (SELECT count(*) FROM jobs WHERE run_id = $1 AND published_at IS NULL),
                   (SELECT count(*) FROM results WHERE run_id = $1),
                   (SELECT count(*) FROM jobs j WHERE j.run_id = $1
                      AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)),
                   (SELECT count(*) FROM results r WHERE r.run_id = $1
                      AND (SELECT count(*) FROM job_events e
                           WHERE e.job_id = r.job_id AND e.kind = 'finished'
                             AND e.id > coalesce((SELECT max(q.id) FROM job_events q
                                                  WHERE q.job_id = r.job_id
                                                    AND q.kind = 'requeued'), 0)) <> 1),
                   (SELECT count(DISTINCT e.job_id) FROM dead_lettered e
                      WHERE e.run_id = $1
                        AND NOT EXISTS (SELECT 1 FROM results r
                                        WHERE r.job_id = e.job_id AND r.outcome = 'error')),
                   (SELECT count(*) FROM jobs WHERE run_id = $1 AND rerun_of IS NOT NULL)",
                &[&run.0],
            )
            .await?;
        let missing = self
            .query(
                "SELECT j.crate_name || '@' || j.crate_version || ' (' || j.side || ')'
                 FROM jobs j WHERE j.run_id = $1
                   AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)
                 ORDER BY 1 LIMIT 20",
                &[&run.0],
            )
            .await?;
        Ok(Reconciliation {
            jobs: row.get(0),
            unpublished: row.get(1),
            results: row.get(2),
            jobs_without_result_count: row.get(3),
            results_without_one_finished_event: row.get(4),
            dead_letters_without_error_result: row.get(5),
            reruns: row.get(6),
            jobs_without_result: missing.into_iter().map(|r| r.get(0)).collect(),
        })
    }
}
