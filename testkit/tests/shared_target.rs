//! A slot keeps its target directory across jobs, and no job can change what a later one builds
//! against: `quarry-shared-poisoner`'s build script and a proc macro it uses try everything
//! against the compiled artifacts of `quarry-shared-dep` (write, truncate, link, rename, remove,
//! plant a file beside), then `quarry-shared-victim`, which depends on it too, runs in the same
//! slot and must build against the artifacts as they were compiled, without compiling them
//! again. The build script also attacks the dependency's sources, which jobs share read-only
//! (`sources.rs`): the victim's job must find them as the archive has them, without extracting
//! them again. The proc macro also attacks the pool of compiled units (`units.rs`), from which
//! a second consumer's slot then takes the dependency for the victim, without compiling it.

use quarry_core::job::Mode;
use quarry_testkit::{TestStack, experiment, fixtures, packages_run};

#[tokio::test(flavor = "multi_thread")]
async fn no_job_alters_what_a_later_job_builds_against() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::group("shared-target", packed.path()).unwrap())
        .await
        .unwrap();
    // One slot, so that both jobs use the same kept target directory.
    let mut config = stack.consumer_config("shared");
    config.consumer.concurrency = 1;
    let store = config.consumer.work_dir.join("sources");
    let consumers = quarry_testkit::Consumers::start([config]);

    let mut logs = Vec::new();
    for (run, package) in [
        ("poison", "quarry-shared-poisoner"),
        ("victim", "quarry-shared-victim"),
    ] {
        let definition = packages_run(experiment(Mode::Check, 300), &[package]);
        let (outcome, log) = stack.run_one(run, &definition).await;
        assert_eq!(outcome, "build-pass", "{package}:\n{log}");
        logs.push(log);
    }
    let stats = consumers.stop().await;

    // Elsewhere: a consumer with slots of its own takes the dependency from the pool.
    let mut config = stack.consumer_config("shared-elsewhere");
    config.consumer.concurrency = 1;
    let elsewhere = quarry_testkit::Consumers::start([config]);
    // Fresh: run again, not the victim's result reused.
    let definition = packages_run(
        quarry_core::job::Experiment {
            fresh: true,
            ..experiment(Mode::Check, 300)
        },
        &["quarry-shared-victim"],
    );
    let (outcome, from_pool) = stack.run_one("elsewhere", &definition).await;
    assert_eq!(outcome, "build-pass", "{from_pool}");
    elsewhere.stop().await;
    // The dependency's library and build script, as the poisoner's job compiled them, and what
    // its build script's run printed.
    assert!(
        from_pool.contains(
            "quarry: dependencies' compiled units: 2 reused from the pool, 0 added to it; \
             build script runs: 1 reused, 0 added"
        ),
        "{from_pool}"
    );

    let (poisoner, victim) = (&logs[0], &logs[1]);

    // The attacks found their target and none of their attempts took.
    for attacker in ["build script", "proc macro", "sources", "pool"] {
        let line = poisoner
            .lines()
            .find(|line| line.contains(&format!("quarry-poison: {attacker} found")))
            .unwrap_or_else(|| panic!("the {attacker} did not report:\n{poisoner}"));
        let (found, took) = line
            .rsplit_once("found ")
            .and_then(|(_, counts)| counts.split_once(", took "))
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            found.trim().parse::<usize>().unwrap() > 0,
            "the {attacker} found nothing to attack, so proved nothing: {line}"
        );
        assert_eq!(took.trim(), "0", "the {attacker} got through: {line}");
    }
    assert!(
        poisoner.contains("Compiling quarry-shared-dep v1.0.0"),
        "the poisoner's job compiled the dependency:\n{poisoner}"
    );
    // The victim built against what the poisoner's job compiled, untouched.
    for compiled in ["Checking quarry-shared-dep", "Compiling quarry-shared-dep"] {
        assert!(
            !victim.contains(compiled),
            "the dependency was compiled again rather than reused:\n{victim}"
        );
    }

    // Extracted once, by the consumer, for the poisoner's job (the dependency, the attack and
    // the macro), and found there for the victim's, linked into its cargo home as cargo read the
    // dependency's index file: so cargo downloaded nothing (the disk cache was read once per
    // job, for the package under test, after its download; not for the dependency); as the
    // archive has them.
    assert_eq!(stats.sources_extracted, 3, "{stats:?}");
    assert_eq!(stats.sources_linked_ahead, 1, "{stats:?}");
    assert_eq!(stats.sources_shared, 0, "{stats:?}");
    assert_eq!(stats.disk_hits, 2, "{stats:?}");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shared-target/dep");
    let stored: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|entry| entry.path().join("quarry-shared-dep-1.0.0"))
        .filter(|dir| dir.is_dir())
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    for file in ["src/lib.rs", "build.rs"] {
        assert_eq!(
            std::fs::read(stored[0].join(file)).unwrap(),
            std::fs::read(fixture.join(file)).unwrap(),
            "{file} of the stored sources was changed"
        );
    }
}
