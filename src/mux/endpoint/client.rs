//! The client side of an endpoint: a WebSocket peer or one HTTP call, admitting its calls to a
//! backend of the pool and delivering what comes back.

use std::sync::{Arc, OnceLock};

use serde_json::value::RawValue;
use tokio::time::Instant;

use super::ext::{local_error, route_ext, with_route};
use super::series::CallEnd;
use super::state::{ClientSlot, Owed, PendingCall, State};
use super::{CloseCell, Digest, Dropped, Endpoint, JoinError, Route};
use crate::duplex::{code, Kind, Message};
use crate::mux::queue::{BackendTx, ClientRx, ClientTx};
use crate::mux::{close, CloseReason, Outcome};

/// A client of an endpoint: a WebSocket peer or one HTTP call.
pub struct ClientConn {
    pub(super) endpoint: Arc<Endpoint>,
    pub(super) route: Route,
    /// `{"route":"<route>"}`, made once.
    pub(super) route_ext: Box<RawValue>,
    pub(super) rx: ClientRx,
    pub(super) close: CloseCell,
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

    /// The backend (its id in the pool) that took this client's latest call.
    pub fn backend(&self) -> Option<String> {
        let s = self.endpoint.state();
        let client = s.clients.get(&self.route)?;
        client.last_backend.map(|key| key.to_string())
    }

    /// Whether calls of this client (to a backend, or from one) are running.
    pub fn has_open_calls(&self) -> bool {
        self.endpoint
            .state()
            .clients
            .get(&self.route)
            .is_some_and(|c| !c.open.is_empty() || !c.incoming.is_empty())
    }

    /// The next frame for this client; None once the multiplexer closed it
    /// (see [`ClientConn::close_reason`]).
    pub async fn recv(&mut self) -> Option<Message> {
        if self.dropped_out() {
            return None;
        }
        self.rx.recv().await
    }

    /// A frame already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        if self.dropped_out() {
            return None;
        }
        self.rx.try_recv()
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

    /// Sends one frame from this client to its backend. Returns the frame to answer the client
    /// with when the gateway answers it itself (too many pending calls, backend unavailable; the
    /// latter also for a request without an id, which then has no id either).
    pub async fn send(&self, msg: Message) -> Outcome {
        self.pass(msg).await.into()
    }

    async fn pass(&self, mut msg: Message) -> Option<Message> {
        let ep = &self.endpoint;

        let backend = match msg.kind() {
            Kind::Reply => {
                // A reply to a call a backend made to this client: back to that backend, under
                // its own id.
                let Some(id) = msg.id() else {
                    ep.dropped(Dropped::ReplyWithoutId);
                    return None;
                };
                let mut s = ep.state();
                let Some(&(key, backend_id)) =
                    s.clients.get(&self.route).and_then(|c| c.incoming.get(&id))
                else {
                    drop(s);
                    ep.dropped(Dropped::UnknownCall);
                    return None;
                };
                if msg.ends_call() {
                    if let Some(c) = s.clients.get_mut(&self.route) {
                        c.incoming.remove(&id);
                    }
                }
                if let Some(b) = s.slot(key) {
                    msg.set_id(Some(backend_id));
                    b.tx.clone()
                } else {
                    // A guest (a backend of another node) made the call.
                    let outlet = s.guests.get(&key).cloned();
                    drop(s);
                    match outlet {
                        Some(outlet) => {
                            msg.set_id(Some(backend_id));
                            with_route(&mut msg, &self.route, &self.route_ext);
                            if !outlet.offer(msg.to_json()) {
                                // More than the way there holds: as a client whose backend
                                // does not read, it cannot be held back here.
                                ep.close_client(&self.route, CloseReason::too_fast());
                            }
                        }
                        None => ep.dropped(Dropped::NoBackend),
                    }
                    return None;
                }
            }
            Kind::Request => loop {
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
            },
        };

        with_route(&mut msg, &self.route, &self.route_ext);
        if backend.send(msg.to_json()).await.is_ok() {
            ep.series.to_backend.inc();
        } else {
            // The backend left while we queued; its departure fails the call.
            ep.dropped(Dropped::NoBackend);
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
    /// No backend takes calls yet; wait for one until this instant.
    Wait(Instant),
}

impl ClientConn {
    /// Decides a request under the endpoint lock: picks its backend (the one of the call it
    /// continues; for a new call the client's pinned backend, or for an HTTP call the one with
    /// the fewest pending calls) and gives it a backend id.
    fn admit(&self, msg: &Message) -> Admit {
        let ep = &self.endpoint;
        let limits = ep.limits();
        let mut guard = ep.state();
        let s = &mut *guard;
        let unavailable = |msg: &Message| {
            ep.dropped(Dropped::NoBackend);
            // Answered even without an id, so an HTTP caller can tell; WebSocket peers are only
            // sent answers that carry an id.
            Admit::Answer(Some(local_error(
                msg,
                code::BACKEND_UNAVAILABLE,
                "backend unavailable",
            )))
        };
        if s.removed {
            drop(guard);
            return unavailable(msg);
        }
        let Some(client) = s.clients.get(&self.route) else {
            // Closed by the multiplexer meanwhile.
            return Admit::Answer(None);
        };
        let client_id = msg.id();
        // The next frame of a call already open goes where the call is.
        if let Some(&(key, backend_id)) = client_id.and_then(|id| client.open.get(&id)) {
            if let Some(slot) = s.slot(key) {
                return Admit::Send(slot.tx.clone(), Some(backend_id));
            }
        }
        // Every queue of the process together is over `limits.max_queued_bytes`: no new call
        // until they drain (what runs carries on).
        if crate::mux::queued_bytes() > limits.max_queued_bytes {
            drop(guard);
            ep.dropped(Dropped::QueuesFull);
            return Admit::Answer(Some(local_error(
                msg,
                code::TOO_MANY_PENDING_CALLS,
                "the gateway holds too much for its peers now: try again",
            )));
        }
        let pinned = client.pinned;
        let websocket = client.websocket;
        let key = match pinned.filter(|k| s.slot(*k).is_some_and(|b| !b.draining)) {
            Some(key) => Some(key),
            None if websocket => {
                s.unpin(&self.route);
                s.pin(&self.route)
            }
            None => s.least(|b| b.calls.len()),
        };
        let Some(key) = key else {
            return match s.grace_until {
                Some(until) if Instant::now() < until => Admit::Wait(until),
                _ => {
                    drop(guard);
                    unavailable(msg)
                }
            };
        };
        let Some(client_id) = client_id else {
            let tx = s.slot(key).map(|b| b.tx.clone());
            return match tx {
                Some(tx) => {
                    // A request without an id (an async HTTP call, a notification): counted
                    // as sent, since no reply will end it.
                    let method = ep
                        .series
                        .method(msg.raw_field("method"), limits.max_methods_per_endpoint);
                    ep.series.call_ended(&method, CallEnd::Sent, 0.0);
                    Admit::Send(tx, None)
                }
                None => Admit::Answer(None),
            };
        };
        let Some(client) = s.clients.get_mut(&self.route) else {
            return Admit::Answer(None);
        };
        if client.open.len() >= limits.max_pending_calls_per_client {
            drop(guard);
            ep.dropped(Dropped::TooManyPendingCalls);
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
            ep.dropped(Dropped::TooManyPendingCalls);
            return Admit::Answer(Some(local_error(
                msg,
                code::TOO_MANY_PENDING_CALLS,
                "pending calls hold too much ext data",
            )));
        }
        client.ext_bytes += ext_len;
        let Some(slot) = s.backends.iter_mut().find(|b| b.key == key) else {
            return Admit::Answer(None);
        };
        let backend_id = slot.next_id;
        slot.next_id += 1;
        slot.calls.insert(
            backend_id,
            PendingCall {
                route: self.route.clone(),
                client_id,
                // Copied only for a call that opens: the rest never need it.
                client_ext: msg.ext_raw().map(|raw| raw.to_owned()),
                method: ep
                    .series
                    .method(msg.raw_field("method"), limits.max_methods_per_endpoint),
                started: std::time::Instant::now(),
            },
        );
        let tx = slot.tx.clone();
        if let Some(client) = s.clients.get_mut(&self.route) {
            client.open.insert(client_id, (key, backend_id));
            client.last_backend = Some(key);
        }
        s.update_gauges();
        drop(guard);
        Admit::Send(tx, Some(backend_id))
    }
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        let route = self.route.clone();
        // What is still queued for the client goes with its queue.
        self.endpoint.remove_clients(None, |_| [route]);
    }
}

impl Endpoint {
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
        let (tx, rx) = ClientTx::channel(budget);
        let close: CloseCell = Arc::new(OnceLock::new());
        s.websocket_clients += usize::from(websocket);
        s.clients
            .insert(route.clone(), ClientSlot::new(tx, close.clone(), websocket));
        if websocket {
            s.pin(&route);
        }
        s.update_gauges();
        Ok(ClientConn {
            endpoint: self.clone(),
            route_ext: route_ext(&route),
            route,
            rx,
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

    /// Removes the clients `pick` chooses (under the lock, after any change it makes), closing
    /// them with `reason`; the backends' calls to them are answered with `-32001`. Returns how
    /// many were removed.
    pub(super) fn remove_clients<R: IntoIterator<Item = Route>>(
        &self,
        reason: Option<&CloseReason>,
        pick: impl FnOnce(&mut State) -> R,
    ) -> usize {
        let mut s = self.state();
        let mut removed = 0;
        let mut owed: Vec<Owed> = Vec::new();
        let mut cancelled = Vec::new();
        for route in pick(&mut s) {
            owed.extend(s.remove_client(&route, reason.cloned(), &mut cancelled));
            removed += 1;
        }
        drop(s);
        for o in owed {
            o.send();
        }
        for (method, started) in cancelled {
            self.series
                .call_ended(&method, CallEnd::Cancelled, started.elapsed().as_secs_f64());
        }
        removed
    }
}
