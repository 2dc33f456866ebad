//! A consumer whose host can no longer set up a job's steps (here its jobs directory is gone,
//! a file in its place: a full or broken disk, a removed mount) stops taking jobs and says why,
//! instead of failing every job of the queue as an `error`; the healthy consumer does them all.

use std::collections::BTreeMap;
use std::time::Duration;

use quarry_core::job::Mode;
use quarry_infra::store::Store;
use quarry_producer::publish_run;
use quarry_testkit::{Consumers, TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_that_cannot_set_up_steps_stops_and_its_jobs_go_to_another() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::corpus(packed.path()).unwrap())
        .await
        .unwrap();
    let expected: BTreeMap<&str, &str> = [
        ("quarry-fixture-pass", "build-pass"),
        ("quarry-fixture-build-fail", "build-fail"),
        ("quarry-fixture-test-fail", "build-pass"),
        ("quarry-fixture-regression", "build-pass"),
        ("quarry-fixture-sandboxed", "build-pass"),
        ("quarry-fixture-patch-lib", "build-pass"),
    ]
    .into();
    let packages: Vec<&str> = expected.keys().copied().collect();
    let definition = packages_run(experiment(Mode::Check, 60), &packages);
    let broken_config = stack.consumer_config("broken-host");
    let broken = Consumers::start([broken_config.clone()]);
    stack.wait_for_fleet(1).await;
    let store = Store::connect(&stack.config.database).await.unwrap();
    let since = chrono::Utc::now() - chrono::Duration::minutes(1);
    let jobs_dir = broken_config
        .consumer
        .work_dir
        .join("broken-host")
        .join("jobs");
    std::fs::remove_dir_all(&jobs_dir).unwrap();
    std::fs::write(&jobs_dir, "not a directory").unwrap();

    let summary = publish_run(
        &stack.config,
        "unusable",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    // The broken consumer takes jobs first, alone; it stops once it finds it cannot run them.
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let fleet = store.fleet(since).await.unwrap();
            if fleet.iter().all(|member| member.stopped_at.is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(ended.is_ok(), "the broken consumer stopped by itself");
    let healthy = Consumers::start([stack.consumer_config("healthy-host")]);
    stack.wait_for_run(summary.run_id).await;
    healthy.stop().await;
    let why = broken.stop_each().await.remove(0).unwrap_err().to_string();
    assert!(
        why.contains("this consumer can no longer set up a job's steps"),
        "{why}"
    );
    assert!(
        why.contains("not a directory") || why.contains("Not a directory"),
        "{why}"
    );

    let written =
        quarry_reporter::generate(&stack.config, "unusable", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    assert_eq!(
        written.outcomes(),
        expected,
        "no job blamed for the broken host"
    );
    let sql = stack.sql().await.unwrap();
    let failed: i64 = sql
        .query_one(
            "SELECT count(*) FROM job_events WHERE kind = 'attempt-failed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed, 0, "no attempt was counted against a job");
    stack.assert_verified("unusable").await;
}
