//! The in-process multiplexer: endpoints, their backend, their clients, and the call table that
//! lets every client share the backend's one connection.
//!
//! The multiplexer knows nothing about Pingora or WebSocket framing. A backend connection is a
//! [`BackendConn`] (frames in with [`BackendConn::handle`], frames out of its queue), a client
//! connection or an HTTP call is a [`ClientConn`] (frames in with [`ClientConn::send`], frames out
//! of its queue). Dropping either one is how it leaves; the endpoint cleans up after it.
//!
//! Rules (`docs/protocol.md`): a client's request id is replaced by a fresh id unique on the backend
//! connection, remembered until the call ends, and reused for the client's later `more` frames of
//! the same call; every frame to the backend carries `ext.route`, the client's route key; replies
//! come back with the client's own id and `ext`. The backend calls a client by naming its route.

mod endpoint;
mod queue;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

pub(crate) use endpoint::local_error;
pub use endpoint::{
    BackendConn, ClientConn, Endpoint, EndpointStats, JoinError, PoolSnapshot, PublishError,
};
pub use queue::queued_bytes;

use crate::auth::Digest;

/// Carries a backend's calls to clients whose route belongs to another node of a cluster, and
/// their answers back (implemented by the cluster; the multiplexer knows nothing of NATS).
pub trait Relay: Send + Sync {
    /// Hands `frame` (a call from backend `key` of `path`, with its `ext.route`) to the node
    /// that holds client `route`, and names that node. None when no node does (the caller
    /// answers `-32001`).
    fn call_client(&self, path: &str, route: &str, key: u64, frame: String) -> Option<Arc<str>>;
    /// Hands `frame` (a client's answer) to backend `key` of `path` on `node`. False when it
    /// cannot be carried now (the link holds too much already): the client sending it is put
    /// out, as one whose backend does not read.
    fn answer_backend(&self, node: &str, path: &str, key: u64, frame: String) -> bool;
}

/// The limits the multiplexer enforces; replaced as a whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Open calls one client may have; the next one gets `-32003`.
    pub max_pending_calls_per_client: usize,
    /// How long clients wait for a backend that left to come back.
    pub backend_grace: Duration,
    /// Bytes of frames queued for one client before it counts as not reading and is closed.
    /// Also the most `ext` bytes one client's open calls may hold.
    pub client_queue_bytes: usize,
    /// Bytes of frames queued for a backend before its clients wait for it to read.
    pub backend_queue_bytes: usize,
    /// The longest a backend's drain waits for its calls to end.
    pub drain_timeout: Duration,
    /// Bytes queued in every queue together over which new calls are refused (`-32003`).
    pub max_queued_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending_calls_per_client: 1024,
            backend_grace: Duration::from_secs(10),
            client_queue_bytes: 16 << 20,
            backend_queue_bytes: 16 << 20,
            drain_timeout: Duration::from_secs(30),
            max_queued_bytes: 1 << 30,
        }
    }
}

/// A close code and reason for a connection the multiplexer ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Human-readable reason.
    pub reason: String,
}

impl CloseReason {
    /// A close reason.
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        CloseReason {
            code,
            reason: reason.into(),
        }
    }

    /// A client that sends faster than its backend reads, where it cannot be held back (its
    /// frames cross to another node): closed with 1008.
    pub fn too_fast() -> Self {
        CloseReason::new(close::POLICY, "client too fast: the backend is not reading")
    }
}

/// Close codes the multiplexer uses.
pub mod close {
    /// The gateway is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Credentials no longer valid (reload).
    pub const POLICY: u16 = 1008;
    /// A frame over `max_message_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// The backend was replaced by a new one.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The backend left and did not come back within the grace.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// All endpoints of the gateway.
pub struct Registry {
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    limits: ArcSwap<Limits>,
    me: Weak<Registry>,
    /// Woken when a pool changes (a backend joins, leaves or drains; an endpoint goes): the
    /// cluster then announces this node's endpoints at once.
    pub pool_changed: tokio::sync::Notify,
    /// Counts pool changes (so a client can tell cheaply that nothing changed since it looked).
    pool_version: std::sync::atomic::AtomicU64,
    /// In a cluster: this node's tag (hex digits), the start of every route key made here, so
    /// other nodes know where a client's route lives; and the relay to them.
    cluster: OnceLock<(String, Arc<dyn Relay>)>,
}

impl Registry {
    /// An empty registry.
    pub fn new(limits: Limits) -> Arc<Registry> {
        Arc::new_cyclic(|me| Registry {
            endpoints: Mutex::new(HashMap::new()),
            limits: ArcSwap::from_pointee(limits),
            me: me.clone(),
            pool_changed: tokio::sync::Notify::new(),
            pool_version: std::sync::atomic::AtomicU64::new(0),
            cluster: OnceLock::new(),
        })
    }

    /// Joins a cluster: route keys made from now on start with `tag`, and calls to routes of
    /// other nodes go through `relay`.
    pub fn join_cluster(&self, tag: String, relay: Arc<dyn Relay>) {
        let _ = self.cluster.set((tag, relay));
    }

    /// The relay to the other nodes, in a cluster.
    pub(crate) fn relay(&self) -> Option<&Arc<dyn Relay>> {
        self.cluster.get().map(|(_, relay)| relay)
    }

    /// A fresh route key: 128 random bits as 32 hex digits, after this node's tag in a cluster
    /// (so other nodes can tell where the client lives without the randomness getting shorter).
    fn route_key(&self) -> Arc<str> {
        let bits: u128 = rand::random();
        // Encoded on the stack: one allocation per key (every HTTP call makes one).
        let mut hex = [0u8; 32];
        if hex::encode_to_slice(bits.to_be_bytes(), &mut hex).is_err() {
            return Arc::from(format!("{bits:032x}"));
        }
        let random = std::str::from_utf8(&hex).unwrap_or_default();
        match self.cluster.get() {
            Some((tag, _)) => {
                let mut key = String::with_capacity(tag.len() + random.len());
                key.push_str(tag);
                key.push_str(random);
                Arc::from(key)
            }
            None => Arc::from(random),
        }
    }

    /// A pool changed: counted, and the cluster (if any) woken to announce it.
    pub fn note_pool_change(&self) {
        self.pool_version
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.pool_changed.notify_one();
    }

    /// How many pool changes there have been.
    pub fn pool_version(&self) -> u64 {
        self.pool_version.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Replaces the limits; they apply to every message from now on.
    pub fn set_limits(&self, limits: Limits) {
        self.limits.store(Arc::new(limits));
    }

    /// The limits in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.load_full()
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Endpoint>>> {
        lock(&self.endpoints)
    }

    /// The endpoint at `path`, if it has a backend or is in its grace.
    pub fn lookup(&self, path: &str) -> Option<Arc<Endpoint>> {
        self.map().get(path).cloned()
    }

    /// Every endpoint (for reload and shutdown).
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.map().values().cloned().collect()
    }

    /// Adds a backend to the pool of `path` (of at most `max_backends`; when it is full, the
    /// longest-connected backend is replaced with 1012). `secret` is what clients must present
    /// from now on; a publish whose secret differs from the pool's live backends' is refused
    /// unless `fixed_secret` (the config sets the secret). `token` is the publishing token's name
    /// and digest (kept so a reload can tell whether the backend may stay).
    pub fn publish(
        &self,
        path: &str,
        secret: Digest,
        token: (&str, Digest),
        max_backends: usize,
        fixed_secret: bool,
    ) -> Result<BackendConn, PublishError> {
        let mut map = self.map();
        if let Some(endpoint) = map.get(path) {
            if let Some(joined) = endpoint.attach_backend(secret, token, max_backends, fixed_secret)
            {
                return joined;
            }
            // The endpoint was being removed as we looked: start a new one.
        }
        // Attach first, then register, so nobody ever finds the endpoint without its secret.
        let endpoint = Endpoint::new(path, self.me.clone());
        let conn = match endpoint.attach_backend(secret, token, max_backends, fixed_secret) {
            Some(joined) => joined?,
            None => unreachable!("a new endpoint is not removed"),
        };
        map.insert(path.to_string(), endpoint);
        Ok(conn)
    }

    /// Forgets `endpoint` if it is still the one registered at its path.
    fn remove(&self, endpoint: &Arc<Endpoint>) {
        let mut map = self.map();
        if map
            .get(endpoint.path())
            .is_some_and(|e| Arc::ptr_eq(e, endpoint))
        {
            map.remove(endpoint.path());
            endpoint.remove_series();
        }
    }
}

/// Locks a mutex, carrying on if a panicking thread poisoned it (the state stays consistent:
/// every critical section is a few map operations).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duplex::{Kind, Message};
    use serde_json::{json, Value};

    fn setup(limits: Limits) -> (Arc<Registry>, BackendConn, Arc<Endpoint>) {
        let registry = Registry::new(limits);
        let backend = registry
            .publish("/t", Digest::of(b"s"), ("t", Digest::of(b"tok")), 1, false)
            .expect("publish");
        let endpoint = registry.lookup("/t").expect("endpoint");
        (registry, backend, endpoint)
    }

    fn join(endpoint: &Arc<Endpoint>) -> ClientConn {
        endpoint.join(true, 100, &Digest::of(b"s")).expect("join")
    }

    fn parse(text: &str) -> Message {
        Message::parse(text.as_bytes()).expect("message")
    }

    async fn to_backend(backend: &mut BackendConn) -> Value {
        let text = backend.recv().await.expect("frame for the backend");
        serde_json::from_str(&text).expect("json")
    }

    #[tokio::test]
    async fn clients_using_the_same_id_get_distinct_backend_ids_and_their_own_replies() {
        let (_r, mut backend, endpoint) = setup(Limits::default());
        let (mut a, mut b) = (join(&endpoint), join(&endpoint));
        for c in [&a, &b] {
            let req = parse(r#"{"type":"req","method":"m","id":1}"#);
            assert!(c.send(req).await.is_none());
        }
        let (fa, fb) = (
            to_backend(&mut backend).await,
            to_backend(&mut backend).await,
        );
        assert_ne!(fa["id"], fb["id"]);
        assert_ne!(fa["ext"]["route"], fb["ext"]["route"]);
        for (f, payload) in [(&fb, "for b"), (&fa, "for a")] {
            let reply = json!({"type":"rep","id":f["id"],"payload":payload,"ext":f["ext"]});
            assert!(backend.handle(parse(&reply.to_string())).is_none());
        }
        let (ra, rb) = (a.recv().await.expect("a"), b.recv().await.expect("b"));
        assert_eq!((ra.id(), ra.payload()), (Some(1), json!("for a")));
        assert_eq!((rb.id(), rb.payload()), (Some(1), json!("for b")));
        assert!(ra.ext_raw().is_none(), "the route does not leak back");
        assert_eq!(endpoint.stats().pending_calls, 0);
    }

    #[tokio::test]
    async fn streamed_input_reuses_one_backend_id_until_the_call_ends() {
        let (_r, mut backend, endpoint) = setup(Limits::default());
        let a = join(&endpoint);
        for more in [true, true, false] {
            let req = Message::request("add", Some(5), &json!(1), more);
            a.send(req).await;
        }
        let ids: Vec<Value> = vec![
            to_backend(&mut backend).await["id"].clone(),
            to_backend(&mut backend).await["id"].clone(),
            to_backend(&mut backend).await["id"].clone(),
        ];
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        backend.handle(parse(
            &json!({"type":"rep","id":ids[0],"payload":3}).to_string(),
        ));
        a.send(Message::request("add", Some(5), &json!(1), false))
            .await;
        assert_ne!(
            to_backend(&mut backend).await["id"],
            ids[0],
            "a new call, a new id"
        );
    }

    #[tokio::test]
    async fn a_client_over_its_byte_budget_is_closed_and_its_calls_forgotten() {
        let limits = Limits {
            client_queue_bytes: 500,
            ..Limits::default()
        };
        let (_r, mut backend, endpoint) = setup(limits);
        let mut a = join(&endpoint);
        a.send(parse(r#"{"type":"req","method":"count","id":1}"#))
            .await;
        let f = to_backend(&mut backend).await;
        for i in 0..20 {
            let rep = json!({"type":"rep","id":f["id"],"payload":i,"more":true,"ext":f["ext"]});
            backend.handle(parse(&rep.to_string()));
        }
        assert_eq!(endpoint.stats().clients, 0);
        assert_eq!(endpoint.stats().pending_calls, 0);
        assert!(a.recv().await.is_none(), "the backlog is not delivered");
        assert_eq!(a.close_reason().code, close::POLICY);
    }

    #[tokio::test]
    async fn a_backend_leaving_fails_pending_calls_then_the_grace_ends_the_endpoint() {
        let limits = Limits {
            backend_grace: Duration::ZERO,
            ..Limits::default()
        };
        let (registry, mut backend, endpoint) = setup(limits);
        let mut a = join(&endpoint);
        a.send(parse(r#"{"type":"req","method":"m","id":9,"ext":{"k":1}}"#))
            .await;
        to_backend(&mut backend).await;
        drop(backend);
        let failed = a.recv().await.expect("the -32000 reply");
        assert_eq!(failed.kind(), Kind::Reply);
        assert_eq!(failed.id(), Some(9));
        assert_eq!(failed.error().map(|e| e.code), Some(-32000));
        assert_eq!(failed.ext(), json!({"k": 1}).as_object().cloned());
        assert!(a.recv().await.is_none());
        assert_eq!(a.close_reason().code, close::TRY_AGAIN_LATER);
        assert!(registry.lookup("/t").is_none());
    }

    #[tokio::test]
    async fn a_client_cannot_answer_a_call_the_backend_made_to_another_client() {
        let (_r, mut backend, endpoint) = setup(Limits::default());
        let (mut a, b) = (join(&endpoint), join(&endpoint));
        let call = json!({"type":"req","method":"hi","id":77,"ext":{"route":a.route()}});
        assert!(backend.handle(parse(&call.to_string())).is_none());
        let got = a.recv().await.expect("the call");
        assert!(
            got.ext_raw().is_none(),
            "the route is not shown to the client"
        );
        // b forges an answer to a's call: dropped.
        b.send(parse(r#"{"type":"rep","id":77,"payload":"forged"}"#))
            .await;
        a.send(parse(r#"{"type":"rep","id":77,"payload":"real"}"#))
            .await;
        let answer = to_backend(&mut backend).await;
        assert_eq!(answer["payload"], "real");
        assert_eq!(answer["ext"]["route"], json!(a.route()));
    }

    fn call_to(route: &str, id: u64) -> Message {
        parse(&json!({"type":"req","method":"hi","id":id,"ext":{"route":route}}).to_string())
    }

    #[tokio::test]
    async fn a_replaced_backend_is_silent_from_that_moment() {
        let (registry, mut old, endpoint) = setup(Limits::default());
        let mut a = join(&endpoint);
        let mut new = registry
            .publish("/t", Digest::of(b"s"), ("t", Digest::of(b"tok")), 1, false)
            .expect("publish");
        a.send(parse(r#"{"type":"req","method":"m","id":1}"#)).await;
        let f = to_backend(&mut new).await;
        // The old backend answers the new one's call, and calls the client by its route.
        let forged = json!({"type":"rep","id":f["id"],"payload":"forged","ext":f["ext"]});
        assert!(old.handle(parse(&forged.to_string())).is_none());
        assert!(
            old.handle(call_to(a.route(), 5)).is_none(),
            "not even -32001"
        );
        assert!(
            a.try_recv().is_none(),
            "nothing from the old backend reached the client"
        );
        assert!(old.recv().await.is_none());
        assert_eq!(old.close_reason().code, close::SERVICE_RESTART);
        let real = json!({"type":"rep","id":f["id"],"payload":"real","ext":f["ext"]});
        assert!(new.handle(parse(&real.to_string())).is_none());
        assert_eq!(a.recv().await.expect("the reply").payload(), json!("real"));
    }

    #[tokio::test]
    async fn a_revoked_backend_is_silent_from_that_moment() {
        let (_r, mut backend, endpoint) = setup(Limits::default());
        let mut a = join(&endpoint);
        a.send(parse(r#"{"type":"req","method":"m","id":1}"#)).await;
        let f = to_backend(&mut backend).await;
        assert!(!endpoint
            .close_backends(CloseReason::new(close::POLICY, "revoked"), |_| true)
            .is_empty());
        // Its pending call failed with -32000; nothing it sends afterwards arrives.
        let failed = a.recv().await.expect("-32000");
        assert_eq!(failed.error().map(|e| e.code), Some(-32000));
        let late = json!({"type":"rep","id":f["id"],"payload":"late","ext":f["ext"]});
        assert!(backend.handle(parse(&late.to_string())).is_none());
        assert!(backend.handle(call_to(a.route(), 5)).is_none());
        assert!(a.try_recv().is_none());
        assert!(backend.recv().await.is_none());
    }

    #[tokio::test]
    async fn calls_from_the_backend_to_one_client_count_against_its_limit() {
        let limits = Limits {
            max_pending_calls_per_client: 2,
            ..Limits::default()
        };
        let (_r, backend, endpoint) = setup(limits);
        let mut a = join(&endpoint);
        let route = a.route().to_string();
        assert!(backend.handle(call_to(&route, 1)).is_none());
        assert!(backend.handle(call_to(&route, 2)).is_none());
        // The next frame of an open call is no new call.
        assert!(backend.handle(call_to(&route, 2)).is_none());
        let refused = backend.handle(call_to(&route, 3)).expect("-32003");
        assert_eq!(refused.error().map(|e| e.code), Some(-32003));
        assert_eq!(refused.id(), Some(3));
        assert_eq!(endpoint.stats().backend_calls, 2);
        // The client answers one: room for another.
        a.recv().await.expect("call 1");
        a.send(parse(r#"{"type":"rep","id":1,"payload":0}"#)).await;
        assert!(backend.handle(call_to(&route, 4)).is_none());
        assert_eq!(endpoint.stats().backend_calls, 2);
    }

    #[tokio::test]
    async fn the_ext_kept_for_open_calls_is_bounded_per_client() {
        let limits = Limits {
            client_queue_bytes: 1000,
            ..Limits::default()
        };
        let (_r, _backend, endpoint) = setup(limits);
        let a = join(&endpoint);
        let big = "x".repeat(400);
        for id in 1..=2 {
            let req = json!({"type":"req","method":"m","id":id,"ext":{"k":big}});
            assert!(a.send(parse(&req.to_string())).await.is_none());
        }
        let req = json!({"type":"req","method":"m","id":3,"ext":{"k":big}});
        let refused = a.send(parse(&req.to_string())).await.expect("-32003");
        assert_eq!(refused.error().map(|e| e.code), Some(-32003));
        // A call without ext still goes through.
        assert!(a
            .send(parse(r#"{"type":"req","method":"m","id":4}"#))
            .await
            .is_none());
    }

    #[tokio::test]
    async fn a_backend_queue_is_bounded_in_bytes_and_its_senders_wait() {
        let limits = Limits {
            backend_queue_bytes: 1000,
            ..Limits::default()
        };
        let (_r, mut backend, endpoint) = setup(limits);
        let a = join(&endpoint);
        let req = |id: u64| {
            let payload = "x".repeat(300);
            parse(&json!({"type":"req","method":"m","id":id,"payload":payload}).to_string())
        };
        let room = Duration::from_secs(5);
        for id in 1..=2 {
            let sent = tokio::time::timeout(room, a.send(req(id))).await;
            assert!(sent.is_ok_and(|answer| answer.is_none()), "call {id}");
        }
        // About 380 bytes each: a third does not fit in 1000, so its sender waits.
        let waiting = tokio::time::timeout(Duration::from_millis(200), a.send(req(3))).await;
        assert!(waiting.is_err(), "the sender waits for room");
        // The backend reads one: room again.
        to_backend(&mut backend).await;
        let sent = tokio::time::timeout(room, a.send(req(4))).await;
        assert!(sent.is_ok(), "room after the backend read");
    }
}
