//! Runs: created or resumed by name, found, listed, cancelled, and how far each has got.

use super::*;

impl Store {
    /// Creates the run named `name`, or returns the existing one if its definition is the same
    /// (`true` in the second field). A different definition under the same name is an error.
    pub async fn create_or_resume_run(
        &self,
        name: &str,
        definition: &serde_json::Value,
    ) -> anyhow::Result<(Run, bool)> {
        let inserted = self
            .execute(
                "INSERT INTO runs (id, name, definition) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&RunId::new().0, &name, definition],
            )
            .await?;
        let run = self
            .run_by_name(name)
            .await?
            .context("run vanished right after it was created")?;
        if inserted == 0 && &run.definition != definition {
            bail!(
                "a run named {name:?} already exists with a different definition; \
                 choose another name, or repeat the original definition to resume it.\n\
                 existing: {}\n   given: {}",
                run.definition,
                definition
            );
        }
        Ok((run, inserted == 0))
    }

    pub async fn run_by_name(&self, name: &str) -> anyhow::Result<Option<Run>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE name = $1"),
                &[&name],
            )
            .await?;
        Ok(row.map(run_from_row))
    }

    /// Finds a run by id or, failing that, by name.
    pub async fn find_run(&self, id_or_name: &str) -> anyhow::Result<Run> {
        if let Ok(id) = id_or_name.parse::<Uuid>() {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
                    &[&id],
                )
                .await?;
            if let Some(row) = row {
                return Ok(run_from_row(row));
            }
        }
        self.run_by_name(id_or_name)
            .await?
            .with_context(|| format!("no run with id or name {id_or_name:?}"))
    }

    /// Every run, newest first.
    pub async fn runs(&self) -> anyhow::Result<Vec<Run>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY created_at DESC"),
                &[],
            )
            .await?;
        Ok(rows.into_iter().map(run_from_row).collect())
    }

    /// Cancels a run. Returns false if it was already cancelled.
    pub async fn cancel_run(&self, run: RunId) -> anyhow::Result<bool> {
        let changed = self
            .execute(
                "UPDATE runs SET cancelled_at = now() WHERE id = $1 AND cancelled_at IS NULL",
                &[&run.0],
            )
            .await?;
        Ok(changed == 1)
    }

    /// Jobs recorded for a run, and the distinct package versions they cover.
    pub async fn recorded(&self, run: RunId) -> anyhow::Result<(i64, i64)> {
        let row = self
            .query_one(
                "SELECT count(*), count(DISTINCT (crate_name, crate_version))
                 FROM jobs WHERE run_id = $1",
                &[&run.0],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Records that the producer has published every job of the run.
    pub async fn finish_publishing(
        &self,
        run: RunId,
        summary: &serde_json::Value,
    ) -> anyhow::Result<()> {
        self.execute(
            "UPDATE runs SET published_at = now(), producer_summary = $2,
                     jobs_total = (SELECT count(*) FROM jobs WHERE run_id = $1)
                 WHERE id = $1",
            &[&run.0, summary],
        )
        .await?;
        Ok(())
    }

    pub async fn progress(&self, run: RunId) -> anyhow::Result<Progress> {
        let client = self.client().await?;
        let row = client
            .query_one(
                // Once everything is published, every recorded job counts, including the
                // re-runs of regressions that consumers add as results come in.
                "WITH recorded AS (SELECT count(*) AS n FROM jobs WHERE run_id = $1)
                 SELECT recorded.n,
                        (SELECT count(*) FROM results WHERE run_id = $1),
                        CASE WHEN runs.published_at IS NOT NULL THEN recorded.n END
                 FROM runs, recorded WHERE runs.id = $1",
                &[&run.0],
            )
            .await?;
        Ok(Progress {
            recorded: row.get(0),
            finished: row.get(1),
            total: row.get(2),
        })
    }
}
