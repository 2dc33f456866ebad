//! The whole path over real crates: producer → RabbitMQ → two consumers (S3, registry, cargo) →
//! PostgreSQL → report, against the real services: a first run, a fresh second run served from
//! S3, and a third whose results are all reused from the first.

use std::collections::BTreeMap;
use std::time::Duration;

use quarry_consumer::ConsumerStats;
use quarry_producer::{RunDefinition, Selection, Sort, publish_run, wait_for_run};
use quarry_shared::job::{Experiment, Mode};
use quarry_testkit::TestStack;
use tokio_util::sync::CancellationToken;

const PACKAGES: u64 = 50;

fn check_first_crates(fresh: bool) -> RunDefinition {
    RunDefinition {
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: Experiment {
            mode: Mode::Check,
            timeout_secs: 300,
            fresh,
        },
        selection: Selection::Listing {
            sort: Sort::Alpha,
            limit: Some(PACKAGES),
        },
    }
}

/// Publishes a run and waits (at most 20 minutes) until every job has a result.
async fn run_to_completion(
    stack: &TestStack,
    name: &str,
    fresh: bool,
) -> quarry_shared::job::RunId {
    let never = CancellationToken::new();
    let summary = publish_run(&stack.config, name, &check_first_crates(fresh), &never)
        .await
        .expect("the producer publishes the run");
    assert!(summary.complete);
    assert_eq!(summary.packages_selected, PACKAGES, "{summary}");
    assert_eq!(summary.jobs_queued, PACKAGES, "{summary}");
    let progress = tokio::time::timeout(
        Duration::from_secs(20 * 60),
        wait_for_run(&stack.config, summary.run_id, &never),
    )
    .await
    .expect("the run finishes within 20 minutes")
    .expect("progress can be read");
    assert!(progress.is_complete(), "{progress:?}");
    summary.run_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_real_crates_three_times_through_two_consumers() {
    let stack = TestStack::start().await.expect("test services are up");
    let served = stack.registry.stats();
    assert_eq!(served.downloads, 0);

    let shutdown = CancellationToken::new();
    let consumers: Vec<_> = ["consumer-a", "consumer-b"]
        .into_iter()
        .map(|name| {
            let config = stack.consumer_config(name);
            let shutdown = shutdown.clone();
            tokio::spawn(async move { quarry_consumer::run(&config, shutdown).await })
        })
        .collect();

    // First run: every .crate comes from the registry and lands in S3.
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
        assert!(written.dir.join(&package.log).is_file(), "{package:?}");
    }
    let markdown = std::fs::read_to_string(&written.markdown).unwrap();
    for (outcome, count) in &database_counts {
        assert!(markdown.contains(&format!("| {outcome} | {count} |")));
    }
    // Real crates really build: most of the corpus passes `cargo check`.
    assert!(
        database_counts.get("build-pass").copied().unwrap_or(0) >= PACKAGES as i64 / 2,
        "{database_counts:?}"
    );

    // Second run of the same experiment, asking for fresh results: every job runs again, and
    // nothing comes from the registry any more.
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
    let after_second = stack.registry.stats();
    assert_eq!(
        after_second.downloads, after_first.downloads,
        "the second run downloads nothing from the registry"
    );

    let verification = quarry_reporter::verify(
        &stack.config,
        "e2e-first",
        &stack.config.reporter.output_dir,
    )
    .await
    .unwrap();
    assert!(verification.is_ok(), "{:?}", verification.problems);
    let verification = quarry_reporter::verify(
        &stack.config,
        "e2e-second",
        &stack.config.reporter.output_dir,
    )
    .await
    .unwrap();
    assert!(verification.is_ok(), "{:?}", verification.problems);
    shutdown.cancel();
    let mut total = ConsumerStats::default();
    for consumer in consumers {
        let stats = consumer.await.unwrap().expect("the consumer stops cleanly");
        total.results += stats.results;
        total.s3_hits += stats.s3_hits;
        total.registry_fetches += stats.registry_fetches;
    }
    assert_eq!(total.results, 2 * PACKAGES);
    assert_eq!(
        total.registry_fetches, PACKAGES,
        "first run: all from the registry"
    );
    assert_eq!(total.s3_hits, PACKAGES, "second run: all S3 hits");
}
