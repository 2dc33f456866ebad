//! Two consumers started with the same name on one host (a restart while the old process is
//! still in its grace period, a copied unit file): what each owns on the host is its own, so the
//! first one stopping breaks nothing of the second's.

use std::collections::BTreeMap;

use quarry_producer::publish_run;
use quarry_shared::job::Mode;
use quarry_testkit::{Consumers, TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_stopping_breaks_nothing_of_another_with_its_name() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::corpus(packed.path()).unwrap())
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
}
