//! The backend's side of the cluster: clients of other nodes, relayed to this node's endpoints.
//!
//! Each session is an ordinary client of the endpoint ([`ClientConn`]), served by a task of its
//! own: frames from the client's node go in through [`ClientConn::send`] in the order they
//! came, and whatever the multiplexer has for the client goes back to its node, in order. An
//! HTTP call's session ends with its final reply.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use async_nats::Subject;
use futures_channel::mpsc;
use futures_util::StreamExt;

use super::wire::{Envelope, Op};
use super::{lock, Cluster};
use crate::auth::Digest;
use crate::duplex::{Kind, Message};
use crate::mux::{close, ClientConn, CloseReason, JoinError};

/// Why a relayed client is refused by the node that serves it: its secret is not the one this
/// node's endpoint wants (HTTP 401, WebSocket 1008 on the client's node).
pub const SECRET_REFUSED: &str = "secret no longer valid";

/// A session this node serves for another node's client.
pub(super) struct Entry {
    /// The client's node.
    pub(super) origin: Arc<str>,
    /// A WebSocket client (else one HTTP call).
    websocket: bool,
    /// Frames of the client that came (its open included).
    pub(super) received: u64,
    /// Frames sent back to the client's node (counted once handed to NATS).
    pub(super) sent: Arc<AtomicU64>,
    /// Counts the session among its path's relayed clients while it lives.
    _counted: Counted,
    tx: mpsc::UnboundedSender<(Message, usize)>,
    queued: Arc<AtomicUsize>,
}

impl Cluster {
    /// HTTP calls of other nodes' clients that this node's backends are serving (SIGTERM lets
    /// them finish like this node's own).
    pub fn relayed_http_calls(&self) -> usize {
        lock(&self.served).values().filter(|e| !e.websocket).count()
    }

    /// A message about a session this node serves.
    pub(super) fn to_served(&self, envelope: &Envelope<'_>) {
        let id = envelope.session;
        match envelope.op {
            Op::Open {
                websocket,
                secret,
                path,
            } => self.open_served(envelope, websocket, secret, path),
            Op::ToBackend => {
                let Ok(msg) = Message::parse(envelope.body) else {
                    return;
                };
                let size = envelope.body.len();
                let budget = self.registry.limits().backend_queue_bytes;
                let mut served = lock(&self.served);
                let Some(entry) = served.get_mut(&id).filter(|e| *e.origin == *envelope.from)
                else {
                    drop(served);
                    // A session this node does not know (ended here, or its open was lost):
                    // the client's node learns it, and places the client again.
                    let reason = CloseReason::new(close::TRY_AGAIN_LATER, "session unknown");
                    self.end_served(&self.subject_of(envelope.from), id, &reason);
                    return;
                };
                if entry.queued.fetch_add(size, Ordering::Relaxed) + size > budget {
                    // The client sends far faster than the backend reads: what a single node
                    // would hold back cannot be held back across NATS, so the client goes.
                    let entry = served.remove(&id);
                    drop(served);
                    if let Some(entry) = entry {
                        let reason = CloseReason::too_fast();
                        self.end_served(&self.subject_of(&entry.origin), id, &reason);
                    }
                    return;
                }
                entry.received += 1;
                let _ = entry.tx.unbounded_send((msg, size));
            }
            Op::Close => {
                let mut served = lock(&self.served);
                if served.get(&id).is_some_and(|e| *e.origin == *envelope.from) {
                    let entry = served.remove(&id);
                    drop(served);
                    drop(entry);
                }
            }
            _ => {}
        }
    }

    fn open_served(&self, envelope: &Envelope<'_>, websocket: bool, secret: &str, path: &str) {
        let id = envelope.session;
        let reply_to = self.subject_of(envelope.from);
        if lock(&self.served).contains_key(&id) {
            return;
        }
        if self.leaving.load(Ordering::SeqCst) {
            let reason = CloseReason::new(close::TRY_AGAIN_LATER, "gateway node stopping");
            self.refuse_served(&reply_to, id, &reason);
            return;
        }
        // Only nodes this one hears open sessions here (the caller checked the message came
        // from one it knows; departing nodes open nothing new).
        if !lock(&self.nodes).contains_key(envelope.from) {
            let reason = CloseReason::new(close::TRY_AGAIN_LATER, "unknown gateway node");
            self.refuse_served(&reply_to, id, &reason);
            return;
        }
        // The client was admitted on its node with this digest: it must still be the one this
        // node's endpoint wants (a reload here may have changed it), and it counts against
        // this node's `max_clients` like a client of its own.
        let Some(secret) = Digest::from_hex(secret) else {
            return;
        };
        let conn = self
            .registry
            .lookup(path)
            .ok_or(JoinError::NotFound)
            .and_then(|endpoint| endpoint.join(websocket, self.limits.max_clients(path), &secret));
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                // A refused secret or a full endpoint is this client's answer; an endpoint this
                // node no longer has lets the client's node look elsewhere.
                match e {
                    JoinError::BadSecret => {
                        let reason = CloseReason::new(close::POLICY, SECRET_REFUSED);
                        self.end_served(&reply_to, id, &reason);
                    }
                    JoinError::Full => {
                        let reason = CloseReason::new(close::TRY_AGAIN_LATER, "endpoint full");
                        self.end_served(&reply_to, id, &reason);
                    }
                    _ => {
                        let reason =
                            CloseReason::new(close::TRY_AGAIN_LATER, "backend unavailable");
                        self.refuse_served(&reply_to, id, &reason);
                    }
                }
                return;
            }
        };
        let (tx, rx) = mpsc::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        if !envelope.body.is_empty() {
            if let Ok(first) = Message::parse(envelope.body) {
                let size = envelope.body.len();
                queued.fetch_add(size, Ordering::Relaxed);
                let _ = tx.unbounded_send((first, size));
            }
        }
        lock(&self.served).insert(
            id,
            Entry {
                _counted: Counted::new(&self.served_counts, path),
                origin: Arc::from(envelope.from),
                websocket,
                received: 1,
                sent: sent.clone(),
                tx,
                queued: queued.clone(),
            },
        );
        let Some(me) = self.me_weak.upgrade() else {
            return;
        };
        // Next to the backend's connection: handing it frames and taking its replies then wakes
        // no other thread (only the NATS link's own thread is crossed, once each way).
        let runtime = conn.endpoint().runtime().unwrap_or_else(|| self.rt.clone());
        runtime.spawn(async move {
            me.serve(conn, rx, (queued, sent), reply_to, id, websocket)
                .await;
        });
    }

    /// Tells a client's node that its session ended.
    pub(super) fn end_served(&self, subject: &Subject, id: u128, reason: &CloseReason) {
        self.send_end(subject, id, reason, false);
    }

    /// Tells the client's node that session `id` was not opened here: nothing of it reached a
    /// backend, so its calls may go elsewhere (see [`Op::Ended`]).
    fn refuse_served(&self, subject: &Subject, id: u128, reason: &CloseReason) {
        self.send_end(subject, id, reason, true);
    }

    fn send_end(&self, subject: &Subject, id: u128, reason: &CloseReason, refused: bool) {
        let ended = Envelope {
            op: Op::Ended {
                code: reason.code,
                reason: &reason.reason,
                refused,
            },
            session: id,
            from: &self.me,
            body: b"",
        };
        self.post_control(subject.clone(), ended.encode());
    }

    /// Serves one session until either side ends it.
    async fn serve(
        self: Arc<Self>,
        mut conn: ClientConn,
        mut rx: mpsc::UnboundedReceiver<(Message, usize)>,
        (queued, sent): (Arc<AtomicUsize>, Arc<AtomicU64>),
        reply_to: Subject,
        id: u128,
        websocket: bool,
    ) {
        let frame = |body: &[u8]| {
            Envelope {
                op: Op::ToClient,
                session: id,
                from: &self.me,
                body,
            }
            .encode()
        };
        loop {
            tokio::select! {
                from_client = rx.next() => match from_client {
                    // The client's node closed it (the client left, or its node is gone).
                    None => break,
                    Some((msg, size)) => {
                        queued.fetch_sub(size, Ordering::Relaxed);
                        if let crate::mux::Outcome::Answer(answer) = conn.send(msg).await {
                            // Answered by this node itself (too many calls, no backend).
                            let last = !websocket && answer.ends_call();
                            if websocket && answer.id().is_none() {
                                // A WebSocket peer is only sent answers that carry an id.
                                continue;
                            }
                            if self.publish(reply_to.clone(), frame(answer.to_json().as_bytes())).await {
                                sent.fetch_add(1, Ordering::SeqCst);
                            }
                            if last {
                                break;
                            }
                        }
                    }
                },
                for_client = conn.recv() => match for_client {
                    Some(msg) => {
                        let last = !websocket && msg.kind() == Kind::Reply && msg.ends_call();
                        if self.publish(reply_to.clone(), frame(msg.to_json().as_bytes())).await {
                            sent.fetch_add(1, Ordering::SeqCst);
                        }
                        if last {
                            break;
                        }
                    }
                    None => {
                        self.end_served(&reply_to, id, &conn.close_reason());
                        break;
                    }
                },
            }
        }
        let mut served = lock(&self.served);
        // Only this session's entry (a new one under the same id is not ours to remove).
        if served
            .get(&id)
            .is_some_and(|e| Arc::ptr_eq(&e.queued, &queued))
        {
            served.remove(&id);
        }
    }
}

/// One session counted among the relayed clients of its path (see [`Cluster::served_on`]).
pub(super) struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(
        counts: &std::sync::Mutex<std::collections::HashMap<Arc<str>, Arc<AtomicUsize>>>,
        path: &str,
    ) -> Counted {
        let mut counts = lock(counts);
        let count = match counts.get(path) {
            Some(count) => count.clone(),
            None => {
                let count = Arc::new(AtomicUsize::new(0));
                counts.insert(Arc::from(path), count.clone());
                count
            }
        };
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Cluster {
    /// How many sessions other nodes have open on this node's endpoint `path`: they count
    /// against its `max_clients` like its own clients.
    pub(super) fn served_on(&self, path: &str) -> usize {
        lock(&self.served_counts)
            .get(path)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}
