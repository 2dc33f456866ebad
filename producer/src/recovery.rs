//! Runs made from earlier ones: `--from-run` selects an earlier run's packages, and
//! `republish` publishes again the jobs of a run that the broker lost.

use std::collections::BTreeMap;

use anyhow::Context as _;
use quarry_core::job::StoredDefinition;
use quarry_infra::Config;
use quarry_infra::queue::Broker;
use quarry_infra::store::{FleetState, Store};
use serde::{Deserialize, Serialize};

use crate::definition::RunDefinition;

/// Which packages of an earlier run a new run takes (`--from-run RUN --only ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Only {
    /// Passed with the start toolchain, failed with the end one, or crashed it (two-toolchain
    /// runs).
    Regressed,
    /// Hit a limit (time, memory) on one side only, or regressed then passed when run again
    /// (flaky): confirm or dismiss them.
    Spurious,
    /// Failed to build or test, or hit a limit, with any toolchain.
    Failed,
    /// Got an `error` (Quarry's infrastructure) with any toolchain.
    Errored,
    /// Could not be unpacked or resolved.
    Broken,
}

/// The packages (`name@version`) of an earlier run that match any of `only`, to start a run of
/// just those: confirming a fix or a flaky result without re-running everything.
pub async fn packages_from_run(
    config: &Config,
    run: &str,
    only: &[Only],
) -> anyhow::Result<Vec<String>> {
    use quarry_core::category::{Category, SideVerdict, Verdict, package_categories};
    use quarry_core::job::Outcome;
    let store = Store::connect(&config.database).await?;
    let run = store.find_run(run).await?;
    let definition = RunDefinition::of(&run)?;
    let pair = match definition.stored().side_labels().as_slice() {
        [start, end] => Some((start.clone(), end.clone())),
        _ => None,
    };
    if pair.is_none()
        && only
            .iter()
            .any(|o| matches!(o, Only::Regressed | Only::Spurious))
    {
        anyhow::bail!(
            "run {} has one toolchain: nothing in it regressed; use --only failed, errored or broken",
            run.name
        );
    }
    let rows = store.package_outcomes(run.id).await?;
    let categories = pair
        .as_ref()
        .map(|(start, end)| package_categories(rows.clone(), start, end))
        .unwrap_or_default();
    let mut packages: BTreeMap<(String, String), Vec<Verdict>> = BTreeMap::new();
    for SideVerdict {
        name,
        version,
        verdict,
        ..
    } in rows
    {
        packages.entry((name, version)).or_default().push(verdict);
    }
    let selected = packages
        .into_iter()
        .filter(|(package, sides)| {
            let category = categories.get(package).copied();
            let any = |wanted: &[Outcome]| sides.iter().any(|v| wanted.contains(&v.outcome));
            only.iter().any(|only| match only {
                Only::Regressed => {
                    matches!(category, Some(Category::Regressed | Category::RegressedIce))
                }
                Only::Spurious => matches!(
                    category,
                    Some(Category::SpuriousRegressed | Category::SpuriousFixed | Category::Flaky)
                ),
                Only::Failed => any(&[
                    Outcome::BuildFail,
                    Outcome::TestFail,
                    Outcome::Timeout,
                    Outcome::OutOfMemory,
                ]),
                Only::Errored => any(&[Outcome::Error]),
                Only::Broken => any(&[Outcome::Broken]),
            })
        })
        .map(|((name, version), _)| format!("{name}@{version}"))
        .collect();
    Ok(selected)
}

/// What `republish` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Republished {
    /// Jobs put back on the work queue.
    pub jobs: u64,
    /// Unfinished jobs left alone because a live consumer has them in hand.
    pub in_hand: u64,
}

/// Puts back on the work queue every job of `run` that has no result and that no live consumer
/// has in hand: the way to recover after the broker lost its queues. Refuses, unless `force`,
/// while the work and retry queues still hold messages, since jobs among them would then be
/// queued twice (harmless to the results, which stay one per job, but wasted work).
pub async fn republish(config: &Config, run: &str, force: bool) -> anyhow::Result<Republished> {
    let store = Store::connect(&config.database).await?;
    let run = store.find_run(run).await?;
    anyhow::ensure!(
        run.cancelled_at.is_none(),
        "run {} was cancelled: there is nothing to republish",
        run.name
    );
    let broker = Broker::connect(&config.rabbitmq).await?;
    let topology = broker.topology().clone();
    let mut queued = 0;
    for queue in std::iter::once(&topology.jobs).chain(topology.retries.iter().map(|(q, _)| q)) {
        queued += broker.ready_messages(queue).await?;
    }
    if queued > 0 && !force {
        anyhow::bail!(
            "{queued} messages are still queued (work and retry queues): jobs among them would \
             be queued twice. Wait until the queues are empty, or pass --force"
        );
    }
    let now = chrono::Utc::now();
    let in_hand: std::collections::HashSet<uuid::Uuid> = store
        .fleet(now - chrono::Duration::hours(1))
        .await?
        .into_iter()
        .filter(|member| member.state(now) == FleetState::Alive)
        .flat_map(|member| member.current_jobs)
        .collect();
    let mut republished = Republished::default();
    let mut jobs = Vec::new();
    let definition = StoredDefinition::of(&run.definition)?;
    for stored in store.unfinished_jobs(run.id).await? {
        if in_hand.contains(&stored.id.0) {
            republished.in_hand += 1;
            continue;
        }
        jobs.push(
            definition
                .job(run.id, stored)
                .with_context(|| format!("cannot republish a job of run {}", run.name))?,
        );
    }
    let publisher = broker.publisher().await?;
    for chunk in jobs.chunks(500) {
        publisher
            .publish_jobs(chunk)
            .await
            .context("republishing failed part way; run it again to finish")?;
        let ids: Vec<_> = chunk.iter().map(|j| j.id).collect();
        store.mark_published(&ids, None).await?;
        republished.jobs += chunk.len() as u64;
    }
    broker.close().await;
    Ok(republished)
}
