//! RabbitMQ restarted under a running run. The test runs its own broker node (this file's
//! process points the test stack at it), so restarting it disturbs no other test.

use std::time::Duration;

use quarry_core::job::Mode;
use quarry_infra::store::Store;
use quarry_producer::publish_run;
use quarry_testkit::private_rabbitmq::PrivateRabbitMq;
use quarry_testkit::{Services, TestStack, first_crates, local_corpus};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restarting_mid_run_loses_nothing_and_counts_nothing_twice() {
    let mut broker = PrivateRabbitMq::start().unwrap();
    let services = Services {
        amqp_url: broker.amqp_url(),
        rabbitmq_api: broker.management_api(),
        ..Services::from_env()
    };
    let stack = TestStack::start_on(local_corpus().unwrap(), services)
        .await
        .unwrap();
    let definition = first_crates(Mode::Check, 10);
    let summary = publish_run(
        &stack.config,
        "broker-restart",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let consumers = stack.start_consumers(&["through-the-restart-a", "through-the-restart-b"]);
    let store = Store::connect(&stack.config.database).await.unwrap();
    while store.progress(summary.run_id).await.unwrap().finished < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The broker goes down with jobs in the consumers' hands and in the queue, stays down for
    // 3 s, and comes back with the same data (its queues are durable).
    let before = store.progress(summary.run_id).await.unwrap().finished;
    let restarted = tokio::task::spawn_blocking(move || {
        broker.stop()?;
        std::thread::sleep(Duration::from_secs(3));
        broker.restart()?;
        anyhow::Ok(broker)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        before < 10,
        "the run finished before the broker went down: the restart proved nothing"
    );

    stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    eprintln!("{stats:?}");
    let progress = store.progress(summary.run_id).await.unwrap();
    assert_eq!((progress.finished, progress.total), (10, Some(10)));
    // A job in hand when the connection died comes back and is recognised as done, never
    // recorded twice; verify checks exactly one result per job.
    assert_eq!(stats.results, 10, "{stats:?}");
    // Each consumer retries with growing pauses; the first one back may finish the run alone.
    assert!(
        stats.broker_connections >= 3,
        "a consumer reconnected after the restart: {stats:?}"
    );
    stack.assert_verified("broker-restart").await;
    drop(stack);
    drop(restarted);
}
