//! A consumer process killed with SIGKILL in the middle of a job: the broker hands the job to
//! another consumer, the sandboxed build dies with the first one, and the job ends with exactly
//! one result. And one told to stop with SIGTERM: it finishes the job it runs and gives back at
//! once the one it was holding for its next slot.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quarry_core::job::Mode;
use quarry_producer::publish_run;
use quarry_testkit::{TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

fn start_consumer(stack: &TestStack, name: &str) -> Child {
    let config = toml::to_string(&stack.consumer_config(name)).unwrap();
    let path = stack.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(stack.dir.path().join(format!("{name}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_quarry-consumer"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Processes of the slow fixture's build still alive.
fn slow_build_processes() -> Vec<String> {
    fixtures::build_script_processes("quarry-fixture-slow")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_killed_mid_job_loses_nothing_and_duplicates_nothing() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::corpus(packed.path()).unwrap())
        .await
        .unwrap();
    let definition = packages_run(experiment(Mode::Check, 300), &["quarry-fixture-slow"]);
    let never = CancellationToken::new();
    let summary = publish_run(&stack.config, "crash", &definition, &never)
        .await
        .unwrap();
    let sql = stack.sql().await.unwrap();
    let started = || async {
        sql.query_one(
            "SELECT count(*) FROM job_events WHERE run_id = $1 AND kind = 'started'",
            &[&summary.run_id.0],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };

    let mut first = start_consumer(&stack, "doomed");
    let deadline = Instant::now() + Duration::from_secs(120);
    while started().await == 0 {
        assert!(
            Instant::now() < deadline,
            "the first consumer never started the job"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Wait until the build script is running, then kill the consumer without warning.
    while slow_build_processes().is_empty() {
        assert!(Instant::now() < deadline, "the slow build never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let results: i64 = sql
        .query_one("SELECT count(*) FROM results", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(results, 0, "killed before it could record anything");
    // The sandbox dies with its consumer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !slow_build_processes().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the build outlived its consumer: {:?}",
            slow_build_processes()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut second = start_consumer(&stack, "survivor");
    // The job is redelivered to the survivor and finishes.
    stack.wait_for_run(summary.run_id).await;
    // SIGTERM: the survivor stops gracefully.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = second.wait().unwrap();
    assert!(status.success(), "a consumer exits 0 on SIGTERM: {status}");

    let row = sql
        .query_one(
            "SELECT count(*), min(outcome), min(consumer) FROM results WHERE run_id = $1",
            &[&summary.run_id.0],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "exactly one result");
    assert_eq!(row.get::<_, String>(1), "build-pass");
    assert_eq!(row.get::<_, String>(2), "survivor");
    assert_eq!(
        started().await,
        2,
        "the job was started twice, finished once"
    );
    stack.assert_verified("crash").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_consumer_finishes_its_running_job_and_gives_back_the_waiting_one() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::corpus(packed.path()).unwrap())
        .await
        .unwrap();
    // Two jobs of the slow package (one per toolchain) for one consumer with one slot: it holds
    // both, runs one and keeps the other ready for the slot.
    let second = std::env::var("QUARRY_TEST_SECOND_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let mut definition = packages_run(experiment(Mode::Check, 300), &["quarry-fixture-slow"]);
    definition.toolchains = vec![quarry_testkit::toolchain(), second.parse().unwrap()];
    let never = CancellationToken::new();
    let summary = publish_run(&stack.config, "stopping", &definition, &never)
        .await
        .unwrap();
    let sql = stack.sql().await.unwrap();
    let count = |kind: &'static str| {
        let sql = &sql;
        async move {
            sql.query_one(
                "SELECT count(*) FROM job_events WHERE run_id = $1 AND kind = $2",
                &[&summary.run_id.0, &kind],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };

    let mut first = start_consumer(&stack, "stopping");
    let deadline = Instant::now() + Duration::from_secs(120);
    while slow_build_processes().is_empty() {
        assert!(Instant::now() < deadline, "the slow build never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The build script sleeps 6 s: by now the other job is in hand, waiting for the slot.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = first.wait().unwrap();
    assert!(status.success(), "a consumer exits 0 on SIGTERM: {status}");
    assert_eq!(count("started").await, 1, "the waiting job was not started");
    let results: i64 = sql
        .query_one(
            "SELECT count(*) FROM results WHERE run_id = $1",
            &[&summary.run_id.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        results, 1,
        "the running job finished within the grace period"
    );

    // The job given back is taken by the next consumer, as if new.
    let mut next = start_consumer(&stack, "next");
    stack.wait_for_run(summary.run_id).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(next.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(next.wait().unwrap().success());
    assert_eq!(count("started").await, 2, "each job started once");
    assert_eq!(count("attempt-failed").await, 0);
    stack.assert_verified("stopping").await;
}
