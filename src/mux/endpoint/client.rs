//! The client side of an endpoint: a WebSocket peer or one HTTP call, admitting its calls to a
//! backend of the pool and delivering what comes back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_channel::mpsc as queue;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::time::Instant;

use super::*;
use crate::duplex::{code, Kind, Message};
use crate::mux::queue::BackendTx;

/// A client of an endpoint: a WebSocket peer or one HTTP call.
pub struct ClientConn {
    pub(super) endpoint: Arc<Endpoint>,
    pub(super) route: Route,
    /// `{"route":"<route>"}`, made once.
    pub(super) route_ext: Box<RawValue>,
    pub(super) rx: queue::UnboundedReceiver<(Message, usize)>,
    /// Bytes queued in `rx` (shared with the endpoint's side of the queue).
    pub(super) queued: Arc<AtomicUsize>,
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
        let (msg, size) = self.rx.next().await?;
        self.queued.fetch_sub(size, Ordering::Relaxed);
        crate::mux::queue::dequeued(size);
        Some(msg)
    }

    /// A frame already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        if self.dropped_out() {
            return None;
        }
        let (msg, size) = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(size, Ordering::Relaxed);
        crate::mux::queue::dequeued(size);
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

    /// Sends one frame from this client to its backend. Returns the frame to answer the client
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
                // A reply to a call a backend made to this client: back to that backend, under
                // its own id.
                let Some(id) = msg.id() else {
                    ep.dropped("reply_without_id");
                    return None;
                };
                let mut s = ep.state();
                let Some(&(key, backend_id)) =
                    s.clients.get(&self.route).and_then(|c| c.incoming.get(&id))
                else {
                    drop(s);
                    ep.dropped("unknown_call");
                    return None;
                };
                if msg.ends_call() {
                    if let Some(c) = s.clients.get_mut(&self.route) {
                        c.incoming.remove(&id);
                    }
                }
                match s.slot(key) {
                    Some(b) => {
                        msg.set_id(Some(backend_id));
                        b.tx.clone()
                    }
                    None => {
                        // A backend of another node of the cluster made the call.
                        let remote = s.remote_callers.get(&key).map(|(n, k, _)| (n.clone(), *k));
                        drop(s);
                        match remote {
                            Some((node, remote_key)) => {
                                msg.set_id(Some(backend_id));
                                self.with_route(&mut msg, ext_map);
                                if let Some(relay) = ep
                                    .registry
                                    .upgrade()
                                    .as_ref()
                                    .and_then(|r| r.relay().cloned())
                                {
                                    let carried = relay.answer_backend(
                                        &node,
                                        &ep.path,
                                        remote_key,
                                        msg.to_json(),
                                    );
                                    if !carried {
                                        // More than the link holds: as a client whose backend
                                        // does not read, it cannot be held back here.
                                        ep.close_client(&self.route, CloseReason::too_fast());
                                    }
                                }
                            }
                            None => ep.dropped("no_backend"),
                        }
                        return None;
                    }
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

        self.with_route(&mut msg, ext_map);
        if backend.send(msg.to_json()).await.is_ok() {
            ep.to_backend.inc();
        } else {
            // The backend left while we queued; its departure fails the call.
            ep.dropped("no_backend");
        }
        None
    }
}

impl ClientConn {
    /// Puts this client's route into `ext` (what a backend sees of every frame).
    fn with_route(&self, msg: &mut Message, ext_map: Option<serde_json::Map<String, Value>>) {
        match ext_map {
            Some(mut ext) => {
                ext.insert("route".into(), Value::String(self.route.to_string()));
                msg.set_ext(Some(&ext));
            }
            None => msg.set_raw("ext", self.route_ext.clone()),
        }
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
            ep.dropped("no_backend");
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
            ep.dropped("queues_full");
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
                Some(tx) => Admit::Send(tx, None),
                None => Admit::Answer(None),
            };
        };
        let Some(client) = s.clients.get_mut(&self.route) else {
            return Admit::Answer(None);
        };
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
            },
        );
        let tx = slot.tx.clone();
        if let Some(client) = s.clients.get_mut(&self.route) {
            client.open.insert(client_id, (key, backend_id));
        }
        s.update_gauges();
        drop(guard);
        Admit::Send(tx, Some(backend_id))
    }
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        let route = self.route.clone();
        self.endpoint.remove_clients(None, |_| [route]);
        // What is still queued for the client goes with it.
        self.rx.close();
        while let Ok((_, size)) = self.rx.try_recv() {
            crate::mux::queue::dequeued(size);
        }
    }
}
