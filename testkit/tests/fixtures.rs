//! Crater's habit: one small crate per failure class through the whole pipeline, and the report
//! compared with the expected one.

use std::collections::BTreeMap;
use std::time::Duration;

use quarry_producer::{RunDefinition, Selection, Sort, publish_run, wait_for_run};
use quarry_shared::job::{Experiment, Mode};
use quarry_testkit::{TestStack, fixtures};
use tokio_util::sync::CancellationToken;

const TIME_LIMIT_SECS: u64 = 30;

#[tokio::test(flavor = "multi_thread")]
async fn each_failure_class_gets_its_outcome_in_the_report() {
    let packed = tempfile::tempdir().unwrap();
    let corpus = fixtures::corpus(packed.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();

    let definition = RunDefinition {
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: Experiment {
            mode: Mode::Test,
            timeout_secs: TIME_LIMIT_SECS,
        },
        selection: Selection::Listing {
            sort: Sort::Alpha,
            limit: None,
        },
    };
    let never = CancellationToken::new();
    let summary = publish_run(&stack.config, "fixtures", &definition, &never)
        .await
        .unwrap();
    assert_eq!(summary.jobs_queued, 6, "{summary}");

    let shutdown = CancellationToken::new();
    let consumers: Vec<_> = ["fixtures-a", "fixtures-b"]
        .into_iter()
        .map(|name| {
            let config = stack.consumer_config(name);
            let shutdown = shutdown.clone();
            tokio::spawn(async move { quarry_consumer::run(&config, shutdown).await })
        })
        .collect();
    let progress = tokio::time::timeout(
        Duration::from_secs(600),
        wait_for_run(&stack.config, summary.run_id, &never),
    )
    .await
    .expect("the fixtures finish in time")
    .unwrap();
    assert!(progress.is_complete());
    shutdown.cancel();
    for consumer in consumers {
        consumer.await.unwrap().unwrap();
    }

    let written =
        quarry_reporter::generate(&stack.config, "fixtures", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    let outcomes: BTreeMap<String, String> = written
        .report
        .packages
        .iter()
        .map(|p| (p.name.clone(), p.outcome.clone()))
        .collect();
    let expected: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(fixtures::dir().join("expected.json")).unwrap())
            .unwrap();
    assert_eq!(outcomes, expected);

    let log = |name: &str| {
        let package = written
            .report
            .packages
            .iter()
            .find(|p| p.name == name)
            .unwrap();
        std::fs::read_to_string(written.dir.join(&package.log)).unwrap()
    };
    assert!(log("quarry-fixture-build-fail").contains("E0308"));
    assert!(log("quarry-fixture-test-fail").contains("test tests::adds ... FAILED"));
    assert!(log("quarry-fixture-broken").contains("quarry-fixture-nowhere"));
    assert!(log("quarry-fixture-timeout").contains("killed after the time limit"));

    // The never-ending build script died with its job: no process of it is left.
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| {
            cmdline.contains("quarry-fixture-timeout") && cmdline.contains("build-script")
        })
        .collect();
    assert!(survivors.is_empty(), "{survivors:?}");
}

/// The escape fixture is a real detector: outside the sandbox, its escapes succeed and it says so.
#[tokio::test(flavor = "multi_thread")]
async fn without_the_sandbox_the_escape_fixture_fails_naming_its_escape() {
    let packed = tempfile::tempdir().unwrap();
    let corpus = fixtures::corpus(packed.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    let definition = RunDefinition {
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: Experiment {
            mode: Mode::Check,
            timeout_secs: TIME_LIMIT_SECS,
        },
        selection: Selection::Packages {
            packages: vec!["quarry-fixture-sandboxed".into()],
        },
    };
    let never = CancellationToken::new();
    let summary = publish_run(&stack.config, "unsandboxed", &definition, &never)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let mut config = stack.consumer_config("unsandboxed");
    config.consumer.unsandboxed = true;
    let consumer = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { quarry_consumer::run(&config, shutdown).await }
    });
    tokio::time::timeout(
        Duration::from_secs(300),
        wait_for_run(&stack.config, summary.run_id, &never),
    )
    .await
    .expect("the job finishes in time")
    .unwrap();
    shutdown.cancel();
    consumer.await.unwrap().unwrap();

    let written = quarry_reporter::generate(
        &stack.config,
        "unsandboxed",
        &stack.config.reporter.output_dir,
    )
    .await
    .unwrap();
    let package = &written.report.packages[0];
    assert_eq!(package.outcome, "build-fail");
    let log = std::fs::read_to_string(written.dir.join(&package.log)).unwrap();
    assert!(log.contains("SANDBOX ESCAPE"), "{log}");
    assert!(log.contains("connected to 127.0.0.1:5432"), "{log}");
}
