//! What holds a job or a computation while it is in hand: a job's lease, and the claim on a memo key that makes identical jobs compute once.

use super::*;

impl Store {
    /// Claims the computation of `memo_key` for `job`: returns `None` when it is ours (no one
    /// had it, its holder's heartbeat is older than `stale_after`, or it was already ours), or
    /// the job holding it.
    pub async fn claim_computation(
        &self,
        memo_key: &str,
        job: JobId,
        consumer: &str,
        stale_after: Duration,
    ) -> anyhow::Result<Option<JobId>> {
        let stale_secs = stale_after.as_secs_f64();
        let client = self.client().await?;
        // Twice at most: the holder may finish between the insert and the look-up.
        for _ in 0..2 {
            let claimed = client
                .query_opt(
                    &client.prepare_cached("INSERT INTO computations AS c (memo_key, job_id, consumer) VALUES ($1, $2, $3)
                     ON CONFLICT (memo_key) DO UPDATE
                       SET job_id = excluded.job_id, consumer = excluded.consumer,
                           heartbeat_at = now()
                       WHERE c.job_id = excluded.job_id
                          OR c.heartbeat_at < now() - make_interval(secs => $4)
                     RETURNING job_id").await?,
                    &[&memo_key, &job.0, &consumer, &stale_secs],
                )
                .await?;
            if claimed.is_some() {
                return Ok(None);
            }
            // The row was someone else's and fresh, so it was left alone: say whose.
            let holder = client
                .query_opt(
                    &client
                        .prepare_cached("SELECT job_id FROM computations WHERE memo_key = $1")
                        .await?,
                    &[&memo_key],
                )
                .await?;
            if let Some(holder) = holder {
                return Ok(Some(JobId(holder.get(0))));
            }
        }
        anyhow::bail!("the claim on computation {memo_key} keeps changing hands")
    }

    /// Keeps a claimed computation alive.
    pub async fn heartbeat_computation(&self, memo_key: &str, job: JobId) -> anyhow::Result<()> {
        self.execute(
            "UPDATE computations SET heartbeat_at = now() WHERE memo_key = $1 AND job_id = $2",
            &[&memo_key, &job.0],
        )
        .await?;
        Ok(())
    }

    /// Gives up a claimed computation (done, or failed).
    pub async fn release_computation(&self, memo_key: &str, job: JobId) -> anyhow::Result<()> {
        self.execute(
            "DELETE FROM computations WHERE memo_key = $1 AND job_id = $2",
            &[&memo_key, &job.0],
        )
        .await?;
        Ok(())
    }

    /// Takes the lease of a delivered job for `holder`, valid for `ttl`: true if it is now
    /// `holder`'s (no one held it, or its lease had lapsed), false if another live lease holds
    /// it (this delivery is a copy of a job in hand somewhere: the holder finishes it, or its
    /// lease lapses and the job is published again).
    pub async fn take_lease(&self, lease: &NewLease<'_>, ttl: Duration) -> anyhow::Result<bool> {
        let taken = self
            .query_opt(
                "INSERT INTO leases AS l (job_id, run_id, holder, consumer, message,
                                              failed_attempts, expires_at)
                         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
                         ON CONFLICT (job_id) DO UPDATE
                           SET holder = excluded.holder, consumer = excluded.consumer,
                               message = excluded.message,
                               failed_attempts = excluded.failed_attempts,
                               taken_at = now(), expires_at = excluded.expires_at
                           WHERE l.expires_at <= now()
                         RETURNING 1",
                &[
                    &lease.job.0,
                    &lease.run.0,
                    &lease.holder,
                    &lease.consumer,
                    &lease.message,
                    &(lease.failed_attempts as i32),
                    &ttl.as_secs_f64(),
                ],
            )
            .await
            .context("cannot take the job's lease")?;
        Ok(taken.is_some())
    }

    /// Renews `holder`'s leases of `jobs` (the jobs it has in hand) for another `ttl`.
    pub async fn renew_leases(
        &self,
        holder: Uuid,
        jobs: &[Uuid],
        ttl: Duration,
    ) -> anyhow::Result<u64> {
        let client = self.client().await?;
        Ok(client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE leases SET expires_at = now() + make_interval(secs => $3)
                         WHERE holder = $1 AND job_id = ANY($2)",
                    )
                    .await?,
                &[&holder, &jobs, &ttl.as_secs_f64()],
            )
            .await?)
    }

    /// Lets `holder`'s lease of `job` lapse at once (all of them with `None`): the step before
    /// a job is published again, so that the copy, whoever takes it, finds the lease free.
    pub async fn lapse_leases(&self, holder: Uuid, job: Option<JobId>) -> anyhow::Result<u64> {
        let client = self.client().await?;
        Ok(client
            .execute(
                &client
                    .prepare_cached(
                        "UPDATE leases SET expires_at = now()
                         WHERE holder = $1 AND ($2::uuid IS NULL OR job_id = $2)",
                    )
                    .await?,
                &[&holder, &job.map(|j| j.0)],
            )
            .await?)
    }

    /// Hands `holder`'s lease of `job` over to a copy of the job that `publish` puts on a queue:
    /// in one transaction, the lease lapses (which locks it), the copy is published, and the
    /// lease is removed. A sweeper skips the locked lease, so it cannot publish the job a
    /// second time while `publish` runs; a consumer taking the copy waits for the removal and
    /// then holds a new lease. If `publish` fails, the lease stays lapsed, for a sweep.
    pub async fn hand_over_lease<Fut>(
        &self,
        holder: Uuid,
        job: JobId,
        publish: Fut,
    ) -> anyhow::Result<()>
    where
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            &tx.prepare_cached(
                "UPDATE leases SET expires_at = now() WHERE holder = $1 AND job_id = $2",
            )
            .await?,
            &[&holder, &job.0],
        )
        .await?;
        let published = publish.await;
        if published.is_ok() {
            tx.execute(
                &tx.prepare_cached("DELETE FROM leases WHERE job_id = $1 AND holder = $2")
                    .await?,
                &[&job.0, &holder],
            )
            .await?;
        }
        tx.commit().await?;
        published
    }

    /// Releases `holder`'s lease of `job`.
    pub async fn release_lease(&self, holder: Uuid, job: JobId) -> anyhow::Result<()> {
        self.execute(
            "DELETE FROM leases WHERE job_id = $1 AND holder = $2",
            &[&job.0, &holder],
        )
        .await?;
        Ok(())
    }

    /// Publishes again the jobs of up to `limit` lapsed leases (their holders died, or handed
    /// them back and could not publish them), through `publish`, and removes each lease whose
    /// job `publish` took. The leases stay locked meanwhile, so no other sweeper publishes them
    /// too, and a consumer taking a copy waits for the removal and then holds a new lease.
    /// Returns the jobs published; one `publish` refused stops the sweep (the rest stay lapsed,
    /// for the next).
    pub async fn sweep_lapsed_leases<F, Fut>(
        &self,
        limit: i64,
        sweeper: &str,
        mut publish: F,
    ) -> anyhow::Result<Vec<LapsedLease>>
    where
        F: FnMut(LapsedLease) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT job_id, run_id, consumer, message, failed_attempts,
                            extract(epoch FROM now() - expires_at)::float8
                     FROM leases WHERE expires_at <= now()
                     ORDER BY expires_at LIMIT $1
                     FOR UPDATE SKIP LOCKED",
                )
                .await?,
                &[&limit],
            )
            .await
            .context("cannot read the lapsed leases")?;
        let mut published = Vec::new();
        for row in rows {
            let lapsed = LapsedLease {
                job: JobId(row.get(0)),
                run: RunId(row.get(1)),
                holder: row.get(2),
                message: row.get(3),
                failed_attempts: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
                lapsed_for: Duration::from_secs_f64(row.get::<_, f64>(5).max(0.0)),
            };
            if let Err(err) = publish(lapsed.clone()).await {
                tracing::warn!(job = %lapsed.job, error = %format!("{err:#}"), "cannot publish a lapsed lease's job; it stays lapsed");
                break;
            }
            tx.execute(
                &tx.prepare_cached("DELETE FROM leases WHERE job_id = $1")
                    .await?,
                &[&lapsed.job.0],
            )
            .await?;
            let detail = format!(
                "the lease of {} lapsed {:.0} s ago: published again by {sweeper}",
                lapsed.holder,
                lapsed.lapsed_for.as_secs_f64()
            );
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO job_events (job_id, run_id, kind, consumer, detail)
                     VALUES ($1, $2, 'lease-lapsed', $3, $4)",
                )
                .await?,
                &[&lapsed.job.0, &lapsed.run.0, &sweeper, &detail],
            )
            .await?;
            published.push(lapsed);
        }
        tx.commit()
            .await
            .context("cannot commit the sweep of lapsed leases")?;
        Ok(published)
    }

    /// The leases held on a run's jobs now, oldest first.
    pub async fn leases(&self, run: RunId) -> anyhow::Result<Vec<LeaseRow>> {
        let client = self.client().await?;
        Ok(client
            .query(
                &client
                    .prepare_cached(
                        "SELECT consumer, job_id, expires_at <= now() FROM leases
                         WHERE run_id = $1 ORDER BY taken_at",
                    )
                    .await?,
                &[&run.0],
            )
            .await?
            .iter()
            .map(|row| LeaseRow {
                holder: row.get(0),
                job: JobId(row.get(1)),
                lapsed: row.get(2),
            })
            .collect())
    }
}
