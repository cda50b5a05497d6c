//! Logging and tracing.
//!
//! Logs: `RUST_LOG` filters (default `info`); `DROVER_LOG_FORMAT=json` for JSON lines.
//!
//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, the
//! node's `tracing` spans are exported over OTLP by a batch exporter: protocol from
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or `grpc`), resource from
//! `OTEL_SERVICE_NAME` (default `drover`) and `OTEL_RESOURCE_ATTRIBUTES`. Every log line then
//! carries the `trace_id` of the span it was written in. Without the variables no layer is
//! installed: nothing is exported and nothing is paid for.

use std::fmt;
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The installed trace pipeline; [`Telemetry::shutdown`] flushes what is still batched.
pub(crate) struct Telemetry {
    /// `None` when no OTLP endpoint is configured.
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes the spans still in the batch and stops the exporter. Call once, as the node
    /// exits (it blocks for at most the exporter's timeout).
    pub(crate) async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("warning: flushing the trace exporter failed: {err}"),
            Err(err) => eprintln!("warning: flushing the trace exporter failed: {err}"),
        }
    }
}

/// Installs the global subscriber (and, with the OTLP env, the trace exporter). Must run inside
/// the tokio runtime: the exporters' I/O runs on it.
pub(crate) fn init() -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("DROVER_LOG_FORMAT").is_ok_and(|f| f == "json");
    let provider = match otlp_configured().then(build_provider) {
        Some(Ok(provider)) => Some(provider),
        Some(Err(err)) => {
            // A broken telemetry setting does not stop a node that can otherwise work.
            eprintln!("warning: OTLP trace export disabled: {err:#}");
            None
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("drover")));
    let traced = provider.is_some();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ));
    let fmt = if json {
        fmt.event_format(WithTraceId {
            inner: tracing_subscriber::fmt::format().json(),
            json: true,
            enabled: traced,
        })
        .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
        .boxed()
    } else {
        fmt.event_format(WithTraceId {
            inner: tracing_subscriber::fmt::format(),
            json: false,
            enabled: traced,
        })
        .boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Telemetry { provider }
}

/// Colour codes only for a person at a terminal: never in a file or a pipe, never with
/// `NO_COLOR` set to anything but the empty string (<https://no-color.org>).
fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()))
}

fn build_provider() -> anyhow::Result<SdkTracerProvider> {
    // W3C `traceparent` is what job headers and the http step carry.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "http/protobuf".to_owned());
    let exporter = match protocol.trim() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(Protocol::Grpc)
            .build()?,
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(ReqwestClient::new()?)
            .build()?,
        other => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (http/protobuf or grpc)"
        ),
    };
    let mut resource = Resource::builder();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    if !named {
        resource = resource.with_service_name("drover");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        // Random ids, except an instance root span's, derived from the instance id.
        .with_id_generator(drover_bus::trace::TraceIds::default())
        .build();
    // The instance root spans are recorded through the global tracer.
    opentelemetry::global::set_tracer_provider(provider.clone());
    drover_bus::trace::enable();
    Ok(provider)
}

/// The http/protobuf exporter's client: the workspace's reqwest 0.12 (rustls) rather than the
/// reqwest 0.13 `opentelemetry-otlp` would otherwise build. The batch processor runs on its own
/// thread, outside the runtime, so each request is spawned onto the runtime it was built in.
#[derive(Debug)]
struct ReqwestClient {
    client: reqwest::Client,
    /// The node's runtime: reqwest's connections live there.
    runtime: tokio::runtime::Handle,
}

impl ReqwestClient {
    fn new() -> anyhow::Result<Self> {
        let timeout = std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT")
            .ok()
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(10), Duration::from_millis);
        Ok(Self {
            client: reqwest::Client::builder().timeout(timeout).build()?,
            runtime: tokio::runtime::Handle::try_current()?,
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ReqwestClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<bytes::Bytes>,
    ) -> Result<opentelemetry_http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let response = client.execute(request).await?;
            let mut builder = opentelemetry_http::Response::builder().status(response.status());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let body = response.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(builder.body(body)?)
        });
        sent.await?
    }
}

/// The fmt layer's event format with the current span's `trace_id` added (a `trace_id=…`
/// prefix in text, a `"trace_id"` key in JSON) when the span is being traced.
struct WithTraceId<F> {
    inner: F,
    json: bool,
    /// Off without an exporter: no span has a trace id then.
    enabled: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The otel layer activates a span's context on entry, so the current otel context is
        // the entered span's.
        let trace_id = self
            .enabled
            .then(|| {
                let cx = opentelemetry::Context::current();
                let span = cx.span();
                let span_context = span.span_context();
                span_context.is_valid().then(|| span_context.trace_id())
            })
            .flatten();
        let Some(trace_id) = trace_id else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "trace_id={trace_id} ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"trace_id\":\"{trace_id}\",{rest}"),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::colour;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(
            !colour(false, None),
            "a file or a pipe gets no colour codes"
        );
    }
}
