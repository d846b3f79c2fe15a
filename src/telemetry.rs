//! Logs and traces: span names and attribute keys in one place, the OTLP exporters, and W3C
//! trace-context handling.
//!
//! Input: the standard `OTEL_*` environment (or an explicit endpoint in tests). Output: two
//! tracers. Lytics-call spans have their own always-on provider with a large span queue, so the
//! high-rate ingest spans (sampled, parent-based) can never crowd them out. Without an endpoint no
//! exporter runs and no span is built. Secrets never become attributes: callers pass only URLs
//! built without tokens.

use opentelemetry::trace::{
    Link, Span, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

/// Span and attribute names.
pub mod names {
    /// The span of one accepted ingest call.
    pub const SPAN_INGEST: &str = "lytics_relay.ingest";
    /// The span of one Lytics collect call (HTTP client conventions: `{method} {route}`).
    pub const SPAN_LYTICS_COLLECT: &str = "POST /collect/json/{stream}";
    /// HTTP client semantic conventions.
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
    /// The host.
    pub const SERVER_ADDRESS: &str = "server.address";
    /// The port.
    pub const SERVER_PORT: &str = "server.port";
    /// The URL, never with a token.
    pub const URL_FULL: &str = "url.full";
    /// The status.
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    /// The failure class.
    pub const ERROR_TYPE: &str = "error.type";
    /// The attempt number (0 for the first try), per the HTTP conventions.
    pub const HTTP_REQUEST_RESEND_COUNT: &str = "http.request.resend_count";
    /// Lytics attributes.
    pub const LYTICS_STREAM: &str = "lytics.stream";
    /// Records in the batch.
    pub const LYTICS_BATCH_SIZE: &str = "lytics.batch.size";
    /// `data.message_count` of the answer.
    pub const LYTICS_MESSAGE_COUNT: &str = "lytics.message_count";
    /// `data.rejected_count` of the answer.
    pub const LYTICS_REJECTED_COUNT: &str = "lytics.rejected_count";
    /// The attempt number (1-based) of the batch's records.
    pub const LYTICS_ATTEMPT: &str = "lytics.attempt";
    /// The integration id.
    pub const LYTICS_INTEGRATION: &str = "lytics.integration";
    /// The rule-set version of the records.
    pub const LYTICS_RULES_VERSION: &str = "lytics.rules_version";
    /// `true` on a `dryrun` call (a probe of the integration's settings, with no records).
    pub const LYTICS_DRYRUN: &str = "lytics.dryrun";
    /// Ingest attributes.
    pub const INGEST_SOURCE: &str = "lytics_relay.source";
    /// Events in the call.
    pub const INGEST_EVENTS: &str = "lytics_relay.events";
    /// Records queued.
    pub const INGEST_RECORDS: &str = "lytics_relay.records";
}

/// The most links a collect span carries; a batch of 500 records from 500 events links to the
/// first 128 distinct ingest spans.
pub const MAX_LINKS: usize = 128;

/// Tracers, or nothing when no exporter is configured.
#[derive(Clone, Default)]
pub struct Telemetry {
    inner: Option<Tracers>,
}

#[derive(Clone)]
struct Tracers {
    calls_provider: SdkTracerProvider,
    ingest_provider: SdkTracerProvider,
    calls: SdkTracer,
    ingest: SdkTracer,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

/// Tracer set-up failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP trace exporter: {0}")]
pub struct TelemetryError(String);

impl Telemetry {
    /// No tracing.
    pub fn disabled() -> Self {
        Telemetry { inner: None }
    }

    /// Exports over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and `OTEL_TRACES_EXPORTER` is not `none`;
    /// the exporter reads the other `OTEL_*` variables itself. Must run inside a Tokio runtime.
    pub fn from_env(call_queue: usize, ingest_ratio: f64) -> Result<Self, TelemetryError> {
        let set = |k: &str| std::env::var(k).map(|v| !v.trim().is_empty()).unwrap_or(false);
        let disabled = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
        if disabled || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
            tracing::info!("traces are not exported (set OTEL_EXPORTER_OTLP_ENDPOINT to export them)");
            return Ok(Self::disabled());
        }
        // Where to, without credentials: not the headers, nor a user and password in the URL.
        let endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .and_then(|v| v.trim().parse::<http::Uri>().ok())
            .map(|u| {
                let host = u.host().unwrap_or_default();
                let port = u.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
                format!("{}://{host}{port}{}", u.scheme_str().unwrap_or("http"), u.path())
            })
            .unwrap_or_default();
        // Only OTLP/gRPC is built in: say so rather than export to a port that speaks HTTP.
        for key in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Ok(v) = std::env::var(key)
                && !v.trim().is_empty()
                && v.trim() != "grpc"
            {
                tracing::warn!(
                    variable = key,
                    value = %v.trim(),
                    "only OTLP/gRPC export is supported: this protocol is ignored; point the endpoint at the collector's gRPC port (4317 by default)"
                );
            }
        }
        let telemetry = Self::build(None, call_queue, ingest_ratio)?;
        tracing::info!(
            %endpoint,
            ingest_sample_ratio = ingest_ratio,
            "exporting traces over OTLP/gRPC: a span for every Lytics call, sampled ingest spans"
        );
        Ok(telemetry)
    }

    /// Exports to `endpoint` (for tests and explicit set-ups).
    pub fn with_endpoint(
        endpoint: &str,
        call_queue: usize,
        ingest_ratio: f64,
    ) -> Result<Self, TelemetryError> {
        Self::build(Some(endpoint), call_queue, ingest_ratio)
    }

    fn build(endpoint: Option<&str>, call_queue: usize, ingest_ratio: f64) -> Result<Self, TelemetryError> {
        let exporter = || {
            let b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            let b = match endpoint {
                Some(e) => b.with_endpoint(e),
                None => b,
            };
            b.build().map_err(|e| TelemetryError(e.to_string()))
        };
        // `OTEL_SERVICE_NAME`, or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, names the
        // service (the builder reads both); `lytics-relay` otherwise.
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                .is_ok_and(|v| v.split(',').any(|kv| kv.trim().starts_with("service.name=")));
        let resource = if named {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name("lytics-relay").build()
        };
        let processor = |queue: usize| -> Result<BatchSpanProcessor, TelemetryError> {
            Ok(BatchSpanProcessor::builder(exporter()?)
                .with_batch_config(
                    BatchConfigBuilder::default()
                        .with_max_queue_size(queue)
                        .with_max_export_batch_size(512)
                        .with_scheduled_delay(std::time::Duration::from_millis(500))
                        .build(),
                )
                .build())
        };
        let calls_provider = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_sampler(Sampler::AlwaysOn)
            .with_span_processor(processor(call_queue)?)
            .build();
        let ingest_provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ingest_ratio,
            ))))
            .with_span_processor(processor(8192)?)
            .build();
        Ok(Telemetry {
            inner: Some(Tracers {
                calls: calls_provider.tracer("lytics-relay.delivery"),
                ingest: ingest_provider.tracer("lytics-relay.ingest"),
                calls_provider,
                ingest_provider,
            }),
        })
    }

    /// True when spans are exported.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts an ingest span under the caller's `traceparent`, if any. Returns the span and the
    /// `traceparent` that records should carry (the span's own, or the caller's when tracing is
    /// off).
    pub fn start_ingest(
        &self,
        parent: Option<&str>,
        attrs: Vec<KeyValue>,
    ) -> (Option<opentelemetry_sdk::trace::Span>, Option<String>) {
        let Some(t) = &self.inner else {
            return (
                None,
                parent.and_then(parse_traceparent).map(|c| format_traceparent(&c)),
            );
        };
        let cx = match parent.and_then(parse_traceparent) {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let span = t
            .ingest
            .span_builder(names::SPAN_INGEST)
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(&t.ingest, &cx);
        let tp = format_traceparent(span.span_context());
        (Some(span), Some(tp))
    }

    /// Starts a Lytics-call span linked to the ingest spans of its records.
    pub fn start_call<'a>(
        &self,
        traceparents: impl Iterator<Item = &'a str>,
        attrs: Vec<KeyValue>,
    ) -> Option<CallSpan> {
        let t = self.inner.as_ref()?;
        let mut links: Vec<Link> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for tp in traceparents {
            if links.len() >= MAX_LINKS {
                break;
            }
            if let Some(sc) = parse_traceparent(tp)
                && seen.insert((sc.trace_id(), sc.span_id()))
            {
                links.push(Link::with_context(sc));
            }
        }
        Some(CallSpan {
            span: t
                .calls
                .span_builder(names::SPAN_LYTICS_COLLECT)
                .with_kind(SpanKind::Client)
                .with_links(links)
                .with_attributes(attrs)
                .start(&t.calls),
            ended: false,
        })
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(&self) {
        if let Some(t) = &self.inner {
            let _ = t.calls_provider.force_flush();
            let _ = t.ingest_provider.force_flush();
            let _ = t.calls_provider.shutdown();
            let _ = t.ingest_provider.shutdown();
        }
    }
}

/// A Lytics call's span. Ended by [`CallSpan::end`] once the answer is on it; a call cut off
/// before that (its task stopped at shutdown) ends it as failed, `error.type` `cancelled`,
/// where a plain span would be exported with no status, looking like a success.
pub struct CallSpan {
    span: opentelemetry_sdk::trace::Span,
    ended: bool,
}

impl CallSpan {
    /// The span, to put the answer on.
    pub fn span(&mut self) -> &mut opentelemetry_sdk::trace::Span {
        &mut self.span
    }

    /// Ends the span as it stands.
    pub fn end(mut self) {
        self.ended = true;
        self.span.end();
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        if !self.ended {
            fail_span(
                &mut self.span,
                "cancelled",
                "the call was cut off before Lytics answered (the relay stopped); its records stay queued"
                    .into(),
            );
            self.span.end();
        }
    }
}

/// Ends a span with an error status.
pub fn fail_span(span: &mut opentelemetry_sdk::trace::Span, error_type: &str, message: String) {
    span.set_attribute(KeyValue::new(names::ERROR_TYPE, error_type.to_string()));
    span.set_status(Status::error(message));
}

/// Parses a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Formats a span context as a W3C `traceparent`.
pub fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Sets up logging: `RUST_LOG` filters (default `info`), text or JSON lines on stderr. The
/// OpenTelemetry exporter's own warnings and errors (one per failed export while the collector
/// is down) pass at most once every 30 s.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::filter::{FilterExt as _, dynamic_filter_fn};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    static EXPORTER_LINES: Throttle = Throttle::new(30_000);
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // Asked at every line (a plain `filter_fn` is asked once per call site and cached).
        .and(dynamic_filter_fn(|m, _| {
            !exporter_problem(m.target(), *m.level()) || EXPORTER_LINES.pass().is_some()
        }));
    // Colours only for a person at a terminal, never into a log file or a journal.
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    let _ = if json {
        registry.with(layer.json().with_filter(filter)).try_init()
    } else {
        registry.with(layer.with_filter(filter)).try_init()
    };
}

/// Whether a log line is a warning or error of the OpenTelemetry SDK or exporter.
fn exporter_problem(target: &str, level: tracing::Level) -> bool {
    target.starts_with("opentelemetry") && level <= tracing::Level::WARN
}

/// Lets a log line that can repeat many times a second (a store out of reach, a full queue)
/// through at most once per period; [`Throttle::pass`] says how many it held back meanwhile.
#[derive(Debug)]
pub struct Throttle {
    period_ms: i64,
    last_ms: std::sync::atomic::AtomicI64,
    held: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// At most one line per `period_ms`.
    pub const fn new(period_ms: i64) -> Self {
        Throttle {
            period_ms,
            last_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when this line may go out, else `None`.
    pub fn pass(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = crate::timefmt::now_ms();
        let last = self.last_ms.load(Relaxed);
        if now.saturating_sub(last) >= self.period_ms
            && self.last_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
        {
            Some(self.held.swap(0, Relaxed))
        } else {
            self.held.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp).unwrap();
        assert!(sc.is_sampled());
        assert_eq!(format_traceparent(&sc), tp);
        assert!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(parse_traceparent("junk").is_none());
    }

    #[test]
    fn only_the_exporters_warnings_and_errors_are_throttled() {
        assert!(exporter_problem("opentelemetry_sdk", tracing::Level::ERROR));
        assert!(exporter_problem("opentelemetry-otlp", tracing::Level::WARN));
        assert!(!exporter_problem("opentelemetry_sdk", tracing::Level::INFO));
        assert!(!exporter_problem("lytics_relay::delivery", tracing::Level::ERROR));
    }

    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let t = Throttle::new(60_000);
        assert_eq!(t.pass(), Some(0));
        assert_eq!(t.pass(), None);
        assert_eq!(t.pass(), None);
        // A period later (here: none at all), the next line says how many were held back.
        let t0 = Throttle::new(0);
        assert_eq!(t0.pass(), Some(0));
        assert_eq!(t0.pass(), Some(0));
        t.last_ms.store(i64::MIN, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(t.pass(), Some(2));
    }
}
