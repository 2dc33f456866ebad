//! Traces: with an OTLP endpoint configured, one job is one trace from the producer that
//! published it to the consumer that ran it, the context carried in the AMQP headers. Its own
//! test binary: tracing is set up once per process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use quarry_core::job::{Experiment, Mode};
use quarry_producer::{RunDefinition, Selection, publish_run};
use quarry_testkit::TestStack;
use tokio_util::sync::CancellationToken;

/// An OTLP/HTTP receiver on loopback, keeping every span posted to `/v1/traces`.
async fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: bytes::Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            let mut kept = kept.lock().unwrap();
            for resource in request.resource_spans {
                for scope in resource.scope_spans {
                    kept.extend(scope.spans);
                }
            }
            axum::http::StatusCode::OK
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/v1/traces"), spans)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

/// Where the traced run's process sends its spans.
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_continues_the_trace_its_producer_started() {
    let (endpoint, spans) = receiver().await;
    // The exporter is configured the standard way, through OTEL_* variables, which is what is
    // tested: they are given to a process of its own (this test binary, running only
    // `traced_run`) rather than set in this one, whose environment no test changes.
    let status = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["traced_run", "--exact", "--ignored", "--nocapture"])
        .env(ENDPOINT, &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "the traced run failed: {status}");
    let named = |name: &str| -> Vec<Span> {
        let spans = spans.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while named("run job").len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let published = named("publish job");
    let ran = named("run job");
    assert_eq!(published.len(), 3, "one producer span per job");
    assert_eq!(ran.len(), 3, "one consumer span per delivery");
    for consumer in &ran {
        let job = attribute(consumer, "job").expect("the consumer's span names its job");
        let producer = published
            .iter()
            .find(|p| attribute(p, "job").as_deref() == Some(job.as_str()))
            .unwrap_or_else(|| panic!("no producer span for job {job}"));
        assert_eq!(
            consumer.trace_id, producer.trace_id,
            "job {job}: the consumer's span is in the producer's trace"
        );
        assert_eq!(
            consumer.parent_span_id, producer.span_id,
            "job {job}: the producer's span is its parent"
        );
    }
    let traces: std::collections::HashSet<_> = published.iter().map(|s| &s.trace_id).collect();
    assert_eq!(traces.len(), 3, "one trace per job");
}

/// The run whose traces `a_consumer_continues_the_trace_its_producer_started` checks: three jobs
/// published and run in this process, its exporter configured by the OTEL_* variables that test
/// starts it with. Run alone, without them, there is nothing to trace, and it says so.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a process of a_consumer_continues_the_trace_its_producer_started, which sets OTEL_*"]
async fn traced_run() {
    if std::env::var_os(ENDPOINT).is_none() {
        eprintln!("{ENDPOINT} is not set: run a_consumer_continues_the_trace_its_producer_started");
        return;
    }
    let _telemetry = quarry_infra::telemetry::init("quarry-test");
    assert!(quarry_infra::telemetry::tracing_enabled());

    let corpus = quarry_registry::Corpus::load(&[quarry_testkit::crates_dir()])
        .unwrap()
        .closed();
    let packages: Vec<String> = corpus.crates.keys().take(3).cloned().collect();
    let stack = TestStack::start_with(corpus).await.unwrap();
    let definition = RunDefinition {
        patch: None,
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: Experiment {
            mode: Mode::Command,
            timeout_secs: 60,
            fresh: true,
            memory_limit_mb: 1024,
            cap_lints: None,
            command: Some(vec!["true".to_owned()]),
        },
        selection: Selection::Packages { packages },
        filter: Default::default(),
        toolchain_files: Vec::new(),
    };
    let summary = publish_run(
        &stack.config,
        "traced",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.jobs_queued, 3);
    let fleet = stack.start_consumers(&["traced"]);
    stack.wait_for_run(summary.run_id).await;
    fleet.stop().await;

    tokio::task::spawn_blocking(quarry_infra::telemetry::flush)
        .await
        .unwrap();
}
