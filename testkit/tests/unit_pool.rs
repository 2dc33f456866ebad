//! Two consumers on one work directory share the pool of compiled units (`units.rs`): a
//! dependency one of them compiled is reused by the other, rustc not run for it, and a unit
//! compiled against a dependency whose build is not reproducible is never reused next to
//! another build of that dependency.
//!
//! `quarry-pool-first` and `quarry-pool-second` both depend on `quarry-pool-plain` (reproducible),
//! `quarry-pool-stamp` (its build script embeds the time) and `quarry-pool-middle` (which depends
//! on the stamp). The first consumer checks the first; a second consumer, with slots of its own,
//! then checks the second. Its build script run makes another stamp, so the stamp and the middle
//! must be compiled again: had the middle been adopted from the pool, rustc would refuse it
//! beside this slot's stamp (E0460) and the job would fail.

use quarry_core::job::Mode;
use quarry_producer::publish_run;
use quarry_testkit::{TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn consumers_reuse_each_others_units_only_where_they_are_the_same() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::group("unit-pool", packed.path()).unwrap())
        .await
        .unwrap();
    let never = CancellationToken::new();
    let pool = stack.config.consumer.work_dir.join("units");

    let mut logs = Vec::new();
    for (consumer, package) in [
        ("pool-one", "quarry-pool-first"),
        ("pool-two", "quarry-pool-second"),
    ] {
        let mut config = stack.consumer_config(consumer);
        config.consumer.concurrency = 1;
        let consumers = quarry_testkit::Consumers::start([config]);
        let definition = packages_run(experiment(Mode::Check, 300), &[package]);
        let summary = publish_run(&stack.config, consumer, &definition, &never)
            .await
            .unwrap();
        stack.wait_for_run(summary.run_id).await;
        let written =
            quarry_reporter::generate(&stack.config, consumer, &stack.config.reporter.output_dir)
                .await
                .unwrap();
        let row = written.report.packages[0].clone();
        let log = written.read_log(row.log.as_deref()).unwrap();
        assert_eq!(row.outcome, "build-pass", "{package}:\n{log}");
        consumers.stop().await;
        logs.push(log);
    }
    let (first, second) = (&logs[0], &logs[1]);

    // The first compiled every dependency's units and pooled them: the stamp's build script and
    // library, the middle, the plain one.
    assert!(
        first.contains(
            "quarry: dependencies' compiled units: 0 reused from the pool, 4 added to it"
        ),
        "{first}"
    );
    // The second reused what is the same for it (the plain library, the stamp's build script)
    // and compiled what was built against another stamp.
    assert!(
        second.contains(
            "quarry: dependencies' compiled units: 2 reused from the pool, 2 added to it"
        ),
        "{second}"
    );
    let entries = std::fs::read_dir(&pool)
        .unwrap()
        .flatten()
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(entries, 6, "one entry per unit compiled");
}
