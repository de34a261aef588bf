//! Spans over OTLP/HTTP (`tracing.otlp_endpoint`): one span per call, the gateway's hop of the
//! call's trace, exported in batches by the OpenTelemetry SDK's batch processor (its own
//! thread: the request path only hands it a finished span).
//!
//! The span's ids are the ones the backend was given in `ext.traceparent` (see
//! [`crate::trace`]), so the backend's spans are its children; its parent is the caller's span
//! when the call came with a trace context. Spans are built whole when the call ends (their ids
//! are chosen before, by the gateway), and handed to the processor directly.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::trace::TraceParent;

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

struct Exporter {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
}

/// Starts exporting to the OTLP/HTTP collector at `endpoint` (a base URL such as
/// `http://127.0.0.1:4318`, to which `/v1/traces` is added; or the full traces URL). Spans leave
/// in JSON batches at least once a second.
pub fn start(endpoint: &str) -> Result<(), String> {
    let url = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
        endpoint.to_string()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("tracing.otlp_endpoint: {e}"))?;
    let mut processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(500))
                .with_max_queue_size(65_536)
                .build(),
        )
        .build();
    processor.set_resource(
        &Resource::builder_empty()
            .with_service_name("duplex-gateway")
            .build(),
    );
    let scope = InstrumentationScope::builder("duplex-gateway")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    EXPORTER
        .set(Exporter { processor, scope })
        .map_err(|_| "the OTLP exporter is already running".to_string())
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// What one call's span says.
pub struct CallSpan<'a> {
    /// The gateway's hop: its trace id, span id and flags.
    pub hop: TraceParent,
    /// The caller's span, when the call came with a trace context.
    pub parent: Option<[u8; 8]>,
    /// When the call arrived and when it ended.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// The endpoint path.
    pub endpoint: &'a str,
    /// The method.
    pub method: &'a str,
    /// `http` or `ws`.
    pub transport: &'static str,
    /// The HTTP status (HTTP calls).
    pub status: Option<u16>,
    /// The error code (a WebSocket call that ended with an error).
    pub code: Option<i64>,
    /// The backend that served it (its id in the pool).
    pub backend: Option<&'a str>,
    /// This node.
    pub node: &'a str,
}

/// Hands one finished call's span to the exporter (nothing when it is off).
pub fn export(call: CallSpan<'_>) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    let mut attributes = vec![
        KeyValue::new("duplex.endpoint", call.endpoint.to_string()),
        KeyValue::new("duplex.method", call.method.to_string()),
        KeyValue::new("duplex.transport", call.transport),
        KeyValue::new("duplex.node", call.node.to_string()),
    ];
    if let Some(status) = call.status {
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
    }
    if let Some(code) = call.code {
        attributes.push(KeyValue::new("duplex.error_code", code));
    }
    if let Some(backend) = call.backend {
        attributes.push(KeyValue::new("duplex.backend", backend.to_string()));
    }
    let failed = call.status.is_some_and(|s| s >= 500) || call.code.is_some();
    let span = SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(call.hop.trace_id),
            SpanId::from_bytes(call.hop.span_id),
            TraceFlags::new(call.hop.flags),
            false,
            TraceState::default(),
        ),
        parent_span_id: call.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: call.parent.is_some(),
        span_kind: SpanKind::Server,
        name: Cow::Owned(format!("{} {}", call.endpoint, call.method)),
        start_time: call.start,
        end_time: call.end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if failed {
            Status::error("the call failed")
        } else {
            Status::Unset
        },
        instrumentation_scope: exporter.scope.clone(),
    };
    exporter.processor.on_end(span);
}

/// Sends what is queued (the gateway is stopping).
pub fn flush() {
    if let Some(exporter) = EXPORTER.get() {
        let _ = exporter.processor.force_flush();
    }
}
