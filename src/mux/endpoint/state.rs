//! An endpoint's synchronous state: its backends, its clients, the calls between them, and the
//! rules that move them (pinning, load balancing, removing a client or a backend).
//!
//! Nothing here waits, sends or counts: each change returns what is left to do once the
//! endpoint's lock is released (a [`Fallout`]), so the whole table is tested without a runtime.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::ext::{client_gone_frame, restore_ext};
use super::series::MethodSeries;
use super::{BackendKey, CloseCell, Route};
use crate::auth::Digest;
use crate::duplex::{code, Message, RpcError};
use crate::mux::queue::{send_nowait, BackendTx, ClientTx};
use crate::mux::CloseReason;

/// Where the keys of guests (backends that are not in the pool, see [`Outlet`]) start; the
/// pool's own backends' keys count up from 1.
pub(super) const GUEST_KEYS: BackendKey = 1 << 62;

/// Where frames for a backend outside this endpoint's pool go: a backend of another node of a
/// cluster calling this endpoint's clients is a guest here, and its answers go through an
/// outlet the cluster provides. The multiplexer knows nothing more of it.
pub trait Outlet: Send + Sync {
    /// Hands `frame` on without waiting. False when it cannot be carried now (the way to the
    /// backend holds too much already): the client that sent it is put out, as one whose
    /// backend does not read.
    fn offer(&self, frame: String) -> bool;
}

pub(super) struct State {
    /// Live backends, the longest-connected first.
    pub(super) backends: Vec<BackendSlot>,
    /// The key the next backend gets.
    pub(super) next_key: BackendKey,
    pub(super) secret: Digest,
    pub(super) clients: HashMap<Route, ClientSlot>,
    /// How many of `clients` are WebSocket clients (kept, not counted, on every change).
    pub(super) websocket_clients: usize,
    /// Where the search for the least-loaded backend starts, so ties go round in turn.
    pub(super) turn: usize,
    /// Set when no backend takes new calls (the last one left, or all drain): new calls wait
    /// until then for one.
    pub(super) grace_until: Option<Instant>,
    pub(super) removed: bool,
    pub(super) gauges: Option<Gauges>,
    /// The runtime the latest backend's connection runs on: work for this endpoint that is
    /// not tied to a connection of its own (relayed cluster sessions) runs there, next to it.
    pub(super) runtime: Option<tokio::runtime::Handle>,
    /// Backends outside the pool that call this endpoint's clients, by the key their calls
    /// stand under in `ClientSlot::incoming` (from [`GUEST_KEYS`] up).
    pub(super) guests: HashMap<BackendKey, Arc<dyn Outlet>>,
    /// The key the next guest gets.
    pub(super) next_guest: BackendKey,
}

pub(super) struct BackendSlot {
    pub(super) key: BackendKey,
    /// When it joined, in milliseconds since the Unix epoch (the cluster compares pools by it).
    pub(super) since_ms: u64,
    pub(super) tx: BackendTx,
    pub(super) close: CloseCell,
    pub(super) token_name: String,
    /// The digest of the token it published with.
    pub(super) token: Digest,
    /// Backend call id -> the client call it stands for.
    pub(super) calls: HashMap<u64, PendingCall>,
    pub(super) next_id: u64,
    /// WebSocket clients pinned to it.
    pub(super) pinned: usize,
    /// Set once it asked to drain: it takes no new clients or calls.
    pub(super) draining: bool,
    /// The `$drain` request still to be answered.
    pub(super) drain_request: Option<DrainRequest>,
}

pub(super) struct DrainRequest {
    pub(super) id: Option<u64>,
    pub(super) ext: Option<Box<RawValue>>,
}

pub(super) struct ClientSlot {
    pub(super) tx: ClientTx,
    pub(super) close: CloseCell,
    /// This client's open calls: client id -> (backend, backend id).
    pub(super) open: HashMap<u64, (BackendKey, u64)>,
    /// Bytes of `ext` its open calls hold (bounded by the client queue's budget).
    pub(super) ext_bytes: usize,
    /// Calls backends (or guests) have open to this client: the id the client sees ->
    /// (backend, the backend's own id). The backend's id is kept unless another backend of the
    /// pool already uses it with this client.
    pub(super) incoming: HashMap<u64, (BackendKey, u64)>,
    /// Where ids for colliding incoming calls come from.
    pub(super) next_incoming: u64,
    /// WebSocket clients count in `duplex_gateway_clients`; HTTP calls do not.
    pub(super) websocket: bool,
    /// The backend a WebSocket client's new calls go to.
    pub(super) pinned: Option<BackendKey>,
    /// The backend that took its latest call.
    pub(super) last_backend: Option<BackendKey>,
}

impl ClientSlot {
    pub(super) fn new(tx: ClientTx, close: CloseCell, websocket: bool) -> ClientSlot {
        ClientSlot {
            tx,
            close,
            open: HashMap::new(),
            ext_bytes: 0,
            incoming: HashMap::new(),
            next_incoming: 1 << 32,
            websocket,
            pinned: None,
            last_backend: None,
        }
    }
}

pub(super) struct PendingCall {
    pub(super) route: Route,
    pub(super) client_id: u64,
    /// The `ext` the client sent, as it sent it (restored on replies).
    pub(super) client_ext: Option<Box<RawValue>>,
    /// Its method's series, and when it was admitted (counted when it ends).
    pub(super) method: Arc<MethodSeries>,
    pub(super) started: std::time::Instant,
}

impl PendingCall {
    fn ext_len(&self) -> usize {
        self.client_ext.as_ref().map_or(0, |e| e.get().len())
    }
}

pub(super) struct Gauges {
    pub(super) backends: IntGauge,
    pub(super) clients: IntGauge,
    pub(super) pending: IntGauge,
}

/// A frame for a client, with its queue.
pub(super) type Delivery = (Route, ClientTx, Message);

/// Frames owed to a backend: one of the pool (queued) or a guest (offered to its outlet).
pub(super) enum Owed {
    Local(BackendTx, Vec<String>),
    Guest(Arc<dyn Outlet>, String),
}

impl Owed {
    /// Sends them without waiting (what a backend's queue has no room for now is queued by a
    /// task of its own; a guest's outlet that cannot take it loses it, as a lost link would).
    pub(super) fn send(self) {
        match self {
            Owed::Local(tx, frames) => send_nowait(&tx, frames),
            Owed::Guest(outlet, frame) => {
                let _ = outlet.offer(frame);
            }
        }
    }
}

/// What a change leaves to do once the lock is released.
#[derive(Default)]
pub(super) struct Fallout {
    pub(super) deliveries: Vec<Delivery>,
    pub(super) owed: Vec<Owed>,
    pub(super) failovers: u64,
    /// Calls that ended with the backends removed (`-32000`): counted in their method's series.
    pub(super) failed_calls: Vec<(Arc<MethodSeries>, std::time::Instant)>,
}

impl State {
    pub(super) fn new() -> State {
        State {
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
            guests: HashMap::new(),
            next_guest: GUEST_KEYS,
        }
    }

    pub(super) fn update_gauges(&self) {
        if let Some(g) = &self.gauges {
            g.backends.set(self.backends.len() as i64);
            g.clients.set(self.websocket_clients as i64);
            g.pending
                .set(self.backends.iter().map(|b| b.calls.len()).sum::<usize>() as i64);
        }
    }

    pub(super) fn slot(&self, key: BackendKey) -> Option<&BackendSlot> {
        self.backends.iter().find(|b| b.key == key)
    }

    pub(super) fn slot_mut(&mut self, key: BackendKey) -> Option<&mut BackendSlot> {
        self.backends.iter_mut().find(|b| b.key == key)
    }

    /// Whether a publish with `secret` would join live backends of another secret: those that
    /// stay once a full pool of `max_backends` has replaced its oldest.
    pub(super) fn secret_conflicts(&self, secret: &Digest, max_backends: usize) -> bool {
        let staying = self.backends.len().min(max_backends.max(1) - 1);
        staying > 0 && !self.secret.matches(secret)
    }

    /// When live backends remain but all of them drain, new calls wait as in a grace (for a
    /// new backend), for `hold` at most.
    pub(super) fn hold_new_calls_if_none_serve(&mut self, hold: Duration) {
        if !self.backends.is_empty() && !self.serving() && self.grace_until.is_none() {
            self.grace_until = Some(Instant::now() + hold);
        }
    }

    /// Whether some backend takes new calls.
    pub(super) fn serving(&self) -> bool {
        self.backends.iter().any(|b| !b.draining)
    }

    /// The backend that takes new work: the one with the least `load`, ties in turn.
    pub(super) fn least(&mut self, load: impl Fn(&BackendSlot) -> usize) -> Option<BackendKey> {
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
    pub(super) fn pin(&mut self, route: &Route) -> Option<BackendKey> {
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
    pub(super) fn unpin(&mut self, route: &Route) {
        let Some(key) = self.clients.get_mut(route).and_then(|c| c.pinned.take()) else {
            return;
        };
        if let Some(slot) = self.slot_mut(key) {
            slot.pinned = slot.pinned.saturating_sub(1);
        }
    }

    /// Pins every WebSocket client left without a backend (in the grace, or all draining).
    pub(super) fn pin_unpinned(&mut self) {
        let unpinned: Vec<Route> = self
            .clients
            .iter()
            .filter(|(_, c)| c.websocket && c.pinned.is_none())
            .map(|(r, _)| r.clone())
            .collect();
        for route in unpinned {
            self.pin(&route);
        }
    }

    /// Pins again every client of backend `key` (it left or drains). Returns how many found
    /// another backend.
    pub(super) fn repin_clients_of(&mut self, key: BackendKey) -> u64 {
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
    pub(super) fn end_call(&mut self, key: BackendKey, backend_id: u64) -> Option<Owed> {
        let slot = self.slot_mut(key)?;
        let call = slot.calls.remove(&backend_id)?;
        let drained = slot.draining && slot.calls.is_empty();
        let answer = if drained {
            slot.drain_request
                .take()
                .map(|req| Owed::Local(slot.tx.clone(), vec![drain_reply(&req, 0)]))
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
    /// backends (and guests) for their calls to this client; the calls it had open (cancelled:
    /// it left first) go into `cancelled`, to be counted.
    pub(super) fn remove_client(
        &mut self,
        route: &Route,
        reason: Option<CloseReason>,
        cancelled: &mut Vec<(Arc<MethodSeries>, std::time::Instant)>,
    ) -> Vec<Owed> {
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
            if let Some(call) = self.slot(key).and_then(|b| b.calls.get(&backend_id)) {
                cancelled.push((call.method.clone(), call.started));
            }
            owed.extend(self.end_call(key, backend_id));
        }
        for &(key, backend_id) in slot.incoming.values() {
            let reply = client_gone_frame(backend_id, route);
            if let Some(backend) = self.slot(key) {
                owed.push(Owed::Local(backend.tx.clone(), vec![reply]));
            } else if let Some(outlet) = self.guests.get(&key) {
                owed.push(Owed::Guest(outlet.clone(), reply));
            }
        }
        self.update_gauges();
        owed
    }

    /// Takes the backends `keys` out of the pool: their pending calls fail with `-32000`
    /// (`why`), their calls to clients are forgotten, their clients are pinned again. `reason`
    /// (if given) is what their connections are closed with. When the last one goes, the grace
    /// (`grace`) begins here, under the lock, before the failed calls are answered: a client's
    /// next call must find it. When live backends remain but none takes new calls, new calls
    /// are held for `hold`. Returns what is left to do, and the token names of the backends
    /// removed (keys no longer in the pool are skipped).
    pub(super) fn remove_backends(
        &mut self,
        keys: &[BackendKey],
        reason: Option<&CloseReason>,
        why: &str,
        (grace, hold): (Duration, Duration),
    ) -> (Fallout, Vec<String>) {
        let mut fallout = Fallout::default();
        let mut removed = Vec::new();
        for &key in keys {
            let Some(index) = self.backends.iter().position(|b| b.key == key) else {
                continue;
            };
            let slot = self.backends.remove(index);
            if self.backends.is_empty() && !self.removed {
                self.grace_until = Some(Instant::now() + grace);
            }
            if let Some(reason) = reason {
                let _ = slot.close.set(reason.clone());
            }
            slot.tx.close();
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
                fallout.failed_calls.push((call.method, call.started));
            }
            for client in self.clients.values_mut() {
                client.incoming.retain(|_, (k, _)| *k != key);
            }
            fallout.failovers += self.repin_clients_of(key);
            removed.push(slot.token_name);
        }
        self.hold_new_calls_if_none_serve(hold);
        self.update_gauges();
        (fallout, removed)
    }

    /// Adds a guest (see [`Outlet`]); None when the endpoint already has `max` of them.
    pub(super) fn add_guest(&mut self, outlet: Arc<dyn Outlet>, max: usize) -> Option<BackendKey> {
        if self.guests.len() >= max {
            return None;
        }
        let key = self.next_guest;
        self.next_guest += 1;
        self.guests.insert(key, outlet);
        Some(key)
    }

    /// Forgets guests: their calls to clients are dropped, so a late answer can never reach a
    /// later guest under the same key.
    pub(super) fn remove_guests(&mut self, keys: &[BackendKey]) {
        for key in keys {
            self.guests.remove(key);
        }
        for client in self.clients.values_mut() {
            client.incoming.retain(|_, (k, _)| !keys.contains(k));
        }
    }
}

/// The immediate answer to a `$drain` that has nothing to wait for (none without an id).
pub(super) fn request_answer(request: &DrainRequest) -> Option<Message> {
    request.id?;
    Message::parse(drain_reply(request, 0).as_bytes()).ok()
}

/// `{"pending": N}`: the answer to a backend's `$drain`.
pub(super) fn drain_reply(req: &DrainRequest, pending: usize) -> String {
    let mut reply = Message::reply(req.id, &json!({ "pending": pending }), false);
    if let Some(ext) = &req.ext {
        reply.set_raw("ext", ext.clone());
    }
    reply.to_json()
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, OnceLock};

    use super::*;
    use crate::mux::queue::BackendRx;

    fn backend(state: &mut State) -> (BackendKey, BackendRx) {
        let (tx, rx) = BackendTx::channel(1 << 20);
        let key = state.next_key;
        state.next_key += 1;
        state.backends.push(BackendSlot {
            key,
            since_ms: 0,
            tx,
            close: Arc::new(OnceLock::new()),
            token_name: format!("token-{key}"),
            token: Digest::of(b"t"),
            calls: HashMap::new(),
            next_id: 1,
            pinned: 0,
            draining: false,
            drain_request: None,
        });
        (key, rx)
    }

    fn client(state: &mut State, name: &str) -> Route {
        let (tx, _rx) = ClientTx::channel(1 << 20);
        let route: Route = Arc::from(name);
        state.clients.insert(
            route.clone(),
            ClientSlot::new(tx, Arc::new(OnceLock::new()), true),
        );
        state.websocket_clients += 1;
        state.pin(&route);
        route
    }

    fn open_call(state: &mut State, route: &Route, key: BackendKey, id: u64) {
        let slot = state.slot_mut(key).expect("backend");
        slot.calls.insert(
            id,
            PendingCall {
                route: route.clone(),
                client_id: id,
                client_ext: None,
                method: Arc::new(MethodSeries::detached()),
                started: std::time::Instant::now(),
            },
        );
        state
            .clients
            .get_mut(route)
            .expect("client")
            .open
            .insert(id, (key, id));
    }

    const TIMES: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(30));

    #[test]
    fn clients_are_spread_over_the_pool_and_draining_backends_get_none() {
        let mut s = State::new();
        let (a, _ra) = backend(&mut s);
        let (b, _rb) = backend(&mut s);
        let routes: Vec<Route> = (0..4).map(|i| client(&mut s, &format!("c{i}"))).collect();
        let on = |s: &State, k| s.clients.values().filter(|c| c.pinned == Some(k)).count();
        assert_eq!((on(&s, a), on(&s, b)), (2, 2));
        s.slot_mut(a).expect("a").draining = true;
        assert_eq!(s.repin_clients_of(a), 2, "a's clients moved to b");
        assert_eq!((on(&s, a), on(&s, b)), (0, 4));
        assert_eq!(s.slot(b).map(|b| b.pinned), Some(routes.len()));
    }

    #[test]
    fn removing_the_last_backend_fails_its_calls_and_starts_the_grace() {
        let mut s = State::new();
        let (key, _rx) = backend(&mut s);
        let route = client(&mut s, "c");
        open_call(&mut s, &route, key, 7);
        let reason = CloseReason::new(1012, "replaced");
        let (fallout, removed) =
            s.remove_backends(&[key, 99], Some(&reason), "backend unavailable", TIMES);
        assert_eq!(
            removed,
            vec![format!("token-{key}")],
            "unknown keys are skipped"
        );
        assert!(s.backends.is_empty() && s.grace_until.is_some());
        assert_eq!(fallout.deliveries.len(), 1);
        let (_, _, reply) = &fallout.deliveries[0];
        assert_eq!(reply.id(), Some(7));
        assert_eq!(
            reply.error().map(|e| e.code),
            Some(code::BACKEND_UNAVAILABLE)
        );
        let client = s
            .clients
            .get(&route)
            .expect("the client stays for the grace");
        assert!(client.open.is_empty() && client.pinned.is_none());
    }

    #[test]
    fn a_backend_leaving_moves_its_clients_and_counts_the_failovers() {
        let mut s = State::new();
        let (a, _ra) = backend(&mut s);
        let (b, _rb) = backend(&mut s);
        for i in 0..4 {
            client(&mut s, &format!("c{i}"));
        }
        let (fallout, _) = s.remove_backends(&[a], None, "gone", TIMES);
        assert_eq!(fallout.failovers, 2);
        assert!(s.grace_until.is_none(), "one backend still serves");
        assert!(s.clients.values().all(|c| c.pinned == Some(b)));
    }

    #[test]
    fn when_every_backend_left_drains_new_calls_are_held() {
        let mut s = State::new();
        let (a, _ra) = backend(&mut s);
        let (b, _rb) = backend(&mut s);
        s.slot_mut(b).expect("b").draining = true;
        s.remove_backends(&[a], None, "gone", TIMES);
        assert!(!s.serving());
        assert!(s.grace_until.is_some());
    }

    struct Recorder(Mutex<Vec<String>>);

    impl Outlet for Recorder {
        fn offer(&self, frame: String) -> bool {
            self.0.lock().expect("recorder").push(frame);
            true
        }
    }

    #[test]
    fn a_client_leaving_owes_every_caller_a_client_gone_reply_guests_included() {
        let mut s = State::new();
        let (key, _rx) = backend(&mut s);
        let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
        let guest = s.add_guest(recorder.clone(), 8).expect("room for a guest");
        assert!(guest >= GUEST_KEYS);
        let route = client(&mut s, "c");
        let incoming = &mut s.clients.get_mut(&route).expect("client").incoming;
        incoming.insert(1, (key, 11));
        incoming.insert(2, (guest, 22));
        let owed = s.remove_client(&route, None, &mut Vec::new());
        assert_eq!(owed.len(), 2);
        for o in owed {
            o.send();
        }
        let frames = recorder.0.lock().expect("recorder").clone();
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("-32001") && frames[0].contains(r#""id":22"#));
    }

    #[test]
    fn guests_are_bounded_and_forgetting_one_drops_its_calls() {
        let mut s = State::new();
        let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
        let first = s.add_guest(recorder.clone(), 2).expect("first");
        let second = s.add_guest(recorder.clone(), 2).expect("second");
        assert!(s.add_guest(recorder.clone(), 2).is_none(), "over the bound");
        let route = client(&mut s, "c");
        let incoming = &mut s.clients.get_mut(&route).expect("client").incoming;
        incoming.insert(1, (first, 1));
        incoming.insert(2, (second, 2));
        s.remove_guests(&[first]);
        let left: Vec<_> = s.clients[&route].incoming.values().copied().collect();
        assert_eq!(left, vec![(second, 2)]);
        assert!(
            s.add_guest(recorder, 2).is_some_and(|k| k > second),
            "keys are never reused"
        );
    }
}
