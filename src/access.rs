//! The access log (`log.access`): one line per finished call (HTTP and WebSocket) and per
//! refused request, on the log's stream, as text (`key=value`) or as one JSON object
//! (`log.format: json`). A line never carries a token, a secret, a signed token or a query
//! string: only the endpoint path, the method and the facts below.

use std::io::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::Serialize;

/// One access line.
#[derive(Debug, Clone, Serialize)]
pub struct Line<'a> {
    /// When it ended (RFC 3339, UTC).
    pub ts: String,
    /// The node (cluster name, else the host name).
    pub node: &'a str,
    /// The endpoint path.
    pub endpoint: &'a str,
    /// The method called (absent for a refused WebSocket upgrade).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    /// `http` or `ws`.
    pub transport: &'static str,
    /// The HTTP status answered (HTTP calls and refused requests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The error code a WebSocket call ended with (absent on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    /// From the request's arrival to its answer.
    pub duration_us: u64,
    /// Body (HTTP) or frame (WebSocket) bytes from the caller.
    pub bytes_in: u64,
    /// Body or frame bytes to the caller.
    pub bytes_out: u64,
    /// The caller's address (the forwarded one from a trusted proxy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    /// The backend that served it: its id in the pool (as the admin API lists it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The call's trace id (W3C trace context), when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// Now, as an access line writes it.
pub fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// The machine's host name (`gateway` when it has none): a node's name in access lines outside
/// a cluster, and the start of a cluster node's default name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into())
}

impl Line<'_> {
    /// The line as written: one JSON object, or `key=value` pairs after the time.
    pub fn render(&self, json: bool) -> String {
        if json {
            return serde_json::to_string(self).unwrap_or_default();
        }
        let mut out = format!(
            "{} ACCESS node={} endpoint={}",
            self.ts,
            quoted(self.node),
            quoted(self.endpoint)
        );
        if let Some(method) = self.method {
            out.push_str(&format!(" method={}", quoted(method)));
        }
        out.push_str(&format!(" transport={}", self.transport));
        if let Some(status) = self.status {
            out.push_str(&format!(" status={status}"));
        }
        if let Some(code) = self.code {
            out.push_str(&format!(" code={code}"));
        }
        out.push_str(&format!(
            " duration_us={} bytes_in={} bytes_out={}",
            self.duration_us, self.bytes_in, self.bytes_out
        ));
        if let Some(ip) = self.client_ip {
            out.push_str(&format!(" client_ip={ip}"));
        }
        if let Some(backend) = &self.backend {
            out.push_str(&format!(" backend={}", quoted(backend)));
        }
        if let Some(trace) = &self.trace_id {
            out.push_str(&format!(" trace_id={trace}"));
        }
        out
    }

    /// Writes the line to the log's stream (standard error), whole.
    pub fn write(&self, json: bool) {
        let mut line = self.render(json);
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// A value as a text line carries it: as it is when it is plain, else JSON-quoted.
fn quoted(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=')
    {
        std::borrow::Cow::Borrowed(value)
    } else {
        std::borrow::Cow::Owned(serde_json::Value::String(value.to_string()).to_string())
    }
}

/// The calls of one WebSocket client as the operator sees them: each, when it ends, gets its
/// access line (with `log.access`) and its span (with `tracing.otlp_endpoint`).
pub struct WsCalls {
    /// The node's name.
    pub node: String,
    /// The endpoint path (as a log line may carry it).
    pub endpoint: String,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// Write access lines, as JSON when `json`.
    lines: Option<bool>,
    /// Export spans.
    spans: bool,
    open: Vec<OpenCall>,
}

struct OpenCall {
    id: u64,
    started: std::time::Instant,
    started_at: SystemTime,
    method: String,
    bytes_in: u64,
    bytes_out: u64,
    /// The gateway's hop of the call's trace, and the client's span above it.
    trace: Option<(crate::trace::TraceParent, [u8; 8])>,
}

/// Open calls a client may have tracked for its access lines (more are not logged; the
/// multiplexer refuses calls over `max_pending_calls_per_client` anyway).
const MAX_TRACKED: usize = 4096;

impl WsCalls {
    /// The calls of a client of `endpoint` from `client_ip`; `lines`: write access lines (as
    /// JSON when true); `spans`: export spans.
    pub fn new(
        node: String,
        endpoint: &str,
        client_ip: Option<IpAddr>,
        lines: Option<bool>,
        spans: bool,
    ) -> WsCalls {
        WsCalls {
            node,
            endpoint: crate::auth::logged(endpoint).into_owned(),
            client_ip,
            lines,
            spans,
            open: Vec::new(),
        }
    }

    /// A request of the client (`bytes` long) on its way to the backend, with the gateway's hop
    /// of its trace (and the client's span) when it carries one.
    pub fn request(
        &mut self,
        msg: &crate::duplex::Message,
        bytes: usize,
        trace: Option<(crate::trace::TraceParent, [u8; 8])>,
    ) {
        let Some(id) = msg.id() else { return };
        if let Some(open) = self.open.iter_mut().find(|c| c.id == id) {
            // Streamed input of a call already open.
            open.bytes_in += bytes as u64;
            return;
        }
        if self.open.len() >= MAX_TRACKED {
            return;
        }
        self.open.push(OpenCall {
            id,
            started: std::time::Instant::now(),
            started_at: SystemTime::now(),
            method: crate::auth::logged(&msg.method().unwrap_or_default()).into_owned(),
            bytes_in: bytes as u64,
            bytes_out: 0,
            trace,
        });
    }

    /// A frame for the client (`bytes` long): a reply that ends one of its calls writes the
    /// call's line; `backend` names the backend that served it.
    pub fn reply(
        &mut self,
        msg: &crate::duplex::Message,
        bytes: usize,
        backend: impl FnOnce() -> Option<String>,
    ) {
        if msg.kind() != crate::duplex::Kind::Reply {
            return;
        }
        let Some(id) = msg.id() else { return };
        let Some(at) = self.open.iter().position(|c| c.id == id) else {
            return;
        };
        self.open[at].bytes_out += bytes as u64;
        if !msg.ends_call() {
            return;
        }
        let call = self.open.swap_remove(at);
        let code = msg.is_error().then(|| {
            msg.error()
                .map_or(crate::duplex::code::INTERNAL_ERROR, |e| e.code)
        });
        let backend = backend();
        if self.spans {
            // A call without a trace context still gets a span: a trace of its own.
            let (hop, parent) = match call.trace {
                Some((hop, parent)) => (hop, Some(parent)),
                None => (crate::trace::TraceParent::child_of(None), None),
            };
            crate::otlp::export(crate::otlp::CallSpan {
                hop,
                parent,
                start: call.started_at,
                end: SystemTime::now(),
                endpoint: &self.endpoint,
                method: &call.method,
                transport: "ws",
                status: None,
                code,
                backend: backend.as_deref(),
                node: &self.node,
            });
        }
        if let Some(json) = self.lines {
            Line {
                ts: now(),
                node: &self.node,
                endpoint: &self.endpoint,
                method: Some(&call.method),
                transport: "ws",
                status: None,
                code,
                duration_us: call.started.elapsed().as_micros() as u64,
                bytes_in: call.bytes_in,
                bytes_out: call.bytes_out,
                client_ip: self.client_ip,
                backend,
                trace_id: call.trace.map(|(hop, _)| hop.trace_hex()),
            }
            .write(json);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> Line<'static> {
        Line {
            ts: "2026-12-04T20:00:00.000000Z".into(),
            node: "n1",
            endpoint: "/a",
            method: Some("echo"),
            transport: "ws",
            status: None,
            code: Some(-32000),
            duration_us: 12,
            bytes_in: 3,
            bytes_out: 40,
            client_ip: "127.0.0.1".parse().ok(),
            backend: Some("2".into()),
            trace_id: None,
        }
    }

    #[test]
    fn a_json_line_has_the_fields_and_leaves_out_the_absent() {
        let v: serde_json::Value = serde_json::from_str(&line().render(true)).expect("json");
        assert_eq!(v["endpoint"], "/a");
        assert_eq!(v["code"], -32000);
        assert_eq!(v["client_ip"], "127.0.0.1");
        assert!(v.get("status").is_none() && v.get("trace_id").is_none());
    }

    #[test]
    fn a_text_line_quotes_what_is_not_plain() {
        let mut l = line();
        l.method = Some("two words");
        let text = l.render(false);
        assert!(text.contains(r#"method="two words""#), "{text}");
        assert!(text.contains("code=-32000 duration_us=12"), "{text}");
    }
}
