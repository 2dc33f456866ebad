//! Two consumers on one work directory share the pool of compiled units (`units.rs`): a
//! dependency one of them compiled is reused by the other, rustc not run for it, and a unit
//! compiled against a dependency whose build is not reproducible is never reused next to
//! another build of that dependency.
//!
//! `quarry-pool-first` and `quarry-pool-second` both depend on `quarry-pool-plain` (reproducible),
//! `quarry-pool-stamp` (its build script embeds the time) and `quarry-pool-middle` (which depends
//! on the stamp). The first consumer checks the first; the stamp's build script run is then
//! removed from the pool (as trimming may), and a second consumer, with slots of its own, checks
//! the second. Its build script run makes another stamp, so the stamp and the middle must be
//! compiled again: had the middle been adopted from the pool, rustc would refuse it beside this
//! slot's stamp (E0460) and the job would fail. A third consumer then checks the first again
//! (fresh): the build script's output and every unit come from the pool.

use quarry_core::job::Mode;
use quarry_testkit::{TestStack, experiment, fixtures, packages_run};

#[tokio::test(flavor = "multi_thread")]
async fn consumers_reuse_each_others_units_only_where_they_are_the_same() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::group("unit-pool", packed.path()).unwrap())
        .await
        .unwrap();
    let pool = stack.config.consumer.work_dir.join("units");

    let mut logs = Vec::new();
    for (consumer, package) in [
        ("pool-one", "quarry-pool-first"),
        ("pool-two", "quarry-pool-second"),
        ("pool-three", "quarry-pool-first"),
    ] {
        let mut config = stack.consumer_config(consumer);
        config.consumer.concurrency = 1;
        let consumers = quarry_testkit::Consumers::start([config]);
        let definition = packages_run(
            quarry_core::job::Experiment {
                fresh: true,
                ..experiment(Mode::Check, 300)
            },
            &[package],
        );
        let (outcome, log) = stack.run_one(consumer, &definition).await;
        assert_eq!(outcome, "build-pass", "{package}:\n{log}");
        consumers.stop().await;
        logs.push(log);
        if consumer == "pool-one" {
            // The build script runs the pool holds (entries marked `ran`).
            for entry in std::fs::read_dir(&pool).unwrap().flatten() {
                if entry.path().join("ran").exists() {
                    std::fs::remove_dir_all(entry.path()).unwrap();
                }
            }
        }
    }
    let (first, second, third) = (&logs[0], &logs[1], &logs[2]);

    // The first compiled every dependency's units and pooled them (the stamp's build script
    // and library, the middle, the plain one), and the stamp's build script run.
    let said = |units: &str| format!("quarry: dependencies' compiled units: {units}\n");
    assert!(
        first.contains(&said(
            "0 reused from the pool, 4 added to it; build script runs: 0 reused, 1 added"
        )),
        "{first}"
    );
    // The second reused what is the same for it (the plain library, the stamp's build script)
    // and compiled what was built against another stamp.
    assert!(
        second.contains(&said(
            "2 reused from the pool, 2 added to it; build script runs: 0 reused, 1 added"
        )),
        "{second}"
    );
    // The third took the second's stamp (its build script's output) and all built against it.
    assert!(
        third.contains(&said(
            "4 reused from the pool, 0 added to it; build script runs: 1 reused, 0 added"
        )),
        "{third}"
    );
    let entries = std::fs::read_dir(&pool)
        .unwrap()
        .flatten()
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(entries, 7, "one entry per unit compiled and per run kept");
}
