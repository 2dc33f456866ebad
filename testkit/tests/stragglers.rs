//! The slowest crates start first: a run publishes the crates that took longest in earlier runs
//! before it pages the registry (and each page longest first), so that its last minutes are not
//! spent waiting on one slow crate that happened to come last. And the last jobs go to a
//! consumer with nothing to do, not into a busy consumer's hand to wait for its slot.

use quarry_core::job::Mode;
use quarry_producer::{RunDefinition, publish_run};
use quarry_testkit::{TestStack, every_crate, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

const SLOW: &str = "quarry-timed-z";

#[tokio::test(flavor = "multi_thread")]
async fn a_crate_slow_in_an_earlier_run_is_published_first() {
    let packed = tempfile::tempdir().unwrap();
    let mut packages: Vec<(String, u64)> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| (format!("quarry-timed-{n}"), 0))
        .collect();
    // Last in the registry's order, and the slowest.
    packages.push((SLOW.to_owned(), 4));
    let stack = TestStack::start_with(fixtures::timed(packed.path(), &packages).unwrap())
        .await
        .unwrap();
    let never = CancellationToken::new();
    // One slot: the jobs start one after another, in the order they are delivered.
    let mut config = stack.consumer_config("stragglers");
    config.consumer.concurrency = 1;
    let consumers = quarry_testkit::Consumers::start([config]);
    let definition = every_crate(quarry_core::job::Experiment {
        fresh: true,
        ..experiment(Mode::Check, 120)
    });
    let database = stack.sql().await.unwrap();
    // Pages of two: the slow crate, last in the registry's order, is on the last page.
    let mut producer = stack.config.clone();
    producer.registry.page_size = 2;

    // The first run: nothing known yet.
    let summary = publish_run(&producer, "first", &definition, &never)
        .await
        .unwrap();
    assert_eq!(summary.jobs_queued, 5);
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;

    // The second, with no consumer running: the slow crate is the first message on the queue,
    // and every job is there once.
    let summary = publish_run(&producer, "second", &definition, &never)
        .await
        .unwrap();
    assert_eq!(summary.jobs_queued, 5, "each job published once");
    let mut queued = take_queued(&stack).await;
    assert_eq!(queued.first().map(String::as_str), Some(SLOW), "{queued:?}");
    queued.sort();
    queued.dedup();
    assert_eq!(queued.len(), 5, "every job once: {queued:?}");
    let expected: Option<i64> = database
        .query_one(
            "SELECT j.expected_ms FROM jobs j JOIN runs r ON r.id = j.run_id
             WHERE r.name = 'second' AND j.crate_name = $1",
            &[&SLOW],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        expected.is_some_and(|ms| ms >= 4_000),
        "the second run expects the time the first took: {expected:?}"
    );

    // A sample is chosen over the whole registry before paging: its slowest crates go first
    // too (here a sample of four, with a seed that takes the slow crate).
    let sampled = (0..64)
        .map(|seed| quarry_producer::selection::Sample { size: 4, seed })
        .find(|sample| {
            let names: Vec<String> = ["a", "b", "c", "d", "z"]
                .iter()
                .map(|n| format!("quarry-timed-{n}"))
                .collect();
            quarry_producer::selection::sample(names, |n| n.clone(), *sample)
                .iter()
                .any(|n| n == SLOW)
        })
        .unwrap();
    let definition = RunDefinition {
        filter: quarry_producer::selection::Filter {
            sample: Some(sampled),
            ..Default::default()
        },
        ..definition
    };
    let summary = publish_run(&producer, "sampled", &definition, &never)
        .await
        .unwrap();
    assert_eq!(summary.jobs_queued, 4);
    let queued = take_queued(&stack).await;
    assert_eq!(queued.first().map(String::as_str), Some(SLOW), "{queued:?}");
    assert_eq!(queued.len(), 4, "every job once: {queued:?}");
}

/// A first run has no earlier durations: its jobs go largest dependency tree first, as the index
/// tells, counting what the dependencies pull in (`z` depends on one package, like `b`, but that
/// one brings two more).
#[tokio::test(flavor = "multi_thread")]
async fn a_first_run_publishes_the_largest_dependency_tree_first() {
    let packed = tempfile::tempdir().unwrap();
    let corpus = fixtures::trees(
        packed.path(),
        &[
            ("quarry-tree-a", &[]),
            ("quarry-tree-b", &["quarry-tree-leaf-1"]),
            ("quarry-tree-leaf-1", &[]),
            ("quarry-tree-leaf-2", &[]),
            (
                "quarry-tree-mid",
                &["quarry-tree-leaf-1", "quarry-tree-leaf-2"],
            ),
            ("quarry-tree-z", &["quarry-tree-mid"]),
        ],
    )
    .unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    // Publishes a run with no consumer running: its jobs queued, and their packages (without
    // the common prefix) in the order they were published.
    let published =
        |config: quarry_infra::Config, name: &'static str, definition: RunDefinition| {
            let stack = &stack;
            async move {
                let summary = publish_run(&config, name, &definition, &CancellationToken::new())
                    .await
                    .unwrap();
                let queued: Vec<String> = take_queued(stack)
                    .await
                    .iter()
                    .map(|n| n.trim_start_matches("quarry-tree-").to_owned())
                    .collect();
                (summary.jobs_queued, queued)
            }
        };
    let (jobs, short) = published(
        stack.config.clone(),
        "first",
        every_crate(experiment(Mode::Check, 120)),
    )
    .await;
    assert_eq!(jobs, 6);
    assert_eq!(short, ["z", "mid", "b", "a", "leaf-1", "leaf-2"]);

    // A list is ordered as a whole before paging, not page by page: with pages of one, the
    // largest tree, last in the list, still goes first.
    let listed = packages_run(
        experiment(Mode::Check, 120),
        &[
            "quarry-tree-a",
            "quarry-tree-b",
            "quarry-tree-mid",
            "quarry-tree-z",
        ],
    );
    let mut producer = stack.config.clone();
    producer.registry.page_size = 1;
    let (jobs, short) = published(producer, "listed", listed).await;
    assert_eq!(jobs, 4);
    assert_eq!(short, ["z", "mid", "b", "a"]);
}

/// Takes every message off the stack's job queue: the packages, in the order they were
/// published.
async fn take_queued(stack: &TestStack) -> Vec<String> {
    let connection = lapin::Connection::connect(
        stack.config.rabbitmq.url.expose(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let jobs_queue = quarry_infra::queue::Broker::connect(&stack.config.rabbitmq)
        .await
        .unwrap()
        .topology()
        .jobs
        .clone();
    let mut queued = Vec::new();
    while let Some(message) = channel
        .basic_get(
            jobs_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let job = quarry_core::job::Job::from_message(&message.delivery.data).unwrap();
        queued.push(job.package.name);
    }
    queued
}

/// A stack over the timed packages `packages` (name, seconds its build script sleeps), and a
/// `check` run of them all in name order.
async fn timed_stack(
    packed: &std::path::Path,
    packages: &[(&str, u64)],
) -> (TestStack, RunDefinition) {
    let packages: Vec<(String, u64)> = packages
        .iter()
        .map(|(name, seconds)| ((*name).to_owned(), *seconds))
        .collect();
    let stack = TestStack::start_with(fixtures::timed(packed, &packages).unwrap())
        .await
        .unwrap();
    let definition = every_crate(experiment(Mode::Check, 120));
    (stack, definition)
}

fn one_slot(stack: &TestStack, name: &str) -> quarry_infra::Config {
    let mut config = stack.consumer_config(name);
    config.consumer.concurrency = 1;
    config
}

/// Each result of `run` by crate name: who ran it, and when it finished.
async fn results_by_crate(
    database: &tokio_postgres::Client,
    run: quarry_core::job::RunId,
) -> Vec<(String, String, chrono::DateTime<chrono::Utc>)> {
    database
        .query(
            "SELECT j.crate_name, r.consumer, r.finished_at FROM results r
             JOIN jobs j ON j.id = r.job_id WHERE r.run_id = $1 ORDER BY j.crate_name",
            &[&run.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_job_goes_to_an_idle_consumer_not_behind_a_busy_slot() {
    let packed = tempfile::tempdir().unwrap();
    // First in the registry's order, and slow; then one quick job, the last in the queue.
    let (stack, definition) = timed_stack(
        packed.path(),
        &[("quarry-timed-a", 8), ("quarry-timed-b", 0)],
    )
    .await;
    let store = quarry_infra::store::Store::connect(&stack.config.database)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    // Another consumer of the fleet, alive and idle, before the first starts: its one slot is
    // free for the quick job (it stands for the second consumer until that starts).
    let waiting = uuid::Uuid::new_v4();
    store
        .register_consumer(waiting, "tail-waiting", "secret", "elsewhere", 1)
        .await
        .unwrap();
    let first = quarry_testkit::Consumers::start([one_slot(&stack, "tail-1")]);
    let summary = publish_run(
        &stack.config,
        "tail",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.jobs_queued, 2);
    let database = stack.sql().await.unwrap();
    let started = |name: &'static str| {
        let database = &database;
        async move {
            database
                .query_one(
                    "SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id
                     WHERE j.crate_name = $1 AND e.kind = 'started'",
                    &[&name],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                > 0
        }
    };
    while !started("quarry-timed-a").await {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The slow job holds the first consumer's slot: the quick one stays in the queue, where
    // the idle consumer can take it, rather than being prepared here to wait for that slot.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let broker = quarry_infra::queue::Broker::connect(&stack.config.rabbitmq)
        .await
        .unwrap();
    let queued = broker
        .ready_messages(&broker.topology().jobs)
        .await
        .unwrap();
    assert_eq!(queued, 1, "the quick job is left in the queue");
    assert!(!started("quarry-timed-b").await);
    let second = quarry_testkit::Consumers::start([one_slot(&stack, "tail-2")]);
    stack.wait_for_run(summary.run_id).await;
    first.stop().await;
    second.stop().await;

    let got = results_by_crate(&database, summary.run_id).await;
    let [(_, slow_by, slow_at), (_, quick_by, quick_at)] = got.as_slice() else {
        panic!("two results: {got:?}");
    };
    assert_eq!((slow_by.as_str(), quick_by.as_str()), ("tail-1", "tail-2"));
    assert!(quick_at < slow_at, "{got:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_waiting_for_a_busy_slot_gives_way_to_a_consumer_that_joins_idle() {
    let packed = tempfile::tempdir().unwrap();
    // Two slow jobs: whichever is prepared first takes the slot, and the other waits.
    let (stack, definition) = timed_stack(
        packed.path(),
        &[("quarry-timed-a", 15), ("quarry-timed-b", 15)],
    )
    .await;
    // Alone in the fleet, the first consumer takes both jobs: one runs, the other is prepared
    // and waits for its slot.
    let first = quarry_testkit::Consumers::start([one_slot(&stack, "give-way-1")]);
    let summary = publish_run(
        &stack.config,
        "give-way",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.jobs_queued, 2);
    let broker = quarry_infra::queue::Broker::connect(&stack.config.rabbitmq)
        .await
        .unwrap();
    let database = stack.sql().await.unwrap();
    loop {
        let started: i64 = database
            .query_one(
                "SELECT count(*) FROM job_events WHERE run_id = $1 AND kind = 'started'",
                &[&summary.run_id.0],
            )
            .await
            .unwrap()
            .get(0);
        let queued = broker
            .ready_messages(&broker.topology().jobs)
            .await
            .unwrap();
        if started == 1 && queued == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A second consumer joins with a free slot and finds the queue empty: it says it is idle
    // in the fleet table, the waiting job goes back to the queue, and the second one runs it.
    let second = quarry_testkit::Consumers::start([one_slot(&stack, "give-way-2")]);
    stack.wait_for_run(summary.run_id).await;
    first.stop().await;
    second.stop().await;

    let got = results_by_crate(&database, summary.run_id).await;
    let [(_, a_by, _), (_, b_by, _)] = got.as_slice() else {
        panic!("two results: {got:?}");
    };
    // One each: the waiting job did not stay behind the busy slot.
    assert_ne!(a_by, b_by, "{got:?}");
}
