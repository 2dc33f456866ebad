//! Two consumers started with the same name on one host (a restart while the old process is
//! still in its grace period, a copied unit file): what each owns on the host is its own, so the
//! first one stopping breaks nothing of the second's.

use std::collections::BTreeMap;
use std::time::Duration;

use quarry_producer::{RunDefinition, Selection, publish_run};
use quarry_shared::job::Mode;
use quarry_shared::store::Store;
use quarry_testkit::{Consumers, TestStack, experiment, fixtures};
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
    let definition = RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: experiment(Mode::Check, 60),
        selection: Selection::Packages {
            packages: expected.keys().map(|p| (*p).to_owned()).collect(),
        },
    };
    let config = stack.consumer_config("twin");
    let first = Consumers::start([config.clone()]);
    let second = Consumers::start([config]);
    // Both are set up (they registered in the fleet after preparing their sandbox and cgroups).
    let store = Store::connect(&stack.config.database).await.unwrap();
    let since = chrono::Utc::now() - chrono::Duration::minutes(1);
    // (Until the first consumer has applied the migrations, there is no fleet table.)
    while store.fleet(since).await.map_or(0, |fleet| fleet.len()) < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let outcomes: BTreeMap<&str, &str> = written
        .report
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.outcome.as_str()))
        .collect();
    assert_eq!(outcomes, expected, "{:#?}", written.report.packages);
    stack.assert_verified("same-name").await;
}
