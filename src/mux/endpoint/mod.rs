//! One endpoint: its pool of backends, its clients, and the call tables between them.
//!
//! A pool holds up to `max_backends` live backends, oldest first. A WebSocket client is pinned
//! to one of them when it joins (the one with the fewest pinned clients) and its new calls go
//! there; an HTTP call goes to the backend with the fewest pending calls. Ids are rewritten per
//! backend connection. A backend that leaves fails its own pending calls and nothing else: its
//! clients are pinned again at once. Only when the last one leaves does the grace start.
//!
//! This file holds the endpoint and its tables; `backend.rs` the backend side of a connection
//! (routing what a backend sends, `$drain`), `client.rs` the client side (admitting calls).

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use futures_channel::mpsc as queue;
use prometheus::IntGauge;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

mod backend;
mod client;

pub use backend::BackendConn;
pub use client::ClientConn;

use super::queue::{send_nowait, BackendTx, ClientTx, Push};
use super::{close, lock, CloseReason, Limits, Registry};
use crate::auth::Digest;
use crate::duplex::{code, Message, RpcError};
use crate::metrics::metrics;

type Route = Arc<str>;
type CloseCell = Arc<OnceLock<CloseReason>>;
/// Identifies one backend connection of an endpoint (bumped by every publish).
type BackendKey = u64;

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

/// Why a backend could not join an endpoint's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishError {
    /// The pool's live backends use another client secret.
    SecretConflict,
}

/// What the cluster announces of an endpoint (see [`Endpoint::snapshot`]).
#[derive(Debug, Clone)]
pub struct PoolSnapshot {
    /// The digest of the secret its clients present.
    pub secret: Digest,
    /// Its live backends, the longest-connected first: (key, joined at in Unix ms, draining).
    pub backends: Vec<(u64, u64, bool)>,
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sizes of an endpoint's tables (for tests, leak checks and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointStats {
    /// Live backends (draining ones included).
    pub backends: usize,
    /// Connected clients (WebSocket clients and HTTP calls in progress).
    pub clients: usize,
    /// Client calls waiting for a backend's reply.
    pub pending_calls: usize,
    /// Backend calls waiting for a client's reply.
    pub backend_calls: usize,
}

/// An endpoint: a path with a pool of backends (or in its grace after the last one left) and
/// its clients.
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
    /// The endpoint is gone and its series removed: late events (a call woken by the end of
    /// the grace, frames in flight) must not make them again.
    gone: bool,
}

struct State {
    /// Live backends, the longest-connected first.
    backends: Vec<BackendSlot>,
    /// The key the next backend gets.
    next_key: BackendKey,
    secret: Digest,
    clients: HashMap<Route, ClientSlot>,
    /// How many of `clients` are WebSocket clients (kept, not counted, on every change).
    websocket_clients: usize,
    /// Where the search for the least-loaded backend starts, so ties go round in turn.
    turn: usize,
    /// Set when no backend takes new calls (the last one left, or all drain): new calls wait
    /// until then for one.
    grace_until: Option<Instant>,
    removed: bool,
    gauges: Option<Gauges>,
    /// The runtime the latest backend's connection runs on: work for this endpoint that is
    /// not tied to a connection of its own (relayed cluster sessions) runs there, next to it.
    runtime: Option<tokio::runtime::Handle>,
    /// Backends of other nodes that called clients of this one: the key each stands under in
    /// `ClientSlot::incoming` (from [`REMOTE_KEYS`] up) -> its node and its key there.
    remote_callers: HashMap<BackendKey, (Arc<str>, u64, Instant)>,
    /// The key the next one gets.
    next_remote_key: BackendKey,
    /// Calls this node's backends made to clients of other nodes, still open:
    /// (backend, its call id) -> (the client's node, the client's route).
    relayed_calls: HashMap<(BackendKey, u64), (Arc<str>, Route)>,
    /// Answers owed to such backends (a client left with their calls open), sent once the
    /// lock is released: (node, key there, frame).
    remote_owed: Vec<(Arc<str>, u64, String)>,
}

struct BackendSlot {
    key: BackendKey,
    /// When it joined, in milliseconds since the Unix epoch (the cluster compares pools by it).
    since_ms: u64,
    tx: BackendTx,
    close: CloseCell,
    token_name: String,
    /// The digest of the token it published with.
    token: Digest,
    /// Backend call id -> the client call it stands for.
    calls: HashMap<u64, PendingCall>,
    next_id: u64,
    /// WebSocket clients pinned to it.
    pinned: usize,
    /// Set once it asked to drain: it takes no new clients or calls.
    draining: bool,
    /// The `$drain` request still to be answered.
    drain_request: Option<DrainRequest>,
}

struct DrainRequest {
    id: Option<u64>,
    ext: Option<Box<RawValue>>,
}

struct ClientSlot {
    tx: ClientTx,
    close: CloseCell,
    /// This client's open calls: client id -> (backend, backend id).
    open: HashMap<u64, (BackendKey, u64)>,
    /// Bytes of `ext` its open calls hold (bounded by the client queue's budget).
    ext_bytes: usize,
    /// Calls backends have open to this client: the id the client sees -> (backend, the
    /// backend's own id). The backend's id is kept unless another backend of the pool already
    /// uses it with this client.
    incoming: HashMap<u64, (BackendKey, u64)>,
    /// Where ids for colliding incoming calls come from.
    next_incoming: u64,
    /// WebSocket clients count in `duplex_gateway_clients`; HTTP calls do not.
    websocket: bool,
    /// The backend a WebSocket client's new calls go to.
    pinned: Option<BackendKey>,
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

/// A frame for a client, with its queue.
type Delivery = (Route, ClientTx, Message);
/// Frames for a backend, with its queue.
type Owed = (BackendTx, Vec<String>);

/// What removing a backend leaves to do once the lock is released.
#[derive(Default)]
struct Fallout {
    deliveries: Vec<Delivery>,
    owed: Vec<Owed>,
    failovers: u64,
}

impl Fallout {
    fn absorb(&mut self, other: Fallout) {
        self.deliveries.extend(other.deliveries);
        self.owed.extend(other.owed);
        self.failovers += other.failovers;
    }
}

impl State {
    fn update_gauges(&self) {
        if let Some(g) = &self.gauges {
            g.backends.set(self.backends.len() as i64);
            g.clients.set(self.websocket_clients as i64);
            g.pending
                .set(self.backends.iter().map(|b| b.calls.len()).sum::<usize>() as i64);
        }
    }

    fn slot(&self, key: BackendKey) -> Option<&BackendSlot> {
        self.backends.iter().find(|b| b.key == key)
    }

    fn slot_mut(&mut self, key: BackendKey) -> Option<&mut BackendSlot> {
        self.backends.iter_mut().find(|b| b.key == key)
    }

    /// Whether a publish with `secret` would join live backends of another secret: those that
    /// stay once a full pool of `max_backends` has replaced its oldest.
    fn secret_conflicts(&self, secret: &Digest, max_backends: usize) -> bool {
        let staying = self.backends.len().min(max_backends.max(1) - 1);
        staying > 0 && !self.secret.matches(secret)
    }

    /// When live backends remain but all of them drain, new calls wait as in a grace (for a
    /// new backend), for `hold` at most.
    fn hold_new_calls_if_none_serve(&mut self, hold: Duration) {
        if !self.backends.is_empty() && !self.serving() && self.grace_until.is_none() {
            self.grace_until = Some(Instant::now() + hold);
        }
    }

    /// The last backend left: new calls wait for one until the grace ends (the grace's timer
    /// starts once the lock is released: see `Endpoint::start_grace`).
    fn begin_grace(&mut self, grace: Duration) {
        if self.backends.is_empty() && !self.removed {
            self.grace_until = Some(Instant::now() + grace);
        }
    }

    /// Whether some backend takes new calls.
    fn serving(&self) -> bool {
        self.backends.iter().any(|b| !b.draining)
    }

    /// The backend that takes new work: the one with the least `load`, ties in turn.
    fn least(&mut self, load: impl Fn(&BackendSlot) -> usize) -> Option<BackendKey> {
        let n = self.backends.len();
        let mut best: Option<(usize, usize)> = None;
        for step in 0..n {
            let i = (self.turn + step) % n;
            let b = &self.backends[i];
            if b.draining {
                continue;
            }
            let l = load(b);
            if best.is_none_or(|(_, bl)| l < bl) {
                best = Some((i, l));
            }
        }
        let (i, _) = best?;
        self.turn = i + 1;
        Some(self.backends[i].key)
    }

    /// Pins a WebSocket client to the backend with the fewest pinned clients.
    fn pin(&mut self, route: &Route) -> Option<BackendKey> {
        let key = self.least(|b| b.pinned)?;
        if let Some(slot) = self.slot_mut(key) {
            slot.pinned += 1;
        }
        if let Some(client) = self.clients.get_mut(route) {
            client.pinned = Some(key);
        }
        Some(key)
    }

    /// Unpins a client from its backend.
    fn unpin(&mut self, route: &Route) {
        let Some(key) = self.clients.get_mut(route).and_then(|c| c.pinned.take()) else {
            return;
        };
        if let Some(slot) = self.slot_mut(key) {
            slot.pinned = slot.pinned.saturating_sub(1);
        }
    }

    /// Pins again every client of backend `key` (it left or drains). Returns how many found
    /// another backend.
    fn repin_clients_of(&mut self, key: BackendKey) -> u64 {
        let routes: Vec<Route> = self
            .clients
            .iter()
            .filter(|(_, c)| c.pinned == Some(key))
            .map(|(r, _)| r.clone())
            .collect();
        let mut moved = 0;
        for route in routes {
            self.unpin(&route);
            if self.pin(&route).is_some() {
                moved += 1;
            }
        }
        moved
    }

    /// Forgets the client call `backend_id` of backend `key` stands for (it ended). Returns the
    /// answer owed to a draining backend whose last call this was.
    fn end_call(&mut self, key: BackendKey, backend_id: u64) -> Option<Owed> {
        let slot = self.slot_mut(key)?;
        let call = slot.calls.remove(&backend_id)?;
        let drained = slot.draining && slot.calls.is_empty();
        let answer = if drained {
            slot.drain_request
                .take()
                .map(|req| (slot.tx.clone(), vec![drain_reply(&req, 0)]))
        } else {
            None
        };
        if let Some(client) = self.clients.get_mut(&call.route) {
            client.open.remove(&call.client_id);
            client.ext_bytes -= call.ext_len();
        }
        self.update_gauges();
        answer
    }

    /// Removes a client and everything it had open. Returns the `-32001` replies owed to the
    /// backends for their calls to this client.
    fn remove_client(&mut self, route: &Route, reason: Option<CloseReason>) -> Vec<Owed> {
        self.unpin(route);
        let Some(slot) = self.clients.remove(route) else {
            return Vec::new();
        };
        if slot.websocket {
            self.websocket_clients -= 1;
        }
        if let Some(reason) = reason {
            let _ = slot.close.set(reason);
        }
        let mut owed = Vec::new();
        // The client is out of `clients` already: ending its calls leaves no client state.
        for &(key, backend_id) in slot.open.values() {
            owed.extend(self.end_call(key, backend_id));
        }
        for &(key, backend_id) in slot.incoming.values() {
            let reply = client_gone_frame(backend_id, route);
            if let Some(backend) = self.slot(key) {
                owed.push((backend.tx.clone(), vec![reply]));
            } else if let Some((node, remote_key, _)) = self.remote_callers.get(&key) {
                self.remote_owed.push((node.clone(), *remote_key, reply));
            }
        }
        self.update_gauges();
        owed
    }

    /// Takes backend `key` out of the pool: its pending calls fail with `-32000`, its calls to
    /// clients are forgotten, its clients are pinned again. `reason` (if given) is what its
    /// connection is closed with. When it was the last one, the `grace` begins here, under the
    /// lock, before the failed calls are answered: a client's next call must find it.
    fn remove_backend(
        &mut self,
        key: BackendKey,
        reason: Option<CloseReason>,
        why: &str,
        grace: Duration,
    ) -> Option<Fallout> {
        let index = self.backends.iter().position(|b| b.key == key)?;
        let slot = self.backends.remove(index);
        self.begin_grace(grace);
        if let Some(reason) = reason {
            let _ = slot.close.set(reason);
        }
        slot.tx.close();
        let mut fallout = Fallout::default();
        for (_, call) in slot.calls {
            if let Some(client) = self.clients.get_mut(&call.route) {
                client.open.remove(&call.client_id);
                client.ext_bytes -= call.ext_len();
                let mut reply = Message::error_reply(
                    Some(call.client_id),
                    &RpcError::new(code::BACKEND_UNAVAILABLE, why),
                );
                restore_ext(&mut reply, &call.route, call.client_ext.as_deref());
                fallout
                    .deliveries
                    .push((call.route.clone(), client.tx.clone(), reply));
            }
        }
        for client in self.clients.values_mut() {
            client.incoming.retain(|_, (k, _)| *k != key);
        }
        self.relayed_calls.retain(|(k, _), _| *k != key);
        fallout.failovers = self.repin_clients_of(key);
        self.update_gauges();
        Some(fallout)
    }
}

/// The immediate answer to a `$drain` that has nothing to wait for (none without an id).
fn request_answer(request: &DrainRequest) -> Option<Message> {
    request.id?;
    Message::parse(drain_reply(request, 0).as_bytes()).ok()
}

/// `{"pending": N}`: the answer to a backend's `$drain`.
fn drain_reply(req: &DrainRequest, pending: usize) -> String {
    let mut reply = Message::reply(req.id, &json!({ "pending": pending }), false);
    if let Some(ext) = &req.ext {
        reply.set_raw("ext", ext.clone());
    }
    reply.to_json()
}

impl Endpoint {
    pub(super) fn new(path: &str, registry: Weak<Registry>) -> Arc<Endpoint> {
        let m = metrics();
        Arc::new(Endpoint {
            path: path.to_string(),
            state: Mutex::new(State {
                backends: Vec::new(),
                next_key: 1,
                secret: Digest::of(b""),
                clients: HashMap::new(),
                websocket_clients: 0,
                turn: 0,
                grace_until: None,
                removed: false,
                gauges: None,
                runtime: None,
                remote_callers: HashMap::new(),
                next_remote_key: REMOTE_KEYS,
                relayed_calls: HashMap::new(),
                remote_owed: Vec::new(),
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
        // The common answer counts on handles looked up once, without a lock: after the
        // endpoint is gone they are detached from the registry, so they make no series again.
        if status == "200" {
            self.http_ok.inc();
        } else {
            let mut series = lock(&self.series);
            if series.gone {
                return;
            }
            remember(&mut series.http_codes, status);
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

    /// Whether a publish with `secret` into a pool of `max_backends` would join live backends
    /// that use another secret (the ones a full pool replaces do not count).
    pub fn secret_conflicts(&self, secret: &Digest, max_backends: usize) -> bool {
        let s = self.state();
        s.secret_conflicts(secret, max_backends)
    }

    /// The digests of the tokens the live backends published with.
    pub fn backend_tokens(&self) -> Vec<Digest> {
        self.state().backends.iter().map(|b| b.token).collect()
    }

    /// How long new calls wait when every live backend drains: until the drains may end, and
    /// at least the grace.
    fn hold(&self) -> Duration {
        let limits = self.limits();
        limits.backend_grace.max(limits.drain_timeout)
    }

    /// The multiplexer's limits in force.
    fn limits(&self) -> Arc<Limits> {
        self.registry
            .upgrade()
            .map_or_else(|| Arc::new(Limits::default()), |r| r.limits())
    }

    /// Whether a call waiting for a backend can stop waiting: one takes calls, or the endpoint
    /// is gone.
    fn waiting_is_over(&self) -> bool {
        let s = self.state();
        s.serving() || s.removed
    }

    /// The runtime the latest backend's connection runs on, if any.
    pub fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.state().runtime.clone()
    }

    /// Whether some live backend takes new calls.
    pub fn serving(&self) -> bool {
        self.state().serving()
    }

    /// The endpoint's pool as the cluster announces it; None once it is removed.
    pub fn snapshot(&self) -> Option<PoolSnapshot> {
        let s = self.state();
        if s.removed {
            return None;
        }
        Some(PoolSnapshot {
            secret: s.secret,
            backends: s
                .backends
                .iter()
                .map(|b| (b.key, b.since_ms, b.draining))
                .collect(),
        })
    }

    /// Tells the cluster (if any) that this endpoint's pool changed.
    fn pool_changed(&self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.note_pool_change();
        }
    }

    /// Closes the backend `key` with `reason` (the cluster replaced it: its pool is full with a
    /// newer backend on another node). Returns whether it was live.
    pub fn close_backend(self: &Arc<Self>, key: u64, reason: CloseReason) -> bool {
        let hold = self.hold();
        let grace = self.limits().backend_grace;
        let mut s = self.state();
        let Some(fallout) = s.remove_backend(key, Some(reason), "backend replaced", grace) else {
            return false;
        };
        let emptied = s.backends.is_empty();
        s.hold_new_calls_if_none_serve(hold);
        drop(s);
        tracing::info!(endpoint = %crate::auth::logged(&self.path), "backend replaced by a newer one on another node");
        // Counted before the failed calls are answered: a client that calls again at once must
        // see that its place changed.
        self.pool_changed();
        self.settle(fallout);
        if emptied {
            self.start_grace();
        }
        true
    }

    /// Table sizes.
    pub fn stats(&self) -> EndpointStats {
        let s = self.state();
        EndpointStats {
            backends: s.backends.len(),
            clients: s.clients.len(),
            pending_calls: s.backends.iter().map(|b| b.calls.len()).sum(),
            backend_calls: s.clients.values().map(|c| c.incoming.len()).sum(),
        }
    }

    /// Adds a backend to the pool; when the pool already has `max_backends`, the
    /// longest-connected ones are replaced (closed with 1012). `fixed_secret`: the endpoint's
    /// secret comes from the config, so a publish may change it; otherwise a publish whose
    /// secret differs from the live backends' is refused. None if the endpoint was removed
    /// meanwhile.
    pub(super) fn attach_backend(
        self: &Arc<Self>,
        secret: Digest,
        token: (&str, Digest),
        max_backends: usize,
        fixed_secret: bool,
    ) -> Option<Result<BackendConn, PublishError>> {
        let (token_name, token) = token;
        let limits = self.limits();
        let grace = limits.backend_grace;
        let mut s = self.state();
        if s.removed {
            return None;
        }
        if !fixed_secret && s.secret_conflicts(&secret, max_backends) {
            return Some(Err(PublishError::SecretConflict));
        }
        let mut fallout = Fallout::default();
        while s.backends.len() >= max_backends.max(1) {
            let oldest = s.backends[0].key;
            let reason = CloseReason::new(close::SERVICE_RESTART, "replaced by a new backend");
            if let Some(f) = s.remove_backend(oldest, Some(reason), "backend replaced", grace) {
                fallout.absorb(f);
            }
            let pool = s.backends.len();
            tracing::info!(endpoint = %crate::auth::logged(&self.path), pool, "longest-connected backend replaced by a new publish");
        }
        let (tx, rx) = BackendTx::channel(limits.backend_queue_bytes);
        let close: CloseCell = Arc::new(OnceLock::new());
        let key = s.next_key;
        s.next_key += 1;
        s.secret = secret;
        s.grace_until = None;
        s.runtime = tokio::runtime::Handle::try_current().ok();
        s.backends.push(BackendSlot {
            key,
            since_ms: unix_ms(),
            tx,
            close: close.clone(),
            token_name: token_name.to_string(),
            token,
            calls: HashMap::new(),
            next_id: 1,
            pinned: 0,
            draining: false,
            drain_request: None,
        });
        // Clients left without a backend (in the grace, or all draining) are pinned again.
        let unpinned: Vec<Route> = s
            .clients
            .iter()
            .filter(|(_, c)| c.websocket && c.pinned.is_none())
            .map(|(r, _)| r.clone())
            .collect();
        for route in unpinned {
            s.pin(&route);
        }
        if s.gauges.is_none() {
            let m = metrics();
            let labels = [self.path.as_str()];
            s.gauges = Some(Gauges {
                backends: m.backends.with_label_values(&labels),
                clients: m.clients.with_label_values(&labels),
                pending: m.pending_calls.with_label_values(&labels),
            });
        }
        s.update_gauges();
        let pool = s.backends.len();
        drop(s);
        tracing::info!(endpoint = %crate::auth::logged(&self.path), token = %token_name, pool, "backend joined the pool");
        self.settle(fallout);
        self.changed.notify_waiters();
        self.pool_changed();
        Some(Ok(BackendConn {
            endpoint: self.clone(),
            key,
            rx,
            close,
        }))
    }

    /// Delivers what removing backends left to deliver, and counts the failovers.
    fn settle(&self, fallout: Fallout) {
        for (route, tx, msg) in fallout.deliveries {
            self.deliver(&route, &tx, msg);
        }
        for (tx, frames) in fallout.owed {
            send_nowait(&tx, frames);
        }
        let mut series = lock(&self.series);
        if fallout.failovers > 0 && !series.gone {
            metrics()
                .failovers
                .with_label_values(&[self.path.as_str()])
                .inc_by(fallout.failovers);
            remember(&mut series.dropped, FAILOVERS);
        }
    }

    /// Adds a client (a WebSocket peer, or an HTTP call when `websocket` is false). The secret
    /// is checked again here, under the endpoint's lock, so a client cannot join with a secret
    /// that a reload has just replaced. A client another node of the cluster relays joins the
    /// same way, with the digest it was admitted with there: it counts against `max_clients`
    /// here too.
    pub fn join(
        self: &Arc<Self>,
        websocket: bool,
        max_clients: usize,
        secret: &Digest,
    ) -> Result<ClientConn, JoinError> {
        let budget = self.limits().client_queue_bytes;
        let mut s = self.state();
        if s.removed || (s.backends.is_empty() && s.grace_until.is_none()) {
            return Err(JoinError::NotFound);
        }
        if !s.secret.matches(secret) {
            return Err(JoinError::BadSecret);
        }
        if s.clients.len() >= max_clients {
            return Err(JoinError::Full);
        }
        let route = match self.registry.upgrade() {
            Some(registry) => registry.route_key(),
            None => return Err(JoinError::NotFound),
        };
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
                ext_bytes: 0,
                incoming: HashMap::new(),
                next_incoming: 1 << 32,
                websocket,
                pinned: None,
            },
        );
        if websocket {
            s.pin(&route);
        }
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

    /// Closes the client `route` names with `reason` (if it is still here).
    pub fn close_client(&self, route: &str, reason: CloseReason) -> bool {
        let route: Route = Arc::from(route);
        self.remove_clients(Some(&reason), |s| {
            s.clients.contains_key(&route).then(|| route.clone())
        }) > 0
    }

    /// Removes the clients `pick` chooses (under the lock, after any change it makes), closing
    /// them with `reason`; the backends' calls to them are answered with `-32001`. Returns how
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
        let remote_owed = std::mem::take(&mut s.remote_owed);
        drop(s);
        for (tx, frames) in owed {
            send_nowait(&tx, frames);
        }
        self.answer_remote(remote_owed);
        removed
    }

    /// Sends answers owed to backends of other nodes.
    fn answer_remote(&self, owed: Vec<(Arc<str>, u64, String)>) {
        if owed.is_empty() {
            return;
        }
        if let Some(relay) = self
            .registry
            .upgrade()
            .as_ref()
            .and_then(|r| r.relay().cloned())
        {
            for (node, key, frame) in owed {
                // Small and owed: a link too full to take it loses it, as a lost link would.
                let _ = relay.answer_backend(&node, &self.path, key, frame);
            }
        }
    }

    /// A call from backend `key` of `node` (another node of the cluster) to a client of this
    /// endpoint. Returns the answer the gateway gives itself (`-32001`, `-32003`), if any.
    pub fn call_from_remote(
        self: &Arc<Self>,
        node: &str,
        key: u64,
        msg: Message,
    ) -> Option<Message> {
        let local_key = {
            let mut s = self.state();
            let found = s
                .remote_callers
                .iter()
                .find(|(_, (n, k, _))| &**n == node && *k == key)
                .map(|(local, _)| *local);
            match found {
                Some(local) => local,
                None if s.remote_callers.len() >= MAX_REMOTE_CALLERS => {
                    drop(s);
                    self.dropped("too_many_remote_backends");
                    return None;
                }
                None => {
                    let local = s.next_remote_key;
                    s.next_remote_key += 1;
                    s.remote_callers
                        .insert(local, (Arc::from(node), key, Instant::now()));
                    local
                }
            }
        };
        let mut ext = msg.ext().unwrap_or_default();
        let route: Option<Route> = match ext.remove("route") {
            Some(Value::String(route)) => Some(Arc::from(route)),
            _ => None,
        };
        self.call_client(local_key, msg, ext, route, false)
    }

    /// Forgets the backends of other nodes that `gone` says are gone (their node died, or
    /// reconnected, or no longer announces them): their calls to this endpoint's clients are
    /// dropped, so an answer can never reach a later backend under the same key.
    /// Callers first heard of within `min_age` are kept (the heartbeat announcing a new backend
    /// may arrive after its first call).
    pub fn forget_remote_callers(&self, min_age: Duration, gone: impl Fn(&str, u64) -> bool) {
        let mut s = self.state();
        let settled = Instant::now()
            .checked_sub(min_age)
            .unwrap_or_else(Instant::now);
        let keys: Vec<BackendKey> = s
            .remote_callers
            .iter()
            .filter(|(_, (node, key, since))| *since <= settled && gone(node, *key))
            .map(|(local, _)| *local)
            .collect();
        if keys.is_empty() {
            return;
        }
        for key in &keys {
            s.remote_callers.remove(key);
        }
        for client in s.clients.values_mut() {
            client.incoming.retain(|_, (k, _)| !keys.contains(k));
        }
    }

    /// A client's answer, from another node, to backend `key` of this endpoint. False when the
    /// backend's queue has no room for it: that client sends faster than the backend reads, and
    /// across nodes it cannot be held back (its node closes it).
    pub fn answer_from_remote(&self, key: u64, answer: &Message) -> bool {
        let mut s = self.state();
        if let Some(id) = answer.id() {
            if answer.ends_call() {
                s.relayed_calls.remove(&(key, id));
            }
        }
        let tx = s.slot(key).map(|b| b.tx.clone());
        drop(s);
        let Some(tx) = tx else {
            self.dropped("backend_closed");
            return true;
        };
        match tx.try_send(answer.to_json()) {
            Ok(()) => {
                self.to_backend.inc();
                true
            }
            // The backend is gone meanwhile.
            Err(None) => {
                self.dropped("backend_closed");
                true
            }
            Err(Some(_)) => {
                self.dropped("backend_full");
                false
            }
        }
    }

    /// Fails with `-32001` the calls this node's backends made to clients of the nodes `gone`
    /// names (the node died, or the link to it was lost): nobody will answer them.
    pub fn fail_calls_relayed_to(&self, gone: impl Fn(&str) -> bool) {
        let mut s = self.state();
        let failed: Vec<((BackendKey, u64), Route)> = s
            .relayed_calls
            .extract_if(|_, (node, _)| gone(node))
            .map(|(call, (_, route))| (call, route))
            .collect();
        let mut owed = Vec::new();
        for ((key, id), route) in failed {
            if let Some(backend) = s.slot(key) {
                owed.push((backend.tx.clone(), vec![client_gone_frame(id, &route)]));
            }
        }
        drop(s);
        for (tx, frames) in owed {
            send_nowait(&tx, frames);
        }
    }

    /// Closes the backends whose token `revoked` says is no longer good (reload), or all of
    /// them (`revoked` always true: shutdown). Their departure follows the usual rules: their
    /// pending calls fail, their clients go to the backends left, or wait for the grace. Returns
    /// the names of the tokens of the backends closed.
    pub fn close_backends(
        self: &Arc<Self>,
        reason: CloseReason,
        revoked: impl Fn(&Digest) -> bool,
    ) -> Vec<String> {
        let hold = self.hold();
        let grace = self.limits().backend_grace;
        let mut s = self.state();
        let keys: Vec<(BackendKey, String)> = s
            .backends
            .iter()
            .filter(|b| revoked(&b.token))
            .map(|b| (b.key, b.token_name.clone()))
            .collect();
        let mut fallout = Fallout::default();
        for (key, _) in &keys {
            if let Some(f) =
                s.remove_backend(*key, Some(reason.clone()), "backend unavailable", grace)
            {
                fallout.absorb(f);
            }
        }
        let emptied = !keys.is_empty() && s.backends.is_empty();
        s.hold_new_calls_if_none_serve(hold);
        let pool = s.backends.len();
        drop(s);
        if !keys.is_empty() {
            tracing::info!(endpoint = %crate::auth::logged(&self.path), closed = keys.len(), pool, "backends closed");
            self.pool_changed();
        }
        self.settle(fallout);
        if emptied {
            self.start_grace();
        }
        keys.into_iter().map(|(_, name)| name).collect()
    }

    /// Closes the longest-connected backends over `size` (reload: a smaller pool) with 1012.
    pub fn shrink_pool(self: &Arc<Self>, size: usize) -> usize {
        let hold = self.hold();
        let grace = self.limits().backend_grace;
        let mut s = self.state();
        let over = s.backends.len().saturating_sub(size.max(1));
        let oldest: Vec<BackendKey> = s.backends.iter().take(over).map(|b| b.key).collect();
        let mut fallout = Fallout::default();
        for key in &oldest {
            let reason = CloseReason::new(close::SERVICE_RESTART, "pool made smaller by a reload");
            if let Some(f) = s.remove_backend(*key, Some(reason), "backend unavailable", grace) {
                fallout.absorb(f);
            }
        }
        s.hold_new_calls_if_none_serve(hold);
        drop(s);
        if !oldest.is_empty() {
            self.pool_changed();
        }
        self.settle(fallout);
        oldest.len()
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

    /// The backend `key` has gone (its connection ended): take it out of the pool.
    fn backend_left(self: &Arc<Self>, key: BackendKey) {
        let hold = self.hold();
        let grace = self.limits().backend_grace;
        let mut s = self.state();
        if s.removed {
            return;
        }
        let Some(fallout) = s.remove_backend(key, None, "backend unavailable", grace) else {
            return;
        };
        let emptied = s.backends.is_empty();
        s.hold_new_calls_if_none_serve(hold);
        let pool = s.backends.len();
        drop(s);
        tracing::info!(endpoint = %crate::auth::logged(&self.path), pool, "backend left");
        self.pool_changed();
        self.settle(fallout);
        if emptied {
            self.start_grace();
        }
    }

    /// The last backend is gone: clients wait `backend_grace` for one to come back, then the
    /// endpoint is removed.
    fn start_grace(self: &Arc<Self>) {
        let grace = self.limits().backend_grace;
        let mut s = self.state();
        if s.removed || !s.backends.is_empty() {
            return;
        }
        if let Some(g) = s.gauges.take() {
            let m = metrics();
            let labels = [self.path.as_str()];
            let _ = m.backends.remove_label_values(&labels);
            let _ = m.clients.remove_label_values(&labels);
            let _ = m.pending_calls.remove_label_values(&labels);
            drop(g);
        }
        // `grace_until` was set as the last backend left (`State::remove_backend`).
        let generation = s.next_key;
        drop(s);
        tracing::info!(endpoint = %crate::auth::logged(&self.path), grace_ms = grace.as_millis() as u64, "last backend left: grace");
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

    /// The grace that began when backend keys had reached `generation` ran out: if no backend
    /// came back, remove the endpoint and close its clients with 1013.
    fn grace_over(self: &Arc<Self>, generation: BackendKey) {
        let mut s = self.state();
        if s.next_key != generation || !s.backends.is_empty() || s.removed {
            return;
        }
        s.removed = true;
        let routes: Vec<Route> = s.clients.keys().cloned().collect();
        let reason = CloseReason::new(close::TRY_AGAIN_LATER, "backend unavailable");
        for route in &routes {
            s.remove_client(route, Some(reason.clone()));
        }
        let remote_owed = std::mem::take(&mut s.remote_owed);
        drop(s);
        self.answer_remote(remote_owed);
        tracing::info!(endpoint = %crate::auth::logged(&self.path), clients = routes.len(), "endpoint removed: backend did not come back");
        self.changed.notify_waiters();
        if let Some(registry) = self.registry.upgrade() {
            registry.remove(self);
            registry.note_pool_change();
        }
    }

    /// Backend `key` asked to drain: no new clients or calls; its clients go elsewhere for their
    /// next calls; `{"pending": 0}` once its last call ends, or `{"pending": N}` after
    /// `drain_timeout`.
    fn start_drain(self: &Arc<Self>, key: BackendKey, request: DrainRequest) -> Option<Message> {
        let limits = self.limits();
        let hold = self.hold();
        let mut s = self.state();
        let slot = s.slot_mut(key)?;
        let first = !slot.draining;
        slot.draining = true;
        let pending = slot.calls.len();
        // Nothing running: answered at once. Else kept (when it has an id) for the answer; a
        // drain asked for again gets the earlier request answered now, with what is running.
        let (immediate, earlier) = if pending == 0 {
            (Some(request), None)
        } else if request.id.is_some() {
            let earlier = slot
                .drain_request
                .replace(request)
                .map(|req| (slot.tx.clone(), vec![drain_reply(&req, pending)]));
            (None, earlier)
        } else {
            (None, None)
        };
        s.repin_clients_of(key);
        s.hold_new_calls_if_none_serve(hold);
        let pool = s.backends.len();
        drop(s);
        if first {
            self.pool_changed();
        }
        if let Some((tx, frames)) = earlier {
            send_nowait(&tx, frames);
        }
        if let Some(request) = immediate {
            tracing::info!(endpoint = %crate::auth::logged(&self.path), pending = 0, pool, "backend drained");
            // Answered only when it has an id: a request without one expects no reply.
            return request_answer(&request);
        }
        tracing::info!(endpoint = %crate::auth::logged(&self.path), pending, pool, "backend draining");
        if !first {
            return None;
        }
        let me = self.clone();
        let timeout = limits.drain_timeout;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(timeout).await;
                let mut s = me.state();
                let Some(slot) = s.slot_mut(key) else { return };
                let Some(request) = slot.drain_request.take() else {
                    return;
                };
                let answer = drain_reply(&request, slot.calls.len());
                let tx = slot.tx.clone();
                drop(s);
                send_nowait(&tx, vec![answer]);
            });
        }
        None
    }

    /// Counts a message dropped for `reason`.
    pub(crate) fn dropped(&self, reason: &'static str) {
        let mut series = lock(&self.series);
        if !series.gone {
            remember(&mut series.dropped, reason);
            metrics()
                .dropped
                .with_label_values(&[self.path.as_str(), reason])
                .inc();
        }
        drop(series);
        tracing::debug!(endpoint = %crate::auth::logged(&self.path), reason, "message dropped");
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
                tracing::info!(endpoint = %crate::auth::logged(&self.path), "closed a client that did not read");
            }
        }
    }

    /// Every series of this endpoint leaves the metrics (it is gone). The registry calls this
    /// under its lock, so a new endpoint at the same path cannot be registering its own meanwhile.
    pub(super) fn remove_series(&self) {
        let m = metrics();
        let path = self.path.as_str();
        let series = std::mem::replace(
            &mut *lock(&self.series),
            Series {
                gone: true,
                ..Series::default()
            },
        );
        for direction in ["to_backend", "to_client"] {
            let _ = m.messages.remove_label_values(&[path, direction]);
        }
        for reason in series.dropped {
            if reason == FAILOVERS {
                let _ = m.failovers.remove_label_values(&[path]);
            } else {
                let _ = m.dropped.remove_label_values(&[path, reason]);
            }
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

/// The most backends of other nodes remembered per endpoint (they are forgotten when they go).
const MAX_REMOTE_CALLERS: usize = 1024;

/// Where the keys of backends of other nodes start (see `State::remote_callers`); this node's
/// own backends' keys count up from 1.
const REMOTE_KEYS: BackendKey = 1 << 62;

/// Stands for the failover counter among the series an endpoint remembers.
const FAILOVERS: &str = "$failovers";

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

/// `-32001` for backend call `backend_id` to the client `route` (gone, or never reached), with
/// the route in `ext` as the backend sent it.
fn client_gone_frame(backend_id: u64, route: &str) -> String {
    let mut reply = Message::error_reply(
        Some(backend_id),
        &RpcError::new(code::CLIENT_NOT_CONNECTED, "client not connected"),
    );
    reply.set_raw("ext", route_ext(route));
    reply.to_json()
}

/// An error reply the gateway makes for `msg`, with its id and `ext`.
pub(crate) fn local_error(msg: &Message, error_code: i64, text: &str) -> Message {
    let mut reply = Message::error_reply(msg.id(), &RpcError::new(error_code, text));
    if let Some(raw) = msg.ext_raw() {
        reply.set_raw("ext", raw.to_owned());
    }
    reply
}
