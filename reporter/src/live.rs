//! Partial reports of running runs, for the live view: every `reporter.live_report_secs`, each
//! recent run that is still going and has new results gets its report written again (the same
//! `generate` as `quarry-reporter generate`), and the run's page shows the regressions grouped as
//! that report groups them. A run that finishes while followed gets one last report.
//!
//! A report is written beside the published one and swapped in by one atomic rename
//! (`RENAME_EXCHANGE`), so someone reading it never sees a half-written page. A failure is
//! logged and tried again next round: it never stops the server.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use quarry_core::job::RunId;
use quarry_infra::Config;
use quarry_infra::store::{Run, Store};
use tokio_util::sync::CancellationToken;

use crate::RegressionGroup;

/// Root causes, roots per cause, kept for the live view.
const GROUPS: usize = 10;
const ROOTS: usize = 5;

/// What the live view shows of a run's latest partial report.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: DateTime<Utc>,
    pub finished: i64,
    pub total: Option<i64>,
    pub complete: bool,
    /// Whether the run has two sides (and so regressions).
    pub compared: bool,
    pub regressed_crates: usize,
    pub causes: usize,
    /// The first [`GROUPS`] root causes, each with its first [`ROOTS`] roots.
    pub groups: Vec<RegressionGroup>,
}

/// The latest snapshot of each followed run.
#[derive(Default)]
pub struct LiveReports {
    runs: Mutex<HashMap<RunId, Snapshot>>,
}

impl LiveReports {
    pub fn get(&self, run: RunId) -> Option<Snapshot> {
        self.runs.lock().expect("not poisoned").get(&run).cloned()
    }

    fn set(&self, run: RunId, snapshot: Snapshot) {
        self.runs
            .lock()
            .expect("not poisoned")
            .insert(run, snapshot);
    }
}

/// Rewrites the partial reports every `every` until `shutdown`.
pub fn spawn(
    config: Config,
    store: Store,
    live: Arc<LiveReports>,
    every: Duration,
    recent: usize,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            let round = async {
                for run in store.runs().await?.iter().rev().take(recent) {
                    if shutdown.is_cancelled() {
                        break;
                    }
                    if let Err(err) = refresh(&config, &store, &live, run).await {
                        tracing::warn!(run = %run.name, error = %format!("{err:#}"), "cannot write the partial report");
                    }
                }
                anyhow::Ok(())
            };
            if let Err(err) = round.await {
                tracing::warn!(error = %format!("{err:#}"), "cannot list the runs to report on");
            }
        }
    })
}

/// Writes `run`'s report again if it is still going and has new results since the last one,
/// or if it finished since.
async fn refresh(
    config: &Config,
    store: &Store,
    live: &LiveReports,
    run: &Run,
) -> anyhow::Result<()> {
    if run.cancelled_at.is_some() {
        return Ok(());
    }
    let progress = store.progress(run.id).await?;
    let held = live.get(run.id);
    let due = match &held {
        // A finished run is reported by whoever finished it; only one followed gets a last one.
        None => !progress.is_complete(),
        Some(held) => !held.complete && held.finished != progress.finished,
    };
    if !due {
        return Ok(());
    }
    let output = &config.reporter.output_dir;
    let staging = output.join(format!(".partial-{}", run.id));
    remove_dir(&staging)?;
    let written = crate::generate(config, &run.id.to_string(), &staging).await?;
    swap_in(&written.dir, &output.join(&run.name))?;
    remove_dir(&staging)?;
    let report = written.report;
    let mut groups = report.regressions;
    let snapshot = Snapshot {
        at: Utc::now(),
        finished: report.progress.finished,
        total: report.progress.total,
        complete: report.progress.complete,
        compared: report.comparison.is_some(),
        regressed_crates: groups.iter().map(|g| g.crates).sum(),
        causes: groups.len(),
        groups: {
            groups.truncate(GROUPS);
            for group in &mut groups {
                group.roots.truncate(ROOTS);
            }
            groups
        },
    };
    tracing::info!(run = %run.name, finished = snapshot.finished, "partial report written");
    live.set(run.id, snapshot);
    Ok(())
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Puts the directory `new` at `target` in one step: exchanged with what is there (left at
/// `new`'s place), or renamed if nothing is.
fn swap_in(new: &Path, target: &Path) -> anyhow::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    let swapped = renameat2(
        AT_FDCWD,
        new,
        AT_FDCWD,
        target,
        RenameFlags::RENAME_EXCHANGE,
    );
    match swapped {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::ENOENT) => std::fs::rename(new, target)
            .with_context(|| format!("cannot move the report to {}", target.display())),
        Err(err) => {
            Err(err).with_context(|| format!("cannot swap the report into {}", target.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_swapped_in_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("run");
        let new = dir.path().join("new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("index.html"), "first").unwrap();
        swap_in(&new, &target).unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("index.html")).unwrap(),
            "first"
        );
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("index.html"), "second").unwrap();
        swap_in(&new, &target).unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("index.html")).unwrap(),
            "second"
        );
        // The old one is left where the new one was, to be removed.
        assert_eq!(
            std::fs::read_to_string(new.join("index.html")).unwrap(),
            "first"
        );
    }
}
