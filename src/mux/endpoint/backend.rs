//! The backend side of an endpoint: routing what one backend of the pool sends (replies to
//! client calls, calls to clients by route, `$` requests to the gateway itself).

use std::sync::Arc;

use serde_json::Value;

use super::ext::{local_error, restore_ext};
use super::state::DrainRequest;
use super::{BackendKey, CloseCell, Dropped, Endpoint, Route};
use crate::duplex::{code, Kind, Message};
use crate::mux::queue::BackendRx;
use crate::mux::{close, CloseReason, Outcome};

/// The backend side of an endpoint: one backend of its pool.
pub struct BackendConn {
    pub(super) endpoint: Arc<Endpoint>,
    pub(super) key: BackendKey,
    pub(super) rx: BackendRx,
    pub(super) close: CloseCell,
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
    /// A backend that was closed (replaced, revoked, stopping) is silent: nothing it sends
    /// reaches anyone.
    pub fn handle(&self, msg: Message) -> Outcome {
        self.route(msg).into()
    }

    fn route(&self, mut msg: Message) -> Option<Message> {
        let ep = &self.endpoint;
        match msg.kind() {
            Kind::Reply => {
                let Some(id) = msg.id() else {
                    ep.dropped(Dropped::ReplyWithoutId);
                    return None;
                };
                let mut s = ep.state();
                let Some(slot) = s.slot(self.key) else {
                    drop(s);
                    ep.dropped(Dropped::BackendClosed);
                    return None;
                };
                let Some(call) = slot.calls.get(&id) else {
                    drop(s);
                    ep.dropped(Dropped::UnknownCall);
                    return None;
                };
                let route = call.route.clone();
                let client_id = call.client_id;
                let client_ext = call.client_ext.clone();
                let ended = msg.ends_call().then(|| (call.method.clone(), call.started));
                let drained = if ended.is_some() {
                    s.end_call(self.key, id)
                } else {
                    None
                };
                let client = s.clients.get(&route).map(|c| (c.tx.clone(), c.websocket));
                drop(s);
                if let Some(owed) = drained {
                    tracing::info!(endpoint = %ep.logged(), pending = 0, "backend drained");
                    owed.send();
                }
                if let Some((method, started)) = ended {
                    let end = if msg.is_error() {
                        super::series::CallEnd::Error(
                            msg.error()
                                .map_or(crate::duplex::code::INTERNAL_ERROR, |e| e.code),
                        )
                    } else {
                        super::series::CallEnd::Ok
                    };
                    ep.series
                        .call_ended(&method, end, started.elapsed().as_secs_f64());
                }
                msg.set_id(Some(client_id));
                match client {
                    Some((tx, websocket)) => {
                        // An HTTP caller is answered with the payload only: its `ext` is never
                        // seen, so it is not rewritten.
                        if websocket {
                            restore_ext(&mut msg, &route, client_ext.as_deref());
                        }
                        ep.deliver(&route, &tx, msg)
                    }
                    None => ep.dropped(Dropped::ClientGone),
                }
                None
            }
            Kind::Request => {
                let mut ext = msg.ext().unwrap_or_default();
                let route: Option<Route> = match ext.remove("route") {
                    Some(Value::String(route)) => Some(Arc::from(route)),
                    _ => None,
                };
                if route.is_none() {
                    // Addressed to the gateway itself: its methods start with `$`.
                    if let Some(method) = msg.method().filter(|m| m.starts_with('$')) {
                        return self.gateway_method(&method, &msg);
                    }
                }
                ep.call_client(self.key, msg, ext, route, true)
            }
        }
    }

    /// A request to the gateway itself: `$drain`, or `-32601` for any other `$` method.
    fn gateway_method(&self, method: &str, msg: &Message) -> Option<Message> {
        let ep = &self.endpoint;
        if ep.state().slot(self.key).is_none() {
            ep.dropped(Dropped::BackendClosed);
            return None;
        }
        if method == "$drain" {
            let request = DrainRequest {
                id: msg.id(),
                ext: msg.ext_raw().map(|raw| raw.to_owned()),
            };
            return ep.start_drain(self.key, request);
        }
        msg.id()?;
        Some(local_error(
            msg,
            code::METHOD_NOT_FOUND,
            &format!("method not found: {method}"),
        ))
    }
}

impl Drop for BackendConn {
    fn drop(&mut self) {
        // Senders waiting for room in this backend's queue stop waiting.
        self.rx.room.close();
        self.endpoint.backend_left(self.key);
    }
}

impl Endpoint {
    /// A call from backend `key` to the client `route` names (`ext` is the call's `ext` without
    /// the route). `local`: the backend is one of this node's (else another node's, relayed).
    /// A route of another node's client is handed to the cluster. Returns the answer the
    /// gateway gives itself (`-32001`, `-32003`), if any.
    pub(super) fn call_client(
        self: &Arc<Self>,
        key: BackendKey,
        mut msg: Message,
        ext: serde_json::Map<String, Value>,
        route: Option<Route>,
        local: bool,
    ) -> Option<Message> {
        let ep = self;
        let id = msg.id();
        let mut s = ep.state();
        if local && s.slot(key).is_none() {
            drop(s);
            ep.dropped(Dropped::BackendClosed);
            return None;
        }
        let target = route
            .as_ref()
            .and_then(|r| s.clients.get_key_value(r))
            .map(|(r, c)| (r.clone(), c.tx.clone()));
        let Some((route, tx)) = target else {
            drop(s);
            // In a cluster, the client may be another node's: its route says which.
            if let (true, Some(route), Some(relay)) = (
                local,
                route.as_ref(),
                ep.registry
                    .upgrade()
                    .as_ref()
                    .and_then(|r| r.relay().cloned()),
            ) {
                if relay.call_client(&ep.path, route, key, id, msg.to_json()) {
                    return None;
                }
            }
            ep.dropped(Dropped::ClientNotConnected);
            id?;
            return Some(local_error(
                &msg,
                code::CLIENT_NOT_CONNECTED,
                "client not connected",
            ));
        };
        if let Some(id) = id {
            let max = ep.limits().max_pending_calls_per_client;
            let client = s.clients.get_mut(&route)?;
            // The id the client sees: the backend's own, unless another backend of the pool
            // already has a call open with this client under it.
            let existing = client
                .incoming
                .iter()
                .find(|(_, &(k, bid))| k == key && bid == id)
                .map(|(&cid, _)| cid);
            let client_id = match existing {
                Some(cid) => cid,
                None => {
                    // A new call to this client: it counts against the client's limit.
                    if client.incoming.len() >= max {
                        drop(s);
                        ep.dropped(Dropped::TooManyPendingCalls);
                        return Some(local_error(
                            &msg,
                            code::TOO_MANY_PENDING_CALLS,
                            "too many pending calls to this client",
                        ));
                    }
                    let mut cid = id;
                    while client.incoming.contains_key(&cid) {
                        cid = client.next_incoming;
                        client.next_incoming += 1;
                    }
                    client.incoming.insert(cid, (key, id));
                    cid
                }
            };
            msg.set_id(Some(client_id));
        }
        drop(s);
        msg.set_ext(if ext.is_empty() { None } else { Some(&ext) });
        ep.deliver(&route, &tx, msg);
        None
    }
}
