//! Every connection over TLS: PostgreSQL that rejects plain TCP connections, RabbitMQ with only
//! an `amqps` listener, and S3 behind HTTPS, all with certificates from a CA of the test's own.
//! A run goes through end to end once the clients are told to trust that CA, and every client
//! refuses the servers, with an error naming the certificate, while they are not.
//!
//! This file's process points the test stack at its own servers, so it holds one test.

use quarry_core::job::Mode;
use quarry_infra::config::Secret;
use quarry_infra::queue::Broker;
use quarry_infra::s3::Bucket;
use quarry_infra::store::Store;
use quarry_producer::publish_run;
use quarry_testkit::private_postgres::PrivatePostgres;
use quarry_testkit::private_rabbitmq::PrivateRabbitMq;
use quarry_testkit::tls::{TestCertificates, tls_proxy};
use quarry_testkit::{Services, TestStack, first_crates, local_corpus};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn a_run_goes_through_with_every_connection_over_verified_tls() {
    let certificates = TestCertificates::generate().unwrap();
    let postgres = PrivatePostgres::start_with_tls(
        &certificates.server_cert_pem,
        &certificates.server_key_pem,
    )
    .unwrap();
    let broker = PrivateRabbitMq::start_with_tls(
        &certificates.server_cert(),
        &certificates.server_key(),
        &certificates.ca_file(),
    )
    .unwrap();
    let services = Services {
        database_url: postgres.admin_url(),
        amqp_url: broker.amqp_url(),
        rabbitmq_api: broker.management_api(),
    };
    let mut stack = TestStack::start_on(local_corpus().unwrap(), services)
        .await
        .unwrap();

    // The stack's database over TCP with TLS required, and its S3 server behind HTTPS.
    let database_url: url::Url = stack.config.database.url.expose().parse().unwrap();
    let database = database_url.path().trim_start_matches('/').to_owned();
    let plain_url = format!("postgres://postgres@127.0.0.1:{}/{database}", postgres.port);
    stack.config.database.url = Secret::new(format!("{plain_url}?sslmode=verify-full"));
    let s3_addr = stack
        .config
        .s3
        .endpoint
        .clone()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (https_addr, proxy) = tls_proxy(&certificates, s3_addr).await.unwrap();
    stack.config.s3.endpoint = Some(format!("https://{https_addr}"));
    assert!(stack.config.rabbitmq.url.expose().starts_with("amqps://"));

    // Not yet trusting the CA, every client refuses its server.
    let refused = format!(
        "{:#}",
        Store::connect(&stack.config.database).await.err().unwrap()
    );
    eprintln!("{refused}");
    assert!(refused.contains("certificate"), "{refused}");
    let refused = format!(
        "{:#}",
        Broker::connect(&stack.config.rabbitmq).await.err().unwrap()
    );
    eprintln!("{refused}");
    assert!(refused.contains("certificate"), "{refused}");
    let bucket = Bucket::new(&stack.config.s3).unwrap();
    let refused = format!("{:#}", bucket.ensure_exists().await.err().unwrap());
    eprintln!("{refused}");
    assert!(refused.contains("certificate"), "{refused}");
    // And the database turns away a plain connection.
    let mut plain = stack.config.database.clone();
    plain.url = Secret::new(plain_url);
    let refused = format!("{:#}", Store::connect(&plain).await.err().unwrap());
    eprintln!("{refused}");
    assert!(refused.contains("no encryption"), "{refused}");

    // Told to trust it, they connect, and a run goes through.
    stack.config.database.ca_file = Some(certificates.ca_file());
    stack.config.rabbitmq.ca_file = Some(certificates.ca_file());
    stack.config.s3.ca_file = Some(certificates.ca_file());
    let definition = first_crates(Mode::Check, 3);
    let summary = publish_run(&stack.config, "tls", &definition, &CancellationToken::new())
        .await
        .unwrap();
    let consumers = stack.start_consumers(&["over-tls"]);
    let progress = stack.wait_for_run(summary.run_id).await;
    let stats = consumers.stop().await;
    assert_eq!((progress.finished, progress.total), (3, Some(3)));
    assert_eq!(stats.results, 3, "{stats:?}");
    // The logs went to S3 over HTTPS; verify writes the report, reading them back.
    stack.assert_verified("tls").await;
    proxy.abort();
    drop(stack);
}
