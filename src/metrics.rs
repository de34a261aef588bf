//! Every Prometheus metric of the gateway, defined once, in the default registry of the
//! `prometheus` crate (which the metrics listener serves).
//!
//! Label values are endpoint paths that have (or had) a backend, fixed reason words and status
//! codes: never a token, a secret or anything else a peer chose freely.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
    HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
};

/// All metrics, created on first use.
pub struct Metrics {
    /// `duplex_gateway_backends{endpoint}`
    pub backends: IntGaugeVec,
    /// `duplex_gateway_clients{endpoint}`
    pub clients: IntGaugeVec,
    /// `duplex_gateway_pending_calls{endpoint}`
    pub pending_calls: IntGaugeVec,
    /// `duplex_gateway_messages_total{endpoint,direction}`
    pub messages: IntCounterVec,
    /// `duplex_gateway_dropped_messages_total{endpoint,reason}`
    pub dropped: IntCounterVec,
    /// `duplex_gateway_http_requests_total{endpoint,code}`
    pub http_requests: IntCounterVec,
    /// `duplex_gateway_http_request_duration_seconds{endpoint}`
    pub http_duration: HistogramVec,
    /// `duplex_gateway_rejected_requests_total{reason}`
    pub rejected: IntCounterVec,
    /// `duplex_gateway_calls_total{endpoint,method,code}`: calls that reached a backend, by how
    /// they ended (`ok`, or the error code).
    pub calls: IntCounterVec,
    /// `duplex_gateway_call_duration_seconds{endpoint,method}`
    pub call_duration: HistogramVec,
    /// `duplex_gateway_config_reloads_total{result}`
    pub reloads: IntCounterVec,
    /// `duplex_gateway_config_last_reload_success_timestamp_seconds`
    pub last_reload_success: IntGauge,
    /// `duplex_gateway_backend_failovers_total{endpoint}`
    pub failovers: IntCounterVec,
    /// `duplex_gateway_cluster_nodes`: nodes this node hears, itself included (1 alone).
    pub cluster_nodes: IntGauge,
    /// `duplex_gateway_cluster_connected`: 1 while the cluster link to NATS is up and usable.
    pub cluster_connected: IntGauge,
    /// `duplex_gateway_cluster_messages_total{direction}` (`out`, `in`).
    pub cluster_messages: IntCounterVec,
    /// `duplex_gateway_cluster_rejected_messages_total{reason}` (`signature`, `invalid`,
    /// `unknown_node`, `replay`).
    pub cluster_rejected: IntCounterVec,
}

/// The `code` label of an HTTP call answered with `status` (statuses the gateway does not
/// answer calls with count as `other`).
pub fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        202 => "202",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        413 => "413",
        500 => "500",
        501 => "501",
        503 => "503",
        504 => "504",
        499 => "499",
        _ => "other",
    }
}

/// Why a request was refused: the `reason` label of `duplex_gateway_rejected_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Plain HTTP while TLS is required.
    TlsRequired,
    /// A publish token that is not configured.
    BadToken,
    /// A token that may not publish this path.
    TokenScope,
    /// A publish without a secret.
    NoSecret,
    /// A missing or wrong client secret.
    BadSecret,
    /// No backend at that endpoint.
    NotFound,
    /// An HTTP body or frame over the limit.
    TooLarge,
    /// An HTTP body that is not JSON.
    BadJson,
    /// A refused Duplex handshake.
    BadHandshake,
    /// The endpoint has all the clients it may have.
    Full,
    /// A publish whose secret differs from the pool's.
    SecretConflict,
    /// A browser origin that `cors.allowed_origins` does not list.
    Origin,
    /// A path with `%`-escaped separators or control characters, or an invalid endpoint path.
    BadPath,
    /// The gateway is stopping.
    Stopping,
    /// A publish on a listener that does not serve backends.
    Listener,
    /// An address over `limits.max_connections_per_ip`.
    IpConnections,
    /// An address over `limits.requests_per_ip_per_second`.
    IpRate,
    /// An address over `limits.auth_failures_per_ip_per_minute`.
    AuthFailures,
    /// An endpoint over its `calls_per_second`.
    EndpointRate,
    /// A client's signed token (JWT) is missing or fails a check.
    Jwt,
}

impl Rejection {
    /// Every reason.
    pub const ALL: [Rejection; 20] = [
        Rejection::TlsRequired,
        Rejection::BadToken,
        Rejection::TokenScope,
        Rejection::NoSecret,
        Rejection::BadSecret,
        Rejection::NotFound,
        Rejection::TooLarge,
        Rejection::BadJson,
        Rejection::BadHandshake,
        Rejection::Full,
        Rejection::BadPath,
        Rejection::Stopping,
        Rejection::SecretConflict,
        Rejection::Origin,
        Rejection::Listener,
        Rejection::IpConnections,
        Rejection::IpRate,
        Rejection::AuthFailures,
        Rejection::EndpointRate,
        Rejection::Jwt,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::TlsRequired => "tls_required",
            Rejection::BadToken => "bad_token",
            Rejection::TokenScope => "token_scope",
            Rejection::NoSecret => "no_secret",
            Rejection::BadSecret => "bad_secret",
            Rejection::NotFound => "not_found",
            Rejection::TooLarge => "too_large",
            Rejection::BadJson => "bad_json",
            Rejection::BadHandshake => "bad_handshake",
            Rejection::Full => "full",
            Rejection::BadPath => "bad_path",
            Rejection::SecretConflict => "secret_conflict",
            Rejection::Origin => "origin",
            Rejection::Stopping => "stopping",
            Rejection::Listener => "listener",
            Rejection::IpConnections => "ip_connections",
            Rejection::IpRate => "ip_rate",
            Rejection::AuthFailures => "auth_failures",
            Rejection::EndpointRate => "endpoint_rate",
            Rejection::Jwt => "jwt",
        }
    }
}

/// Every metric family: name, help and type. The registry only shows a family once it has a
/// series; the metrics listener writes the `HELP` and `TYPE` lines of the others itself, so every
/// family exists from start-up.
pub const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "duplex_gateway_backends",
        "Live backends per endpoint",
        "gauge",
    ),
    (
        "duplex_gateway_clients",
        "Connected WebSocket clients per endpoint",
        "gauge",
    ),
    (
        "duplex_gateway_pending_calls",
        "Client calls waiting for the backend's reply, per endpoint",
        "gauge",
    ),
    (
        "duplex_gateway_messages_total",
        "Messages forwarded, per endpoint and direction",
        "counter",
    ),
    (
        "duplex_gateway_dropped_messages_total",
        "Messages that could not be delivered, per endpoint and reason",
        "counter",
    ),
    (
        "duplex_gateway_http_requests_total",
        "HTTP calls answered, per endpoint and status code",
        "counter",
    ),
    (
        "duplex_gateway_http_request_duration_seconds",
        "Time to answer an HTTP call, per endpoint",
        "histogram",
    ),
    (
        "duplex_gateway_calls_total",
        "Calls (HTTP and WebSocket) that reached a backend, per endpoint, method and how they ended (ok, or the error code)",
        "counter",
    ),
    (
        "duplex_gateway_call_duration_seconds",
        "Time from a call's arrival at the backend's endpoint to its last reply, per endpoint and method",
        "histogram",
    ),
    (
        "duplex_gateway_rejected_requests_total",
        "Requests refused before reaching a backend, per reason",
        "counter",
    ),
    (
        "duplex_gateway_config_reloads_total",
        "Configuration reloads, per result",
        "counter",
    ),
    (
        "duplex_gateway_backend_failovers_total",
        "Clients moved to another backend of the pool because theirs left, per endpoint",
        "counter",
    ),
    (
        "duplex_gateway_config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful configuration load",
        "gauge",
    ),
    (
        "duplex_gateway_cluster_nodes",
        "Gateway nodes this node hears, itself included (1 without a cluster)",
        "gauge",
    ),
    (
        "duplex_gateway_cluster_connected",
        "1 while connected to NATS (0 without a cluster, while disconnected, or local-only)",
        "gauge",
    ),
    (
        "duplex_gateway_cluster_messages_total",
        "NATS messages of the cluster, per direction",
        "counter",
    ),
    (
        "duplex_gateway_cluster_rejected_messages_total",
        "Cluster messages dropped unread, per reason (signature, invalid, unknown_node, replay)",
        "counter",
    ),
];

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::register);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn register() -> Metrics {
        // Registration only fails for a duplicate name or a malformed definition, both fixed at
        // compile time here; a failure is a programming error worth a loud stop.
        let fail = |e: prometheus::Error| -> ! { panic!("metric definition: {e}") };
        Metrics {
            backends: register_int_gauge_vec!(
                "duplex_gateway_backends",
                "Live backends per endpoint",
                &["endpoint"]
            )
            .unwrap_or_else(|e| fail(e)),
            clients: register_int_gauge_vec!(
                "duplex_gateway_clients",
                "Connected WebSocket clients per endpoint",
                &["endpoint"]
            )
            .unwrap_or_else(|e| fail(e)),
            pending_calls: register_int_gauge_vec!(
                "duplex_gateway_pending_calls",
                "Client calls waiting for the backend's reply, per endpoint",
                &["endpoint"]
            )
            .unwrap_or_else(|e| fail(e)),
            messages: register_int_counter_vec!(
                "duplex_gateway_messages_total",
                "Messages forwarded, per endpoint and direction",
                &["endpoint", "direction"]
            )
            .unwrap_or_else(|e| fail(e)),
            dropped: register_int_counter_vec!(
                "duplex_gateway_dropped_messages_total",
                "Messages that could not be delivered, per endpoint and reason",
                &["endpoint", "reason"]
            )
            .unwrap_or_else(|e| fail(e)),
            http_requests: register_int_counter_vec!(
                "duplex_gateway_http_requests_total",
                "HTTP calls answered, per endpoint and status code",
                &["endpoint", "code"]
            )
            .unwrap_or_else(|e| fail(e)),
            http_duration: register_histogram_vec!(
                "duplex_gateway_http_request_duration_seconds",
                "Time to answer an HTTP call, per endpoint",
                &["endpoint"]
            )
            .unwrap_or_else(|e| fail(e)),
            calls: register_int_counter_vec!(
                "duplex_gateway_calls_total",
                "Calls (HTTP and WebSocket) that reached a backend, per endpoint, method and how they ended (ok, or the error code)",
                &["endpoint", "method", "code"]
            )
            .unwrap_or_else(|e| fail(e)),
            call_duration: register_histogram_vec!(
                "duplex_gateway_call_duration_seconds",
                "Time from a call's arrival at the backend's endpoint to its last reply, per endpoint and method",
                &["endpoint", "method"]
            )
            .unwrap_or_else(|e| fail(e)),
            rejected: register_int_counter_vec!(
                "duplex_gateway_rejected_requests_total",
                "Requests refused before reaching a backend, per reason",
                &["reason"]
            )
            .unwrap_or_else(|e| fail(e)),
            reloads: register_int_counter_vec!(
                "duplex_gateway_config_reloads_total",
                "Configuration reloads, per result",
                &["result"]
            )
            .unwrap_or_else(|e| fail(e)),
            last_reload_success: register_int_gauge!(
                "duplex_gateway_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load"
            )
            .unwrap_or_else(|e| fail(e)),
            failovers: register_int_counter_vec!(
                "duplex_gateway_backend_failovers_total",
                "Clients moved to another backend of the pool because theirs left, per endpoint",
                &["endpoint"]
            )
            .unwrap_or_else(|e| fail(e)),
            cluster_nodes: register_int_gauge!(
                "duplex_gateway_cluster_nodes",
                "Gateway nodes this node hears, itself included (1 without a cluster)"
            )
            .unwrap_or_else(|e| fail(e)),
            cluster_connected: register_int_gauge!(
                "duplex_gateway_cluster_connected",
                "1 while connected to NATS (0 without a cluster, while disconnected, or local-only)"
            )
            .unwrap_or_else(|e| fail(e)),
            cluster_messages: register_int_counter_vec!(
                "duplex_gateway_cluster_messages_total",
                "NATS messages of the cluster, per direction",
                &["direction"]
            )
            .unwrap_or_else(|e| fail(e)),
            cluster_rejected: register_int_counter_vec!(
                "duplex_gateway_cluster_rejected_messages_total",
                "Cluster messages dropped unread, per reason (signature, invalid, unknown_node, replay)",
                &["reason"]
            )
            .unwrap_or_else(|e| fail(e)),
        }
    }

    /// Creates the series that have fixed label values, so they show (at 0) from the first
    /// scrape on instead of appearing with their first event.
    pub fn touch(&self) {
        self.cluster_nodes.set(1);
        for direction in ["out", "in"] {
            let _ = self.cluster_messages.with_label_values(&[direction]);
        }
        for reason in ["signature", "invalid", "unknown_node", "replay"] {
            let _ = self.cluster_rejected.with_label_values(&[reason]);
        }
        for result in ["success", "failure"] {
            let _ = self.reloads.with_label_values(&[result]);
        }
        for reason in Rejection::ALL {
            let _ = self.rejected.with_label_values(&[reason.as_str()]);
        }
    }

    /// Counts a refused request.
    pub fn reject(&self, reason: Rejection) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }
}

/// Writes `HELP` and `TYPE` for each family of [`FAMILIES`] that has no series yet.
fn empty_families(present: &[prometheus::proto::MetricFamily], out: &mut Vec<u8>) {
    for (name, help, kind) in FAMILIES {
        if !present.iter().any(|f| f.name() == *name) {
            out.extend_from_slice(
                format!("# HELP {name} {help}\n# TYPE {name} {kind}\n").as_bytes(),
            );
        }
    }
}

/// The metrics in Prometheus' text format: (status, content type, body).
pub fn render() -> (u16, &'static str, Vec<u8>) {
    let _ = metrics();
    let encoder = prometheus::TextEncoder::new();
    let mut body = Vec::new();
    let families = prometheus::gather();
    match prometheus::Encoder::encode(&encoder, &families, &mut body) {
        Ok(()) => {
            empty_families(&families, &mut body);
            (200, prometheus::TEXT_FORMAT, body)
        }
        Err(e) => (500, "text/plain", e.to_string().into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_family_is_listed_and_shown_before_its_first_series() {
        let m = metrics();
        m.backends.with_label_values(&["/family-test"]).set(0);
        m.clients.with_label_values(&["/family-test"]).set(0);
        m.pending_calls.with_label_values(&["/family-test"]).set(0);
        m.messages.with_label_values(&["/family-test", "to_client"]);
        m.dropped.with_label_values(&["/family-test", "x"]);
        m.http_requests.with_label_values(&["/family-test", "200"]);
        m.http_duration.with_label_values(&["/family-test"]);
        m.failovers.with_label_values(&["/family-test"]);
        m.calls.with_label_values(&["/family-test", "m", "ok"]);
        m.call_duration.with_label_values(&["/family-test", "m"]);
        m.touch();
        let mut registered: Vec<String> = prometheus::gather()
            .iter()
            .map(|f| f.name().to_string())
            .filter(|n| n.starts_with("duplex_gateway_"))
            .collect();
        registered.sort();
        let mut listed: Vec<String> = FAMILIES.iter().map(|f| f.0.to_string()).collect();
        listed.sort();
        assert_eq!(registered, listed);
        // With no series at all, a family still shows its HELP and TYPE lines.
        let mut out = Vec::new();
        empty_families(&[], &mut out);
        let text = String::from_utf8(out).expect("utf-8");
        for (name, _, kind) in FAMILIES {
            assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{text}");
        }
    }
}
