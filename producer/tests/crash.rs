//! The producer process killed with SIGKILL in the middle of paging, then started again with
//! the same command: every selected job ends up in the queue, and a job is published again only
//! if the kill fell between its broker confirm and the database recording it (at most the
//! pages in flight).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use quarry_core::job::{Job, JobId};
use quarry_infra::queue::Broker;
use quarry_infra::store::Store;
use quarry_registry::Fault;
use quarry_testkit::TestStack;

const PAGE: u32 = 5;
const LIMIT: u64 = 40;

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_killed_mid_paging_and_run_again_misses_nothing() {
    let mut stack = TestStack::start().await.unwrap();
    stack.config.registry.page_size = PAGE;
    let config_file = stack.dir.path().join("producer.toml");
    std::fs::write(&config_file, toml::to_string(&stack.config).unwrap()).unwrap();
    // Slow listing pages, so that the kill lands while pages are still being read.
    stack.registry.set_faults(vec![Fault {
        path_contains: "/api/v1/crates".to_owned(),
        delay_ms: Some(300),
        ..Fault::default()
    }]);
    let producer = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_quarry-producer"));
        command
            .arg("--config")
            .arg(&config_file)
            .args(["run", "--name", "killed", "--limit", &LIMIT.to_string()])
            .args(["--toolchain", &quarry_testkit::toolchain().to_string()]);
        command
    };

    // The schema is there before the producer starts, so the polling below can read it.
    Store::connect(&stack.config.database)
        .await
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let mut first = producer()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let database = stack.sql().await.unwrap();
    let published = || async {
        let row = database
            .query_one(
                "SELECT count(*) FROM jobs WHERE published_at IS NOT NULL",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let started = Instant::now();
    while published().await < 10 {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the producer ended early"
        );
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = published().await;
    assert!(
        at_kill < LIMIT as i64,
        "the producer had finished: the kill proved nothing"
    );

    let again = producer().output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(again.status.success(), "{said}");
    assert!(said.contains("resumed"), "{said}");

    // Every job of the run is in the queue; count how often each is there.
    let jobs: Vec<JobId> = database
        .query("SELECT id FROM jobs", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| JobId(row.get(0)))
        .collect();
    assert_eq!(jobs.len() as u64, LIMIT);
    let broker = Broker::connect(&stack.config.rabbitmq).await.unwrap();
    let queue = broker.topology().jobs.clone();
    let in_queue = broker.ready_messages(&queue).await.unwrap();
    broker.close().await;
    let connection =
        lapin::Connection::connect(stack.config.rabbitmq.url.expose(), Default::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "inspect".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut copies: BTreeMap<JobId, u32> = BTreeMap::new();
    for _ in 0..in_queue {
        let delivery = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        *copies
            .entry(Job::from_message(&delivery.data).unwrap().id)
            .or_default() += 1;
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let missing: Vec<_> = jobs.iter().filter(|id| !copies.contains_key(id)).collect();
    assert!(missing.is_empty(), "jobs never published: {missing:?}");
    let duplicated = in_queue as u64 - LIMIT;
    eprintln!("killed after {at_kill} jobs were published; {duplicated} published twice");
    // The producer keeps three pages in flight; only those can be sent again.
    assert!(
        duplicated <= 3 * u64::from(PAGE),
        "{duplicated} jobs published twice"
    );
    assert!(copies.values().all(|&n| n <= 2), "{copies:?}");
}
