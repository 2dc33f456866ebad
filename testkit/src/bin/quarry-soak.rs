//! `quarry-soak`: the long reliability run (RELIABILITY.md). N generated packages, one no-op
//! job each, and beside them a run of long jobs (each longer than the broker's delivery
//! timeout), through real `quarry-consumer` processes that are killed with SIGKILL at random
//! every few seconds (and started again, as Kubernetes would), or replaced while they drain (a
//! consumer of the same name started while the old one is still in its grace period), on a
//! RabbitMQ node of the soak's own, with a delivery timeout of a few seconds, that is restarted
//! twice mid-run. At the end every job must be accounted for: `quarry-reporter verify` finds
//! exactly one result per job and nothing else, and the soak prints its figures as a markdown
//! table.
//!
//! Build the consumer beside it: `cargo build --release --bin quarry-consumer --bin quarry-soak`,
//! then `target/release/quarry-soak --jobs 20000`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use quarry_infra::store::Store;
use quarry_producer::publish_run;
use quarry_testkit::private_rabbitmq::PrivateRabbitMq;
use quarry_testkit::{TestStack, fixtures};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Soak {
    /// Jobs (one generated package each).
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Consumer processes (one job at a time each).
    #[arg(long, default_value_t = 3)]
    consumers: usize,
    /// Shortest and longest pause between two kills, in seconds (each pause is drawn uniformly).
    #[arg(long, num_args = 2, default_values_t = [2, 6])]
    kill_every: Vec<u64>,
    /// Broker restarts, spread evenly over the run's progress.
    #[arg(long, default_value_t = 2)]
    broker_restarts: u32,
    /// How long the broker stays down at each restart, in seconds.
    #[arg(long, default_value_t = 5)]
    broker_down_secs: u64,
    /// Seed of the kill schedule (random if not given).
    #[arg(long)]
    seed: Option<u64>,
    /// The broker's delivery acknowledgement timeout (`consumer_timeout`), in seconds.
    #[arg(long, default_value_t = 4)]
    consumer_timeout_secs: u64,
    /// Long jobs (`sleep` in the sandbox), in a run of their own beside the no-op jobs.
    #[arg(long, default_value_t = 20)]
    long_jobs: usize,
    /// How long each long job sleeps, in seconds (more than the broker's timeout).
    #[arg(long, default_value_t = 10)]
    long_job_secs: u64,
    /// Every this many kills, the consumer is instead replaced while it drains: told to stop
    /// (SIGTERM) and, at once, a consumer of the same name started beside it. 0: never.
    #[arg(long, default_value_t = 3)]
    same_name_every: u32,
}

fn main() -> anyhow::Result<()> {
    let soak = Soak::parse();
    ensure!(
        soak.kill_every[0] <= soak.kill_every[1] && soak.kill_every[1] > 0,
        "--kill-every takes the shortest pause, then the longest"
    );
    let consumer = consumer_binary()?;
    eprintln!("starting a RabbitMQ node of the soak's own");
    let broker = PrivateRabbitMq::start_with_advanced(&format!(
        "[{{rabbit, [{{consumer_timeout, {}}}, {{channel_tick_interval, 250}}]}}].\n",
        soak.consumer_timeout_secs * 1000
    ))?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(soak, consumer, broker))
}

/// `quarry-consumer`, built beside this binary.
fn consumer_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let binary = exe
        .parent()
        .context("the soak binary has no directory")?
        .join("quarry-consumer");
    ensure!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --release --bin quarry-consumer --bin quarry-soak`",
        binary.display()
    );
    Ok(binary)
}

/// What the soak did and saw, printed at the end.
#[derive(Default, Debug)]
struct Figures {
    kills: u32,
    /// Consumers replaced by one of the same name while they drained.
    same_name: u32,
    broker_restarts: u32,
    /// Deliveries of jobs that already had a result, recognised and not recorded again
    /// (consumers' `quarry_consumer_duplicates_skipped_total`, read every second, so a kill
    /// can hide the last second's count from it).
    duplicates_suppressed: u64,
}

/// One consumer process of the fleet: the slot keeps its name across restarts, as a pod does.
struct Slot {
    name: String,
    child: Child,
    metrics_port: u16,
    /// Duplicates counted by this incarnation, as last read from its /metrics.
    duplicates: u64,
    /// Duplicates counted by the incarnations killed before this one.
    earlier_duplicates: u64,
}

async fn run(soak: Soak, consumer: PathBuf, mut broker: PrivateRabbitMq) -> anyhow::Result<()> {
    let seed = soak.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut random = fastrand::Rng::with_seed(seed);
    let crates = tempfile::tempdir()?;
    eprintln!("generating {} packages", soak.jobs);
    let corpus = fixtures::synthetic(crates.path(), soak.jobs)?;
    let services = quarry_testkit::Services {
        amqp_url: broker.amqp_url(),
        rabbitmq_api: broker.management_api(),
        ..quarry_testkit::Services::from_env()
    };
    let stack = TestStack::start_on(corpus, services).await?;
    let config_file = stack.dir.path().join("consumer.toml");
    std::fs::write(&config_file, toml::to_string(&stack.config)?)?;

    let mut slots = Vec::new();
    for i in 0..soak.consumers {
        slots.push(spawn(&consumer, &config_file, format!("soak-{i}"), 0).await?);
    }

    let started = Instant::now();
    // The long jobs first, so that they are taken while the no-op jobs flood the queue.
    let mut long = quarry_testkit::no_op_run();
    long.experiment.command = Some(vec!["sleep".to_owned(), soak.long_job_secs.to_string()]);
    long.experiment.timeout_secs = soak.long_job_secs + 60;
    long.selection = quarry_producer::Selection::Listing {
        sort: quarry_producer::Sort::Alpha,
        limit: Some(soak.long_jobs as u64),
    };
    let long_summary = publish_run(&stack.config, "soak-long", &long, &CancellationToken::new())
        .await
        .context("the producer failed")?;
    let definition = quarry_testkit::no_op_run();
    let summary = publish_run(
        &stack.config,
        "soak",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .context("the producer failed")?;
    eprintln!(
        "published {} jobs and {} long ones (seed {seed})",
        summary.jobs_queued, long_summary.jobs_queued
    );
    let store = Store::connect(&stack.config.database).await?;
    // Consumers told to stop while a namesake replaced them, until they exit.
    let mut draining: Vec<(String, Child)> = Vec::new();

    let mut figures = Figures::default();
    let total = soak.jobs as i64;
    let pause = |random: &mut fastrand::Rng| {
        Duration::from_secs(random.u64(soak.kill_every[0]..=soak.kill_every[1]))
    };
    let mut next_kill = Instant::now() + pause(&mut random);
    let mut last_report = Instant::now();
    loop {
        let finished = store.progress(summary.run_id).await?.finished;
        let long_finished = store.progress(long_summary.run_id).await?.finished;
        if finished >= total && long_finished >= soak.long_jobs as i64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(4 * 3600) {
            bail!("the run did not finish within 4 hours: {finished} of {total} jobs");
        }
        for slot in &mut slots {
            if let Some(read) = duplicates_skipped(slot.metrics_port).await {
                slot.duplicates = read;
            }
        }
        // Restart k is due once k / (restarts + 1) of the jobs are finished.
        let due = finished * i64::from(soak.broker_restarts + 1) / total
            > i64::from(figures.broker_restarts);
        if figures.broker_restarts < soak.broker_restarts && due {
            eprintln!("restarting the broker at {finished} of {total} jobs");
            let down = Duration::from_secs(soak.broker_down_secs);
            broker = tokio::task::spawn_blocking(move || {
                broker.stop()?;
                std::thread::sleep(down);
                broker.restart()?;
                anyhow::Ok(broker)
            })
            .await??;
            figures.broker_restarts += 1;
        }
        if Instant::now() >= next_kill {
            let slot = &mut slots[random.usize(..soak.consumers)];
            let pid = slot.child.id().context("a consumer exited on its own")?;
            let earlier = slot.earlier_duplicates + slot.duplicates;
            let replacement = spawn(&consumer, &config_file, slot.name.clone(), earlier);
            let faults = figures.kills + figures.same_name + 1;
            if soak.same_name_every > 0 && faults % (soak.same_name_every + 1) == 0 {
                // Replaced while it drains: both run under one name for its grace period.
                kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
                let old = std::mem::replace(slot, replacement.await?);
                draining.push((old.name, old.child));
                figures.same_name += 1;
            } else {
                kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
                slot.child.wait().await?;
                figures.kills += 1;
                *slot = replacement.await?;
            }
            next_kill = Instant::now() + pause(&mut random);
        }
        for slot in &mut slots {
            if let Some(status) = slot.child.try_wait()? {
                bail!("consumer {} exited on its own: {status}", slot.name);
            }
        }
        let mut still_draining = Vec::new();
        for (name, mut child) in draining {
            match child.try_wait()? {
                Some(status) => ensure!(
                    status.success(),
                    "consumer {name}, told to stop while its namesake started, stopped with {status}"
                ),
                None => still_draining.push((name, child)),
            }
        }
        draining = still_draining;
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{finished} of {total} jobs and {long_finished} of {} long ones after {:.0} s; \
                 {} kills, {} same-name replacements, {} broker restarts",
                soak.long_jobs,
                started.elapsed().as_secs_f64(),
                figures.kills,
                figures.same_name,
                figures.broker_restarts
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let elapsed = started.elapsed();

    // Graceful stop of the fleet: each consumer exits 0 on SIGTERM.
    for (name, mut child) in draining {
        let status = child.wait().await?;
        ensure!(status.success(), "consumer {name} stopped with {status}");
    }
    for slot in &mut slots {
        if let Some(read) = duplicates_skipped(slot.metrics_port).await {
            slot.duplicates = read;
        }
        if let Some(pid) = slot.child.id() {
            kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
        }
        let status = slot.child.wait().await?;
        ensure!(
            status.success(),
            "consumer {} stopped with {status}",
            slot.name
        );
        figures.duplicates_suppressed += slot.earlier_duplicates + slot.duplicates;
    }

    let mut problems = Vec::new();
    for run in ["soak", "soak-long"] {
        let verification =
            quarry_reporter::verify(&stack.config, run, &stack.config.reporter.output_dir)
                .await
                .with_context(|| format!("cannot verify the run {run}"))?;
        problems.extend(
            verification
                .problems
                .into_iter()
                .map(|problem| format!("{run}: {problem}")),
        );
    }
    let database = stack.sql().await?;
    let runs = [summary.run_id.0, long_summary.run_id.0];
    let row = database
        .query_one(
            "SELECT
               (SELECT count(*) FROM jobs WHERE run_id = ANY($1)),
               (SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.run_id = ANY($1)),
               (SELECT count(*) FROM (SELECT job_id FROM job_events WHERE run_id = ANY($1) AND kind = 'started'
                                      GROUP BY job_id HAVING count(*) > 1) AS again),
               (SELECT count(*) FROM job_events WHERE run_id = ANY($1) AND kind = 'attempt-failed'),
               (SELECT count(*) FROM job_events WHERE run_id = ANY($1) AND kind = 'lease-lapsed'),
               (SELECT count(*) FROM leases WHERE run_id = ANY($1))",
            &[&&runs[..]],
        )
        .await?;
    let (jobs, results, started_again, attempts_failed, lapsed, leases_left): (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    let outcomes = database
        .query(
            "SELECT r.outcome, count(*) FROM results r JOIN jobs j ON j.id = r.job_id
             WHERE j.run_id = ANY($1) GROUP BY r.outcome ORDER BY r.outcome",
            &[&&runs[..]],
        )
        .await?
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
        .collect::<BTreeMap<_, _>>();
    eprintln!("outcomes: {outcomes:?}");
    eprintln!("{figures:?}");
    println!(
        "| {jobs} | {results} | {} | {} ({} s) | {} | {} | {} | {} | {started_again} | {lapsed} | {} | {attempts_failed} | {:.0} s | {} |",
        soak.consumers,
        soak.long_jobs,
        soak.long_job_secs,
        soak.consumer_timeout_secs,
        figures.kills,
        figures.same_name,
        figures.broker_restarts,
        figures.duplicates_suppressed,
        elapsed.as_secs_f64(),
        if problems.is_empty() {
            "ok".to_owned()
        } else {
            problems.join("; ")
        }
    );
    ensure!(problems.is_empty(), "verify found problems: {problems:?}");
    let expected = (soak.jobs + soak.long_jobs) as i64;
    ensure!(
        jobs == expected && results == jobs,
        "{jobs} jobs, {results} results"
    );
    ensure!(leases_left == 0, "{leases_left} leases left over");
    ensure!(
        outcomes.get("test-pass").copied().unwrap_or(0)
            + outcomes.get("build-pass").copied().unwrap_or(0)
            == jobs,
        "every job should have passed: {outcomes:?}"
    );
    drop(stack);
    Ok(())
}

async fn spawn(
    consumer: &Path,
    config: &Path,
    name: String,
    earlier_duplicates: u64,
) -> anyhow::Result<Slot> {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(consumer)
        .arg("--config")
        .arg(config)
        .args(["--name", &name])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", consumer.display()))?;
    Ok(Slot {
        name,
        child,
        metrics_port,
        duplicates: 0,
        earlier_duplicates,
    })
}

/// `quarry_consumer_duplicates_skipped_total` from a consumer's /metrics, if it answers.
async fn duplicates_skipped(port: u16) -> Option<u64> {
    let text = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("quarry_consumer_duplicates_skipped_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
}
