//! Backends outside the pool: a backend of another node of a cluster that calls a client of
//! this endpoint is a guest here, an ordinary caller whose answers go out through an
//! [`Outlet`]; and frames for one of this pool's backends that arrive from elsewhere.

use std::sync::Arc;

use serde_json::Value;

use super::{BackendKey, Dropped, Endpoint, Outlet, Route};
use crate::duplex::Message;
use crate::mux::Outcome;

/// The most guests one endpoint keeps (they are forgotten when they go).
const MAX_GUESTS: usize = 1024;

/// What became of a frame handed to a backend of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Queued for it.
    Queued,
    /// It is not (or no longer) in the pool.
    Gone,
    /// Its queue has no room now.
    Full,
}

impl Endpoint {
    /// Adds a guest; None when the endpoint is gone or already keeps 1,024 (counted
    /// as `too_many_remote_backends`).
    pub fn add_guest(&self, outlet: Arc<dyn Outlet>) -> Option<u64> {
        let mut s = self.state();
        if s.removed {
            return None;
        }
        let key = s.add_guest(outlet, MAX_GUESTS);
        drop(s);
        if key.is_none() {
            self.dropped(Dropped::TooManyRemoteBackends);
        }
        key
    }

    /// Forgets guests (their backend left, or their node): their calls to this endpoint's
    /// clients are dropped, so an answer can never reach a later guest under the same key.
    pub fn remove_guests(&self, keys: &[u64]) {
        if !keys.is_empty() {
            self.state().remove_guests(keys);
        }
    }

    /// A frame from guest `key` to a client of this endpoint (its `ext.route` names which).
    /// Returns the answer the gateway gives itself (`-32001`, `-32003`), if any.
    pub fn call_as_guest(self: &Arc<Self>, key: u64, msg: Message) -> Outcome {
        let mut ext = msg.ext().unwrap_or_default();
        let route: Option<Route> = match ext.remove("route") {
            Some(Value::String(route)) => Some(Arc::from(route)),
            _ => None,
        };
        self.call_client(key, msg, ext, route, false).into()
    }

    /// Hands `frame` (a client's answer that came from another node) to backend `key` of the
    /// pool without waiting, counting what is not delivered.
    pub fn answer_backend(&self, key: BackendKey, frame: String) -> Handed {
        let tx = self.state().slot(key).map(|b| b.tx.clone());
        let handed = match tx.map(|tx| tx.try_send(frame)) {
            Some(Ok(())) => Handed::Queued,
            // Not in the pool, or gone meanwhile.
            None | Some(Err(None)) => Handed::Gone,
            Some(Err(Some(_))) => Handed::Full,
        };
        match handed {
            Handed::Queued => self.series.to_backend.inc(),
            Handed::Gone => self.dropped(Dropped::BackendClosed),
            Handed::Full => self.dropped(Dropped::BackendFull),
        }
        handed
    }
}
