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

pub(crate) use endpoint::{client_gone_frame, local_error};
pub use endpoint::{
    BackendConn, BackendInfo, ClientConn, Dropped, Endpoint, EndpointStats, Handed, JoinError,
    Outlet, PoolSnapshot, PublishError,
};
pub use queue::queued_bytes;

use crate::auth::Digest;
use crate::duplex::Message;

/// Carries a backend's calls to clients whose route is not this process's (implemented by the
/// cluster; the multiplexer knows nothing of NATS). The answers come back through
/// [`Endpoint::answer_backend`].
pub trait Relay: Send + Sync {
    /// Hands `frame` (call `id` from backend `key` of `path`, with its `ext.route`) to where
    /// client `route` lives. False when nowhere does (the caller answers `-32001`).
    fn call_client(
        &self,
        path: &str,
        route: &str,
        key: u64,
        id: Option<u64>,
        frame: String,
    ) -> bool;
}

/// What became of a frame handed to the multiplexer.
#[derive(Debug)]
#[must_use = "an answer of the gateway's own must reach the sender"]
pub enum Outcome {
    /// Sent on, or dropped and counted: nothing to answer.
    Done,
    /// The gateway answers the sender itself (its own error, or the reply to `$drain`).
    Answer(Message),
}

impl Outcome {
    /// The gateway's own answer, if any.
    pub fn into_answer(self) -> Option<Message> {
        match self {
            Outcome::Done => None,
            Outcome::Answer(msg) => Some(msg),
        }
    }

    /// Whether nothing is to be answered.
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done)
    }
}

impl From<Option<Message>> for Outcome {
    fn from(answer: Option<Message>) -> Outcome {
        answer.map_or(Outcome::Done, Outcome::Answer)
    }
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
    /// Method names with series of their own per endpoint; calls of others count as `other`.
    pub max_methods_per_endpoint: usize,
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
            max_methods_per_endpoint: 64,
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
    /// Counts pool changes (a backend joins, leaves or drains; an endpoint goes): whoever
    /// watches it (the cluster, announcing this node's endpoints; clients waiting for a
    /// backend anywhere) wakes at each.
    pool_changes: tokio::sync::watch::Sender<u64>,
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
            pool_changes: tokio::sync::watch::Sender::new(0),
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

    /// A pool changed: counted, and its watchers woken.
    pub fn note_pool_change(&self) {
        self.pool_changes.send_modify(|version| *version += 1);
    }

    /// How many pool changes there have been.
    pub fn pool_version(&self) -> u64 {
        *self.pool_changes.borrow()
    }

    /// Wakes at every pool change from now on.
    pub fn watch_pools(&self) -> tokio::sync::watch::Receiver<u64> {
        self.pool_changes.subscribe()
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
mod tests;
