//! An endpoint's metric series: the counters it moves on every frame, the reasons it drops
//! frames for, its calls per method, and the removal of all of them when the endpoint goes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;

use crate::metrics::metrics;
use crate::mux::lock;

/// Why a frame was dropped (the `reason` label of `duplex_gateway_dropped_messages_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// A reply without an id.
    ReplyWithoutId,
    /// From a backend the multiplexer closed (replaced, revoked, stopping), or for one gone.
    BackendClosed,
    /// A reply to no open call.
    UnknownCall,
    /// For a client that has gone.
    ClientGone,
    /// A backend's call to a route no client (of any node) has.
    ClientNotConnected,
    /// A client's queue over its budget (the client is closed).
    ClientQueueFull,
    /// A call over `max_pending_calls_per_client`, or holding too much `ext`.
    TooManyPendingCalls,
    /// A call while no backend serves.
    NoBackend,
    /// A call while every queue together holds over `max_queued_bytes`.
    QueuesFull,
    /// A call from a backend of another node when the endpoint tracks too many of them.
    TooManyRemoteBackends,
    /// An answer from another node to a backend whose queue is full.
    BackendFull,
    /// A frame that is not a Duplex message.
    Malformed,
}

impl Dropped {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::ReplyWithoutId => "reply_without_id",
            Dropped::BackendClosed => "backend_closed",
            Dropped::UnknownCall => "unknown_call",
            Dropped::ClientGone => "client_gone",
            Dropped::ClientNotConnected => "client_not_connected",
            Dropped::ClientQueueFull => "client_queue_full",
            Dropped::TooManyPendingCalls => "too_many_pending_calls",
            Dropped::NoBackend => "no_backend",
            Dropped::QueuesFull => "queues_full",
            Dropped::TooManyRemoteBackends => "too_many_remote_backends",
            Dropped::BackendFull => "backend_full",
            Dropped::Malformed => "malformed",
        }
    }
}

/// One endpoint's series.
pub(super) struct Series {
    path: String,
    pub(super) to_backend: prometheus::IntCounter,
    pub(super) to_client: prometheus::IntCounter,
    /// `duplex_gateway_http_requests_total{code="200"}` and the call duration of this endpoint,
    /// looked up once (every HTTP call counts in them).
    http_ok: prometheus::IntCounter,
    http_duration: prometheus::Histogram,
    /// The label values made so far, so they can all be removed when the endpoint is gone.
    made: Mutex<Made>,
}

#[derive(Default)]
struct Made {
    /// The methods with series of their own (at most `max_methods_per_endpoint`, then `other`).
    methods: HashMap<Box<str>, Arc<MethodSeries>>,
    /// The other codes counted per method (`ok` is always made with the method).
    method_codes: Vec<(Arc<str>, String)>,
    dropped: Vec<Dropped>,
    http_codes: Vec<&'static str>,
    failovers: bool,
    /// The endpoint is gone and its series removed: late events (a call woken by the end of
    /// the grace, frames in flight) must not make them again.
    gone: bool,
}

/// The label of calls whose method has no series of its own, and of error codes past
/// [`MAX_CODES_PER_METHOD`].
const OTHER: &str = "other";

/// Distinct error codes counted per method (the rest: `code="other"`): a backend choosing codes
/// freely cannot grow the metrics.
const MAX_CODES_PER_METHOD: usize = 16;

/// How a call ended (the `code` label of `duplex_gateway_calls_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallEnd {
    /// A reply: `ok`.
    Ok,
    /// An error reply with this code.
    Error(i64),
    /// The caller left (or its HTTP call timed out) before the reply: `cancelled`.
    Cancelled,
    /// Sent without an id (an async call, a notification): no reply ends it: `sent`.
    Sent,
}

/// One method's series at an endpoint: a call holds it from its admission to its end.
pub(crate) struct MethodSeries {
    label: Arc<str>,
    ok: prometheus::IntCounter,
    duration: prometheus::Histogram,
}

impl MethodSeries {
    fn new(path: &str, label: &str) -> MethodSeries {
        let m = metrics();
        MethodSeries {
            label: Arc::from(label),
            ok: m.calls.with_label_values(&[path, label, "ok"]),
            duration: m.call_duration.with_label_values(&[path, label]),
        }
    }

    /// Series in no registry: for a call admitted after its endpoint's series were removed.
    pub(super) fn detached() -> MethodSeries {
        let opts = prometheus::Opts::new("detached", "detached");
        MethodSeries {
            label: Arc::from(OTHER),
            ok: prometheus::IntCounter::with_opts(opts)
                .unwrap_or_else(|_| unreachable!("a valid name")),
            duration: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new(
                "detached", "detached",
            ))
            .unwrap_or_else(|_| unreachable!("a valid name")),
        }
    }
}

/// A method name from a request's raw `method` (a JSON string).
fn method_name(raw: Option<&RawValue>) -> Option<String> {
    let raw = raw?.get();
    match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(plain) if !plain.contains('\\') => Some(plain.to_string()),
        _ => serde_json::from_str(raw).ok(),
    }
}

fn remember<T: PartialEq>(seen: &mut Vec<T>, value: T) {
    if !seen.contains(&value) {
        seen.push(value);
    }
}

impl Series {
    pub(super) fn new(path: &str) -> Series {
        let m = metrics();
        Series {
            path: path.to_string(),
            to_backend: m.messages.with_label_values(&[path, "to_backend"]),
            to_client: m.messages.with_label_values(&[path, "to_client"]),
            http_ok: m.http_requests.with_label_values(&[path, "200"]),
            http_duration: m.http_duration.with_label_values(&[path]),
            made: Mutex::new(Made::default()),
        }
    }

    /// Counts one HTTP call answered with `status` (its label) after `seconds`.
    pub(super) fn http_call(&self, status: &'static str, seconds: f64) {
        // The common answer counts on handles looked up once, without a lock: after the
        // endpoint is gone they are detached from the registry, so they make no series again.
        if status == "200" {
            self.http_ok.inc();
        } else {
            let mut made = lock(&self.made);
            if made.gone {
                return;
            }
            remember(&mut made.http_codes, status);
            metrics()
                .http_requests
                .with_label_values(&[self.path.as_str(), status])
                .inc();
        }
        self.http_duration.observe(seconds);
    }

    /// The series of the method of a request (raw `method`): its own while the endpoint has
    /// fewer than `max` methods with series, else `other`.
    pub(super) fn method(&self, raw: Option<&RawValue>, max: usize) -> Arc<MethodSeries> {
        let mut made = lock(&self.made);
        if made.gone {
            return Arc::new(MethodSeries::detached());
        }
        let name = method_name(raw).unwrap_or_default();
        if let Some(series) = made.methods.get(name.as_str()) {
            return series.clone();
        }
        let label = if made.methods.len() < max {
            name
        } else {
            OTHER.to_string()
        };
        made.methods
            .entry(label.clone().into_boxed_str())
            .or_insert_with(|| Arc::new(MethodSeries::new(&self.path, &label)))
            .clone()
    }

    /// Counts a call of `method` that ended (`end`) after `seconds` (its duration is observed
    /// for calls that had a reply coming).
    pub(super) fn call_ended(&self, method: &MethodSeries, end: CallEnd, seconds: f64) {
        let code = match end {
            CallEnd::Ok => {
                method.ok.inc();
                method.duration.observe(seconds);
                return;
            }
            CallEnd::Error(code) => code.to_string(),
            CallEnd::Cancelled => "cancelled".to_string(),
            CallEnd::Sent => "sent".to_string(),
        };
        if end != CallEnd::Sent {
            method.duration.observe(seconds);
        }
        let mut made = lock(&self.made);
        if made.gone {
            return;
        }
        let known = made
            .method_codes
            .iter()
            .any(|(m, c)| *m == method.label && *c == code);
        let code = if known
            || made
                .method_codes
                .iter()
                .filter(|(m, _)| *m == method.label)
                .count()
                < MAX_CODES_PER_METHOD
        {
            code
        } else {
            OTHER.to_string()
        };
        remember(&mut made.method_codes, (method.label.clone(), code.clone()));
        metrics()
            .calls
            .with_label_values(&[self.path.as_str(), &method.label, &code])
            .inc();
    }

    /// Counts a frame dropped for `reason`.
    pub(super) fn dropped(&self, reason: Dropped) {
        let mut made = lock(&self.made);
        if !made.gone {
            remember(&mut made.dropped, reason);
            metrics()
                .dropped
                .with_label_values(&[self.path.as_str(), reason.as_str()])
                .inc();
        }
    }

    /// Counts clients moved to another backend of the pool.
    pub(super) fn failovers(&self, moved: u64) {
        let mut made = lock(&self.made);
        if moved > 0 && !made.gone {
            metrics()
                .failovers
                .with_label_values(&[self.path.as_str()])
                .inc_by(moved);
            made.failovers = true;
        }
    }

    /// The pool gauges of this endpoint (made when its first backend joins).
    pub(super) fn gauges(&self) -> super::state::Gauges {
        let m = metrics();
        let labels = [self.path.as_str()];
        super::state::Gauges {
            backends: m.backends.with_label_values(&labels),
            clients: m.clients.with_label_values(&labels),
            pending: m.pending_calls.with_label_values(&labels),
        }
    }

    /// The pool gauges leave the metrics (the last backend left: the grace began).
    pub(super) fn remove_gauges(&self) {
        let m = metrics();
        for gauge in [&m.backends, &m.clients, &m.pending_calls] {
            let _ = gauge.remove_label_values(&[self.path.as_str()]);
        }
    }

    /// Every series of this endpoint leaves the metrics (it is gone). The registry calls this
    /// under its lock, so a new endpoint at the same path cannot be registering its own meanwhile.
    pub(super) fn remove_all(&self) {
        let m = metrics();
        let path = self.path.as_str();
        let made = std::mem::replace(
            &mut *lock(&self.made),
            Made {
                gone: true,
                ..Made::default()
            },
        );
        for direction in ["to_backend", "to_client"] {
            let _ = m.messages.remove_label_values(&[path, direction]);
        }
        for label in made.methods.keys() {
            let _ = m.calls.remove_label_values(&[path, label, "ok"]);
            let _ = m.call_duration.remove_label_values(&[path, label]);
        }
        for (label, code) in made.method_codes {
            let _ = m.calls.remove_label_values(&[path, &label, &code]);
        }
        for reason in made.dropped {
            let _ = m.dropped.remove_label_values(&[path, reason.as_str()]);
        }
        if made.failovers {
            let _ = m.failovers.remove_label_values(&[path]);
        }
        for code in made.http_codes.into_iter().chain(["200"]) {
            let _ = m.http_requests.remove_label_values(&[path, code]);
        }
        let _ = m.http_duration.remove_label_values(&[path]);
        self.remove_gauges();
    }
}
