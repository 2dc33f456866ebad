//! Toolchains on demand: a run's toolchain given as a file (a compiler build, here the test
//! toolchain packed under another name) is installed by each consumer the first time it needs
//! it, once, and its results carry its exact build; toolchains that cannot be had (a corrupt
//! file, one that does not match its checksum, a channel whose dist server is unreachable) end
//! their jobs in `error` saying why, and the consumers carry on.

use quarry_core::job::{Mode, Outcome, Toolchain};
use quarry_producer::{RunDefinition, publish_run, resolve_toolchain_file};
use quarry_testkit::{Consumers, TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

const PACKAGES: [&str; 4] = [
    "quarry-bench-0",
    "quarry-bench-1",
    "quarry-bench-2",
    "quarry-bench-3",
];

/// Consumers of the stack, each with toolchains of its own (as pods without a shared volume)
/// and two slots.
fn consumers(stack: &TestStack, names: &[&str]) -> Consumers {
    Consumers::start(names.iter().map(|name| {
        let mut config = stack.consumer_config(name);
        config.consumer.concurrency = 2;
        config.consumer.toolchains.dir = Some(stack.dir.path().join(format!("toolchains-{name}")));
        config
    }))
}

/// `(side, outcome, toolchain build)` of each result of `run`.
async fn results(stack: &TestStack, run: &str) -> Vec<(String, Outcome, Option<String>, String)> {
    let store = quarry_infra::store::Store::connect(&stack.config.database)
        .await
        .unwrap();
    let run = store.find_run(run).await.unwrap();
    let bucket = quarry_infra::s3::Bucket::new(&stack.config.s3).unwrap();
    let mut rows = Vec::new();
    for row in store.results(run.id).await.unwrap() {
        let log = bucket
            .result_log(row.log.as_deref(), row.log_key.as_deref())
            .await
            .unwrap();
        rows.push((row.side, row.outcome, row.toolchain_build, log));
    }
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn a_toolchain_file_is_installed_once_by_each_consumer_and_its_build_recorded() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::synthetic(packed.path(), PACKAGES.len()).unwrap())
        .await
        .unwrap();
    let own = quarry_testkit::toolchain();
    let tarball = packed.path().join("toolchain.tar.gz");
    quarry_testkit::pack_installed_toolchain(own.name(), &tarball).unwrap();
    let file = resolve_toolchain_file(&stack.config, &format!("pr-12345={}", tarball.display()))
        .await
        .unwrap();

    // Computed on both sides (the packed compiler is the same build: it would be reused).
    let mut run_experiment = experiment(Mode::Check, 300);
    run_experiment.fresh = true;
    let definition = RunDefinition {
        toolchains: vec![own.clone(), "pr-12345".parse().unwrap()],
        toolchain_files: vec![file.clone()],
        ..packages_run(run_experiment, &PACKAGES)
    };
    let never = CancellationToken::new();
    // The first consumer takes its first four jobs (both sides of two packages: it holds two
    // per slot) as they are published, the second the rest: both need the new toolchain, and
    // each has two slots asking for it at once.
    let first = consumers(&stack, &["tc-a"]);
    stack.wait_for_fleet(1).await;
    let summary = publish_run(&stack.config, "on-demand", &definition, &never)
        .await
        .unwrap();
    let second = consumers(&stack, &["tc-b"]);
    stack.wait_for_run(summary.run_id).await;

    // Each says which toolchains it has with its next heartbeat.
    let store = quarry_infra::store::Store::connect(&stack.config.database)
        .await
        .unwrap();
    let has_it = |toolchains: &[String]| {
        toolchains
            .iter()
            .any(|t| t.starts_with("pr-12345: rustc ") && t.ends_with("(installed on demand)"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let fleet = store.fleet(chrono::DateTime::UNIX_EPOCH).await.unwrap();
        if fleet.len() == 2 && fleet.iter().all(|m| has_it(&m.toolchains)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{fleet:?}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let mut stats = first.stop_each().await;
    stats.extend(second.stop_each().await);
    for stats in stats {
        let stats = stats.expect("the consumer stops cleanly");
        assert_eq!(stats.toolchain_installs, 1, "{stats:?}");
    }

    let expected_build = String::from_utf8(
        std::process::Command::new("rustc")
            .args([&format!("+{}", own.name()), "-vV"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let rows = results(&stack, "on-demand").await;
    assert_eq!(rows.len(), 2 * PACKAGES.len());
    for (side, outcome, build, log) in &rows {
        assert_eq!(*outcome, Outcome::BuildPass, "{side}: {log}");
        assert_eq!(build.as_deref(), Some(expected_build.trim()), "{side}");
        if side == "pr-12345" {
            assert!(
                log.contains(&format!("cargo +{} check", file.rustup_name())),
                "{log}"
            );
        }
    }
    // The report names each side's exact build.
    let written = quarry_reporter::generate(
        &stack.config,
        "on-demand",
        &stack.config.reporter.output_dir,
    )
    .await
    .unwrap();
    let release = expected_build.lines().next().unwrap().to_owned();
    for side in [own.to_string(), "pr-12345".to_owned()] {
        assert_eq!(
            written.report.run.builds.get(&side),
            Some(&vec![release.clone()])
        );
    }
    stack.assert_verified("on-demand").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn toolchains_that_cannot_be_had_end_their_jobs_in_error_saying_why() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::synthetic(packed.path(), 2).unwrap())
        .await
        .unwrap();
    let never = CancellationToken::new();
    let packages = &PACKAGES[..2];

    // Not a tar archive inside its compression.
    let corrupt = packed.path().join("corrupt.tar.gz");
    {
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&corrupt).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut gz, &[0x55u8; 64 << 10]).unwrap();
        gz.finish().unwrap();
    }
    let corrupt = resolve_toolchain_file(&stack.config, &format!("corrupt={}", corrupt.display()))
        .await
        .unwrap();
    // A good file, replaced in S3 afterwards by other bytes.
    let good = packed.path().join("good.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&good).unwrap(),
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o755);
        tar.append_data(&mut header, "t/bin/rustc", &b"#!\n"[..])
            .unwrap();
        tar.into_inner().unwrap().finish().unwrap();
    }
    let swapped = resolve_toolchain_file(&stack.config, &format!("swapped={}", good.display()))
        .await
        .unwrap();
    let bucket = quarry_infra::s3::Bucket::new(&stack.config.s3).unwrap();
    bucket
        .put_toolchain(&swapped.checksum, &corrupt_bytes(packed.path()), 10)
        .await
        .unwrap();

    let runs = [
        (
            "unknown-channel",
            vec!["nightly-2026-11-30".parse::<Toolchain>().unwrap()],
            vec![],
            "rustup could not install it from http://127.0.0.1:1",
        ),
        (
            "corrupt-file",
            vec!["corrupt".parse().unwrap()],
            vec![corrupt],
            "the toolchain file of corrupt cannot be installed: not a readable tar archive",
        ),
        (
            "swapped-file",
            vec!["swapped".parse().unwrap()],
            vec![swapped],
            "does not match its checksum",
        ),
    ];
    let consumers = consumers(&stack, &["bad-a", "bad-b"]);
    for (name, toolchains, files, _) in &runs {
        let definition = RunDefinition {
            toolchains: toolchains.clone(),
            toolchain_files: files.clone(),
            ..packages_run(experiment(Mode::Check, 120), packages)
        };
        let summary = publish_run(&stack.config, name, &definition, &never)
            .await
            .unwrap();
        stack.wait_for_run(summary.run_id).await;
    }
    for (name, _, _, why) in &runs {
        let rows = results(&stack, name).await;
        assert_eq!(rows.len(), packages.len(), "{name}");
        for (_, outcome, build, log) in rows {
            assert_eq!(outcome, Outcome::Error, "{name}: {log}");
            assert!(log.contains("gave up after 3 attempts"), "{name}: {log}");
            assert!(log.contains(why), "{name}: {log}");
            assert_eq!(build, None);
        }
        stack.assert_verified(name).await;
    }
    // No crash loop: both consumers ran to the end and stop as asked, having installed nothing.
    for stats in consumers.stop_each().await {
        let stats = stats.expect("the consumer stops cleanly");
        assert_eq!(stats.toolchain_installs, 0, "{stats:?}");
    }
}

/// Ten bytes that are not the file they replace.
fn corrupt_bytes(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("other-bytes");
    std::fs::write(&path, b"0123456789").unwrap();
    path
}

/// A channel the consumers lack, installed with rustup from the configured dist server: a
/// mirror on loopback serving `nightly-2026-11-30` made of the test toolchain's files.
#[tokio::test(flavor = "multi_thread")]
async fn a_channel_the_consumers_lack_is_installed_with_rustup_from_the_mirror() {
    let packed = tempfile::tempdir().unwrap();
    let mut stack = TestStack::start_with(fixtures::synthetic(packed.path(), 2).unwrap())
        .await
        .unwrap();
    let own = quarry_testkit::toolchain();
    let mirror = quarry_testkit::dist_server::DistServer::serve(own.name(), "2026-11-30")
        .await
        .unwrap();
    stack.config.consumer.toolchains.dist_server = mirror.url().to_owned();
    let nightly: Toolchain = "nightly-2026-11-30".parse().unwrap();
    let definition = RunDefinition {
        toolchains: vec![nightly.clone()],
        ..packages_run(experiment(Mode::Check, 300), &PACKAGES[..2])
    };
    let consumers = consumers(&stack, &["mirror-a"]);
    let summary = publish_run(
        &stack.config,
        "mirror",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    stack.wait_for_run(summary.run_id).await;
    let stats: Vec<_> = consumers.stop_each().await;
    let stats = stats
        .into_iter()
        .next()
        .unwrap()
        .expect("the consumer stops cleanly");
    assert_eq!(stats.toolchain_installs, 1, "{stats:?}");
    assert!(mirror.requests() >= 4, "the manifest and three packages");

    let rows = results(&stack, "mirror").await;
    assert_eq!(rows.len(), 2);
    for (side, outcome, build, log) in rows {
        assert_eq!(side, "nightly-2026-11-30");
        assert_eq!(outcome, Outcome::BuildPass, "{log}");
        assert!(
            build
                .as_deref()
                .is_some_and(|b| b.starts_with("rustc 1.95.0")),
            "{build:?}"
        );
        assert!(log.contains("cargo +nightly-2026-11-30 check"), "{log}");
    }
    stack.assert_verified("mirror").await;
}
