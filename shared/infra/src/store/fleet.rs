//! The fleet: consumers registered, their heartbeats with the jobs in hand, and who is alive.

use super::*;

impl Store {
    /// Registers a consumer process; `secret` authenticates its later updates.
    pub async fn register_consumer(
        &self,
        id: Uuid,
        name: &str,
        secret: &str,
        host: &str,
        slots: u16,
    ) -> anyhow::Result<()> {
        self.execute(
            "INSERT INTO consumers (id, name, secret, host, slots) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO NOTHING",
            &[&id, &name, &secret, &host, &i32::from(slots)],
        )
        .await?;
        Ok(())
    }

    /// Says whether a consumer has a free slot and found the queue empty (`idle`), for
    /// [`Store::idle_elsewhere`].
    pub async fn consumer_idle(&self, id: Uuid, secret: &str, idle: bool) -> anyhow::Result<()> {
        self.execute(
            "UPDATE consumers SET idle_since = CASE WHEN $3 THEN coalesce(idle_since, now()) END
                 WHERE id = $1 AND secret = $2",
            &[&id, &secret, &idle],
        )
        .await?;
        Ok(())
    }

    /// Whether a consumer of the fleet alive now, other than `id`, said it is idle: a job
    /// waiting for `id`'s busy slot would start sooner there.
    pub async fn idle_elsewhere(&self, id: Uuid) -> anyhow::Result<bool> {
        let lost_after = quarry_core::fleet::LOST_AFTER.as_secs_f64();
        let row = self
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM consumers
                                 WHERE id <> $1 AND stopped_at IS NULL AND idle_since IS NOT NULL
                                   AND heartbeat_at >= now() - make_interval(secs => $2))",
                &[&id, &lost_after],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Renews a consumer's heartbeat with the jobs it has in hand, its total so far and the
    /// toolchains it has ready, and returns the slots of the whole fleet alive now, its own
    /// included: a consumer takes a job it cannot start yet only while the queue holds enough
    /// for the others' slots too.
    pub async fn consumer_heartbeat(
        &self,
        id: Uuid,
        secret: &str,
        current_jobs: &[Uuid],
        jobs_done: i64,
        toolchains: &[String],
    ) -> anyhow::Result<u32> {
        let lost_after = quarry_core::fleet::LOST_AFTER.as_secs_f64();
        // The other rows as they were before this statement, and this one as it updated it.
        let row = self
            .query_one(
                "WITH beat AS (
                     UPDATE consumers SET heartbeat_at = now(), current_jobs = $3, jobs_done = $4,
                            toolchains = $5
                     WHERE id = $1 AND secret = $2
                     RETURNING slots
                 )
                 SELECT (SELECT count(*) FROM beat),
                        (SELECT coalesce(sum(slots), 0) FROM beat)
                        + (SELECT coalesce(sum(slots), 0) FROM consumers
                           WHERE id <> $1 AND stopped_at IS NULL
                             AND heartbeat_at >= now() - make_interval(secs => $6))",
                &[
                    &id,
                    &secret,
                    &current_jobs,
                    &jobs_done,
                    &toolchains,
                    &lost_after,
                ],
            )
            .await?;
        let updated: i64 = row.get(0);
        anyhow::ensure!(
            updated == 1,
            "consumer {id} is not registered (or its secret is wrong)"
        );
        let slots: i64 = row.get(1);
        Ok(u32::try_from(slots).unwrap_or(u32::MAX))
    }

    pub async fn consumer_stopped(&self, id: Uuid, secret: &str) -> anyhow::Result<()> {
        self.execute(
            "UPDATE consumers SET stopped_at = now(), current_jobs = '{}'
                 WHERE id = $1 AND secret = $2",
            &[&id, &secret],
        )
        .await?;
        Ok(())
    }

    /// Consumers seen since `since`, most recent heartbeat first.
    pub async fn fleet(&self, since: DateTime<Utc>) -> anyhow::Result<Vec<FleetMember>> {
        let rows = self.query("SELECT id, name, host, started_at, heartbeat_at, current_jobs, jobs_done, stopped_at,
                        toolchains
                 FROM consumers WHERE heartbeat_at >= $1 ORDER BY heartbeat_at DESC", &[&since]).await?;
        Ok(rows
            .into_iter()
            .map(|row| FleetMember {
                id: row.get(0),
                name: row.get(1),
                host: row.get(2),
                started_at: row.get(3),
                heartbeat_at: row.get(4),
                current_jobs: row.get(5),
                jobs_done: row.get(6),
                stopped_at: row.get(7),
                toolchains: row.get(8),
            })
            .collect())
    }
}
