//! The whole path over real crates: producer → RabbitMQ → two consumers (S3, registry, cargo) →
//! PostgreSQL → report, against the real services: a first run, a fresh second run served from
//! S3, and a third whose results are all reused from the first.

use std::collections::BTreeMap;

use quarry_core::job::{Experiment, Mode};
use quarry_producer::{RunDefinition, Selection, Sort, publish_run};
use quarry_testkit::{Consumers, TestStack};
use tokio_util::sync::CancellationToken;

const PACKAGES: u64 = 50;

fn check_first_crates(fresh: bool) -> RunDefinition {
    RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: Experiment {
            mode: Mode::Check,
            timeout_secs: 300,
            fresh,
            memory_limit_mb: 4096,
            cap_lints: None,
            command: None,
        },
        selection: Selection::Listing {
            sort: Sort::Alpha,
            limit: Some(PACKAGES),
        },
        toolchain_files: Vec::new(),
    }
}

/// Publishes a run and waits (at most 20 minutes) until every job has a result.
async fn run_to_completion(stack: &TestStack, name: &str, fresh: bool) -> quarry_core::job::RunId {
    let never = CancellationToken::new();
    let summary = publish_run(&stack.config, name, &check_first_crates(fresh), &never)
        .await
        .expect("the producer publishes the run");
    assert!(summary.complete);
    assert_eq!(summary.packages_selected, PACKAGES, "{summary}");
    assert_eq!(summary.jobs_queued, PACKAGES, "{summary}");
    stack.wait_for_run(summary.run_id).await;
    summary.run_id
}

/// Two consumers sharing a work directory, as on one machine.
fn machine(stack: &TestStack, names: [&str; 2], machine: &str) -> Consumers {
    Consumers::start(names.map(|name| {
        let mut config = stack.consumer_config(name);
        config.consumer.work_dir = stack.dir.path().join(machine);
        config
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_real_crates_three_times_through_two_consumers() {
    let stack = TestStack::start().await.expect("test services are up");
    assert_eq!(stack.registry.stats().downloads, 0);

    // First run: every .crate, the packages' and their dependencies', comes from the registry
    // through the consumers' cache layers, and lands in S3.
    let first_fleet = machine(&stack, ["consumer-a", "consumer-b"], "machine-1");
    let first = run_to_completion(&stack, "e2e-first", false).await;
    let sql = stack.sql().await.unwrap();
    let jobs_without_exactly_one_result: i64 = sql
        .query_one(
            "SELECT count(*) FROM jobs j WHERE j.run_id = $1
               AND (SELECT count(*) FROM results r WHERE r.job_id = j.id) <> 1",
            &[&first.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(jobs_without_exactly_one_result, 0);
    let results: i64 = sql
        .query_one(
            "SELECT count(*) FROM results WHERE run_id = $1",
            &[&first.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(results, PACKAGES as i64);
    let consumers_used: i64 = sql
        .query_one(
            "SELECT count(DISTINCT consumer) FROM results WHERE run_id = $1",
            &[&first.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(consumers_used, 2, "both consumers took jobs");
    let after_first = stack.registry.stats();
    assert!(
        after_first.downloads >= PACKAGES,
        "the first run downloads every package: {after_first:?}"
    );

    // The report says what the database says.
    let written = quarry_reporter::generate(
        &stack.config,
        "e2e-first",
        &stack.config.reporter.output_dir,
    )
    .await
    .expect("the report is written");
    let database_counts: BTreeMap<String, i64> = sql
        .query(
            "SELECT outcome, count(*) FROM results WHERE run_id = $1 GROUP BY outcome",
            &[&first.0],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let on_disk: quarry_reporter::Report =
        serde_json::from_slice(&std::fs::read(&written.json).unwrap()).unwrap();
    assert_eq!(on_disk.counts, database_counts);
    assert_eq!(on_disk.packages.len(), PACKAGES as usize);
    assert!(on_disk.progress.complete);
    let html = std::fs::read_to_string(&written.html).unwrap();
    for (outcome, count) in &database_counts {
        assert!(
            html.contains(&format!("<td data-count=\"{outcome}\">{count}</td>")),
            "the HTML shows {count} {outcome}"
        );
    }
    for package in &on_disk.packages {
        let log = written.read_log(package.log.as_deref()).unwrap();
        // Quarry's own lines (what preparing the package changed or refused) come first.
        assert!(
            log.lines()
                .find(|line| !line.starts_with("quarry: "))
                .is_some_and(|line| line.starts_with("$ cargo +")),
            "{package:?}: {log}"
        );
    }
    // Logs live in S3, compressed; PostgreSQL keeps only their keys.
    let in_s3: i64 = sql
        .query_one(
            "SELECT count(*) FROM results WHERE run_id = $1 AND log_key IS NOT NULL AND log IS NULL",
            &[&first.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_s3, PACKAGES as i64);
    let csv = std::fs::read_to_string(&written.csv).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + PACKAGES as usize,
        "a header and a row per job"
    );
    let markdown = std::fs::read_to_string(&written.markdown).unwrap();
    for (outcome, count) in &database_counts {
        assert!(markdown.contains(&format!("| {outcome} | {count} |")));
    }
    // Real crates really build: most of the corpus passes `cargo check`.
    assert!(
        database_counts.get("build-pass").copied().unwrap_or(0) >= PACKAGES as i64 / 2,
        "{database_counts:?}"
    );

    stack.assert_verified("e2e-first").await;
    let first_stats = first_fleet.stop().await;
    eprintln!("first run, machine 1: {first_stats:?}, registry: {after_first:?}");
    assert_eq!(
        first_stats.registry_fetches, after_first.downloads,
        "cargo itself never went to the registry: every download went through the caches"
    );
    assert!(
        first_stats.disk_hits + first_stats.s3_hits + first_stats.registry_fetches > PACKAGES,
        "dependencies came through the caches too: {first_stats:?}"
    );

    // Second run of the same experiment, asking for fresh results, on a new machine (empty disk
    // cache, empty cargo home): every job runs again, and nothing comes from the registry.
    let second_fleet = machine(&stack, ["consumer-c", "consumer-d"], "machine-2");
    let second = run_to_completion(&stack, "e2e-second", true).await;
    let results: i64 = sql
        .query_one(
            "SELECT count(*) FROM results WHERE run_id = $1",
            &[&second.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(results, PACKAGES as i64);
    assert_eq!(
        stack.registry.stats().downloads,
        after_first.downloads,
        "the second run downloads nothing from the registry"
    );
    stack.assert_verified("e2e-second").await;

    // Third run, memoized: every result is reused from the first run, nothing is fetched or run.
    let third = run_to_completion(&stack, "e2e-third", false).await;
    let outcomes = |run: quarry_core::job::RunId| {
        let sql = &sql;
        async move {
            sql.query(
                "SELECT j.crate_name, r.outcome, r.reused_from IS NOT NULL FROM results r
                 JOIN jobs j ON j.id = r.job_id WHERE r.run_id = $1 ORDER BY 1",
                &[&run.0],
            )
            .await
            .unwrap()
            .into_iter()
            .map(|row| {
                (
                    row.get::<_, String>(0),
                    row.get::<_, String>(1),
                    row.get::<_, bool>(2),
                )
            })
            .collect::<Vec<_>>()
        }
    };
    let reused = outcomes(third).await;
    assert!(reused.iter().all(|(_, _, reused)| *reused), "{reused:?}");
    let strip = |rows: Vec<(String, String, bool)>| -> Vec<(String, String)> {
        rows.into_iter()
            .map(|(name, outcome, _)| (name, outcome))
            .collect()
    };
    assert_eq!(
        strip(reused),
        strip(outcomes(first).await),
        "the first run's results"
    );
    stack.assert_verified("e2e-third").await;

    let later_stats = second_fleet.stop().await;
    eprintln!("second and third runs, machine 2: {later_stats:?}");
    assert_eq!(
        later_stats.registry_fetches, 0,
        "nothing from the registry after the first run"
    );
    assert!(
        later_stats.s3_hits >= PACKAGES,
        "the second run's packages came from S3"
    );
    assert_eq!(
        later_stats.memoized, PACKAGES,
        "the third run reused every result"
    );
    assert_eq!(first_stats.results + later_stats.results, 3 * PACKAGES);
}
