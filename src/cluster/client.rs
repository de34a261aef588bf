//! The client's side of the cluster: a client of this node whose endpoint is served here or on
//! another node.
//!
//! A [`ClusterClient`] is attached to one place at a time: this node's endpoint (an ordinary
//! [`ClientConn`]) or a session on another node (its frames relayed over NATS). It attaches on
//! its first call and again whenever the place it used stops serving (its backends left, its
//! node died, NATS was lost): calls open there fail with `-32000` (the gateway cannot know
//! whether they ran), and the next call goes where a backend serves: this node first, else
//! another node in turn. With no backend anywhere the client waits as in a grace, for
//! `limits.backend_grace`, then is closed with 1013.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use async_nats::Subject;
use futures_channel::mpsc;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::wire::{Envelope, Op};
use super::{lock, session_id, Cluster};
use crate::auth::Digest;
use crate::duplex::{code, Kind, Message, RpcError};
use crate::mux::{close, local_error, ClientConn, CloseReason, Endpoint, JoinError, Outcome};

/// What the cluster hands a relayed client.
pub(super) enum Inbound {
    /// A frame from the session `u128`.
    Frame(u128, Message, usize),
    /// The session ended; `true` when the serving node refused it at its open (nothing sent in
    /// it reached a backend).
    Ended(u128, CloseReason, bool),
}

/// The entry of a relayed session in the cluster's table.
pub(super) struct Relay {
    pub(super) node: Arc<str>,
    pub(super) subject: Subject,
    tx: mpsc::UnboundedSender<Inbound>,
    queued: Arc<AtomicUsize>,
    budget: usize,
    /// Frames the client sent into the session (counted once handed to NATS).
    pub(super) sent: Arc<AtomicU64>,
    /// Frames of the session that came back.
    pub(super) received: u64,
}

impl Relay {
    pub(super) fn end(&self, id: u128, reason: CloseReason) {
        let _ = self.tx.unbounded_send(Inbound::Ended(id, reason, false));
    }
}

impl Cluster {
    /// A frame or an end for a session this node relays.
    pub(super) fn to_relayed_client(&self, envelope: &Envelope<'_>) {
        let id = envelope.session;
        match envelope.op {
            Op::Ended {
                code,
                reason,
                refused,
            } => {
                let mut sessions = lock(&self.sessions);
                if sessions.get(&id).is_some_and(|r| *r.node == *envelope.from) {
                    if let Some(relay) = sessions.remove(&id) {
                        drop(sessions);
                        let reason = CloseReason::new(code, reason);
                        let _ = relay.tx.unbounded_send(Inbound::Ended(id, reason, refused));
                    }
                }
            }
            Op::ToClient => {
                let Ok(msg) = Message::parse(envelope.body) else {
                    tracing::debug!("cluster: an unreadable frame from another node");
                    return;
                };
                let size = envelope.body.len();
                let mut sessions = lock(&self.sessions);
                let Some(relay) = sessions.get_mut(&id).filter(|r| *r.node == *envelope.from)
                else {
                    drop(sessions);
                    // A session this node no longer has: the serving node forgets it too.
                    self.close_remote(&self.subject_of(envelope.from), id);
                    return;
                };
                let queued = relay.queued.fetch_add(size, Ordering::Relaxed) + size;
                if queued > relay.budget {
                    // The client does not read: closed, as on one node.
                    if let Some(relay) = sessions.remove(&id) {
                        drop(sessions);
                        relay.end(
                            id,
                            CloseReason::new(
                                close::POLICY,
                                "client too slow: it did not read its messages",
                            ),
                        );
                        self.close_remote(&relay.subject, id);
                    }
                    return;
                }
                relay.received += 1;
                let _ = relay.tx.unbounded_send(Inbound::Frame(id, msg, size));
            }
            _ => {}
        }
    }

    /// Tells the node serving session `id` that its client left.
    pub(super) fn close_remote(&self, subject: &Subject, id: u128) {
        let close = Envelope {
            op: Op::Close,
            session: id,
            from: &self.me,
            body: b"",
        };
        self.post_control(subject.clone(), close.encode());
    }
}

/// Where a [`ClusterClient`] is attached.
enum Place {
    Nowhere,
    Local(ClientConn),
    Remote(Session),
}

/// A session on another node.
struct Session {
    id: u128,
    node: Arc<str>,
    subject: Subject,
    /// Frames sent into it (shared with its [`Relay`] entry, for the audits).
    sent: Arc<AtomicU64>,
    /// The first frame has gone (with the open).
    opened: bool,
    /// The other node ended it (or the final reply of an HTTP call came): no close to send.
    over: bool,
    /// The frames sent into it while nothing has come back (at most [`MAX_REPLAYED`]; None
    /// after that): if the serving node refuses the session at its open, they go again.
    replay: Option<Vec<Message>>,
}

/// The most frames of a session kept for sending again if the serving node refuses it.
const MAX_REPLAYED: usize = 8;

/// How long a client waits before sending again what a node refused (that node's heartbeat
/// saying it stops, or that it no longer serves, is on its way).
const REFUSED_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// A client of this node in a cluster (see the module's documentation).
pub struct ClusterClient {
    cluster: Arc<Cluster>,
    path: Arc<str>,
    websocket: bool,
    secret: Digest,
    place: Place,
    tx: mpsc::UnboundedSender<Inbound>,
    rx: mpsc::UnboundedReceiver<Inbound>,
    queued: Arc<AtomicUsize>,
    /// Calls open through the session: client id -> the `ext` it sent (for failing them).
    open: HashMap<u64, Option<Box<RawValue>>>,
    /// Answers the gateway owes the client (calls failed when a session ended).
    owed: VecDeque<Message>,
    /// Frames of a session the serving node refused, to send again (from `resend_at` on),
    /// before anything newer.
    resend: VecDeque<Message>,
    resend_at: Option<Instant>,
    /// When the first of a run of refusals came (the frames go again for at most
    /// `limits.backend_grace` from then).
    refused_since: Option<Instant>,
    closed: Option<CloseReason>,
    /// No backend anywhere: the client waits until then for one.
    grace_until: Option<Instant>,
    /// SIGTERM: this node closes its WebSocket clients.
    stop: tokio::sync::watch::Receiver<Option<CloseReason>>,
    /// What the cluster and the pools looked like when the client's place was last found good.
    checked: Option<(u64, u64)>,
    /// Wakes a client waiting for a backend when a pool of this node changes (made at its
    /// first wait).
    pools: Option<tokio::sync::watch::Receiver<u64>>,
}

impl ClusterClient {
    /// A client of `path` that presented `secret` (checked by the caller against this node's
    /// endpoint or another node's announcement). Fails as a join does: 404 when no node serves
    /// the path (nor has it in its grace), 503 when this node's endpoint is full.
    pub fn join(
        cluster: &Arc<Cluster>,
        local: Option<&Arc<Endpoint>>,
        path: &str,
        websocket: bool,
        max_clients: usize,
        secret: Digest,
    ) -> Result<ClusterClient, JoinError> {
        // This node's clients of the path count against `max_clients` wherever they are
        // served, and so do the sessions other nodes relay to this node's endpoint.
        {
            let relayed_here = cluster.served_on(path);
            let mut counts = lock(&cluster.clients);
            let count = counts.entry(Arc::from(path)).or_default();
            if *count + relayed_here >= max_clients {
                return Err(JoinError::Full);
            }
            *count += 1;
        }
        // futures' channel: it allocates nothing up front (tokio's takes a block per channel).
        let (tx, rx) = mpsc::unbounded();
        let mut client = ClusterClient {
            cluster: cluster.clone(),
            path: Arc::from(path),
            websocket,
            secret,
            place: Place::Nowhere,
            tx,
            rx,
            queued: Arc::new(AtomicUsize::new(0)),
            open: HashMap::new(),
            owed: VecDeque::new(),
            resend: VecDeque::new(),
            resend_at: None,
            refused_since: None,
            closed: None,
            grace_until: None,
            stop: cluster.stop_signal(),
            checked: None,
            pools: None,
        };
        // A node that serves the endpoint takes its own clients (they count against its limits
        // and show in its gauges at once).
        if let Some(endpoint) = local {
            if endpoint.serving() || !cluster.serves_elsewhere(path) {
                client.place = Place::Local(endpoint.join(websocket, usize::MAX, &secret)?);
                return Ok(client);
            }
        }
        if !cluster.knows(path) {
            return Err(JoinError::NotFound);
        }
        Ok(client)
    }

    /// The backend of this node that took the client's latest call (None when another node
    /// serves it).
    pub fn local_backend(&self) -> Option<String> {
        match &self.place {
            Place::Local(conn) => conn.backend(),
            _ => None,
        }
    }

    /// This node's endpoint at the client's path, if it has one.
    pub fn local_endpoint(&self) -> Option<Arc<Endpoint>> {
        self.cluster.registry.lookup(&self.path)
    }

    /// Why the client was closed.
    pub fn close_reason(&self) -> CloseReason {
        if let Some(reason) = &self.closed {
            return reason.clone();
        }
        match &self.place {
            Place::Local(conn) => conn.close_reason(),
            _ => CloseReason::new(close::GOING_AWAY, "closed"),
        }
    }

    /// Makes sure the client is attached where a backend serves, waiting (as in a grace) while
    /// none does. False when none came in time.
    async fn attach(&mut self) -> bool {
        // Nothing changed since the last call found its place good: it still is.
        let versions = self.cluster.versions();
        if self.checked == Some(versions) && !matches!(self.place, Place::Nowhere) {
            return true;
        }
        let placed = self.place_for_call().await;
        self.checked = placed.then_some(versions);
        placed
    }

    async fn place_for_call(&mut self) -> bool {
        loop {
            let local = self.cluster.registry.lookup(&self.path);
            let local_serves = local.as_ref().is_some_and(|e| e.serving());
            match &self.place {
                Place::Local(_) => {
                    if local_serves || !self.cluster.usable() {
                        // Served here, or (the link down) the local grace is all there is.
                        return true;
                    }
                    if self.cluster.serves_elsewhere(&self.path) {
                        // Its own pool emptied (or drains) while another node serves: go there,
                        // once its calls running here have ended (they carry on).
                        if self.place_busy() && !self.wait_for_running_calls().await {
                            return true;
                        }
                        self.place = Place::Nowhere;
                    } else {
                        // Nobody serves: wait for a backend on any node.
                        if !self.wait_for_a_backend().await {
                            return false;
                        }
                        continue;
                    }
                }
                Place::Remote(session) => {
                    if self.cluster.node_serves(&session.node, &self.path) {
                        return true;
                    }
                    // Calls running there carry on (its backends may drain): the client moves
                    // once they have ended.
                    if self.place_busy() && !self.wait_for_running_calls().await {
                        return true;
                    }
                    if !matches!(self.place, Place::Remote(_)) {
                        continue;
                    }
                    self.leave_session("backend unavailable");
                }
                Place::Nowhere => {}
            }
            if let Some(endpoint) = local.filter(|_| local_serves) {
                match endpoint.join(self.websocket, usize::MAX, &self.secret) {
                    Ok(conn) => {
                        self.place = Place::Local(conn);
                        self.grace_until = None;
                        return true;
                    }
                    Err(_) => return false,
                }
            }
            if let Some((node, subject)) = self.cluster.pick(&self.path, &self.secret) {
                let id = session_id();
                let sent = Arc::new(AtomicU64::new(0));
                lock(&self.cluster.sessions).insert(
                    id,
                    Relay {
                        node: node.clone(),
                        subject: subject.clone(),
                        tx: self.tx.clone(),
                        queued: self.queued.clone(),
                        budget: self.cluster.registry.limits().client_queue_bytes,
                        sent: sent.clone(),
                        received: 0,
                    },
                );
                self.place = Place::Remote(Session {
                    id,
                    node,
                    subject,
                    sent,
                    opened: false,
                    over: false,
                    replay: Some(Vec::new()),
                });
                self.grace_until = None;
                return true;
            }
            if self.cluster.serves_elsewhere(&self.path) {
                // Other nodes serve the path, none with this client's secret: a reload there
                // changed it since the client was let in. Refused, as the serving node would.
                self.closed = Some(CloseReason::new(
                    close::POLICY,
                    super::served::SECRET_REFUSED,
                ));
                return false;
            }
            if !self.cluster.usable() {
                // Another node may serve it, but the link is down: the call cannot be made.
                // This node's endpoint in its grace still takes it (and waits there).
                if let Some(endpoint) = self.cluster.registry.lookup(&self.path) {
                    if let Ok(conn) = endpoint.join(self.websocket, usize::MAX, &self.secret) {
                        self.place = Place::Local(conn);
                        return true;
                    }
                }
                return false;
            }
            if !self.wait_for_a_backend().await {
                return false;
            }
        }
    }

    /// Whether calls are running where the client is.
    fn place_busy(&self) -> bool {
        match &self.place {
            Place::Local(conn) => conn.has_open_calls(),
            Place::Remote(_) => !self.open.is_empty(),
            Place::Nowhere => false,
        }
    }

    /// Waits (as in a grace, at most `limits.backend_grace`) until the calls running where the
    /// client is have ended, or that place serves again. False when they still run at the end:
    /// the new call then goes there too (whose own rules hold or fail it), so running calls are
    /// never cut.
    async fn wait_for_running_calls(&mut self) -> bool {
        let until = Instant::now() + self.cluster.registry.limits().backend_grace;
        while Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            // Replies that end calls arrive meanwhile; take them in (they stay queued for the
            // client in `owed`).
            while let Some(msg) = self.try_recv_inbound() {
                self.owed.push_back(msg);
            }
            if !self.place_busy() {
                return true;
            }
        }
        false
    }

    /// What the cluster handed over, without waiting, taken in.
    fn try_recv_inbound(&mut self) -> Option<Message> {
        loop {
            let inbound = self.rx.try_recv().ok()?;
            if let Some(msg) = self.on_inbound(inbound) {
                return Some(msg);
            }
        }
    }

    /// No backend serves on any node: waits for one, as in a grace (`limits.backend_grace`
    /// from when the wait began). False when the grace ran out.
    async fn wait_for_a_backend(&mut self) -> bool {
        let until = *self
            .grace_until
            .get_or_insert_with(|| Instant::now() + self.cluster.registry.limits().backend_grace);
        let Some(pools) = self.pools.as_mut() else {
            // Watching from now on; a change just before is found by looking again at once.
            self.pools = Some(self.cluster.registry.watch_pools());
            return true;
        };
        let changed = self.cluster.changed.notified();
        tokio::select! {
            _ = changed => true,
            _ = pools.changed() => true,
            _ = tokio::time::sleep_until(until) => {
                self.cluster.serves_elsewhere(&self.path)
                    || self.cluster.registry.lookup(&self.path).is_some_and(|e| e.serving())
            }
        }
    }

    /// Ends the session this client is relayed through (if any): its open calls fail with
    /// `-32000`, and the serving node forgets the client.
    fn leave_session(&mut self, why: &str) {
        let Place::Remote(session) = std::mem::replace(&mut self.place, Place::Nowhere) else {
            return;
        };
        lock(&self.cluster.sessions).remove(&session.id);
        if !session.over && session.opened {
            self.cluster.close_remote(&session.subject, session.id);
        }
        self.fail_open_calls(why);
    }

    fn fail_open_calls(&mut self, why: &str) {
        for (id, ext) in self.open.drain() {
            let mut reply =
                Message::error_reply(Some(id), &RpcError::new(code::BACKEND_UNAVAILABLE, why));
            if let Some(ext) = ext {
                reply.set_raw("ext", ext);
            }
            self.owed.push_back(reply);
        }
    }

    /// Sends one frame from the client (see [`crate::target::Client::send`]).
    pub async fn send(&mut self, msg: Message) -> Outcome {
        self.pass(msg).await.into()
    }

    async fn pass(&mut self, msg: Message) -> Option<Message> {
        if !self.resend.is_empty() {
            // What a refused session carried goes first, in order.
            self.send_refused_again().await;
            if self.closed.is_some() {
                return None;
            }
        }
        self.pass_one(msg).await
    }

    async fn pass_one(&mut self, msg: Message) -> Option<Message> {
        if self.closed.is_some() {
            return None;
        }
        if msg.kind() == Kind::Request {
            // The next frame of a call open through a session goes there; anything else may
            // need a (new) place.
            let continues = msg.id().is_some_and(|id| self.open.contains_key(&id));
            if !continues && !self.attach().await {
                // Refused for its secret: the client is closed (HTTP: 401), nothing to answer.
                if self.closed.is_some() {
                    return None;
                }
                return Some(unavailable(&msg));
            }
        }
        let (subject, id, first) = match &mut self.place {
            Place::Local(conn) => return conn.send(msg).await.into_answer(),
            Place::Nowhere => {
                // A reply to a call from a backend that is gone: dropped.
                return None;
            }
            Place::Remote(session) => (session.subject.clone(), session.id, !session.opened),
        };
        // A session's first frame asks NATS to say at once if the node is gone (calls on an open
        // session are covered by the tick's audit, itself a probe).
        let probe = first;
        if msg.kind() == Kind::Request {
            if let Some(call) = msg.id() {
                if !self.open.contains_key(&call) {
                    let max = self.cluster.registry.limits().max_pending_calls_per_client;
                    if self.open.len() >= max {
                        return Some(local_error(
                            &msg,
                            code::TOO_MANY_PENDING_CALLS,
                            "too many pending calls",
                        ));
                    }
                    self.open
                        .insert(call, msg.ext_raw().map(|raw| raw.to_owned()));
                }
            }
        }
        let body = msg.to_json();
        let secret = if first {
            self.secret.to_hex()
        } else {
            String::new()
        };
        let envelope = Envelope {
            op: if first {
                Op::Open {
                    websocket: self.websocket,
                    secret: &secret,
                    path: &self.path,
                }
            } else {
                Op::ToBackend
            },
            session: id,
            from: &self.cluster.me,
            body: body.as_bytes(),
        };
        let sent = if probe {
            let node = match &self.place {
                Place::Remote(session) => session.node.clone(),
                _ => return None,
            };
            self.cluster
                .publish_probed(subject, envelope.encode(), &node)
                .await
        } else {
            self.cluster.publish(subject, envelope.encode()).await
        };
        if sent {
            if let Place::Remote(session) = &mut self.place {
                // Marked once handed over: a send interrupted before (see `recv`) goes again
                // as the session's open.
                session.opened = true;
                session.sent.fetch_add(1, Ordering::SeqCst);
                if let Some(replay) = &mut session.replay {
                    if replay.len() < MAX_REPLAYED {
                        replay.push(msg);
                    } else {
                        session.replay = None;
                    }
                }
            }
            return None;
        }
        // The link is down (or the frame too large for it): the call cannot be made.
        let failed = Message::parse(body.as_bytes()).ok()?;
        if let Some(call) = failed.id() {
            if failed.kind() == Kind::Request {
                self.open.remove(&call);
            }
        }
        self.leave_session("backend unavailable: the cluster link is down");
        (failed.kind() == Kind::Request).then(|| unavailable(&failed))
    }

    /// The next frame for the client (see [`crate::target::Client::recv`]).
    pub async fn recv(&mut self) -> Option<Message> {
        loop {
            if let Some(msg) = self.owed.pop_front() {
                return Some(msg);
            }
            if self.closed.is_some() {
                return None;
            }
            if !self.resend.is_empty() {
                self.send_refused_again().await;
                continue;
            }
            let grace = self.grace_until;
            let nowhere = matches!(self.place, Place::Nowhere);
            let local = match &mut self.place {
                Place::Local(conn) => Some(conn),
                _ => None,
            };
            let has_local = local.is_some();
            let websocket = self.websocket;
            let stop = &mut self.stop;
            tokio::select! {
                Ok(()) = stop.changed(), if websocket => {
                    let reason = stop.borrow().clone();
                    if let Some(reason) = reason {
                        self.leave_session("gateway shutting down");
                        self.place = Place::Nowhere;
                        self.closed = Some(reason);
                        return None;
                    }
                }
                got = async { local?.recv().await }, if has_local => match got {
                    Some(msg) => return Some(msg),
                    None => {
                        let reason = self.close_reason();
                        // Its pool's grace ran out here while another node serves: stay.
                        if reason.code == close::TRY_AGAIN_LATER
                            && self.cluster.serves_elsewhere(&self.path)
                        {
                            self.place = Place::Nowhere;
                            continue;
                        }
                        self.closed = Some(reason);
                        return None;
                    }
                },
                inbound = self.rx.next() => match inbound {
                    Some(inbound) => {
                        if let Some(msg) = self.on_inbound(inbound) {
                            return Some(msg);
                        }
                    }
                    None => return None,
                },
                _ = async {
                    match grace {
                        Some(until) => tokio::time::sleep_until(until).await,
                        None => std::future::pending().await,
                    }
                }, if self.websocket && nowhere => {
                    self.grace_until = None;
                    let local_serves = self.cluster.registry.lookup(&self.path).is_some_and(|e| e.serving());
                    if !local_serves && !self.cluster.serves_elsewhere(&self.path) {
                        self.closed = Some(CloseReason::new(close::TRY_AGAIN_LATER, "backend unavailable"));
                    }
                }
            }
        }
    }

    /// The serving node refused the current session at its open: what was sent in it reached
    /// no backend, so it goes again (the client is placed afresh, waiting as in a grace while no
    /// backend serves). False when that cannot be (more was sent than kept, or refusals have
    /// gone on for `limits.backend_grace`): the session then ends as any other.
    fn take_refused(&mut self) -> bool {
        let grace = self.cluster.registry.limits().backend_grace;
        let since = *self.refused_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= grace {
            return false;
        }
        let Place::Remote(session) = &mut self.place else {
            return false;
        };
        let Some(frames) = session.replay.take() else {
            return false;
        };
        lock(&self.cluster.sessions).remove(&session.id);
        self.place = Place::Nowhere;
        self.checked = None;
        self.resend_at = Some(Instant::now() + REFUSED_PAUSE);
        for frame in &frames {
            if frame.kind() == Kind::Request {
                if let Some(call) = frame.id() {
                    self.open.remove(&call);
                }
            }
        }
        self.resend.extend(frames);
        true
    }

    /// Sends again the frames of a refused session, after a pause (the refusing node's news
    /// is on its way); what cannot be sent is answered as a first sending would be. Safe to
    /// interrupt (`recv` is raced against the client's next frame): a frame leaves the queue
    /// only once handed to NATS or answered, and the pause ends at a fixed instant.
    async fn send_refused_again(&mut self) {
        if let Some(at) = self.resend_at {
            tokio::time::sleep_until(at).await;
        }
        while let Some(msg) = self.resend.front().cloned() {
            let answer = self.pass_one(msg).await;
            self.resend.pop_front();
            if let Some(answer) = answer {
                self.owed.push_back(answer);
            }
        }
    }

    /// A frame already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        if let Some(msg) = self.owed.pop_front() {
            return Some(msg);
        }
        if let Place::Local(conn) = &mut self.place {
            if let Some(msg) = conn.try_recv() {
                return Some(msg);
            }
        }
        loop {
            let inbound = self.rx.try_recv().ok()?;
            if let Some(msg) = self.on_inbound(inbound) {
                return Some(msg);
            }
            if let Some(msg) = self.owed.pop_front() {
                return Some(msg);
            }
        }
    }

    /// Takes in what the cluster handed over; returns a frame for the client, if it is one.
    fn on_inbound(&mut self, inbound: Inbound) -> Option<Message> {
        let current = match &self.place {
            Place::Remote(session) => Some(session.id),
            _ => None,
        };
        match inbound {
            Inbound::Frame(id, msg, size) => {
                self.queued.fetch_sub(size, Ordering::Relaxed);
                if Some(id) != current {
                    return None;
                }
                if let Place::Remote(session) = &mut self.place {
                    // The session was taken: nothing of it will be sent again.
                    session.replay = None;
                }
                self.refused_since = None;
                if self.websocket && msg.kind() == Kind::Reply && msg.id().is_none() {
                    // A WebSocket peer is only sent answers that carry an id.
                    return None;
                }
                if msg.kind() == Kind::Reply && msg.ends_call() {
                    if let Some(call) = msg.id() {
                        self.open.remove(&call);
                    }
                    // An HTTP call's session ends with its reply: the other node closes it.
                    if !self.websocket && self.open.is_empty() {
                        if let Place::Remote(session) = &mut self.place {
                            session.over = true;
                        }
                    }
                }
                Some(msg)
            }
            Inbound::Ended(id, reason, refused) => {
                if Some(id) != current {
                    return None;
                }
                if refused && reason.code != close::POLICY && self.take_refused() {
                    return None;
                }
                if let Place::Remote(session) = &mut self.place {
                    session.over = true;
                }
                if reason.code == close::POLICY && !self.websocket {
                    // The serving node refused this caller (its secret, or it sent too much):
                    // the call gets that answer (401), not a `-32000` for a lost backend.
                    self.open.clear();
                }
                self.leave_session("backend unavailable");
                if reason.code == close::POLICY {
                    // Put out by the serving node's rules (secret revoked, too slow): as on
                    // one node, the client is closed.
                    self.closed = Some(reason);
                } else if !self.websocket {
                    // An HTTP call has nowhere else to go: its failure is owed.
                    if self.owed.is_empty() {
                        self.closed = Some(reason);
                    }
                } else {
                    self.grace_until =
                        Some(Instant::now() + self.cluster.registry.limits().backend_grace);
                }
                None
            }
        }
    }
}

impl Drop for ClusterClient {
    fn drop(&mut self) {
        self.leave_session("client left");
        let mut counts = lock(&self.cluster.clients);
        if let Some(count) = counts.get_mut(&self.path) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.path);
            }
        }
    }
}

/// `-32000` for a request no backend can take (answered even without an id, so an HTTP caller
/// can tell).
fn unavailable(msg: &Message) -> Message {
    local_error(msg, code::BACKEND_UNAVAILABLE, "backend unavailable")
}
