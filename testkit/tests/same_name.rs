//! Two consumers started with the same name on one host (a restart while the old process is
//! still in its grace period, a copied unit file): what each owns on the host is its own, so the
//! first one stopping breaks nothing of the second's.

use std::collections::BTreeMap;

use quarry_core::job::Mode;
use quarry_producer::publish_run;
use quarry_testkit::{Consumers, TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_stopping_breaks_nothing_of_another_with_its_name() {
    let packed = tempfile::tempdir().unwrap();
    fixtures::corpus(packed.path()).unwrap();
    // Beside the fixtures, slow packages for the second half.
    let stack = TestStack::start_with(fixtures::slow(packed.path(), 6, 3).unwrap())
        .await
        .unwrap();
    let expected: BTreeMap<&str, &str> = [
        ("quarry-fixture-slow", "build-pass"),
        ("quarry-fixture-pass", "build-pass"),
        ("quarry-fixture-build-fail", "build-fail"),
        ("quarry-fixture-test-fail", "build-pass"),
        ("quarry-fixture-regression", "build-pass"),
        ("quarry-fixture-sandboxed", "build-pass"),
        ("quarry-fixture-patch-lib", "build-pass"),
        ("quarry-fixture-patch-user", "build-pass"),
    ]
    .into();
    let packages: Vec<&str> = expected.keys().copied().collect();
    let definition = packages_run(experiment(Mode::Check, 60), &packages);
    let config = stack.consumer_config("twin");
    let first = Consumers::start([config.clone()]);
    let second = Consumers::start([config]);
    // Both are set up (they registered in the fleet after preparing their sandbox and cgroups).
    stack.wait_for_fleet(2).await;
    // The first goes while the second is idle (what it removes on its way out is then not in
    // use), and the second does the run alone.
    first.stop().await;
    let summary = publish_run(
        &stack.config,
        "same-name",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    stack.wait_for_run(summary.run_id).await;
    second.stop().await;

    let written = quarry_reporter::generate(
        &stack.config,
        "same-name",
        &stack.config.reporter.output_dir,
    )
    .await
    .unwrap();
    assert_eq!(
        written.outcomes(),
        expected,
        "{:#?}",
        written.report.packages
    );
    stack.assert_verified("same-name").await;

    // Now both work on one run, and the first is stopped in the middle of it (its jobs in hand
    // finish or are handed back; the second carries on with its own).
    let slow: Vec<String> = (0..6).map(|i| format!("quarry-slow-{i}")).collect();
    let slow: Vec<&str> = slow.iter().map(String::as_str).collect();
    let config = stack.consumer_config("twin");
    let first = Consumers::start([config.clone()]);
    let second = Consumers::start([config]);
    let summary = publish_run(
        &stack.config,
        "same-name-mid-run",
        &packages_run(experiment(Mode::Check, 60), &slow),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let store = quarry_infra::store::Store::connect(&stack.config.database)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store.progress(summary.run_id).await.unwrap().finished == 0 {
        assert!(std::time::Instant::now() < deadline, "no job finished");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    first.stop().await;
    let progress = stack.wait_for_run(summary.run_id).await;
    assert!(progress.finished == 6, "{progress:?}");
    second.stop().await;
    let written = quarry_reporter::generate(
        &stack.config,
        "same-name-mid-run",
        &stack.config.reporter.output_dir,
    )
    .await
    .unwrap();
    assert!(
        written.outcomes().values().all(|o| *o == "build-pass"),
        "{:?}",
        written.outcomes()
    );
    stack.assert_verified("same-name-mid-run").await;
}
