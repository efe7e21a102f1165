//! The process's logs and traces: `tracing` events to stderr, filtered by
//! `RUST_LOG`, and, when an OTLP endpoint is configured, the spans of the
//! [`TRACE_TARGET`] target exported over OTLP/gRPC as OpenTelemetry spans
//! through `tracing-opentelemetry`.
//!
//! Spans of that target are traces, never logs: the log layer never sees
//! them, and without an endpoint no layer wants them, so each such
//! `info_span!` is a disabled callsite and costs one cached interest check
//! (the proxy's request path asks `enabled!` first and does nothing more).
//! Those spans are: a span per proxied request (the data plane's route
//! stage), a span per admin API write and per store commit, and a span per
//! discovery push.
//!
//! The OpenTelemetry SDK's own variables apply: `OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` (parent-based, always on
//! by default), `OTEL_BSP_SCHEDULE_DELAY` and the other batch settings.

use anyhow::Context as _;
use clap::Args;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, fmt};

/// The target of the spans that are traces (the literal the crates' spans
/// name: `info_span!(target: "prism_trace", …)`).
pub const TRACE_TARGET: &str = "prism_trace";

/// Where a serving command sends its traces.
#[derive(Args, Clone, Debug)]
pub struct TraceArgs {
    /// OTLP/gRPC collector to export traces to (`http://host:4317`, plain
    /// gRPC); no traces are recorded without one.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Where a serving command's traces go, and the service they are of.
#[derive(Clone, Debug)]
pub struct Otlp {
    pub endpoint: String,
    pub service: &'static str,
}

impl TraceArgs {
    /// The export of `service`'s traces, if an endpoint is configured.
    pub fn otlp(&self, service: &'static str) -> Option<Otlp> {
        let endpoint = self.otlp_endpoint.clone()?;
        Some(Otlp { endpoint, service })
    }
}

/// The installed trace pipeline, flushed by [`Traces::shutdown`].
#[must_use = "shut it down at exit, or the last spans are lost"]
pub struct Traces(Option<Pipeline>);

/// The tracer provider, and the thread whose runtime its exporter's gRPC
/// channel lives on: exports never run on the proxy's workers.
struct Pipeline {
    provider: SdkTracerProvider,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Installs the global subscriber: logs at `default_level` unless
/// `RUST_LOG` says otherwise, and traces to `otlp` if given.
pub fn init(default_level: &str, otlp: Option<Otlp>) -> anyhow::Result<Traces> {
    let logs = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_level))
        .add_directive(format!("{TRACE_TARGET}=off").parse()?);
    let logs = fmt::layer().with_writer(std::io::stderr).with_filter(logs);
    let Some(Otlp { endpoint, service }) = otlp else {
        tracing_subscriber::registry().with(logs).try_init()?;
        return Ok(Traces(None));
    };
    // Plain gRPC only: a collector over TLS is reached through a local one
    // (an agent or sidecar), as the exporter is built without TLS.
    if !endpoint.starts_with("http://") {
        anyhow::bail!(
            "--otlp-endpoint `{endpoint}`: expected an http:// URL of an OTLP/gRPC collector, such as http://127.0.0.1:4317 (TLS to a collector is not supported)"
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the trace exporter's runtime")?;
    let exporter = {
        let _on = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&endpoint)
            .build()
            .with_context(|| format!("cannot export traces to --otlp-endpoint {endpoint}"))?
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("prism-otlp".into())
        .spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
        })
        .context("cannot start the trace exporter's thread")?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    // Spans are batched on the SDK's own thread, which exports through the
    // channel on the runtime above.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("prism"))
        // Attributes are what the spans record, nothing of the tracing
        // machinery (source file, thread, level).
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_filter(Targets::new().with_target(TRACE_TARGET, Level::INFO));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()?;
    Ok(Traces(Some(Pipeline {
        provider,
        stop,
        thread,
    })))
}

impl Traces {
    /// Exports the spans still queued, then stops the exporter's thread.
    pub fn shutdown(self) {
        let Some(Pipeline {
            provider,
            stop,
            thread,
        }) = self.0
        else {
            return;
        };
        if let Err(error) = provider.shutdown() {
            tracing::warn!(%error, "Failed to export the last spans.");
        }
        let _ = stop.send(());
        let _ = thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_that_is_no_plain_grpc_url_is_refused_by_name() {
        for endpoint in ["https://collector:4317", "collector:4317", "not a url"] {
            let otlp = Otlp {
                endpoint: endpoint.into(),
                service: "prism",
            };
            let Err(error) = init("warn", Some(otlp)) else {
                panic!("{endpoint} accepted");
            };
            let message = error.to_string();
            assert!(message.contains("--otlp-endpoint"), "{message}");
            assert!(message.contains(endpoint), "{message}");
        }
    }
}
