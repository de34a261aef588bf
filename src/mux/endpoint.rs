//! One endpoint: its backend, its clients and the call table between them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use futures_channel::mpsc as queue;
use futures_util::StreamExt;
use prometheus::IntGauge;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;

use super::{close, lock, route_key, CloseReason, Limits, Registry};
use crate::auth::Digest;
use crate::duplex::{code, Kind, Message, RpcError};
use crate::metrics::metrics;

type Route = Arc<str>;
type CloseCell = Arc<OnceLock<CloseReason>>;

/// Why a client could not join an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
    /// The endpoint is gone (its grace ran out).
    NotFound,
    /// The endpoint has all the clients it may have.
    Full,
    /// The secret is not (or no longer) the endpoint's.
    BadSecret,
}

/// Sizes of an endpoint's tables (for tests, leak checks and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointStats {
    /// Whether a backend is connected.
    pub backend: bool,
    /// Connected clients (WebSocket clients and HTTP calls in progress).
    pub clients: usize,
    /// Client calls waiting for the backend.
    pub pending_calls: usize,
    /// Backend calls waiting for a client.
    pub backend_calls: usize,
}

/// An endpoint: a path with a backend (or in its grace after the backend left) and its clients.
pub struct Endpoint {
    path: String,
    state: Mutex<State>,
    /// Woken when a backend arrives or the endpoint is removed (calls made in the grace wait on it).
    changed: Notify,
    registry: Weak<Registry>,
    to_backend: prometheus::IntCounter,
    to_client: prometheus::IntCounter,
    /// `duplex_gateway_http_requests_total{code="200"}` and the call duration of this endpoint,
    /// looked up once (every HTTP call counts in them).
    http_ok: prometheus::IntCounter,
    http_duration: prometheus::Histogram,
    /// The `reason` and `code` label values this endpoint's series were made with, so they can
    /// all be removed when the endpoint is gone.
    series: Mutex<Series>,
}

#[derive(Default)]
struct Series {
    dropped: Vec<&'static str>,
    http_codes: Vec<&'static str>,
}

struct State {
    backend: Option<BackendSlot>,
    /// Bumped by every publish, so a replaced backend's departure is told apart.
    generation: u64,
    secret: Digest,
    token_name: String,
    /// The digest of the token the backend published with.
    token: Option<Digest>,
    clients: HashMap<Route, ClientSlot>,
    /// How many of `clients` are WebSocket clients (kept, not counted, on every change).
    websocket_clients: usize,
    /// Backend call id -> the client call it stands for.
    calls: HashMap<u64, PendingCall>,
    /// Calls the backend made to clients: backend id -> client route.
    backend_calls: HashMap<u64, Route>,
    next_id: u64,
    /// Set when a backend leaves; new calls wait until then for a new one.
    grace_until: Option<Instant>,
    removed: bool,
    gauges: Option<Gauges>,
}

struct BackendSlot {
    tx: BackendTx,
    close: CloseCell,
}

struct ClientSlot {
    tx: ClientTx,
    close: CloseCell,
    /// This client's open calls: client id -> backend id.
    open: HashMap<u64, u64>,
    /// Bytes of `ext` its open calls hold (bounded by the client queue's budget).
    ext_bytes: usize,
    /// Calls the backend has open to this client (bounded like the client's own).
    backend_calls: usize,
    /// WebSocket clients count in `duplex_gateway_clients`; HTTP calls do not.
    websocket: bool,
}

struct PendingCall {
    route: Route,
    client_id: u64,
    /// The `ext` the client sent, as it sent it (restored on replies).
    client_ext: Option<Box<RawValue>>,
}

impl PendingCall {
    fn ext_len(&self) -> usize {
        self.client_ext.as_ref().map_or(0, |e| e.get().len())
    }
}

struct Gauges {
    backends: IntGauge,
    clients: IntGauge,
    pending: IntGauge,
}

impl State {
    fn update_gauges(&self) {
        if let Some(g) = &self.gauges {
            g.clients.set(self.websocket_clients as i64);
            g.pending.set(self.calls.len() as i64);
        }
    }

    /// Removes a client and everything it had open. Returns the `-32001` replies owed to the
    /// backend for its calls to this client.
    fn remove_client(&mut self, route: &Route, reason: Option<CloseReason>) -> Vec<String> {
        let Some(slot) = self.clients.remove(route) else {
            return Vec::new();
        };
        if slot.websocket {
            self.websocket_clients -= 1;
        }
        if let Some(reason) = reason {
            let _ = slot.close.set(reason);
        }
        for backend_id in slot.open.values() {
            self.calls.remove(backend_id);
        }
        let mut owed = Vec::new();
        self.backend_calls.retain(|&id, r| {
            if r == route {
                let mut reply = Message::error_reply(
                    Some(id),
                    &RpcError::new(code::CLIENT_NOT_CONNECTED, "client not connected"),
                );
                reply.set_raw("ext", route_ext(route));
                owed.push(reply.to_json());
                false
            } else {
                true
            }
        });
        self.update_gauges();
        owed
    }

    /// Fails every pending client call with `-32000` (the backend is gone).
    fn fail_pending_calls(&mut self, why: &str) -> Vec<(Route, ClientTx, Message)> {
        let mut out = Vec::with_capacity(self.calls.len());
        for (_, call) in self.calls.drain() {
            if let Some(client) = self.clients.get(&call.route) {
                let mut reply = Message::error_reply(
                    Some(call.client_id),
                    &RpcError::new(code::BACKEND_UNAVAILABLE, why),
                );
                restore_ext(&mut reply, &call.route, call.client_ext.as_deref());
                out.push((call.route.clone(), client.tx.clone(), reply));
            }
        }
        for client in self.clients.values_mut() {
            client.open.clear();
            client.ext_bytes = 0;
            client.backend_calls = 0;
        }
        self.backend_calls.clear();
        out
    }

    /// Forgets the client call `backend_id` stands for (it ended).
    fn end_call(&mut self, backend_id: u64) {
        if let Some(call) = self.calls.remove(&backend_id) {
            if let Some(client) = self.clients.get_mut(&call.route) {
                client.open.remove(&call.client_id);
                client.ext_bytes -= call.ext_len();
            }
        }
        self.update_gauges();
    }

    /// Whether the backend of `generation` is still the endpoint's: a backend that was replaced
    /// or closed is silent from that moment.
    fn is_current(&self, generation: u64) -> bool {
        self.generation == generation && self.backend.is_some()
    }
}

impl Endpoint {
    pub(super) fn new(path: &str, registry: Weak<Registry>) -> Arc<Endpoint> {
        let m = metrics();
        Arc::new(Endpoint {
            path: path.to_string(),
            state: Mutex::new(State {
                backend: None,
                generation: 0,
                secret: Digest::of(b""),
                token_name: String::new(),
                token: None,
                clients: HashMap::new(),
                websocket_clients: 0,
                calls: HashMap::new(),
                backend_calls: HashMap::new(),
                next_id: 1,
                grace_until: None,
                removed: false,
                gauges: None,
            }),
            changed: Notify::new(),
            registry,
            to_backend: m.messages.with_label_values(&[path, "to_backend"]),
            to_client: m.messages.with_label_values(&[path, "to_client"]),
            http_ok: m.http_requests.with_label_values(&[path, "200"]),
            http_duration: m.http_duration.with_label_values(&[path]),
            series: Mutex::new(Series::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The endpoint's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Counts one HTTP call answered with `status` (its label) after `seconds`.
    pub fn count_http_call(&self, status: &'static str, seconds: f64) {
        if status == "200" {
            self.http_ok.inc();
        } else {
            remember(&mut lock(&self.series).http_codes, status);
            metrics()
                .http_requests
                .with_label_values(&[self.path.as_str(), status])
                .inc();
        }
        self.http_duration.observe(seconds);
    }

    /// Whether `secret` (a digest) is the one clients of this endpoint must present (constant
    /// time).
    pub fn secret_matches(&self, secret: &Digest) -> bool {
        self.state().secret.matches(secret)
    }

    /// The name of the token the current (or last) backend published with.
    pub fn token_name(&self) -> String {
        self.state().token_name.clone()
    }

    /// The digest of the token the connected backend published with (None without a backend).
    pub fn backend_token(&self) -> Option<Digest> {
        let s = self.state();
        s.backend.as_ref().and(s.token)
    }

    /// The multiplexer's limits in force.
    fn limits(&self) -> Arc<Limits> {
        self.registry
            .upgrade()
            .map_or_else(|| Arc::new(Limits::default()), |r| r.limits())
    }

    /// Whether a call waiting for a backend can stop waiting: one is there, or the endpoint is
    /// gone.
    fn waiting_is_over(&self) -> bool {
        let s = self.state();
        s.backend.is_some() || s.removed
    }

    /// Table sizes.
    pub fn stats(&self) -> EndpointStats {
        let s = self.state();
        EndpointStats {
            backend: s.backend.is_some(),
            clients: s.clients.len(),
            pending_calls: s.calls.len(),
            backend_calls: s.backend_calls.len(),
        }
    }

    /// Attaches a new backend; None if the endpoint was removed meanwhile.
    pub(super) fn attach_backend(
        self: &Arc<Self>,
        secret: Digest,
        token: (&str, Digest),
        limits: &Limits,
    ) -> Option<BackendConn> {
        let (token_name, token) = token;
        let (tx, rx) = BackendTx::channel(limits.backend_queue_bytes);
        let close: CloseCell = Arc::new(OnceLock::new());
        let mut s = self.state();
        if s.removed {
            return None;
        }
        let mut failed = Vec::new();
        if let Some(old) = s.backend.take() {
            let _ = old.close.set(CloseReason::new(
                close::SERVICE_RESTART,
                "replaced by a new backend",
            ));
            old.tx.close();
            failed = s.fail_pending_calls("backend replaced");
            tracing::info!(endpoint = %self.path, "backend replaced by a new publish");
        }
        s.generation += 1;
        s.secret = secret;
        s.token_name = token_name.to_string();
        s.token = Some(token);
        s.grace_until = None;
        s.backend = Some(BackendSlot {
            tx,
            close: close.clone(),
        });
        let m = metrics();
        let labels = [self.path.as_str()];
        let gauges = Gauges {
            backends: m.backends.with_label_values(&labels),
            clients: m.clients.with_label_values(&labels),
            pending: m.pending_calls.with_label_values(&labels),
        };
        gauges.backends.set(1);
        s.gauges = Some(gauges);
        s.update_gauges();
        let generation = s.generation;
        drop(s);
        self.deliver_all(failed);
        self.changed.notify_waiters();
        Some(BackendConn {
            endpoint: self.clone(),
            generation,
            rx,
            close,
        })
    }

    /// Adds a client (a WebSocket peer, or an HTTP call when `websocket` is false).
    /// The secret is checked again here, under the endpoint's lock, so a client cannot join with a
    /// secret that a reload has just replaced.
    pub fn join(
        self: &Arc<Self>,
        websocket: bool,
        max_clients: usize,
        secret: &Digest,
    ) -> Result<ClientConn, JoinError> {
        let budget = self
            .registry
            .upgrade()
            .map_or(Limits::default().client_queue_bytes, |r| {
                r.limits().client_queue_bytes
            });
        let mut s = self.state();
        if s.removed || (s.backend.is_none() && s.grace_until.is_none()) {
            return Err(JoinError::NotFound);
        }
        if !s.secret.matches(secret) {
            return Err(JoinError::BadSecret);
        }
        if s.clients.len() >= max_clients {
            return Err(JoinError::Full);
        }
        let route = route_key();
        let (tx, rx) = queue::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let close: CloseCell = Arc::new(OnceLock::new());
        s.websocket_clients += usize::from(websocket);
        s.clients.insert(
            route.clone(),
            ClientSlot {
                tx: ClientTx {
                    tx,
                    queued: queued.clone(),
                    budget,
                },
                close: close.clone(),
                open: HashMap::new(),
                websocket,
                ext_bytes: 0,
                backend_calls: 0,
            },
        );
        s.update_gauges();
        Ok(ClientConn {
            endpoint: self.clone(),
            route_ext: route_ext(&route),
            route,
            rx,
            queued,
            close,
        })
    }

    /// Closes every client with `reason` (reload: the endpoint's fixed secret changed), and makes
    /// `secret` (if given) the one new clients must present.
    pub fn close_clients(&self, secret: Option<Digest>, reason: CloseReason) -> usize {
        self.remove_clients(Some(&reason), |s| {
            if let Some(secret) = secret {
                s.secret = secret;
            }
            s.clients.keys().cloned().collect::<Vec<_>>()
        })
    }

    /// Removes the clients `pick` chooses (under the lock, after any change it makes), closing
    /// them with `reason`; the backend's calls to them are answered with `-32001`. Returns how
    /// many were removed.
    fn remove_clients<R: IntoIterator<Item = Route>>(
        &self,
        reason: Option<&CloseReason>,
        pick: impl FnOnce(&mut State) -> R,
    ) -> usize {
        let mut s = self.state();
        let mut removed = 0;
        let mut owed = Vec::new();
        for route in pick(&mut s) {
            owed.extend(s.remove_client(&route, reason.cloned()));
            removed += 1;
        }
        let backend = if owed.is_empty() {
            None
        } else {
            s.backend.as_ref().map(|b| b.tx.clone())
        };
        drop(s);
        if let Some(tx) = backend {
            send_nowait(&tx, owed);
        }
        removed
    }

    /// Closes the backend with `reason` (reload: its token was revoked). Its departure then
    /// follows the usual rules (pending calls fail, clients wait for the grace).
    pub fn close_backend(self: &Arc<Self>, reason: CloseReason) -> bool {
        let mut s = self.state();
        match s.backend.take() {
            Some(old) => {
                let _ = old.close.set(reason);
                old.tx.close();
                let generation = s.generation;
                drop(s);
                // The connection's own departure will find no backend; run it here instead.
                self.backend_left(generation, true);
                true
            }
            None => false,
        }
    }

    /// Closes every WebSocket client with `reason` (shutdown, first step: HTTP calls in progress
    /// keep running). Returns how many were closed.
    pub fn close_websocket_clients(&self, reason: CloseReason) -> usize {
        self.remove_clients(Some(&reason), |s| {
            s.clients
                .iter()
                .filter(|(_, c)| c.websocket)
                .map(|(r, _)| r.clone())
                .collect::<Vec<_>>()
        })
    }

    /// The backend with `generation` has gone: fail pending calls, start the grace.
    fn backend_left(self: &Arc<Self>, generation: u64, already_detached: bool) {
        let mut s = self.state();
        if s.generation != generation || s.removed {
            return;
        }
        if !already_detached {
            if s.backend.is_none() {
                return;
            }
            s.backend = None;
        }
        let failed = s.fail_pending_calls("backend unavailable");
        if let Some(g) = s.gauges.take() {
            let m = metrics();
            let labels = [self.path.as_str()];
            let _ = m.backends.remove_label_values(&labels);
            let _ = m.clients.remove_label_values(&labels);
            let _ = m.pending_calls.remove_label_values(&labels);
            drop(g);
        }
        let grace = self
            .registry
            .upgrade()
            .map_or(Duration::ZERO, |r| r.limits().backend_grace);
        s.grace_until = Some(Instant::now() + grace);
        drop(s);
        tracing::info!(endpoint = %self.path, grace_ms = grace.as_millis() as u64, "backend left");
        self.deliver_all(failed);
        let me = self.clone();
        let expire = async move {
            tokio::time::sleep(grace).await;
            me.grace_over(generation);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(expire);
            }
            Err(_) => self.grace_over(generation),
        }
    }

    /// The grace after the backend `generation` left ran out: if no backend came back, remove the
    /// endpoint and close its clients with 1013.
    fn grace_over(self: &Arc<Self>, generation: u64) {
        let mut s = self.state();
        if s.generation != generation || s.backend.is_some() || s.removed {
            return;
        }
        s.removed = true;
        let routes: Vec<Route> = s.clients.keys().cloned().collect();
        let reason = CloseReason::new(close::TRY_AGAIN_LATER, "backend unavailable");
        for route in &routes {
            s.remove_client(route, Some(reason.clone()));
        }
        drop(s);
        tracing::info!(endpoint = %self.path, clients = routes.len(), "endpoint removed: backend did not come back");
        self.changed.notify_waiters();
        if let Some(registry) = self.registry.upgrade() {
            registry.remove(self);
        }
    }

    fn deliver_all(&self, frames: Vec<(Route, ClientTx, Message)>) {
        for (route, tx, msg) in frames {
            self.deliver(&route, &tx, msg);
        }
    }

    /// Counts a message dropped for `reason`.
    pub(crate) fn dropped(&self, reason: &'static str) {
        remember(&mut lock(&self.series).dropped, reason);
        metrics()
            .dropped
            .with_label_values(&[self.path.as_str(), reason])
            .inc();
        tracing::debug!(endpoint = %self.path, reason, "message dropped");
    }

    /// Hands a frame to a client; a client whose queue is over its budget is not reading (fast
    /// enough) and is closed.
    fn deliver(&self, route: &Route, tx: &ClientTx, msg: Message) {
        match tx.push(msg) {
            Push::Sent => self.to_client.inc(),
            Push::Gone => self.dropped("client_gone"),
            Push::Full => {
                self.dropped("client_queue_full");
                let reason = CloseReason::new(
                    close::POLICY,
                    "client too slow: it did not read its messages",
                );
                self.remove_clients(Some(&reason), |_| [route.clone()]);
                tracing::info!(endpoint = %self.path, "closed a client that did not read");
            }
        }
    }

    /// Every series of this endpoint leaves the metrics (it is gone). The registry calls this
    /// under its lock, so a new endpoint at the same path cannot be registering its own meanwhile.
    pub(super) fn remove_series(&self) {
        let m = metrics();
        let path = self.path.as_str();
        let series = std::mem::take(&mut *lock(&self.series));
        for direction in ["to_backend", "to_client"] {
            let _ = m.messages.remove_label_values(&[path, direction]);
        }
        for reason in series.dropped {
            let _ = m.dropped.remove_label_values(&[path, reason]);
        }
        for code in series.http_codes.into_iter().chain(["200"]) {
            let _ = m.http_requests.remove_label_values(&[path, code]);
        }
        let _ = m.http_duration.remove_label_values(&[path]);
        for gauge in [&m.backends, &m.clients, &m.pending_calls] {
            let _ = gauge.remove_label_values(&[path]);
        }
    }
}

fn remember(seen: &mut Vec<&'static str>, value: &'static str) {
    if !seen.contains(&value) {
        seen.push(value);
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("path", &self.path)
            .finish()
    }
}

/// The sending side of a client's queue. The queue is bounded in bytes, not frames, so a burst
/// of small frames to a client that reads is fine, while a client that stops reading is found.
#[derive(Clone)]
struct ClientTx {
    /// futures' channel rather than tokio's: it allocates nothing up front, where tokio's takes
    /// a 1.8 KB block per channel (an HTTP call makes one; every idle client holds one).
    tx: queue::UnboundedSender<(Message, usize)>,
    queued: Arc<AtomicUsize>,
    budget: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Push {
    Sent,
    Gone,
    Full,
}

impl ClientTx {
    fn push(&self, msg: Message) -> Push {
        let size = msg.approx_len();
        let reserved = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                (queued + size <= self.budget).then_some(queued + size)
            });
        if reserved.is_err() {
            return Push::Full;
        }
        match self.tx.unbounded_send((msg, size)) {
            Ok(()) => Push::Sent,
            Err(_) => Push::Gone,
        }
    }
}

/// `{"route":"<key>"}` as raw JSON. Route keys are hex digits, so no escaping is needed.
fn route_ext(route: &str) -> Box<RawValue> {
    RawValue::from_string(format!(r#"{{"route":"{route}"}}"#))
        .unwrap_or_else(|_| unreachable!("route keys are hex"))
}

/// Puts the client's own `ext` back on a reply: the gateway's `route` goes; every key the client
/// sent comes back as the client sent it (its own `route` included); keys the backend added stay.
/// A reply the gateway makes itself (no `ext`) gets exactly the client's `ext`.
fn restore_ext(reply: &mut Message, route: &str, client_ext: Option<&RawValue>) {
    let Some(client_ext) = client_ext else {
        match reply.ext_raw().map(RawValue::get) {
            None => {}
            // The common case, a backend copying back exactly the ext we sent: no parsing.
            Some(raw)
                if raw
                    .strip_prefix(r#"{"route":""#)
                    .and_then(|r| r.strip_suffix(r#""}"#))
                    == Some(route) =>
            {
                reply.set_ext(None);
            }
            Some(_) => {
                let mut ext = reply.ext().unwrap_or_default();
                ext.remove("route");
                reply.set_ext(if ext.is_empty() { None } else { Some(&ext) });
            }
        }
        return;
    };
    let mut ext = reply.ext().unwrap_or_default();
    ext.remove("route");
    if let Ok(own) = serde_json::from_str::<Map<String, Value>>(client_ext.get()) {
        ext.extend(own);
    }
    reply.set_ext(Some(&ext));
}

/// The sending side of a backend's queue, bounded in bytes: a sender waits for room, so the
/// clients of a backend that does not read wait for it instead of piling frames up in memory.
#[derive(Clone)]
struct BackendTx {
    tx: mpsc::UnboundedSender<(String, u32)>,
    /// Free bytes in the queue; closed when the backend is.
    room: Arc<Semaphore>,
    budget: u32,
}

impl BackendTx {
    fn channel(budget: usize) -> (BackendTx, BackendRx) {
        let budget = u32::try_from(budget).unwrap_or(u32::MAX).max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(budget as usize));
        (
            BackendTx {
                tx,
                room: room.clone(),
                budget,
            },
            BackendRx { rx, room },
        )
    }

    /// What a frame takes of the budget (a frame over the whole budget takes all of it, so it
    /// still goes through, alone).
    fn cost(&self, frame: &str) -> u32 {
        u32::try_from(frame.len())
            .unwrap_or(u32::MAX)
            .clamp(1, self.budget)
    }

    /// Queues a frame, waiting for room. Err when the backend is closed.
    async fn send(&self, frame: String) -> Result<(), ()> {
        let cost = self.cost(&frame);
        let permit = self.room.acquire_many(cost).await.map_err(|_| ())?;
        permit.forget();
        self.tx.send((frame, cost)).map_err(|_| ())
    }

    /// Queues a frame if there is room now.
    fn try_send(&self, frame: String) -> Result<(), Option<String>> {
        let cost = self.cost(&frame);
        match self.room.try_acquire_many(cost) {
            Ok(permit) => {
                permit.forget();
                self.tx.send((frame, cost)).map_err(|_| None)
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Err(Some(frame)),
            Err(tokio::sync::TryAcquireError::Closed) => Err(None),
        }
    }

    /// Wakes every sender waiting for room: the backend is gone.
    fn close(&self) {
        self.room.close();
    }
}

/// The receiving side of a backend's queue.
struct BackendRx {
    rx: mpsc::UnboundedReceiver<(String, u32)>,
    room: Arc<Semaphore>,
}

impl BackendRx {
    fn took(&self, (frame, cost): (String, u32)) -> String {
        self.room.add_permits(cost as usize);
        frame
    }
}

/// Queues frames for a backend without waiting (from places that cannot wait): what does not
/// fit now is queued by a task of its own.
fn send_nowait(tx: &BackendTx, frames: Vec<String>) {
    for frame in frames {
        if let Err(Some(frame)) = tx.try_send(frame) {
            let tx = tx.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = tx.send(frame).await;
                });
            }
        }
    }
}

/// The backend side of an endpoint.
pub struct BackendConn {
    endpoint: Arc<Endpoint>,
    generation: u64,
    rx: BackendRx,
    close: CloseCell,
}

impl BackendConn {
    /// The endpoint this backend serves.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The next frame to write to the backend; None once the multiplexer closed this backend
    /// (see [`BackendConn::close_reason`]).
    pub async fn recv(&mut self) -> Option<String> {
        if self.is_closed() {
            return None;
        }
        let item = self.rx.rx.recv().await?;
        let frame = self.rx.took(item);
        // Closed while waiting: what was queued is not delivered (those calls have failed).
        (!self.is_closed()).then_some(frame)
    }

    /// A frame already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<String> {
        if self.is_closed() {
            return None;
        }
        let item = self.rx.rx.try_recv().ok()?;
        Some(self.rx.took(item))
    }

    /// Whether the multiplexer closed this backend (replaced, revoked, stopping).
    fn is_closed(&self) -> bool {
        self.close.get().is_some()
    }

    /// Why the multiplexer closed this backend.
    pub fn close_reason(&self) -> CloseReason {
        self.close
            .get()
            .cloned()
            .unwrap_or_else(|| CloseReason::new(close::GOING_AWAY, "closed"))
    }

    /// Routes one frame from the backend. Returns a frame to answer the backend with, if any.
    pub fn handle(&self, mut msg: Message) -> Option<Message> {
        let ep = &self.endpoint;
        match msg.kind() {
            Kind::Reply => {
                let Some(id) = msg.id() else {
                    ep.dropped("reply_without_id");
                    return None;
                };
                let mut s = ep.state();
                if !s.is_current(self.generation) {
                    drop(s);
                    ep.dropped("backend_closed");
                    return None;
                }
                let Some(call) = s.calls.get(&id) else {
                    drop(s);
                    ep.dropped("unknown_call");
                    return None;
                };
                let route = call.route.clone();
                let client_id = call.client_id;
                let client_ext = call.client_ext.clone();
                if msg.ends_call() {
                    s.end_call(id);
                }
                let tx = s.clients.get(&route).map(|c| c.tx.clone());
                drop(s);
                msg.set_id(Some(client_id));
                restore_ext(&mut msg, &route, client_ext.as_deref());
                match tx {
                    Some(tx) => ep.deliver(&route, &tx, msg),
                    None => ep.dropped("client_gone"),
                }
                None
            }
            Kind::Request => {
                let mut ext = msg.ext().unwrap_or_default();
                let route: Option<Route> = match ext.remove("route") {
                    Some(Value::String(route)) => Some(Arc::from(route)),
                    _ => None,
                };
                let id = msg.id();
                let mut s = ep.state();
                if !s.is_current(self.generation) {
                    drop(s);
                    ep.dropped("backend_closed");
                    return None;
                }
                let target = route
                    .as_ref()
                    .and_then(|r| s.clients.get_key_value(r))
                    .map(|(r, c)| (r.clone(), c.tx.clone()));
                let Some((route, tx)) = target else {
                    drop(s);
                    ep.dropped("client_not_connected");
                    let id = id?;
                    let mut reply = Message::error_reply(
                        Some(id),
                        &RpcError::new(code::CLIENT_NOT_CONNECTED, "client not connected"),
                    );
                    if let Some(raw) = msg.ext_raw() {
                        reply.set_raw("ext", raw.to_owned());
                    }
                    return Some(reply);
                };
                if let Some(id) = id {
                    if s.backend_calls.get(&id) != Some(&route) {
                        // A new call to this client: it counts against the client's limit.
                        let max = ep.limits().max_pending_calls_per_client;
                        let open = s.clients.get(&route).map_or(0, |c| c.backend_calls);
                        if open >= max {
                            drop(s);
                            ep.dropped("too_many_pending_calls");
                            let mut reply = Message::error_reply(
                                Some(id),
                                &RpcError::new(
                                    code::TOO_MANY_PENDING_CALLS,
                                    "too many pending calls to this client",
                                ),
                            );
                            if let Some(raw) = msg.ext_raw() {
                                reply.set_raw("ext", raw.to_owned());
                            }
                            return Some(reply);
                        }
                        if let Some(before) = s.backend_calls.insert(id, route.clone()) {
                            if let Some(c) = s.clients.get_mut(&before) {
                                c.backend_calls -= 1;
                            }
                        }
                        if let Some(c) = s.clients.get_mut(&route) {
                            c.backend_calls += 1;
                        }
                    }
                }
                drop(s);
                msg.set_ext(if ext.is_empty() { None } else { Some(&ext) });
                ep.deliver(&route, &tx, msg);
                None
            }
        }
    }
}

impl Drop for BackendConn {
    fn drop(&mut self) {
        // Senders waiting for room in this backend's queue stop waiting.
        self.rx.room.close();
        self.endpoint.backend_left(self.generation, false);
    }
}

/// A client of an endpoint: a WebSocket peer or one HTTP call.
pub struct ClientConn {
    endpoint: Arc<Endpoint>,
    route: Route,
    /// `{"route":"<route>"}`, made once.
    route_ext: Box<RawValue>,
    rx: queue::UnboundedReceiver<(Message, usize)>,
    /// Bytes queued in `rx` (shared with the endpoint's side of the queue).
    queued: Arc<AtomicUsize>,
    close: CloseCell,
}

impl ClientConn {
    /// The endpoint.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// This client's route key.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The next frame for this client; None once the multiplexer closed it
    /// (see [`ClientConn::close_reason`]).
    pub async fn recv(&mut self) -> Option<Message> {
        if self.dropped_out() {
            return None;
        }
        let (msg, size) = self.rx.next().await?;
        self.queued.fetch_sub(size, Ordering::Relaxed);
        Some(msg)
    }

    /// A frame already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        if self.dropped_out() {
            return None;
        }
        let (msg, size) = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(size, Ordering::Relaxed);
        Some(msg)
    }

    /// Whether this client was put out for policy (it did not read, or its secret was revoked):
    /// then what is still queued for it is not delivered. Other closes (grace over, shutdown)
    /// deliver what is queued first.
    fn dropped_out(&self) -> bool {
        self.close.get().is_some_and(|r| r.code == close::POLICY)
    }

    /// Why the multiplexer closed this client.
    pub fn close_reason(&self) -> CloseReason {
        self.close
            .get()
            .cloned()
            .unwrap_or_else(|| CloseReason::new(close::GOING_AWAY, "closed"))
    }

    /// Sends one frame from this client to the backend. Returns the frame to answer the client
    /// with when the gateway answers it itself (too many pending calls, backend unavailable; the
    /// latter also for a request without an id, which then has no id either).
    pub async fn send(&self, mut msg: Message) -> Option<Message> {
        let ep = &self.endpoint;
        let ext_map = if msg.ext_raw().is_some() {
            msg.ext()
        } else {
            None
        };

        let backend = match msg.kind() {
            Kind::Reply => {
                // A reply to a call the backend made to this client: it keeps its id.
                let Some(id) = msg.id() else {
                    ep.dropped("reply_without_id");
                    return None;
                };
                let mut s = ep.state();
                if s.backend_calls.get(&id) != Some(&self.route) {
                    drop(s);
                    ep.dropped("unknown_call");
                    return None;
                }
                if msg.ends_call() {
                    s.backend_calls.remove(&id);
                    if let Some(c) = s.clients.get_mut(&self.route) {
                        c.backend_calls -= 1;
                    }
                }
                match &s.backend {
                    Some(b) => b.tx.clone(),
                    None => {
                        drop(s);
                        ep.dropped("no_backend");
                        return None;
                    }
                }
            }
            Kind::Request => {
                loop {
                    match self.admit(&msg) {
                        Admit::Send(tx, backend_id) => {
                            if backend_id.is_some() {
                                msg.set_id(backend_id);
                            }
                            break tx;
                        }
                        Admit::Answer(reply) => return reply,
                        Admit::Wait(deadline) => {
                            // Only a call that has to wait registers for the wake-up (the common
                            // path takes no extra lock); after registering, look again, so a
                            // backend that came in between is not missed.
                            let wait = ep.changed.notified();
                            let mut wait = std::pin::pin!(wait);
                            wait.as_mut().enable();
                            if ep.waiting_is_over() {
                                continue;
                            }
                            let _ = tokio::time::timeout_at(deadline, wait).await;
                        }
                    }
                }
            }
        };

        match ext_map {
            Some(mut ext) => {
                ext.insert("route".into(), Value::String(self.route.to_string()));
                msg.set_ext(Some(&ext));
            }
            None => msg.set_raw("ext", self.route_ext.clone()),
        }
        if backend.send(msg.to_json()).await.is_ok() {
            ep.to_backend.inc();
        } else {
            // The backend left while we queued; its departure fails the call.
            ep.dropped("no_backend");
        }
        None
    }
}

/// What to do with a client's request.
enum Admit {
    /// Queue it to this backend, under this backend id (None: it has no id).
    Send(BackendTx, Option<u64>),
    /// The gateway answers it itself (or drops it: None).
    Answer(Option<Message>),
    /// No backend yet; wait for one until this instant.
    Wait(Instant),
}

impl ClientConn {
    /// Decides a request under the endpoint lock: gives it a backend id (or reuses the one of the
    /// call it continues) and picks the backend to send it to.
    fn admit(&self, msg: &Message) -> Admit {
        let ep = &self.endpoint;
        let mut guard = ep.state();
        let s = &mut *guard;
        let backend = match (&s.backend, s.grace_until) {
            (Some(b), _) => b.tx.clone(),
            (None, Some(until)) if !s.removed && Instant::now() < until => {
                return Admit::Wait(until)
            }
            _ => {
                drop(guard);
                ep.dropped("no_backend");
                // Answered even without an id, so an HTTP caller can tell; WebSocket peers are
                // only sent answers that carry an id.
                return Admit::Answer(Some(local_error(
                    msg,
                    code::BACKEND_UNAVAILABLE,
                    "backend unavailable",
                )));
            }
        };
        let Some(client_id) = msg.id() else {
            return Admit::Send(backend, None);
        };
        let limits = ep.limits();
        let Some(client) = s.clients.get_mut(&self.route) else {
            // Closed by the multiplexer meanwhile.
            return Admit::Answer(None);
        };
        let backend_id = match client.open.get(&client_id) {
            Some(&backend_id) => backend_id,
            None => {
                if client.open.len() >= limits.max_pending_calls_per_client {
                    drop(guard);
                    ep.dropped("too_many_pending_calls");
                    return Admit::Answer(Some(local_error(
                        msg,
                        code::TOO_MANY_PENDING_CALLS,
                        "too many pending calls",
                    )));
                }
                // The `ext` of every open call is kept until it ends: bounded per client too.
                let ext_len = msg.ext_raw().map_or(0, |e| e.get().len());
                if client.ext_bytes + ext_len > limits.client_queue_bytes {
                    drop(guard);
                    ep.dropped("too_many_pending_calls");
                    return Admit::Answer(Some(local_error(
                        msg,
                        code::TOO_MANY_PENDING_CALLS,
                        "pending calls hold too much ext data",
                    )));
                }
                client.ext_bytes += ext_len;
                let backend_id = s.next_id;
                s.next_id += 1;
                client.open.insert(client_id, backend_id);
                s.calls.insert(
                    backend_id,
                    PendingCall {
                        route: self.route.clone(),
                        client_id,
                        // Copied only for a call that opens: the rest never need it.
                        client_ext: msg.ext_raw().map(|raw| raw.to_owned()),
                    },
                );
                s.update_gauges();
                backend_id
            }
        };
        drop(guard);
        Admit::Send(backend, Some(backend_id))
    }
}

/// An error reply the gateway makes for `msg`, with its id and `ext`.
fn local_error(msg: &Message, error_code: i64, text: &str) -> Message {
    let mut reply = Message::error_reply(msg.id(), &RpcError::new(error_code, text));
    if let Some(raw) = msg.ext_raw() {
        reply.set_raw("ext", raw.to_owned());
    }
    reply
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        let route = self.route.clone();
        self.endpoint.remove_clients(None, |_| [route]);
    }
}
