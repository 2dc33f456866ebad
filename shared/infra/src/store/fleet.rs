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
    ) -> anyhow::Result<()> {
        self.execute(
            "INSERT INTO consumers (id, name, secret, host) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO NOTHING",
            &[&id, &name, &secret, &host],
        )
        .await?;
        Ok(())
    }

    /// Renews a consumer's heartbeat with the jobs it has in hand, its total so far and the
    /// toolchains it has ready.
    pub async fn consumer_heartbeat(
        &self,
        id: Uuid,
        secret: &str,
        current_jobs: &[Uuid],
        jobs_done: i64,
        toolchains: &[String],
    ) -> anyhow::Result<()> {
        let updated = self
            .execute(
                "UPDATE consumers SET heartbeat_at = now(), current_jobs = $3, jobs_done = $4,
                        toolchains = $5
                 WHERE id = $1 AND secret = $2",
                &[&id, &secret, &current_jobs, &jobs_done, &toolchains],
            )
            .await?;
        anyhow::ensure!(
            updated == 1,
            "consumer {id} is not registered (or its secret is wrong)"
        );
        Ok(())
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
