//! Calls between a backend and a client on two different nodes (a backend calling a client by
//! its route): the route's tag names the client's node, the call goes there, and the answer
//! comes back to the backend's node.
//!
//! On the client's node, the calling backend is a guest of the endpoint (an ordinary caller of
//! the multiplexer whose answers go out through a [`RemoteBackend`] outlet). On the backend's
//! node, the calls still open are remembered, so they fail (`-32001`) when the client's node is
//! lost instead of waiting for ever.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::Subject;
use tokio::time::Instant;

use super::wire::{Envelope, Op};
use super::{lock, tag_of, Cluster, TAG_HEX};
use crate::duplex::{code, Message};
use crate::mux::{self, Endpoint, Handed};

/// A guest of one of this node's endpoints: a backend of another node.
pub(super) struct Guest {
    endpoint: Weak<Endpoint>,
    /// Its key among the endpoint's guests.
    key: u64,
    /// When it first called: a guest is not forgotten for not being announced before the
    /// heartbeat announcing it had time to come.
    since: Instant,
}

/// Where guest backends of one node meet: (path, node, the backend's key there).
pub(super) type GuestKey = (String, Arc<str>, u64);

/// A call of one of this node's backends to a client of another node, still open.
pub(super) struct Relayed {
    endpoint: Weak<Endpoint>,
    node: Arc<str>,
    route: String,
}

/// (path, backend key, call id).
pub(super) type RelayedKey = (String, u64, u64);

/// Answers from a client of this node to a backend of another (an [`mux::Outlet`]).
struct RemoteBackend {
    cluster: Weak<Cluster>,
    node: Arc<str>,
    path: String,
    key: u64,
}

impl mux::Outlet for RemoteBackend {
    fn offer(&self, frame: String) -> bool {
        self.cluster
            .upgrade()
            .is_some_and(|c| c.answer_backend(&self.node, &self.path, self.key, frame))
    }
}

fn same(a: &Weak<Endpoint>, b: &Arc<Endpoint>) -> bool {
    std::ptr::eq(a.as_ptr(), Arc::as_ptr(b))
}

impl Cluster {
    /// Hands `frame` (a client's answer) to backend `key` of `path` on `node`. False when the
    /// outbox has no room for it.
    fn answer_backend(&self, node: &str, path: &str, key: u64, frame: String) -> bool {
        let answer = Envelope {
            op: Op::AnswerBackend { key, path },
            session: 0,
            from: &self.me,
            body: frame.as_bytes(),
        };
        self.post(self.subject_of(node), answer.encode())
    }

    /// A call from backend `key` of `node` to a client of this node's endpoint at `path`.
    pub(super) fn call_from(&self, node: &str, path: &str, key: u64, call: Message) {
        let answer = match self.registry.lookup(path) {
            Some(endpoint) => match self.guest_key(&endpoint, node, key) {
                Some(guest) => endpoint.call_as_guest(guest, call).into_answer(),
                None => None,
            },
            None => call.id().map(|_| {
                mux::local_error(&call, code::CLIENT_NOT_CONNECTED, "client not connected")
            }),
        };
        if let Some(answer) = answer {
            self.answer_backend(node, path, key, answer.to_json());
        }
    }

    /// The key backend `key` of `node` stands under among `endpoint`'s guests, made at its
    /// first call.
    fn guest_key(&self, endpoint: &Arc<Endpoint>, node: &str, key: u64) -> Option<u64> {
        let mut guests = lock(&self.guests);
        let id: GuestKey = (endpoint.path().to_string(), Arc::from(node), key);
        if let Some(guest) = guests.get(&id).filter(|g| same(&g.endpoint, endpoint)) {
            return Some(guest.key);
        }
        let outlet = Arc::new(RemoteBackend {
            cluster: self.me_weak.clone(),
            node: id.1.clone(),
            path: id.0.clone(),
            key,
        });
        let local = endpoint.add_guest(outlet)?;
        guests.insert(
            id,
            Guest {
                endpoint: Arc::downgrade(endpoint),
                key: local,
                since: Instant::now(),
            },
        );
        Some(local)
    }

    /// Forgets the guests `gone` names (path, node, key there): their node died, reconnected,
    /// or no longer announces them. Guests first heard of within `min_age` are kept (the
    /// heartbeat announcing a new backend may arrive after its first call).
    pub(super) fn forget_guests(&self, min_age: Duration, gone: impl Fn(&GuestKey) -> bool) {
        let settled = Instant::now()
            .checked_sub(min_age)
            .unwrap_or_else(Instant::now);
        let mut forgotten: HashMap<*const Endpoint, (Arc<Endpoint>, Vec<u64>)> = HashMap::new();
        lock(&self.guests).retain(|id, guest| {
            let Some(endpoint) = guest.endpoint.upgrade() else {
                return false;
            };
            if guest.since > settled || !gone(id) {
                return true;
            }
            forgotten
                .entry(Arc::as_ptr(&endpoint))
                .or_insert_with(|| (endpoint.clone(), Vec::new()))
                .1
                .push(guest.key);
            false
        });
        for (endpoint, keys) in forgotten.into_values() {
            endpoint.remove_guests(&keys);
        }
    }

    /// Hands call `id` of backend `key` of `path` to the node that holds client `route` (its
    /// tag says which). False when no node does.
    pub(super) fn call_client(
        &self,
        path: &str,
        route: &str,
        key: u64,
        id: Option<u64>,
        frame: String,
    ) -> bool {
        // A route key of a cluster is the tag and 32 hex digits; anything else names no client
        // anywhere.
        if route.len() != TAG_HEX + 32 || !route.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        let Some(tag) = route.get(..TAG_HEX) else {
            return false;
        };
        if !self.usable() || tag == tag_of(&self.me) {
            return false;
        }
        let Some((node, subject)): Option<(Arc<str>, Subject)> = lock(&self.nodes)
            .iter()
            .find(|(_, node)| node.tag == tag)
            .map(|(name, node)| (name.clone(), node.subject.clone()))
        else {
            return false;
        };
        let call = Envelope {
            op: Op::CallClient { key, path },
            session: 0,
            from: &self.me,
            body: frame.as_bytes(),
        };
        // A backend that calls faster than NATS takes the calls: they fail as if the client
        // were gone, rather than piling up.
        if !self.post(subject, call.encode()) {
            return false;
        }
        // Remembered, so the call fails (-32001) if that node goes before answering.
        if let (Some(id), Some(endpoint)) = (id, self.registry.lookup(path)) {
            lock(&self.relayed).insert(
                (path.to_string(), key, id),
                Relayed {
                    endpoint: Arc::downgrade(&endpoint),
                    node,
                    route: route.to_string(),
                },
            );
        }
        true
    }

    /// A client's answer, from `node`, to backend `key` of this node's endpoint at `path`.
    pub(super) fn answer_from(&self, node: &str, path: &str, key: u64, answer: &Message) {
        let Some(endpoint) = self.registry.lookup(path) else {
            return;
        };
        if let Some(id) = answer.id().filter(|_| answer.ends_call()) {
            lock(&self.relayed).remove(&(path.to_string(), key, id));
        }
        if endpoint.answer_backend(key, answer.to_json()) != Handed::Full {
            return;
        }
        // The backend does not read: the client that sends it all is put out by its own node
        // (its route is read only then).
        let route = answer.ext().and_then(|mut ext| match ext.remove("route") {
            Some(serde_json::Value::String(route)) => Some(route),
            _ => None,
        });
        if let Some(route) = route {
            let close = Envelope {
                op: Op::CloseClient { path },
                session: 0,
                from: &self.me,
                body: route.as_bytes(),
            };
            self.post_control(self.subject_of(node), close.encode());
        }
    }

    /// Fails with `-32001` the calls this node's backends made to clients of the nodes `gone`
    /// names (the node died, or the link to it was lost): nobody will answer them. Calls of
    /// backends that left are forgotten.
    pub(super) fn fail_relayed_calls(&self, gone: impl Fn(&str) -> bool) {
        let mut failed = Vec::new();
        lock(&self.relayed).retain(|(_, key, id), call| {
            let Some(endpoint) = call.endpoint.upgrade() else {
                return false;
            };
            if !endpoint.has_backend(*key) {
                return false;
            }
            if !gone(&call.node) {
                return true;
            }
            failed.push((endpoint, *key, mux::client_gone_frame(*id, &call.route)));
            false
        });
        for (endpoint, key, frame) in failed {
            endpoint.answer_backend(key, frame);
        }
    }
}

/// Hands calls to other nodes' clients to the cluster (a weak link: the registry lives in the
/// cluster too).
pub(super) struct RelayTo(pub(super) Weak<Cluster>);

impl mux::Relay for RelayTo {
    fn call_client(
        &self,
        path: &str,
        route: &str,
        key: u64,
        id: Option<u64>,
        frame: String,
    ) -> bool {
        self.0
            .upgrade()
            .is_some_and(|c| c.call_client(path, route, key, id, frame))
    }
}
