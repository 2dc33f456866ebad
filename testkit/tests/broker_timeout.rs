//! The broker's delivery acknowledgement timeout (`consumer_timeout`), set short on a broker of
//! the test's own: it closes the consumer's channel while a job waits for a slot behind a slow
//! one. The consumer must come back and consume again, never stay alive consuming nothing; every
//! job ends with exactly one result.

use quarry_producer::publish_run;
use quarry_shared::job::Mode;
use quarry_testkit::private_rabbitmq::PrivateRabbitMq;
use quarry_testkit::{Consumers, TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn a_channel_the_broker_closes_for_a_late_ack_is_consumed_again() {
    // 3 s to ack a delivery, checked every quarter second (as RabbitMQ's own tests of it do).
    let broker = PrivateRabbitMq::start_with_advanced(
        "[{rabbit, [{consumer_timeout, 3000}, {channel_tick_interval, 250}]}].\n",
    )
    .unwrap();
    // SAFETY (of the test's intent): set before any thread of this process reads them; this
    // file holds one test, so no other test in the process sees the change.
    unsafe {
        std::env::set_var("QUARRY_TEST_AMQP_URL", broker.amqp_url());
        std::env::set_var("QUARRY_TEST_RABBITMQ_API", broker.management_api());
    }
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::corpus(packed.path()).unwrap())
        .await
        .unwrap();
    // The slow fixture's build script sleeps 6 s: its delivery, and the one held behind it
    // for the next slot, outlive the timeout; the jobs after them are left for a new channel.
    let packages = [
        "quarry-fixture-slow",
        "quarry-fixture-pass",
        "quarry-fixture-build-fail",
        "quarry-fixture-test-fail",
        "quarry-fixture-regression",
        "quarry-fixture-sandboxed",
    ];
    let definition = packages_run(experiment(Mode::Check, 60), &packages);
    let summary = publish_run(
        &stack.config,
        "late-acks",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut config = stack.consumer_config("late-acks");
    config.consumer.concurrency = 1;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    config.consumer.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
    let consumers = Consumers::start([config]);
    // What a readiness probe sees meanwhile: ready while consuming, not ready once the channel
    // is gone, ready again on the new one.
    let readiness = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{metrics_port}/ready");
        let mut changes: Vec<u16> = Vec::new();
        loop {
            if let Ok(answer) = client.get(&url).send().await {
                let status = answer.status().as_u16();
                if changes.last() != Some(&status) {
                    changes.push(status);
                }
            }
            if changes.ends_with(&[200, 503, 200]) {
                return changes;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let progress = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        stack.wait_for_run(summary.run_id),
    )
    .await
    .expect("the consumer stopped consuming after the broker closed its channel");
    tokio::time::timeout(std::time::Duration::from_secs(10), readiness)
        .await
        .expect("the probe saw the consumer ready, not ready while it had no channel, ready again")
        .unwrap();
    let stats = consumers.stop().await;
    assert_eq!((progress.finished, progress.total), (6, Some(6)));
    let log = broker.log();
    assert!(
        stats.broker_connections >= 2,
        "the channel was closed and consumed again: {stats:?}\n{log}"
    );
    stack.assert_verified("late-acks").await;
    drop(stack);
    drop(broker);
}
