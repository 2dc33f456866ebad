//! Behaviour of the pipeline's parts against the real services: re-running the producer, bad
//! messages, a misbehaving registry, concurrent migrations.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use quarry_core::job::Mode;
use quarry_infra::queue::Broker;
use quarry_infra::s3::Bucket;
use quarry_infra::store::Store;
use quarry_producer::{PublishSummary, RunDefinition, Selection, Sort, publish_run};
use quarry_registry::Fault;
use quarry_testkit::{Consumers, TestStack, experiment};
use tokio_util::sync::CancellationToken;

fn definition(selection: Selection) -> RunDefinition {
    RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: experiment(Mode::Check, 300),
        selection,
        toolchain_files: Vec::new(),
    }
}

/// Publishes a run of `selection` named `name`, to completion.
async fn publish(stack: &TestStack, name: &str, selection: Selection) -> PublishSummary {
    publish_run(
        &stack.config,
        name,
        &definition(selection),
        &CancellationToken::new(),
    )
    .await
    .expect("the producer publishes the run")
}

fn first(limit: u64) -> Selection {
    Selection::Listing {
        sort: Sort::Alpha,
        limit: Some(limit),
    }
}

async fn ready(stack: &TestStack, queue: fn(&Broker) -> String) -> u32 {
    let broker = Broker::connect(&stack.config.rabbitmq).await.unwrap();
    let count = broker.ready_messages(&queue(&broker)).await.unwrap();
    broker.close().await;
    count
}

fn jobs_queue(broker: &Broker) -> String {
    broker.topology().jobs.clone()
}

fn dead_queue(broker: &Broker) -> String {
    broker.topology().dead.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn rerunning_the_producer_publishes_nothing_twice() {
    let stack = TestStack::start().await.unwrap();
    let never = CancellationToken::new();
    let run = definition(first(12));

    let once = publish_run(&stack.config, "twice", &run, &never)
        .await
        .unwrap();
    assert_eq!((once.jobs_queued, once.jobs_total), (12, 12));
    assert!(!once.resumed);

    let again = publish_run(&stack.config, "twice", &run, &never)
        .await
        .unwrap();
    assert!(again.resumed);
    assert_eq!(again.run_id, once.run_id);
    assert_eq!(again.jobs_queued, 0);
    assert_eq!(again.jobs_already_queued_or_done, 12);
    assert_eq!(ready(&stack, jobs_queue).await, 12, "one message per job");

    // Nothing consumed yet: the invariant checker says which jobs are still without a result.
    let verification =
        quarry_reporter::verify(&stack.config, "twice", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    assert!(!verification.is_ok());
    assert!(
        verification.problems[0].starts_with("12 jobs have no result, for example: "),
        "{:?}",
        verification.problems
    );

    // The same name with another definition is refused, and publishes nothing.
    let err = publish_run(&stack.config, "twice", &definition(first(13)), &never)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("different definition"),
        "{err:#}"
    );
    assert_eq!(ready(&stack, jobs_queue).await, 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_broker_lost_its_queue_republish_puts_back_exactly_the_unfinished_jobs() {
    let stack = TestStack::start().await.unwrap();
    let summary = publish(&stack, "lost-queue", first(6)).await;
    // Two jobs get their results; then the broker loses what is queued.
    let consumers = stack.start_consumers(&["before-the-loss"]);
    let store = Store::connect(&stack.config.database).await.unwrap();
    while store.progress(summary.run_id).await.unwrap().finished < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumers.stop().await;
    let finished_before = store.progress(summary.run_id).await.unwrap().finished;
    assert!(
        finished_before < 6,
        "the consumer was stopped before the end"
    );

    // With messages still queued, republishing would queue some jobs twice: refused.
    let err = quarry_producer::republish(&stack.config, "lost-queue", false)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("still queued"), "{err:#}");

    let (connection, channel) = raw_channel(&stack).await;
    let jobs = format!("{}.jobs", stack.config.rabbitmq.prefix);
    channel
        .queue_purge(jobs.as_str().into(), Default::default())
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    assert_eq!(ready(&stack, jobs_queue).await, 0);

    let republished = quarry_producer::republish(&stack.config, "lost-queue", false)
        .await
        .unwrap();
    assert_eq!(republished.jobs, 6 - finished_before as u64);
    assert_eq!(ready(&stack, jobs_queue).await as u64, republished.jobs);

    let consumers = stack.start_consumers(&["after-the-loss"]);
    stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    assert_eq!(stats.results, republished.jobs, "{stats:?}");
    stack.assert_verified("lost-queue").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_command_runs_in_each_package_and_its_exit_status_is_the_outcome() {
    let stack = TestStack::start().await.unwrap();
    let mut run = definition(first(3));
    run.experiment.mode = Mode::Command;
    // Passes where the package has a build script, fails elsewhere; says which in its log.
    run.experiment.command = Some(vec![
        "sh".into(),
        "-c".into(),
        "echo \"scanning $(pwd)\"; if test -f build.rs; then echo has-a-build\"-\"script; \
         else echo no-build\"-\"script; exit 1; fi"
            .into(),
    ]);
    let summary = publish_run(&stack.config, "scan", &run, &CancellationToken::new())
        .await
        .unwrap();
    let consumers = stack.start_consumers(&["scanner"]);
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;
    stack.assert_verified("scan").await;
    let written =
        quarry_reporter::generate(&stack.config, "scan", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    for package in &written.report.packages {
        let log = written.read_log(package.log.as_deref()).unwrap();
        assert!(log.contains("$ sh -c echo"), "{log}");
        assert!(log.contains("scanning /"), "{log}");
        let expected = if log.contains("has-a-build-script") {
            "test-pass"
        } else {
            assert!(log.contains("no-build-script"), "{log}");
            "test-fail"
        };
        assert_eq!(package.outcome, expected, "{package:?}");
    }
}

/// Two runs of the same packages, one after the other, through one consumer whose confirmed
/// index files stay fresh for `fresh_secs`: what the registry saw of the second run's index
/// requests (asked, answered 304) and of its downloads, before and after.
async fn index_requests_of_a_second_run(
    fresh_secs: u64,
) -> (quarry_registry::Stats, quarry_registry::Stats) {
    let stack = TestStack::start().await.unwrap();
    let mut config = stack.consumer_config("indexing");
    config.registry.index_fresh_secs = fresh_secs;
    let consumers = quarry_testkit::Consumers::start([config]);
    let first_run = publish(&stack, "index-first", first(3)).await;
    stack.wait_for_run(first_run.run_id).await;
    let after_first = stack.registry.stats();
    // The same packages again, computed afresh: cargo asks for the same index files.
    let mut again = definition(first(3));
    again.experiment.fresh = true;
    let second_run = publish_run(
        &stack.config,
        "index-second",
        &again,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    stack.wait_for_run(second_run.run_id).await;
    consumers.stop().await;
    stack.assert_verified("index-second").await;
    (after_first, stack.registry.stats())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_revalidates_index_files_instead_of_downloading_them() {
    let (after_first, after_second) = index_requests_of_a_second_run(0).await;
    let asked = after_second.index_requests - after_first.index_requests;
    let unchanged = after_second.index_not_modified - after_first.index_not_modified;
    assert!(asked > 0, "{after_first:?} {after_second:?}");
    assert_eq!(
        asked, unchanged,
        "every index file the second run needed was answered 304, with no body"
    );
    assert_eq!(after_second.downloads, after_first.downloads);
}

#[tokio::test(flavor = "multi_thread")]
async fn index_files_the_registry_just_confirmed_are_not_asked_for_again() {
    let (after_first, after_second) = index_requests_of_a_second_run(3600).await;
    // The producer (a process of its own, each run) still revalidates the index file of each
    // of the run's three packages; the consumer's cargo asks for many more, and for none of
    // them does the consumer ask the registry again.
    assert!(after_first.index_requests > 3, "{after_first:?}");
    assert_eq!(
        after_second.index_requests - after_first.index_requests,
        3,
        "only the producer's requests: {after_first:?} {after_second:?}"
    );
    assert_eq!(after_second.downloads, after_first.downloads);
}

#[tokio::test(flavor = "multi_thread")]
async fn packages_missing_from_the_index_are_reported_not_fatal() {
    let stack = TestStack::start().await.unwrap();
    let corpus_crate = stack_crate_name(&stack).await;
    let run = definition(Selection::Packages {
        packages: vec![
            corpus_crate.clone(),
            "no-such-crate-anywhere".into(),
            format!("{corpus_crate}@999.0.0"),
        ],
    });
    let summary = publish_run(&stack.config, "partial", &run, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(summary.jobs_queued, 1);
    assert_eq!(summary.packages_failed.len(), 2, "{summary}");
    assert!(summary.packages_failed["no-such-crate-anywhere"].contains("not in the registry"));
    assert!(summary.complete);
}

async fn stack_crate_name(stack: &TestStack) -> String {
    let registry = quarry_infra::registry::RegistryClient::new(&stack.config.registry).unwrap();
    let page = registry.crates_page(None, 1).await.unwrap();
    page.crates[0].name.clone()
}

/// The kinds of a job's events, oldest first.
async fn event_kinds(store: &Store, job: uuid::Uuid) -> Vec<String> {
    store
        .events(quarry_core::job::JobId(job))
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.kind.as_str().to_owned())
        .collect()
}

/// A plain AMQP channel to the stack's vhost, for doing what a foreign or broken client does.
async fn raw_channel(stack: &TestStack) -> (Connection, lapin::Channel) {
    let connection = Connection::connect(
        stack.config.rabbitmq.url.expose(),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Takes the next message of `queue` and gives it back, as a consumer that dies holding it does;
/// with `started` (a store and the attempt), after logging the attempt's `started` event, as a
/// consumer that dies while the job runs leaves it.
async fn deliver_and_give_back_after(
    channel: &lapin::Channel,
    queue: &str,
    started: Option<(&Store, i32)>,
) {
    let message = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("a message to deliver");
    if let Some((store, attempt)) = started {
        let job = quarry_core::job::Job::from_message(&message.delivery.data).unwrap();
        store.start_attempt(&job, attempt, "doomed").await.unwrap();
    }
    message
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn deliver_and_give_back(channel: &lapin::Channel, queue: &str) {
    deliver_and_give_back_after(channel, queue, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_keeps_killing_its_consumers_ends_dead_lettered_with_an_error_result() {
    let stack = TestStack::start().await.unwrap();
    let (connection, channel) = raw_channel(&stack).await;
    let jobs = format!("{}.jobs", stack.config.rabbitmq.prefix);
    let store = Store::connect(&stack.config.database).await.unwrap();
    // A job merely held by consumers that died (given back before it started) is innocent:
    // it runs, however often that happened.
    let innocent = publish(&stack, "innocent", first(1)).await;
    for _ in 0..quarry_infra::queue::CRASH_LIMIT + 1 {
        deliver_and_give_back(&channel, &jobs).await;
    }
    let consumers = stack.start_consumers(&["runs-the-innocent"]);
    stack.wait_for_run(innocent.run_id).await;
    let stats = consumers.stop().await;
    assert_eq!((stats.results, stats.dead_lettered), (1, 0), "{stats:?}");

    let summary = publish(&stack, "crash-loop", first(1)).await;
    for attempt in 1..=quarry_infra::queue::CRASH_LIMIT {
        deliver_and_give_back_after(&channel, &jobs, Some((&store, attempt as i32))).await;
    }

    let consumers = stack.start_consumers(&["after-the-crashes"]);
    stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    assert_eq!((stats.results, stats.dead_lettered), (1, 1), "{stats:?}");
    let dead = channel
        .basic_get(
            format!("{jobs}.dead").as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the job is in the dead-letter queue");
    let reason = quarry_infra::queue::dead_letter_reason(&dead.properties).unwrap();
    assert!(
        reason.contains("started 5 times without ending"),
        "{reason}"
    );
    let explained =
        quarry_reporter::explain(&stack.config, "crash-loop", &stack_crate_name(&stack).await)
            .await
            .unwrap();
    assert!(explained.contains("dead-lettered"), "{explained}");
    stack.assert_verified("crash-loop").await;

    // Past the broker's own delivery limit (when even that consumer check cannot run), the
    // broker dead-letters the message itself: never an endless loop.
    let summary = publish(&stack, "broker-backstop", first(1)).await;
    for _ in 0..=10 {
        deliver_and_give_back(&channel, &jobs).await;
    }
    for _ in 0..50 {
        if ready(&stack, dead_queue).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready(&stack, jobs_queue).await, 0);
    assert_eq!(ready(&stack, dead_queue).await, 1);
    // The broker records nothing: a consumer reads the dead letter's copy and records the job
    // as an error with the broker's reason, so the run still ends with one result per job.
    let consumers = stack.start_consumers(&["recorder"]);
    stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    assert_eq!(stats.results, 1, "{stats:?}");
    stack.assert_verified("broker-backstop").await;
    let explained = quarry_reporter::explain(
        &stack.config,
        "broker-backstop",
        &stack_crate_name(&stack).await,
    )
    .await
    .unwrap();
    assert!(
        explained.contains("dead-lettered by the broker (delivery_limit"),
        "{explained}"
    );
    assert_eq!(
        ready(&stack, dead_queue).await,
        1,
        "the dead letter itself stays for people to see"
    );
    connection.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_messages_are_dead_lettered_with_their_reason_and_work_goes_on() {
    let stack = TestStack::start().await.unwrap();
    let summary = publish(&stack, "with-poison", first(3)).await;

    // Garbage on the work queue, as a buggy or foreign publisher would send it.
    let (connection, channel) = raw_channel(&stack).await;
    for body in [&b"{not json"[..], br#"{"format": 99}"#] {
        channel
            .basic_publish(
                "".into(),
                "quarry.jobs".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let consumers = stack.start_consumers(&["poison-eater"]);
    stack.wait_for_run(summary.run_id).await;
    // The poison may sit behind the valid jobs; wait until it is gone from the work queue.
    for _ in 0..100 {
        if ready(&stack, jobs_queue).await == 0 && ready(&stack, dead_queue).await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = consumers.stop().await;
    assert_eq!(stats.results, 3);
    assert_eq!(stats.dead_lettered, 2);

    let mut reasons = Vec::new();
    for _ in 0..2 {
        let message = channel
            .basic_get(
                "quarry.jobs.dead".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .expect("a dead letter");
        reasons.push(quarry_infra::queue::dead_letter_reason(&message.properties).unwrap());
    }
    reasons.sort();
    assert!(reasons[0].contains("format 99"), "{reasons:?}");
    assert!(reasons[1].contains("not a Quarry job"), "{reasons:?}");
    connection.close(200, "done".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_registry_failures_are_retried_and_a_wrong_checksum_ends_as_an_error() {
    let stack = TestStack::start().await.unwrap();
    let registry = quarry_infra::registry::RegistryClient::new(&stack.config.registry).unwrap();
    let page = registry.crates_page(None, 2).await.unwrap();
    let (flaky, corrupt) = (page.crates[0].name.clone(), page.crates[1].name.clone());
    stack.registry.set_faults(vec![
        // The first two downloads of one crate fail with 503, then it is served.
        Fault {
            path_contains: format!("/crates/{flaky}/"),
            status: Some(503),
            times: Some(2),
            ..Fault::default()
        },
        // The other is always served corrupted.
        Fault {
            path_contains: format!("/crates/{corrupt}/"),
            corrupt: true,
            ..Fault::default()
        },
    ]);
    let summary = publish(
        &stack,
        "faulty-registry",
        Selection::Packages {
            packages: vec![flaky.clone(), corrupt.clone()],
        },
    )
    .await;

    let consumers = stack.start_consumers(&["patient"]);
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;

    let sql = stack.sql().await.unwrap();
    let bucket = Bucket::new(&stack.config.s3).unwrap();
    let outcome = |name: String| {
        let (sql, bucket) = (&sql, &bucket);
        async move {
            let row = sql
                .query_one(
                    "SELECT r.outcome, r.log, r.log_key FROM results r JOIN jobs j ON j.id = r.job_id
                     WHERE j.crate_name = $1",
                    &[&name],
                )
                .await
                .unwrap();
            let log = bucket.result_log(row.get(1), row.get(2)).await.unwrap();
            (row.get::<_, String>(0), log)
        }
    };
    stack.assert_verified("faulty-registry").await;
    let (flaky_outcome, _) = outcome(flaky).await;
    assert_ne!(
        flaky_outcome, "error",
        "a 503 twice is retried, then served"
    );
    let (corrupt_outcome, log) = outcome(corrupt.clone()).await;
    assert_eq!(corrupt_outcome, "error");
    assert!(log.contains("sha256"), "{log}");
    assert!(log.contains("gave up after 3 attempts"), "{log}");
    assert_eq!(
        ready(&stack, dead_queue).await,
        1,
        "dead-lettered with its reason"
    );
    let job: uuid::Uuid = sql
        .query_one("SELECT id FROM jobs WHERE crate_name = $1", &[&corrupt])
        .await
        .unwrap()
        .get(0);
    let store = Store::connect(&stack.config.database).await.unwrap();
    let events = event_kinds(&store, job).await;
    assert_eq!(
        events,
        [
            "queued",
            "attempt-failed",
            "attempt-failed",
            "attempt-failed",
            "dead-lettered",
            "finished"
        ],
        "the event log explains what happened (never started: its package never arrived)"
    );
    let attempts: Vec<i32> = sql
        .query(
            "SELECT e.attempt FROM job_events e JOIN jobs j ON j.id = e.job_id
             WHERE j.crate_name = $1 AND e.kind = 'attempt-failed' ORDER BY e.id",
            &[&corrupt],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        attempts,
        [1, 2, 3],
        "each retry went through a delay queue, counted"
    );

    // The registry is fixed: the dead-lettered job is requeued through the reporter (with its
    // token) and this time gets a real result.
    stack.registry.set_faults(Vec::new());
    let token = "a-test-token-of-some-length";
    let mut config = stack.config.clone();
    config.reporter.listen = "127.0.0.1:0".into();
    config.reporter.token = Some(quarry_infra::config::Secret::new(token));
    let stop = CancellationToken::new();
    let (addr, server) = quarry_reporter::serve(&config, stop.clone()).await.unwrap();
    let requeue = format!("http://{addr}/runs/faulty-registry/requeue");
    let http = reqwest::Client::new();
    let refused = http.post(&requeue).send().await.unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(
        ready(&stack, dead_queue).await,
        1,
        "nothing requeued without the token"
    );
    let answer = http.post(&requeue).bearer_auth(token).send().await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    let said = answer.text().await.unwrap();
    assert!(
        said.contains("requeued 1 dead-lettered jobs") && said.contains("1 messages removed"),
        "{said}"
    );
    assert_eq!(
        ready(&stack, dead_queue).await,
        0,
        "its spent copy left the dead letters"
    );
    let live = quarry_testkit::get_text(format!("http://{addr}/runs/faulty-registry")).await;
    assert!(
        !live.contains(&corrupt),
        "no longer listed as dead-lettered"
    );

    let consumers = stack.start_consumers(&["after-the-fix"]);
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;
    let (corrupt_outcome, log) = outcome(corrupt.clone()).await;
    assert_ne!(corrupt_outcome, "error", "{log}");
    let events = event_kinds(&store, job).await;
    assert_eq!(
        &events[events.len() - 4..],
        ["finished", "requeued", "started", "finished"],
        "the event log keeps the first ending and tells the second: {events:?}"
    );
    stack.assert_verified("faulty-registry").await;
    // Nothing is dead-lettered now: a second requeue has nothing to do.
    let again = http.post(&requeue).bearer_auth(token).send().await.unwrap();
    assert!(
        again
            .text()
            .await
            .unwrap()
            .contains("requeued 0 dead-lettered jobs")
    );
    stop.cancel();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_started_by_many_processes_at_once_all_succeed() {
    let stack = TestStack::start().await.unwrap();
    let attempts: Vec<_> = (0..6)
        .map(|_| {
            let config = stack.config.database.clone();
            tokio::spawn(async move { Store::connect(&config).await?.migrate().await })
        })
        .collect();
    for attempt in attempts {
        attempt
            .await
            .unwrap()
            .expect("every migration run succeeds");
    }
    let sql = stack.sql().await.unwrap();
    let row = sql
        .query_one(
            "SELECT count(*), count(DISTINCT version) FROM refinery_schema_history",
            &[],
        )
        .await
        .unwrap();
    let (applied, distinct): (i64, i64) = (row.get(0), row.get(1));
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count() as i64;
    assert_eq!(
        (applied, distinct),
        (files, files),
        "each migration applied once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_run_is_skipped_by_consumers_and_refused_by_the_producer() {
    let stack = TestStack::start().await.unwrap();
    let never = CancellationToken::new();
    let run = definition(first(6));
    let summary = publish_run(&stack.config, "cancelled", &run, &never)
        .await
        .unwrap();
    let store = Store::connect(&stack.config.database).await.unwrap();
    assert!(store.cancel_run(summary.run_id).await.unwrap());
    assert!(
        !store.cancel_run(summary.run_id).await.unwrap(),
        "only once"
    );

    let consumers = stack.start_consumers(&["skipper"]);
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;
    let counts = store.outcome_counts(summary.run_id).await.unwrap();
    assert_eq!(
        counts,
        [(quarry_core::job::Outcome::Skipped, 6)],
        "every job recorded as skipped, none run"
    );

    stack.assert_verified("cancelled").await;
    let err = publish_run(&stack.config, "cancelled", &run, &never)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("was cancelled"), "{err:#}");
}

/// A package whose index keeps failing is left out, named, and the rest of the run goes on; the
/// next invocation tries it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_package_left_out_is_named_and_tried_again_by_the_next_invocation() {
    let stack = TestStack::start().await.unwrap();
    let listing = format!(
        "{}/api/v1/crates?per_page=5&sort=alpha",
        stack.registry.api_url()
    );
    let names: Vec<String> = reqwest::get(&listing)
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["crates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    let failing = names
        .iter()
        .find(|n| n.len() >= 4)
        .expect("a crate name of 4 letters or more")
        .clone();
    // Its sparse index file (`/ab/cd/abcdef`) answers 500 whatever the retries.
    stack.registry.set_faults(vec![Fault {
        path_contains: format!("/{}/{}/{failing}", &failing[..2], &failing[2..4]),
        status: Some(500),
        ..Fault::default()
    }]);
    let once = publish(&stack, "left-out", first(5)).await;
    assert!(once.complete);
    assert_eq!(once.jobs_queued, 4, "the others are published: {once}");
    assert_eq!(
        once.packages_failed.keys().collect::<Vec<_>>(),
        [&failing],
        "{once}"
    );
    assert!(once.to_string().contains("run the same command again"));

    stack.registry.set_faults(vec![]);
    let again = publish(&stack, "left-out", first(5)).await;
    assert!(again.packages_failed.is_empty(), "{again}");
    assert_eq!(again.jobs_queued, 1, "only the package left out: {again}");
    assert_eq!(again.jobs_total, 5);
    assert_eq!(
        ready(&stack, jobs_queue).await,
        5,
        "nothing published twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_web_api_is_asked_politely_and_retry_after_is_honoured() {
    let stack = TestStack::start().await.unwrap();
    let mut config = stack.config.registry.clone();
    config.api_min_interval_ms = 300;
    let registry = quarry_infra::registry::RegistryClient::new(&config).unwrap();

    // Three listing pages at most one per 300 ms: at least 600 ms between the first and last.
    let started = std::time::Instant::now();
    let mut next = None;
    for _ in 0..3 {
        let page = registry.crates_page(next.as_deref(), 5).await.unwrap();
        next = page.meta.next_page;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );

    // A 429 with Retry-After: 2 is waited out, then the page comes.
    stack.registry.set_faults(vec![Fault {
        path_contains: "/api/v1/crates".into(),
        status: Some(429),
        retry_after_secs: Some(2),
        times: Some(1),
        ..Fault::default()
    }]);
    let started = std::time::Instant::now();
    let page = registry.crates_page(None, 5).await.unwrap();
    assert_eq!(page.crates.len(), 5);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stack.registry.stats().faults_applied, 1);
}

/// Sums the samples of a metric in a Prometheus text exposition.
fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_serves_its_figures_as_prometheus_metrics() {
    let stack = TestStack::start().await.unwrap();
    let summary = publish(&stack, "measured", first(3)).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = stack.consumer_config("measured");
    config.consumer.metrics_listen = Some(format!("127.0.0.1:{port}"));
    let consumers = Consumers::start([config]);
    stack.wait_for_run(summary.run_id).await;

    let exposition = quarry_testkit::get_text(format!("http://127.0.0.1:{port}/metrics")).await;
    let stats = consumers.stop().await;

    assert_eq!(
        metric_sum(&exposition, "quarry_consumer_jobs_total"),
        3.0,
        "{exposition}"
    );
    assert_eq!(
        metric_sum(&exposition, "quarry_consumer_job_duration_seconds_count"),
        3.0
    );
    assert!(exposition.contains("quarry_consumer_fetches_total{layer=\"registry\"}"));
    assert_eq!(
        metric_sum(&exposition, "quarry_consumer_fetches_total"),
        (stats.disk_hits + stats.s3_hits + stats.registry_fetches) as f64,
        "the metrics are the figures the consumer reports"
    );
    assert!(metric_sum(&exposition, "quarry_consumer_fetch_bytes_total") > 0.0);
    assert_eq!(
        metric_sum(&exposition, "quarry_consumer_jobs_in_progress"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_s3_down_the_registry_stands_in_and_the_run_completes() {
    let mut stack = TestStack::start().await.unwrap();
    stack.stop_s3();
    let summary = publish(&stack, "no-s3", first(4)).await;
    let consumers = stack.start_consumers(&["without-s3"]);
    stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    assert_eq!(stats.results, 4);
    assert!(
        stats.s3_unavailable >= 4,
        "every fetch noticed S3 was down: {stats:?}"
    );
    assert!(stats.registry_fetches >= 4);
    let store = Store::connect(&stack.config.database).await.unwrap();
    let errors = store
        .outcome_counts(summary.run_id)
        .await
        .unwrap()
        .into_iter()
        .filter(|(outcome, _)| *outcome == quarry_core::job::Outcome::Error)
        .count();
    assert_eq!(errors, 0, "an S3 outage is not the packages' fault");
    // S3 would not take the logs either: PostgreSQL kept them, whole.
    let sql = stack.sql().await.unwrap();
    let kept: i64 = sql
        .query_one(
            "SELECT count(*) FROM results WHERE log_key IS NULL AND log LIKE '%$ cargo%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 4);
    stack.assert_verified("no-s3").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_producer_continues_from_its_last_page() {
    let stack = TestStack::start().await.unwrap();
    let mut config = stack.config.clone();
    config.registry.page_size = 10;
    let run = definition(first(35));

    // Interrupted (as by Ctrl-C) from the start: the page in hand is finished, then it stops.
    let interrupted = CancellationToken::new();
    interrupted.cancel();
    let once = publish_run(&config, "paged", &run, &interrupted)
        .await
        .unwrap();
    assert!(!once.complete);
    assert_eq!((once.pages, once.jobs_queued), (1, 10));
    assert!(
        once.to_string().contains("run the same command again"),
        "{once}"
    );

    // Run again: it continues with the second page and publishes the rest, nothing twice.
    let again = publish_run(&config, "paged", &run, &CancellationToken::new())
        .await
        .unwrap();
    assert!(again.complete && again.resumed);
    assert_eq!((again.pages, again.jobs_queued), (3, 25), "{again}");
    assert_eq!(
        again.jobs_already_queued_or_done, 10,
        "the first invocation's page, not read again"
    );
    assert_eq!(again.jobs_total, 35);
    assert_eq!(ready(&stack, jobs_queue).await, 35);
    let store = Store::connect(&config.database).await.unwrap();
    let progress = store.progress(once.run_id).await.unwrap();
    assert_eq!(progress.total, Some(35));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_regains_a_lost_broker_connection_and_finishes_the_run() {
    let stack = TestStack::start().await.unwrap();
    let summary = publish(&stack, "reconnect", first(60)).await;
    let consumers = stack.start_consumers(&["stubborn"]);
    let store = Store::connect(&stack.config.database).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while store.progress(summary.run_id).await.unwrap().finished == 0 {
        assert!(std::time::Instant::now() < deadline, "no job finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The broker drops the consumer (as in a broker restart) in the middle of the run.
    // The management API learns of connections with a delay (its statistics interval).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stack.close_amqp_connections().await.unwrap() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the consumer's connection never showed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let at_cut = store.progress(summary.run_id).await.unwrap();
    assert!(
        at_cut.finished < 60,
        "the connection must be cut mid-run for this test to mean anything: {at_cut:?}"
    );

    stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    assert!(stats.broker_connections >= 2, "{stats:?}");
    stack.assert_verified("reconnect").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn consumers_register_in_the_fleet_and_are_told_apart() {
    let stack = TestStack::start().await.unwrap();
    let summary = publish(&stack, "fleet", first(4)).await;
    // Two consumers with the same name.
    let consumers = stack.start_consumers(&["twin-name", "twin-name"]);
    stack.wait_for_run(summary.run_id).await;
    let store = Store::connect(&stack.config.database).await.unwrap();
    let epoch = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    let alive = store.fleet(epoch).await.unwrap();
    assert_eq!(alive.len(), 2, "{alive:?}");
    assert!(
        alive
            .iter()
            .all(|m| m.name == "twin-name" && m.stopped_at.is_none())
    );
    assert_ne!(alive[0].id, alive[1].id, "same name, told apart");

    let results = consumers.stop().await.results;
    let stopped = store.fleet(epoch).await.unwrap();
    assert!(
        stopped
            .iter()
            .all(|m| m.stopped_at.is_some() && m.current_jobs.is_empty())
    );
    assert_eq!(
        stopped.iter().map(|m| m.jobs_done as u64).sum::<u64>(),
        results,
        "the last heartbeat carries the final count"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_that_hang_are_cut_short_or_are_rate_limited_are_retried_until_served() {
    let mut stack = TestStack::start().await.unwrap();
    // A download that hangs is abandoned after a second, not waited for.
    stack.config.registry.request_timeout_secs = 1;
    let registry = quarry_infra::registry::RegistryClient::new(&stack.config.registry).unwrap();
    let page = registry.crates_page(None, 3).await.unwrap();
    let names: Vec<String> = page.crates.iter().map(|c| c.name.clone()).collect();
    let once = |name: &str, fault: Fault| Fault {
        path_contains: format!("/crates/{name}/"),
        times: Some(1),
        ..fault
    };
    stack.registry.set_faults(vec![
        once(
            &names[0],
            Fault {
                delay_ms: Some(5_000),
                ..Fault::default()
            },
        ),
        once(
            &names[1],
            Fault {
                truncate_to: Some(100),
                ..Fault::default()
            },
        ),
        once(
            &names[2],
            Fault {
                status: Some(429),
                retry_after_secs: Some(1),
                ..Fault::default()
            },
        ),
    ]);
    let summary = publish(
        &stack,
        "unreliable-downloads",
        Selection::Packages {
            packages: names.clone(),
        },
    )
    .await;
    let consumers = stack.start_consumers(&["persistent"]);
    stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    assert_eq!(stack.registry.stats().faults_applied, 3);
    let sql = stack.sql().await.unwrap();
    for name in &names {
        let outcome: String = sql
            .query_one(
                "SELECT r.outcome FROM results r JOIN jobs j ON j.id = r.job_id
                 WHERE j.crate_name = $1",
                &[name],
            )
            .await
            .unwrap()
            .get(0);
        assert_ne!(outcome, "error", "{name} was retried until served");
    }
    // Retried within the job, by the fetch's own backoff: no attempt had to be given up.
    assert_eq!(stats.attempts_failed, 0, "{stats:?}");
    stack.assert_verified("unreliable-downloads").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_a_job_another_consumer_holds_is_dropped_and_its_lapsed_lease_is_published_again()
{
    let stack = TestStack::start().await.unwrap();
    let summary = publish(&stack, "held", first(1)).await;
    let store = Store::connect(&stack.config.database).await.unwrap();
    // Another consumer took the job and holds its lease (it acked the delivery, as consumers
    // do); then a copy of the message reaches the queue (a sweep racing a hand-over, a
    // producer's republish).
    let (connection, channel) = raw_channel(&stack).await;
    let jobs = format!("{}.jobs", stack.config.rabbitmq.prefix);
    let message = channel
        .basic_get(
            jobs.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the job's message");
    let job = quarry_core::job::Job::from_message(&message.delivery.data).unwrap();
    let other = uuid::Uuid::new_v4();
    let lease = quarry_infra::store::NewLease {
        job: job.id,
        run: job.run_id,
        holder: other,
        consumer: "elsewhere",
        message: &message.delivery.data,
        failed_attempts: 0,
    };
    assert!(
        store
            .take_lease(&lease, Duration::from_secs(600))
            .await
            .unwrap()
    );
    assert!(
        !store
            .take_lease(&lease, Duration::from_secs(600))
            .await
            .unwrap(),
        "a live lease is not taken twice"
    );
    channel
        .basic_publish(
            "".into(),
            jobs.as_str().into(),
            BasicPublishOptions::default(),
            &message.delivery.data,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let consumers = stack.start_consumers(&["bystander"]);
    // The copy is taken and dropped: the job stays the other consumer's.
    for _ in 0..100 {
        if ready(&stack, jobs_queue).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ready(&stack, jobs_queue).await, 0);
    assert_eq!(store.progress(summary.run_id).await.unwrap().finished, 0);
    assert!(
        event_kinds(&store, job.id.0)
            .await
            .iter()
            .all(|k| k != "started")
    );

    // The other consumer dies: its lease lapses, and the bystander's sweeper publishes the job
    // again, which it then runs.
    store.lapse_leases(other, None).await.unwrap();
    stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    assert_eq!(
        (stats.results, stats.duplicates_skipped, stats.leases_lapsed),
        (1, 1, 1),
        "{stats:?}"
    );
    let kinds = event_kinds(&store, job.id.0).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "lease-lapsed").count(),
        1,
        "{kinds:?}"
    );
    assert!(store.leases(summary.run_id).await.unwrap().is_empty());
    stack.assert_verified("held").await;
    connection.close(200, "done".into()).await.unwrap();
}
