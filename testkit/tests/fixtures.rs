//! Crater's habit: one small crate per failure class through the whole pipeline, and the report
//! compared with the expected one.

use std::collections::BTreeMap;

use quarry_core::job::Mode;
use quarry_producer::{RunDefinition, Selection, Sort, publish_run};
use quarry_testkit::images::{self, Images};
use quarry_testkit::{Consumers, TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

const TIME_LIMIT_SECS: u64 = 30;

#[tokio::test(flavor = "multi_thread")]
async fn each_failure_class_gets_its_outcome_in_the_report() {
    failure_classes(None).await;
}

/// The same run through Quarry's images, run as the chart runs its pods: migrations and the run
/// published by producer containers, two consumer containers in the `userns` sandbox mode, the
/// report written and verified by a reporter container; the outcomes, limits included, are the
/// same.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the images of docker/build-local: docker/run-local runs it"]
async fn each_failure_class_gets_its_outcome_in_the_images() {
    failure_classes(Some(Images::from_env())).await;
}

async fn failure_classes(images: Option<Images>) {
    let packed = tempfile::tempdir().unwrap();
    let corpus = fixtures::corpus(packed.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();

    let definition = RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: experiment(Mode::Test, TIME_LIMIT_SECS),
        selection: Selection::Listing {
            sort: Sort::Alpha,
            limit: None,
        },
        toolchain_files: Vec::new(),
    };
    let never = CancellationToken::new();
    let names = ["fixtures-a", "fixtures-b"];
    if let Some(images) = &images {
        let run = |component, args: &[&str]| {
            let output = stack.run_image(images, component, args);
            images::check(output, &format!("quarry-{component} {}", args.join(" "))).unwrap()
        };
        run("producer", &["migrate"]);
        let published = run(
            "producer",
            &[
                "run",
                "--name",
                "fixtures",
                "--mode",
                "test",
                // The definition above, as flags.
                "--timeout",
                &definition.experiment.timeout_secs.to_string(),
                "--memory-limit",
                &definition.experiment.memory_limit_mb.to_string(),
                "--toolchain",
                &quarry_testkit::toolchain().to_string(),
            ],
        );
        assert!(published.contains("16 jobs, 16 queued now"), "{published}");
        let consumers = stack.start_image_consumers(images, &names, &[]);
        eprintln!(
            "consumer containers answered /metrics after {:?}",
            consumers.started_in
        );
        let run_id = stack.run_id("fixtures").await;
        stack.wait_for_run(run_id).await;
        let logs = consumers.stop().unwrap();
        // Inside the container the consumer has no cgroups, as in a pod (docs/operations.md).
        assert!(
            logs.iter().all(|log| log.contains("no cgroups")),
            "{logs:?}"
        );
        let output = stack.config.reporter.output_dir.display().to_string();
        run("reporter", &["generate", "fixtures", "--output", &output]);
        run("reporter", &["verify", "fixtures", "--output", &output]);
    } else {
        let summary = publish_run(&stack.config, "fixtures", &definition, &never)
            .await
            .unwrap();
        assert_eq!(summary.jobs_queued, 16, "{summary}");
        let consumers = stack.start_consumers(&names);
        stack.wait_for_run(summary.run_id).await;
        consumers.stop().await;
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

    stack.assert_verified("fixtures").await;
    let log = |name: &str| {
        let package = written
            .report
            .packages
            .iter()
            .find(|p| p.name == name)
            .unwrap();
        written.read_log(package.log.as_deref()).unwrap()
    };
    assert!(log("quarry-fixture-build-fail").contains("E0308"));
    assert!(log("quarry-fixture-test-fail").contains("test tests::adds ... FAILED"));
    assert!(log("quarry-fixture-broken").contains("quarry-fixture-nowhere"));
    assert!(log("quarry-fixture-timeout").contains("killed after the time limit"));
    let hog = log("quarry-fixture-memory-hog");
    // The step's cgroup (the kernel's OOM kill), or without one each process's address space.
    assert!(
        hog.contains("quarry: out of memory") || hog.contains("memory allocation of"),
        "{hog}"
    );
    // Stopped by the step's own task limit (its cgroup's, else its sandbox's RLIMIT_NPROC),
    // not by a limit of the whole machine or container.
    let bomb = log("quarry-fixture-fork-bomb");
    let started: u64 = bomb
        .split_once("stopped after ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .and_then(|(count, _)| count.parse().ok())
        .unwrap_or_else(|| panic!("{bomb}"));
    assert!(started < stack.config.consumer.task_limit, "{bomb}");
    // Two gigabytes printed: the start is kept, the rest counted.
    let loud = log("quarry-fixture-loud");
    assert!(
        loud.contains("output truncated"),
        "{}",
        &loud[loud.len().saturating_sub(2000)..]
    );
    assert!(loud.len() < 64 << 20, "the kept log is bounded");
    assert!(log("quarry-fixture-archive-bomb").contains("expands past"));

    // What each job used, recorded on its result and summed for the run.
    let cost = |name: &str| {
        let package = written.report.packages.iter().find(|p| p.name == name);
        package
            .and_then(|p| p.cost.clone())
            .unwrap_or_else(|| panic!("{name} has its cost recorded"))
    };
    let pass = cost("quarry-fixture-pass");
    let steps: Vec<&str> = pass.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["fetch", "build", "test"], "{pass:?}");
    assert!(pass.disk_bytes > 0, "{pass:?}");
    let hog = cost("quarry-fixture-memory-hog");
    if images.is_none() {
        // Counted by each step's cgroup; the memory hog's peak is what it allocated, up to
        // the limit (1 GiB).
        assert!(pass.cpu_ms.is_some_and(|ms| ms > 0), "{pass:?}");
        assert!(
            hog.peak_memory_bytes.is_some_and(|b| b >= 512 << 20),
            "{hog:?}"
        );
    } else {
        // A sandboxed step without a cgroup (a container's, a pod's) has its CPU time and
        // peak counted by nobody: not recorded rather than recorded wrong.
        assert_eq!(
            (pass.cpu_ms, pass.peak_memory_bytes),
            (None, None),
            "{pass:?}"
        );
    }
    let run = &written.report.cost;
    let measured: Vec<_> = written
        .report
        .packages
        .iter()
        .filter_map(|p| p.cost.as_ref())
        .collect();
    assert_eq!(run.jobs as usize, measured.len());
    let cpu_ms: u64 = measured.iter().filter_map(|c| c.cpu_ms).sum();
    assert!(
        (run.cpu_seconds - cpu_ms as f64 / 1000.0).abs() < 1e-6,
        "{run:?}"
    );
    assert!(run.peak_memory_bytes >= hog.peak_memory_bytes.unwrap_or(0));

    // Failures grouped by root cause, read from their logs.
    let cause_of = |name: &str| {
        written
            .report
            .causes
            .iter()
            .find(|g| g.jobs.iter().any(|j| j.starts_with(&format!("{name}@"))))
            .map(|g| g.cause.clone())
    };
    assert_eq!(
        cause_of("quarry-fixture-build-fail").as_deref(),
        Some("E0308: mismatched types")
    );
    assert_eq!(
        cause_of("quarry-fixture-test-fail").as_deref(),
        Some("tests failed")
    );
    let html = std::fs::read_to_string(&written.html).unwrap();
    // The build failure fixture's, and the ICE fixture's on a stable toolchain.
    assert!(
        html.contains("<td data-cause=\"E0308: mismatched types\">2</td>"),
        "{html}"
    );

    // The never-ending build script died with its job: no process of it is left.
    let survivors = fixtures::build_script_processes("quarry-fixture-timeout");
    assert!(survivors.is_empty(), "{survivors:?}");
}

/// The escape fixture is a real detector: outside the sandbox, its escapes succeed and it says so.
#[tokio::test(flavor = "multi_thread")]
async fn without_the_sandbox_the_escape_fixture_fails_naming_its_escape() {
    let packed = tempfile::tempdir().unwrap();
    let corpus = fixtures::corpus(packed.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    let definition = RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: experiment(Mode::Check, TIME_LIMIT_SECS),
        selection: Selection::Packages {
            packages: vec!["quarry-fixture-sandboxed".into()],
        },
        toolchain_files: Vec::new(),
    };
    let never = CancellationToken::new();
    let summary = publish_run(&stack.config, "unsandboxed", &definition, &never)
        .await
        .unwrap();
    let mut config = stack.consumer_config("unsandboxed");
    config.consumer.unsandboxed = true;
    let consumers = Consumers::start([config]);
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;

    let written = quarry_reporter::generate(
        &stack.config,
        "unsandboxed",
        &stack.config.reporter.output_dir,
    )
    .await
    .unwrap();
    let package = &written.report.packages[0];
    assert_eq!(package.outcome, "build-fail");
    let log = written.read_log(package.log.as_deref()).unwrap();
    assert!(log.contains("SANDBOX ESCAPE"), "{log}");
    assert!(log.contains("connected to 127.0.0.1:5432"), "{log}");
    if nix::unistd::geteuid().is_root() {
        // What the sandbox hides from a consumer running as root.
        assert!(log.contains("read /etc/shadow"), "{log}");
    }
}

/// Two toolchains: every package is compared, and the one that breaks on the end toolchain is
/// reported as regressed.
#[tokio::test(flavor = "multi_thread")]
async fn two_toolchains_are_compared_and_the_regression_stands_out() {
    let packed = tempfile::tempdir().unwrap();
    let corpus = fixtures::corpus(packed.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    let expected: BTreeMap<String, String> = serde_json::from_slice(
        &std::fs::read(fixtures::dir().join("expected-comparison.json")).unwrap(),
    )
    .unwrap();
    let end = std::env::var("QUARRY_TEST_SECOND_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let definition = RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain(), end.parse().unwrap()],
        experiment: experiment(Mode::Test, 120),
        // Every fixture but the one that always times out, which would only slow this down.
        selection: Selection::Packages {
            packages: expected.keys().cloned().collect(),
        },
        toolchain_files: Vec::new(),
    };
    let never = CancellationToken::new();
    let summary = publish_run(&stack.config, "compared", &definition, &never)
        .await
        .unwrap();
    assert_eq!(summary.jobs_queued, 2 * expected.len() as u64, "{summary}");

    let consumers = stack.start_consumers(&["compare-a", "compare-b"]);
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;

    let written =
        quarry_reporter::generate(&stack.config, "compared", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    let comparison = written
        .report
        .comparison
        .as_ref()
        .expect("a two-toolchain run is compared");
    let categories: BTreeMap<String, String> = comparison
        .packages
        .iter()
        .map(|p| (p.name.clone(), p.category.clone()))
        .collect();
    assert_eq!(
        categories, expected,
        "if a toolchain is missing, install it or set QUARRY_TEST_SECOND_TOOLCHAIN"
    );
    stack.assert_verified("compared").await;
    let regressed = comparison
        .packages
        .iter()
        .find(|p| p.category == "regressed")
        .unwrap();
    let end_log = written.read_log(regressed.end_log.as_deref()).unwrap();
    assert!(end_log.contains("does not build with"), "{end_log}");
    // Denied the network by the sandbox on end only: spurious, said why, and not run again.
    let denied = written
        .report
        .packages
        .iter()
        .find(|p| p.name == "quarry-fixture-needs-network" && p.outcome == "build-fail")
        .expect("the network fixture fails on end");
    let why = denied.environment.as_deref().unwrap_or_default();
    assert!(why.contains("Network is unreachable"), "{why}");
    assert_eq!(denied.cause.as_deref(), Some("network denied"));
    assert!(
        !written
            .report
            .packages
            .iter()
            .any(|p| p.name == "quarry-fixture-needs-network" && p.side.ends_with("(re-run)")),
        "a spurious failure is not re-run"
    );
    let html = std::fs::read_to_string(&written.html).unwrap();
    assert!(html.contains("<td data-category=\"regressed\">1</td>"));
    let markdown = std::fs::read_to_string(&written.markdown).unwrap();
    assert!(
        markdown.contains("`quarry-fixture-regression@1.0.0`: test-pass → build-fail"),
        "{markdown}"
    );

    // A follow-up run takes just what needs a second look, at the versions tested.
    let regressed = quarry_producer::packages_from_run(
        &stack.config,
        "compared",
        &[quarry_producer::Only::Regressed],
    )
    .await
    .unwrap();
    assert_eq!(regressed, ["quarry-fixture-regression@1.0.0"]);
    let failed = quarry_producer::packages_from_run(
        &stack.config,
        "compared",
        &[quarry_producer::Only::Failed, quarry_producer::Only::Broken],
    )
    .await
    .unwrap();
    assert_eq!(
        failed,
        [
            "quarry-fixture-broken@1.0.0",
            "quarry-fixture-build-fail@1.0.0",
            "quarry-fixture-ice@1.0.0",
            "quarry-fixture-needs-network@1.0.0",
            "quarry-fixture-regression@1.0.0",
            "quarry-fixture-test-fail@1.0.0",
        ]
    );
}

/// Two runs of the same experiment at once: each identical pair of jobs is computed once; the
/// job that finds its twin in flight waits for it and reuses its result.
#[tokio::test(flavor = "multi_thread")]
async fn identical_jobs_in_flight_are_computed_once() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::corpus(packed.path()).unwrap())
        .await
        .unwrap();
    let definition = packages_run(
        experiment(Mode::Check, TIME_LIMIT_SECS),
        &[
            "quarry-fixture-slow",
            "quarry-fixture-pass",
            "quarry-fixture-build-fail",
        ],
    );
    let never = CancellationToken::new();
    let mut runs = Vec::new();
    for name in ["twin-a", "twin-b"] {
        runs.push(
            publish_run(&stack.config, name, &definition, &never)
                .await
                .unwrap()
                .run_id,
        );
    }
    let consumers = stack.start_consumers(&["twins-a", "twins-b"]);
    for run in &runs {
        stack.wait_for_run(*run).await;
    }
    let waits = consumers.stop().await.waits;

    let sql = stack.sql().await.unwrap();
    let row = sql
        .query_one(
            "SELECT count(*) FILTER (WHERE reused_from IS NULL),
                    count(*) FILTER (WHERE reused_from IS NOT NULL)
             FROM results",
            &[],
        )
        .await
        .unwrap();
    let (computed, reused): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((computed, reused), (3, 3), "each pair computed once");
    assert!(waits >= 1, "the slow build's twin waited for it");
    for name in ["twin-a", "twin-b"] {
        stack.assert_verified(name).await;
    }
    let leftover: i64 = sql
        .query_one("SELECT count(*) FROM computations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftover, 0, "every claim was released");
}

/// A dependency-patch run: the same packages built as published and with one dependency
/// replaced, by an unpublished version uploaded with the run (which breaks its dependent) or by
/// a version from the registry (which does not).
#[tokio::test(flavor = "multi_thread")]
async fn a_dependency_patch_shows_who_it_would_break() {
    let packed = tempfile::tempdir().unwrap();
    let corpus = fixtures::corpus(packed.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    let unpublished = tempfile::tempdir().unwrap();
    let next = fixtures::pack(
        &fixtures::dir().join("patches/patch-lib-1.0.1"),
        unpublished.path(),
    )
    .unwrap();

    let mut categories = Vec::new();
    for (run, with) in [
        ("uploaded-patch", next.display().to_string()),
        ("registry-patch", "1.0.0".to_owned()),
    ] {
        let patch = quarry_producer::resolve_patch(
            &stack.config,
            &format!("quarry-fixture-patch-lib={with}"),
        )
        .await
        .unwrap();
        let definition = RunDefinition {
            patch: Some(patch),
            filter: Default::default(),
            toolchains: vec![quarry_testkit::toolchain()],
            experiment: experiment(Mode::Test, 120),
            selection: Selection::Packages {
                packages: vec!["quarry-fixture-patch-user".into()],
            },
            toolchain_files: Vec::new(),
        };
        let summary = publish_run(&stack.config, run, &definition, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(summary.jobs_queued, 2, "as published, and patched");
        let consumers = stack.start_consumers(&[run]);
        stack.wait_for_run(summary.run_id).await;
        consumers.stop().await;
        stack.assert_verified(run).await;

        let written =
            quarry_reporter::generate(&stack.config, run, &stack.config.reporter.output_dir)
                .await
                .unwrap();
        let comparison = written
            .report
            .comparison
            .as_ref()
            .expect("a patch run is compared: as published, then patched");
        categories.push(comparison.packages[0].category.clone());
        if run == "uploaded-patch" {
            let patched = written
                .report
                .packages
                .iter()
                .find(|p| p.outcome == "build-fail")
                .expect("the patched side fails to build");
            let log = written.read_log(patched.log.as_deref()).unwrap();
            assert!(log.contains("quarry-fixture-patch-lib v1.0.1"), "{log}");
            assert!(log.contains("E0308"), "{log}");
        }
    }
    assert_eq!(categories, ["regressed", "still-passing"]);
}

/// A package that regresses is run once more on its end side before it counts as regressed:
/// the deterministic regression fails again and stays regressed; a package that fails only the
/// first time is told apart as flaky. The re-run is computed afresh, never reused from the
/// failure it checks.
#[tokio::test(flavor = "multi_thread")]
async fn a_regression_is_run_again_and_a_flaky_one_is_told_apart() {
    let packed = tempfile::tempdir().unwrap();
    // Fails on the end toolchain the first time it builds, passes from then on. It remembers
    // through a file of this test's own outside the package, so its consumer runs unsandboxed
    // (the sandbox exists to forbid exactly that).
    let memory = tempfile::tempdir().unwrap();
    let marker = memory.path().join("failed-once");
    let source = tempfile::tempdir().unwrap();
    let flaky = source.path().join("flaky");
    std::fs::create_dir_all(flaky.join("src")).unwrap();
    std::fs::write(
        flaky.join("Cargo.toml"),
        "[package]\nname = \"quarry-fixture-flaky\"\nversion = \"1.0.0\"\nedition = \"2021\"\n\
         description = \"Fails once on nightly, then passes\"\nlicense = \"MIT\"\n",
    )
    .unwrap();
    std::fs::write(flaky.join("src/lib.rs"), "").unwrap();
    std::fs::write(
        flaky.join("build.rs"),
        format!(
            "fn main() {{\n\
             let rustc = std::env::var(\"RUSTC\").unwrap_or_else(|_| \"rustc\".to_owned());\n\
             let version = std::process::Command::new(rustc).arg(\"--version\").output().unwrap();\n\
             let marker = std::path::Path::new({marker:?});\n\
             if String::from_utf8_lossy(&version.stdout).contains(\"nightly\") && !marker.exists() {{\n\
                 std::fs::write(marker, \"\").unwrap();\n\
                 panic!(\"quarry-fixture-flaky fails this time\");\n\
             }}\n\
             }}\n"
        ),
    )
    .unwrap();
    fixtures::pack(&flaky, packed.path()).unwrap();
    let corpus = fixtures::corpus(packed.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    let end = std::env::var("QUARRY_TEST_SECOND_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let definition = RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain(), end.parse().unwrap()],
        experiment: experiment(Mode::Test, 120),
        selection: Selection::Packages {
            packages: vec![
                "quarry-fixture-flaky".into(),
                "quarry-fixture-regression".into(),
                "quarry-fixture-pass".into(),
            ],
        },
        toolchain_files: Vec::new(),
    };
    let summary = publish_run(
        &stack.config,
        "rerun",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.jobs_queued, 6, "{summary}");
    let mut config = stack.consumer_config("rerun");
    config.consumer.unsandboxed = true;
    let consumers = Consumers::start([config]);
    let progress = stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    // Two packages regressed; each got one re-run, which the run waited for.
    assert_eq!(stats.reruns, 2, "{stats:?}");
    assert_eq!((progress.finished, progress.total), (8, Some(8)));
    stack.assert_verified("rerun").await;

    let written =
        quarry_reporter::generate(&stack.config, "rerun", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    let comparison = written.report.comparison.as_ref().unwrap();
    let row = |name: &str| {
        comparison
            .packages
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{name} is compared"))
    };
    let regression = row("quarry-fixture-regression");
    assert_eq!(regression.category, "regressed");
    assert_eq!(regression.end_rerun.as_deref(), Some("build-fail"));
    let flaky = row("quarry-fixture-flaky");
    assert_eq!(flaky.category, "flaky");
    assert_eq!(
        (flaky.start.as_deref(), flaky.end.as_deref()),
        (Some("test-pass"), Some("build-fail"))
    );
    assert_eq!(flaky.end_rerun.as_deref(), Some("test-pass"));
    let first = written.read_log(flaky.end_log.as_deref()).unwrap();
    assert!(first.contains("fails this time"), "{first}");
    let rerun = written.read_log(flaky.end_rerun_log.as_deref()).unwrap();
    assert!(!rerun.contains("fails this time"), "{rerun}");
    assert!(
        !rerun.contains("reused the result"),
        "a re-run is computed: {rerun}"
    );
    let passing = row("quarry-fixture-pass");
    assert_eq!(
        (passing.category.as_str(), passing.end_rerun.as_deref()),
        ("still-passing", None)
    );

    let markdown = std::fs::read_to_string(&written.markdown).unwrap();
    assert!(
        markdown
            .contains("`quarry-fixture-flaky@1.0.0`: test-pass → build-fail, re-run: test-pass"),
        "{markdown}"
    );
    let html = std::fs::read_to_string(&written.html).unwrap();
    assert!(
        html.contains("<td data-category=\"flaky\">1</td>"),
        "{html}"
    );
    // The follow-up selection counts flaky as spurious, not regressed.
    let spurious = quarry_producer::packages_from_run(
        &stack.config,
        "rerun",
        &[quarry_producer::Only::Spurious],
    )
    .await
    .unwrap();
    assert_eq!(spurious, ["quarry-fixture-flaky@1.0.0"]);
    let explained = quarry_reporter::explain(&stack.config, "rerun", "quarry-fixture-flaky")
        .await
        .unwrap();
    assert!(
        explained.contains(&format!("with {end} (re-run)")),
        "{explained}"
    );
}
