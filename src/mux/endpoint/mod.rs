//! One endpoint: its pool of backends, its clients, and the call tables between them.
//!
//! A pool holds up to `max_backends` live backends, oldest first. A WebSocket client is pinned
//! to one of them when it joins (the one with the fewest pinned clients) and its new calls go
//! there; an HTTP call goes to the backend with the fewest pending calls. Ids are rewritten per
//! backend connection. A backend that leaves fails its own pending calls and nothing else: its
//! clients are pinned again at once. Only when the last one leaves does the grace start.
//!
//! The files, one concept each:
//! - `state.rs`: the synchronous tables and the rules that change them (no runtime needed);
//! - `pool.rs`: the pool's life: backends joining and leaving, the grace, `$drain`;
//! - `client.rs`: the client side of a connection (joining, admitting calls, replies to
//!   backends' calls); `backend.rs`: the backend side (replies, calls to clients by route);
//! - `guests.rs`: backends outside the pool (another node's) calling this endpoint's clients
//!   through an [`Outlet`];
//! - `ext.rs`: `ext` rewriting; `series.rs`: the endpoint's metric series.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;

mod backend;
mod client;
mod ext;
mod guests;
mod pool;
mod series;
mod state;

pub use backend::BackendConn;
pub use client::ClientConn;
pub(crate) use ext::{client_gone_frame, local_error};
pub use guests::Handed;
pub use series::Dropped;
pub use state::Outlet;

use super::{lock, CloseReason, Limits, Registry};
use crate::auth::Digest;
use state::State;

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

/// One backend of a pool, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// Its id in the pool (unique at this endpoint on this node).
    pub id: u64,
    /// The name of the token it published with.
    pub token: String,
    /// When it joined, in Unix milliseconds.
    pub since_ms: u64,
    /// Client calls waiting for its reply.
    pub pending_calls: usize,
    /// WebSocket clients pinned to it.
    pub clients: usize,
    /// It drains: no new clients or calls.
    pub draining: bool,
}

/// An endpoint: a path with a pool of backends (or in its grace after the last one left) and
/// its clients.
pub struct Endpoint {
    path: String,
    state: Mutex<State>,
    /// Woken when a backend arrives or the endpoint is removed (calls made in the grace wait on it).
    changed: Notify,
    registry: Weak<Registry>,
    series: series::Series,
}

impl Endpoint {
    pub(super) fn new(path: &str, registry: Weak<Registry>) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            path: path.to_string(),
            state: Mutex::new(State::new()),
            changed: Notify::new(),
            registry,
            series: series::Series::new(path),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The endpoint's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path as it may appear in a log line.
    fn logged(&self) -> std::borrow::Cow<'_, str> {
        crate::auth::logged(&self.path)
    }

    /// Counts one HTTP call answered with `status` (its label) after `seconds`.
    pub fn count_http_call(&self, status: &'static str, seconds: f64) {
        self.series.http_call(status, seconds);
    }

    /// Counts a frame dropped for `reason`.
    pub fn dropped(&self, reason: Dropped) {
        self.series.dropped(reason);
        tracing::debug!(endpoint = %self.logged(), reason = reason.as_str(), "message dropped");
    }

    /// Whether `secret` (a digest) is the one clients of this endpoint must present (constant
    /// time).
    pub fn secret_matches(&self, secret: &Digest) -> bool {
        self.state().secret.matches(secret)
    }

    /// Whether a publish with `secret` into a pool of `max_backends` would join live backends
    /// that use another secret (the ones a full pool replaces do not count).
    pub fn secret_conflicts(&self, secret: &Digest, max_backends: usize) -> bool {
        self.state().secret_conflicts(secret, max_backends)
    }

    /// The digests of the tokens the live backends published with.
    pub fn backend_tokens(&self) -> Vec<Digest> {
        self.state().backends.iter().map(|b| b.token).collect()
    }

    /// The grace, and how long new calls wait when every live backend drains: until the drains
    /// may end, and at least the grace.
    fn grace_and_hold(&self) -> (Duration, Duration) {
        let limits = self.limits();
        let grace = limits.backend_grace;
        (grace, grace.max(limits.drain_timeout))
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

    /// Whether backend `key` is in the pool.
    pub fn has_backend(&self, key: u64) -> bool {
        self.state().slot(key).is_some()
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

    /// Tells whoever watches the registry's pools (the cluster) that this one changed.
    fn pool_changed(&self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.note_pool_change();
        }
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

    /// The backends of its pool.
    pub fn backends(&self) -> Vec<BackendInfo> {
        let s = self.state();
        s.backends
            .iter()
            .map(|b| BackendInfo {
                id: b.key,
                token: b.token_name.clone(),
                since_ms: b.since_ms,
                pending_calls: b.calls.len(),
                clients: b.pinned,
                draining: b.draining,
            })
            .collect()
    }

    /// Every series of this endpoint leaves the metrics (it is gone).
    pub(super) fn remove_series(&self) {
        self.series.remove_all();
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("path", &self.path)
            .finish()
    }
}
