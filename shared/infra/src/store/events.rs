//! The job event log: appended to, never updated; read back for `explain`.

use super::*;

impl Store {
    pub(super) async fn append_event(
        &self,
        job: &Job,
        kind: EventKind,
        attempt: Option<i32>,
        consumer: &str,
        detail: &str,
    ) -> anyhow::Result<()> {
        self.execute(
            "INSERT INTO job_events (job_id, run_id, kind, attempt, consumer, detail)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &job.id.0,
                &job.run_id.0,
                &kind.as_str(),
                &attempt,
                &consumer,
                &detail,
            ],
        )
        .await?;
        Ok(())
    }

    /// A job's event log, oldest first.
    pub async fn events(&self, job: JobId) -> anyhow::Result<Vec<JobEvent>> {
        let client = self.client().await?;
        let rows = client
            .query(
                // The `queued` event is the job's published_at: not a row of its own, since
                // the producer writes it for every job of every run.
                "SELECT at, kind, attempt, consumer, detail FROM (
                     SELECT 0 AS position, published_at AS at, 'queued' AS kind,
                            NULL::integer AS attempt, NULL AS consumer, NULL AS detail
                     FROM jobs WHERE id = $1 AND published_at IS NOT NULL
                     UNION ALL
                     SELECT id, at, kind, attempt, consumer, detail FROM job_events
                     WHERE job_id = $1
                 ) events ORDER BY position",
                &[&job.0],
            )
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(JobEvent {
                    at: row.get(0),
                    kind: row.get::<_, String>(1).parse()?,
                    attempt: row.get(2),
                    consumer: row.get(3),
                    detail: row.get(4),
                })
            })
            .collect()
    }
}
