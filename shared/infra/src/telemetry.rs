//! Logging and tracing set-up shared by the binaries.
//!
//! Logs: human-readable lines on stderr, filtered by `RUST_LOG` (default `info`). Stdout is left
//! to each command's outcome output.
//!
//! Traces: when an OTLP endpoint is configured the standard way (`OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, OTLP over HTTP with protobuf), `tracing` spans are
//! exported as OpenTelemetry spans too. A job is one trace from producer to result: the producer
//! starts it when it publishes the job and puts its W3C trace context in the message's headers
//! ([`inject`]); the consumer continues it from there ([`extract`]), through redeliveries and
//! retries, since the headers travel with the message.

use std::sync::OnceLock;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Flushes the spans still buffered when dropped: hold it for the life of `main`.
#[must_use = "spans are flushed when this is dropped"]
pub struct Telemetry(());

impl Drop for Telemetry {
    fn drop(&mut self) {
        flush();
    }
}

/// Sets up logging, and tracing when an OTLP endpoint is configured. `service` names the
/// component in traces (`OTEL_SERVICE_NAME` overrides it).
pub fn init(service: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(
            "info,aws_smithy_runtime=warn,aws_config=warn,tokio_postgres=warn,refinery_core=warn",
        )
    });
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let traces = otlp_endpoint_configured()
        .then(|| tracer_provider(service))
        .and_then(|built| match built {
            Ok(provider) => Some(provider),
            Err(err) => {
                eprintln!("warning: traces are not exported: {err:#}");
                None
            }
        })
        .map(|provider| {
            let tracer = provider.tracer(service);
            let _ = PROVIDER.set(provider);
            tracing_opentelemetry::layer().with_tracer(tracer)
        });
    // A second initialisation (tests run several binaries' mains in one process) is harmless.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init();
    Telemetry(())
}

/// A binary's `main`: telemetry set up for `service` for as long as `run` runs (its spans
/// flushed at the end), and an error printed with its causes, exiting 1.
pub async fn main<F>(service: &'static str, run: impl FnOnce() -> F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<std::process::ExitCode>>,
{
    let _telemetry = init(service);
    match run().await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Whether spans are exported: producers only start per-job traces when someone reads them.
pub fn tracing_enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Exports the spans buffered so far.
pub fn flush() {
    if let Some(provider) = PROVIDER.get()
        && let Err(err) = provider.force_flush()
    {
        eprintln!("warning: cannot export traces: {err}");
    }
}

fn otlp_endpoint_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

fn tracer_provider(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    // The exporter reads the endpoint, headers and timeout from the standard OTEL_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.into()))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Puts the trace context of `span` into AMQP message headers (`traceparent`, `tracestate`).
pub fn inject(span: &tracing::Span, headers: &mut FieldTable) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Makes `span` continue the trace whose context the message's headers carry, if any.
pub fn extract(headers: Option<&FieldTable>, span: &tracing::Span) {
    let Some(headers) = headers else { return };
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    // Only fails when the span is disabled (traces are off): nothing to continue then.
    let _ = span.set_parent(context);
}

struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0
            .insert(ShortString::from(key), AMQPValue::LongString(value.into()));
    }
}

struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}
