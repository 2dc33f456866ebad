//! The broker's delivery acknowledgement timeout (`consumer_timeout`), set far below the length
//! of a job on a broker of the test's own, and a connection the broker closes mid-run. A job
//! outlives the timeout without the broker noticing (its delivery was acked once its lease was
//! held); a consumer whose channel is closed under it consumes again within seconds, its jobs in
//! hand running on; every job ends with exactly one result and runs once.

use std::time::{Duration, Instant};

use quarry_core::job::Mode;
use quarry_producer::publish_run;
use quarry_testkit::private_rabbitmq::PrivateRabbitMq;
use quarry_testkit::{Consumers, Services, TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

/// Each job's build script sleeps this long: past the broker's 3 s timeout, and a job waiting
/// for a slot behind one waits as long again.
const JOB_SECS: u64 = 5;

#[tokio::test(flavor = "multi_thread")]
async fn jobs_longer_than_the_brokers_delivery_timeout_run_once_and_a_closed_channel_is_consumed_again()
 {
    // 3 s to ack a delivery, checked every quarter second (as RabbitMQ's own tests of it do).
    let broker = PrivateRabbitMq::start_with_advanced(
        "[{rabbit, [{consumer_timeout, 3000}, {channel_tick_interval, 250}]}].\n",
    )
    .unwrap();
    let services = Services {
        amqp_url: broker.amqp_url(),
        rabbitmq_api: broker.management_api(),
        ..Services::from_env()
    };
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_on(
        fixtures::slow(packed.path(), 12, JOB_SECS).unwrap(),
        services,
    )
    .await
    .unwrap();
    let names: Vec<String> = (0..12).map(|i| format!("quarry-slow-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();

    // Two consumers of two slots each take eight jobs at once: four run, four wait for a slot,
    // each held about twice the broker's timeout, some longer.
    let long = packages_run(experiment(Mode::Check, 120), &names[..8]);
    let summary = publish_run(&stack.config, "long-jobs", &long, &CancellationToken::new())
        .await
        .unwrap();
    let consumers = Consumers::start(["first", "second"].map(|name| {
        let mut config = stack.consumer_config(name);
        config.consumer.concurrency = 2;
        config
    }));
    let progress =
        tokio::time::timeout(Duration::from_secs(240), stack.wait_for_run(summary.run_id))
            .await
            .expect("the long jobs finish");
    let stats = consumers.stop().await;
    assert_eq!((progress.finished, progress.total), (8, Some(8)));
    let log = broker.log();
    assert_eq!(
        stats.broker_connections, 2,
        "one connection each: the broker never closed a channel over a long job: {stats:?}\n{log}"
    );
    assert!(
        !log.contains("delivery acknowledgement on channel"),
        "the broker timed out a delivery:\n{log}"
    );
    assert_eq!(stats.leases_lapsed, 0, "{stats:?}");
    assert_runs_once(&stack, "long-jobs").await;
    stack.assert_verified("long-jobs").await;

    // The broker closes the connection of a consumer with a job running and one waiting.
    let cut = packages_run(experiment(Mode::Check, 120), &names[8..]);
    let summary = publish_run(&stack.config, "cut", &cut, &CancellationToken::new())
        .await
        .unwrap();
    let mut config = stack.consumer_config("cut-off");
    config.consumer.concurrency = 1;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    config.consumer.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
    let consumers = Consumers::start([config]);
    let sql = stack.sql().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&sql, "started", "cut").await == 0 {
        assert!(Instant::now() < deadline, "no job started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The management API learns of connections with a delay (its statistics interval).
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.close_amqp_connections().await.unwrap() == 0 {
        assert!(
            Instant::now() < deadline,
            "the consumer's connection never showed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let closed = Instant::now();
    // What a readiness probe sees: not ready while the consumer has no channel, then ready
    // again, within seconds, though the job in hand is still running.
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{metrics_port}/ready");
    let mut seen: Vec<u16> = Vec::new();
    while !seen.ends_with(&[503, 200]) {
        assert!(
            closed.elapsed() < Duration::from_secs(10),
            "not consuming again 10 s after its connection was closed: /ready said {seen:?}"
        );
        if let Ok(answer) = client.get(&url).send().await {
            let status = answer.status().as_u16();
            if seen.last() != Some(&status) {
                seen.push(status);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let progress = count(&sql, "finished", "cut").await;
    assert!(
        progress < 4,
        "the connection must be cut mid-run for this test to mean anything"
    );
    let progress =
        tokio::time::timeout(Duration::from_secs(240), stack.wait_for_run(summary.run_id))
            .await
            .expect("the run finishes after the cut");
    let stats = consumers.stop().await;
    assert_eq!((progress.finished, progress.total), (4, Some(4)));
    assert_eq!(stats.broker_connections, 2, "{stats:?}");
    assert_runs_once(&stack, "cut").await;
    stack.assert_verified("cut").await;
    drop(stack);
    drop(broker);
}

/// Every job of `run` started exactly once: none was run again for the broker's sake.
async fn assert_runs_once(stack: &TestStack, run: &str) {
    let sql = stack.sql().await.unwrap();
    let starts: Vec<(String, i64)> = sql
        .query(
            "SELECT j.crate_name, count(e.id) FROM jobs j JOIN runs r ON r.id = j.run_id
             LEFT JOIN job_events e ON e.job_id = j.id AND e.kind = 'started'
             WHERE r.name = $1 GROUP BY j.crate_name ORDER BY 1",
            &[&run],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert!(
        starts.iter().all(|(_, n)| *n == 1),
        "each job started once: {starts:?}"
    );
}

/// Events of `kind` in `run`.
async fn count(sql: &tokio_postgres::Client, kind: &str, run: &str) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM job_events e JOIN runs r ON r.id = e.run_id
         WHERE r.name = $1 AND e.kind = $2",
        &[&run, &kind],
    )
    .await
    .unwrap()
    .get(0)
}
