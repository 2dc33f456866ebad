//! The services restarted under a running run. Each test runs its own server (this file's
//! process sets the variables that point the test stack at it), so restarting it disturbs no
//! other test.

use std::time::Duration;

use quarry_core::job::Mode;
use quarry_infra::store::Store;
use quarry_producer::publish_run;
use quarry_testkit::private_postgres::PrivatePostgres;
use quarry_testkit::{Services, TestStack, first_crates, local_corpus};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn postgresql_crashing_mid_run_loses_nothing_and_counts_nothing_twice() {
    let postgres = PrivatePostgres::start().unwrap();
    let services = Services {
        database_url: postgres.admin_url(),
        ..Services::from_env()
    };
    let stack = TestStack::start_on(local_corpus().unwrap(), services)
        .await
        .unwrap();
    let definition = first_crates(Mode::Check, 8);
    let summary = publish_run(
        &stack.config,
        "pg-crash",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let consumers = stack.start_consumers(&["through-the-crash-a", "through-the-crash-b"]);
    let store = Store::connect(&stack.config.database).await.unwrap();
    while store.progress(summary.run_id).await.unwrap().finished < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The database goes away mid-run, as a crash would take it, and comes back 3 s later.
    postgres.kill().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    postgres.restart().unwrap();

    stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    eprintln!("{stats:?}");
    let store = Store::connect(&stack.config.database).await.unwrap();
    let progress = store.progress(summary.run_id).await.unwrap();
    assert_eq!((progress.finished, progress.total), (8, Some(8)));
    // Exactly one result recorded per job: a job whose result was committed before the crash
    // and that came back is recognised as done (a duplicate skipped), never recorded again.
    assert_eq!(stats.results, 8, "{stats:?}");
    stack.assert_verified("pg-crash").await;
    drop(stack);
}
