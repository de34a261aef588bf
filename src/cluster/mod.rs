//! Several gateway nodes joined by NATS (core NATS: at-most-once, no store), so that any client
//! reaches any backend.
//!
//! Every node subscribes to two subjects under `cluster.subject_prefix`:
//! - `<prefix>.hb`: heartbeats. Each node announces itself and its endpoints (path, SHA-256 of
//!   the client secret, its backends with their join times) every second and at once when a pool
//!   changes; a node that says it is leaving, or is not heard from for `cluster.node_timeout`, is
//!   forgotten.
//! - `<prefix>.node.<name>`: everything addressed to that node. Endpoint paths never appear in
//!   subjects (they travel in the message), so any path is safe.
//!
//! A client whose endpoint has no serving backend on its own node is relayed: its node opens a
//! *session* on a node that has one ([`client`]), and that node joins the client to its endpoint
//! like any other client (module `served`), so id rewriting, `ext`, streams, backend-to-client
//! calls, `-32001` and limits work exactly as on one node. Frames of one session travel in
//! order: one publisher, one subscriber, one NATS connection each way. A route key starts with
//! its node's tag, so a backend's call to a client served on another node goes there
//! ([`mux::Relay`]).
//!
//! When a node dies or NATS is lost, the sessions across it end: calls open through them fail
//! with `-32000` (HTTP 503), and clients are relayed again, elsewhere, on their next call.
//!
//! The bus is not trusted: [`link`] logs in to NATS (credentials, TLS) and [`seal`] numbers every
//! message and, with `cluster.key`, signs it; a node takes each message once, only from nodes it
//! hears in heartbeats, and a heartbeat only with values a node could send (see
//! `check_heartbeat`). What it drops is counted in
//! `duplex_gateway_cluster_rejected_messages_total{reason}`.

mod calls;
pub mod client;
pub mod link;
pub mod seal;
pub mod served;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_nats::Subject;
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::auth::Digest;
use crate::config::{is_subject_token, ClusterConfig};
use crate::metrics::metrics;
use crate::mux::{self, Registry};
use wire::{Announced, Heartbeat, Op, ENVELOPE_BYTES};

pub use client::{Client, ClusterClient};

/// This node's link to the others.
pub struct Cluster {
    me: Arc<str>,
    prefix: String,
    node_timeout: Duration,
    nats: async_nats::Client,
    /// The runtime the NATS client and the cluster's tasks run on (a thread of its own, so the
    /// link lives independently of Pingora's services).
    rt: tokio::runtime::Handle,
    registry: Arc<Registry>,
    /// Other nodes, by name.
    nodes: Mutex<HashMap<Arc<str>, Node>>,
    /// Client sessions this node relays to others, by session id.
    sessions: Mutex<HashMap<u128, client::Relay>>,
    /// Sessions other nodes relay to this one, by session id.
    served: Mutex<HashMap<u128, served::Entry>>,
    /// How many of them each path has (see [`Cluster::served_on`]).
    served_counts: Mutex<HashMap<Arc<str>, Arc<AtomicUsize>>>,
    /// Connected to NATS (as the client last told us).
    connected: AtomicBool,
    /// The server's `max_payload` (0 until known).
    max_payload: AtomicUsize,
    /// Backends of other nodes calling this node's clients (see [`calls`]).
    guests: Mutex<HashMap<calls::GuestKey, calls::Guest>>,
    /// Calls of this node's backends to other nodes' clients, still open (see [`calls`]).
    relayed: Mutex<HashMap<calls::RelayedKey, calls::Relayed>>,
    /// `limits.max_message_bytes` in force.
    max_message: AtomicUsize,
    /// Woken when what other nodes hold changes (clients waiting for a backend look again).
    changed: Notify,
    /// Woken when this node should announce its endpoints before its next heartbeat (the
    /// link came back, a node joined, the limits changed).
    announce_soon: Notify,
    /// Spreads relayed clients over nodes in turn.
    turn: AtomicUsize,
    /// Counts changes of what this node knows of the others (and of the link).
    version: std::sync::atomic::AtomicU64,
    /// `duplex_gateway_cluster_messages_total{direction="out"}` and `{direction="in"}`, looked
    /// up once (every frame counts).
    sent: prometheus::IntCounter,
    received: prometheus::IntCounter,
    /// This node's current link epoch (see [`Heartbeat::epoch`]): grows with every new link.
    epoch: std::sync::atomic::AtomicU64,
    /// Numbers every message this node publishes (see [`seal`]).
    seq: std::sync::atomic::AtomicU64,
    /// Signs this node's messages and checks the others'.
    sealer: seal::Sealer,
    /// What this node has taken from each node it hears (or that is departing): every message
    /// is taken once.
    windows: Mutex<HashMap<Arc<str>, seal::Window>>,
    /// The last epoch of nodes forgotten, so their old messages stay refused (bounded).
    forgotten: Mutex<HashMap<Arc<str>, u64>>,
    /// `duplex_gateway_cluster_rejected_messages_total`, by [`seal::Rejected::ALL`].
    rejected: [prometheus::IntCounter; 4],
    /// Messages published by one task in order, from code that cannot wait.
    outbox: futures_channel::mpsc::UnboundedSender<(Subject, BytesMut)>,
    /// Bytes waiting in the outbox (bounded: see [`Cluster::post`]).
    outbox_bytes: AtomicUsize,
    /// Set on SIGTERM: heartbeats say the node leaves, and no new session is accepted.
    leaving: AtomicBool,
    /// Nodes that said they leave: forgotten for good (their sessions ended) at the instant
    /// given, once their drain must be over.
    departing: Mutex<HashMap<Arc<str>, Instant>>,
    /// Tells this node's relayed WebSocket clients to close (SIGTERM), with the reason.
    stop: tokio::sync::watch::Sender<Option<mux::CloseReason>>,
    /// This node's own clients per endpoint path (checked against `max_clients`).
    pub(super) clients: Mutex<HashMap<Arc<str>, usize>>,
    /// Pool sizes and client limits of each path (the config in force).
    limits: Box<dyn PathLimits>,
    /// The `code` label values of the HTTP call series this node made for endpoints it has no
    /// endpoint of its own for (removed when no node has the endpoint any more).
    http_series: Mutex<HashMap<String, Vec<&'static str>>>,
    me_weak: Weak<Cluster>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.me).finish()
    }
}

/// What this node knows of another.
struct Node {
    last_seen: Instant,
    epoch: u64,
    /// Its tag (see `tag_of`): the start of its route keys.
    tag: String,
    subject: Subject,
    endpoints: HashMap<String, Remote>,
}

/// An endpoint of another node.
struct Remote {
    secret: Digest,
    /// (key, joined in Unix ms, draining)
    backends: Vec<(u64, u64, bool)>,
}

impl Remote {
    fn serving(&self) -> usize {
        self.backends.iter().filter(|b| !b.2).count()
    }
}

/// What the config in force says of an endpoint path.
pub trait PathLimits: Send + Sync {
    /// Its pool size (over the whole cluster).
    fn max_backends(&self, path: &str) -> usize;
    /// The most clients one node takes (its own and the ones relayed to it).
    fn max_clients(&self, path: &str) -> usize;
}

/// How long a node that said it leaves may still finish what runs there (its HTTP calls get
/// 10 s, its WebSockets 2 s more) before it is forgotten for good.
const DEPARTURE: Duration = Duration::from_secs(13);

/// How many forgotten nodes' last epochs are remembered (to refuse their old messages).
const MAX_FORGOTTEN: usize = 1024;

/// The most backends one heartbeat may announce for one endpoint.
pub const MAX_ANNOUNCED_BACKENDS: usize = 1024;

/// The most endpoints one heartbeat may announce.
pub const MAX_ANNOUNCED_ENDPOINTS: usize = 100_000;

/// How long the start-up waits for NATS before starting local-only.
const CONNECT_WAIT: Duration = Duration::from_secs(2);

impl Cluster {
    /// Connects to NATS (waiting up to 2 s; a node starts even when NATS is down, and keeps
    /// trying) and starts the heartbeats and the subscriptions. Fails when NATS is reachable
    /// but its `max_payload` cannot carry a frame of `max_message_bytes`.
    pub fn start(
        config: &ClusterConfig,
        max_message_bytes: usize,
        registry: Arc<Registry>,
        limits: Box<dyn PathLimits>,
    ) -> Result<Arc<Cluster>, String> {
        let me: Arc<str> = Arc::from(node_name(config.node.as_deref()));
        // One thread: the link's reads and writes, heartbeats and relayed sessions are light,
        // and a single-threaded runtime wakes its own tasks without crossing threads.
        let rt = tokio::runtime::Builder::new_current_thread()
            .thread_name("cluster")
            .enable_all()
            .build()
            .map_err(|e| format!("cluster: cannot start its runtime: {e}"))?;
        let handle = rt.handle().clone();
        // The runtime lives as long as the process: its thread runs the NATS link.
        std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .map_err(|e| format!("cluster: cannot start its thread: {e}"))?;

        let link = link::load(config)?;
        let shown = link.shown.join(", ");
        if config.key.is_none() {
            tracing::warn!(
                "cluster: no cluster.key: cluster messages are not authenticated, so anyone who can publish on these NATS servers can act as a node"
            );
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        // A server that refuses the credentials says so through the client's events.
        let refused: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let refusal = refused.clone();
        let options = link
            .options
            .name(format!("duplex-gateway {me}"))
            // A dead link is found within seconds, not the client's default minutes.
            .ping_interval(Duration::from_secs(2))
            .connection_timeout(Duration::from_secs(2))
            .retry_on_initial_connect()
            // Every subject is made here from checked tokens: no need to scan each one again.
            .skip_subject_validation(true)
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 200).min(1000))
            })
            .event_callback(move |event| {
                if let async_nats::Event::ClientError(async_nats::ClientError::Other(text)) = &event
                {
                    if is_refusal(text) {
                        *lock(&refusal) = Some(text.clone());
                    }
                }
                let events = events_tx.clone();
                async move {
                    let _ = events.send(event);
                }
            });
        let nats = handle
            .block_on(options.connect(link.servers))
            .map_err(|e| format!("cluster: cannot set up the NATS client: {e}"))?;
        let (outbox, outbox_rx) = futures_channel::mpsc::unbounded();
        let cluster = Arc::new_cyclic(|me_weak| Cluster {
            me,
            prefix: config.subject_prefix.clone(),
            node_timeout: config.node_timeout,
            nats,
            rt: handle.clone(),
            registry,
            nodes: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            served_counts: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            max_payload: AtomicUsize::new(0),
            max_message: AtomicUsize::new(max_message_bytes),
            guests: Mutex::new(HashMap::new()),
            relayed: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            announce_soon: Notify::new(),
            turn: AtomicUsize::new(0),
            version: std::sync::atomic::AtomicU64::new(0),
            sent: metrics().cluster_messages.with_label_values(&["out"]),
            received: metrics().cluster_messages.with_label_values(&["in"]),
            epoch: std::sync::atomic::AtomicU64::new(seal::next_epoch(0)),
            seq: std::sync::atomic::AtomicU64::new(0),
            sealer: seal::Sealer::new(config.key.as_ref().map(|k| k.bytes())),
            windows: Mutex::new(HashMap::new()),
            forgotten: Mutex::new(HashMap::new()),
            rejected: seal::Rejected::ALL
                .map(|r| metrics().cluster_rejected.with_label_values(&[r.as_str()])),
            outbox,
            outbox_bytes: AtomicUsize::new(0),
            leaving: AtomicBool::new(false),
            departing: Mutex::new(HashMap::new()),
            stop: tokio::sync::watch::channel(None).0,
            clients: Mutex::new(HashMap::new()),
            limits,
            http_series: Mutex::new(HashMap::new()),
            me_weak: me_weak.clone(),
        });
        // Wait a little for the first connection, so the payload check (and a server refusing
        // the credentials) can stop the start.
        let deadline = std::time::Instant::now() + CONNECT_WAIT;
        while std::time::Instant::now() < deadline
            && cluster.nats.connection_state() != async_nats::connection::State::Connected
            && lock(&refused).is_none()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(why) = lock(&refused).take() {
            return Err(format!(
                "cluster: the NATS server ({shown}) refused this node's credentials: {why}"
            ));
        }
        if cluster.nats.connection_state() == async_nats::connection::State::Connected {
            let max_payload = cluster.nats.server_info().max_payload;
            cluster.max_payload.store(max_payload, Ordering::SeqCst);
            cluster.payload_fits()?;
            cluster.connected.store(true, Ordering::SeqCst);
        } else {
            tracing::warn!(node = %cluster.me, servers = %shown, "NATS unreachable: starting local-only, retrying");
        }
        cluster.update_gauges();
        cluster.registry.join_cluster(
            tag_of(&cluster.me),
            Arc::new(calls::RelayTo(Arc::downgrade(&cluster))),
        );
        let c = cluster.clone();
        handle.spawn(async move { c.run(events_rx).await });
        let c = cluster.clone();
        handle.spawn(async move { c.send_outbox(outbox_rx).await });
        tracing::info!(
            node = %cluster.me,
            prefix = %cluster.prefix,
            servers = %shown,
            signed = cluster.sealer.signs(),
            "cluster node started"
        );
        Ok(cluster)
    }

    fn subject_of(&self, node: &str) -> Subject {
        Subject::from(format!("{}.node.{node}", self.prefix))
    }

    fn heartbeat_subject(&self) -> String {
        format!("{}.hb", self.prefix)
    }

    /// Whether a frame of `max_message_bytes` plus the envelope fits the server's `max_payload`.
    fn payload_fits(&self) -> Result<(), String> {
        let max_payload = self.max_payload.load(Ordering::SeqCst);
        let max_message = self.max_message.load(Ordering::SeqCst);
        if max_payload > 0 && max_message.saturating_add(ENVELOPE_BYTES) > max_payload {
            return Err(format!(
                "limits.max_message_bytes {max_message} (plus {ENVELOPE_BYTES} bytes of envelope) does not fit the NATS server's max_payload {max_payload}: lower max_message_bytes to {} or raise the server's max_payload",
                max_payload.saturating_sub(ENVELOPE_BYTES)
            ));
        }
        Ok(())
    }

    /// Whether the link is up and can carry the frames the limits allow.
    pub fn usable(&self) -> bool {
        self.connected.load(Ordering::SeqCst) && self.payload_fits().is_ok()
    }

    /// A reload changed the limits: a `max_message_bytes` the servers cannot carry makes this
    /// node local-only until the limits or the server change.
    pub fn set_max_message_bytes(&self, max: usize) {
        let before = self.usable();
        self.max_message.store(max, Ordering::SeqCst);
        if let Err(e) = self.payload_fits() {
            tracing::error!("cluster: {e}; this node stays local-only");
        }
        if before && !self.usable() {
            self.link_lost();
        }
        self.update_gauges();
        self.announce_soon.notify_one();
    }

    /// What this node knows of the others, and of the link, and of its own pools, as a pair of
    /// counters that move whenever any of it changes.
    pub(super) fn versions(&self) -> (u64, u64) {
        (
            self.version.load(Ordering::SeqCst),
            self.registry.pool_version(),
        )
    }

    /// What this node knows of the others changed: counted, and waiting clients look again.
    fn directory_changed(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn update_gauges(&self) {
        // Called on every change of the link too.
        self.version.fetch_add(1, Ordering::SeqCst);
        let m = metrics();
        m.cluster_connected.set(i64::from(self.usable()));
        // While the link is down this node hears nobody.
        let others = if self.usable() {
            lock(&self.nodes).len()
        } else {
            0
        };
        m.cluster_nodes.set(1 + others as i64);
    }

    /// Seals and publishes one message; false when it could not be handed to the NATS client.
    async fn publish(&self, subject: Subject, message: BytesMut) -> bool {
        if !self.usable() {
            return false;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let payload = self.sealer.seal(&subject, message, epoch, seq);
        match self.nats.publish(subject, payload).await {
            Ok(()) => {
                self.sent.inc();
                true
            }
            Err(e) => {
                tracing::debug!("cluster: publish failed: {e}");
                false
            }
        }
    }

    /// Hands a message to the outbox, for code that cannot wait: one task publishes them in
    /// order (no task per message). The outbox holds at most [`Cluster::outbox_budget`] bytes:
    /// false when the message does not fit (the caller puts out whoever sent too much).
    fn post(&self, subject: Subject, message: BytesMut) -> bool {
        let size = message.len();
        let budget = self.outbox_budget();
        let reserved =
            self.outbox_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                    (queued + size <= budget).then_some(queued + size)
                });
        if reserved.is_err() {
            return false;
        }
        if self.outbox.unbounded_send((subject, message)).is_err() {
            self.outbox_bytes.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Hands a small control message (a session's end or close) to the outbox, whatever it
    /// holds: dropping one would leave a call hanging.
    fn post_control(&self, subject: Subject, message: BytesMut) {
        self.outbox_bytes
            .fetch_add(message.len(), Ordering::Relaxed);
        if let Err(e) = self.outbox.unbounded_send((subject, message)) {
            let (_, message) = e.into_inner();
            self.outbox_bytes
                .fetch_sub(message.len(), Ordering::Relaxed);
        }
    }

    /// The most bytes the outbox holds: as much as one backend's queue (16 x `max_message_bytes`).
    fn outbox_budget(&self) -> usize {
        self.registry.limits().backend_queue_bytes
    }

    /// Publishes what [`Cluster::post`] queued, in order, until the process ends.
    async fn send_outbox(
        self: Arc<Self>,
        mut rx: futures_channel::mpsc::UnboundedReceiver<(Subject, BytesMut)>,
    ) {
        while let Some((subject, message)) = rx.next().await {
            let size = message.len();
            self.publish(subject, message).await;
            self.outbox_bytes.fetch_sub(size, Ordering::Relaxed);
        }
    }

    /// Counts a message this node would not take, and why.
    fn reject(&self, why: seal::Rejected, from: &str) {
        self.rejected[why as usize].inc();
        tracing::debug!(reason = why.as_str(), from = %safe_name(from), "cluster: a message refused");
    }

    /// The heartbeats, the subscriptions and the connection events, until the process ends.
    async fn run(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<async_nats::Event>) {
        let inbox = self.subject_of(&self.me);
        let (mut direct, mut beats) = loop {
            // The client re-subscribes by itself after a reconnect: subscribing once is enough.
            let direct = self.nats.subscribe(inbox.clone()).await;
            let beats = self.nats.subscribe(self.heartbeat_subject()).await;
            match (direct, beats) {
                (Ok(d), Ok(b)) => break (d, b),
                (d, b) => {
                    let e = d
                        .err()
                        .map(|e| e.to_string())
                        .or(b.err().map(|e| e.to_string()));
                    tracing::warn!(
                        "cluster: cannot subscribe ({}); retrying",
                        e.unwrap_or_default()
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let period =
            (self.node_timeout / 3).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A burst of pool changes makes one announcement, 5 ms after the first.
        let mut announce_at: Option<Instant> = None;
        let mut pools = self.registry.watch_pools();
        loop {
            let debounce = async {
                match announce_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = direct.next() => match msg {
                    Some(msg) => self.on_direct(&msg.subject, &msg.payload),
                    None => return,
                },
                msg = beats.next() => match msg {
                    Some(msg) => self.on_heartbeat(&msg.subject, &msg.payload),
                    None => return,
                },
                event = events.recv() => match event {
                    Some(event) => self.on_event(event),
                    None => return,
                },
                _ = ticker.tick() => {
                    self.expire_silent_nodes();
                    // Calls of backends that left are forgotten.
                    self.fail_relayed_calls(|_| false);
                    self.remove_gone_series();
                    self.announce().await;
                }
                _ = pools.changed(), if announce_at.is_none() => {
                    announce_at = Some(Instant::now() + Duration::from_millis(5));
                }
                _ = self.announce_soon.notified(), if announce_at.is_none() => {
                    announce_at = Some(Instant::now() + Duration::from_millis(5));
                }
                _ = debounce => {
                    announce_at = None;
                    self.announce().await;
                }
            }
        }
    }

    fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                let max_payload = self.nats.server_info().max_payload;
                self.max_payload.store(max_payload, Ordering::SeqCst);
                self.connected.store(true, Ordering::SeqCst);
                // Nodes were not heard while the link was down: they get a node timeout from now.
                let now = Instant::now();
                for node in lock(&self.nodes).values_mut() {
                    node.last_seen = now;
                }
                match self.payload_fits() {
                    Ok(()) => tracing::info!(node = %self.me, "cluster: connected to NATS"),
                    Err(e) => tracing::error!("cluster: {e}; this node stays local-only"),
                }
                self.update_gauges();
                self.announce_soon.notify_one();
            }
            async_nats::Event::Disconnected => {
                tracing::warn!(node = %self.me, "cluster: NATS connection lost; serving local backends only, retrying");
                self.connected.store(false, Ordering::SeqCst);
                self.link_lost();
            }
            async_nats::Event::SlowConsumer(_) => {
                // Messages were dropped: sessions may have lost frames, so they all end (their
                // calls fail rather than hang), and the peers learn it from the new epoch.
                tracing::warn!(
                    "cluster: this node read NATS too slowly and lost messages: its sessions end"
                );
                self.link_lost();
            }
            other => tracing::info!("cluster: NATS {other}"),
        }
    }

    /// The link is down (or unusable): every session across it ends (calls open through it
    /// fail), and calls that need another node get `-32000` / 503 until it is back. The other
    /// nodes' endpoints are remembered (so their clients get 503, not 404), but none is taken
    /// for dead for not being heard meanwhile.
    fn link_lost(&self) {
        // Whatever was in flight may be lost both ways: the next heartbeats tell the others.
        let _ = self
            .epoch
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| {
                Some(seal::next_epoch(e))
            });
        let ended: Vec<(u128, client::Relay)> = lock(&self.sessions).drain().collect();
        for (id, relay) in ended {
            relay.end(
                id,
                mux::CloseReason::new(mux::close::TRY_AGAIN_LATER, "NATS connection lost"),
            );
        }
        let served: Vec<served::Entry> = lock(&self.served).drain().map(|(_, e)| e).collect();
        drop(served);
        self.fail_relayed_calls(|_| true);
        self.update_gauges();
        self.directory_changed();
    }

    /// Announces this node's endpoints (or that it leaves).
    async fn announce(&self) {
        if !self.usable() {
            return;
        }
        let leaving = self.leaving.load(Ordering::SeqCst);
        let mut endpoints = Vec::new();
        if !leaving {
            for endpoint in self.registry.endpoints() {
                // A path the others would refuse is served by this node only.
                if endpoint.path().len() > wire::MAX_PATH_BYTES {
                    continue;
                }
                if let Some(pool) = endpoint.snapshot() {
                    endpoints.push(Announced {
                        path: endpoint.path().to_string(),
                        secret: pool.secret.to_hex(),
                        backends: pool.backends,
                    });
                }
            }
        }
        let beat = Heartbeat {
            node: self.me.to_string(),
            leaving,
            epoch: self.epoch.load(Ordering::SeqCst),
            sent: unix_ms(),
            endpoints,
        };
        match serde_json::to_vec(&beat) {
            Ok(body) => {
                let max_payload = self.max_payload.load(Ordering::SeqCst);
                if max_payload > 0 && body.len() > max_payload {
                    // The others would take this node for dead: say why, loudly.
                    tracing::error!(
                        bytes = body.len(),
                        max_payload,
                        "cluster: this node's heartbeat (all its endpoints) does not fit the NATS server's max_payload"
                    );
                }
                self.publish(
                    Subject::from(self.heartbeat_subject()),
                    BytesMut::from(&body[..]),
                )
                .await;
            }
            Err(e) => tracing::error!("cluster: cannot encode a heartbeat: {e}"),
        }
    }

    /// Closes this node's backends that a pool counted over the whole cluster has no room for:
    /// of all the backends of a path, the newest `max_backends` stay (ties by node and key, so
    /// every node comes to the same answer), the others are closed by their own node with 1012.
    /// Two publishes on two nodes within one heartbeat both succeed; this settles it.
    fn enforce_pool_sizes(&self) {
        if !self.usable() {
            return;
        }
        // Backends of nodes that no longer announce their endpoint: their calls are forgotten
        // (keys restart when an endpoint is made again, so an old key must not reach a new
        // backend).
        self.forget_guests(Duration::from_secs(3), |(path, node, _)| {
            lock(&self.nodes)
                .get(node)
                .is_none_or(|n| !n.endpoints.contains_key(path))
        });
        for endpoint in self.registry.endpoints() {
            let Some(pool) = endpoint.snapshot() else {
                continue;
            };
            if pool.backends.is_empty() {
                continue;
            }
            let path = endpoint.path();
            let mut all: Vec<(u64, Arc<str>, u64)> = pool
                .backends
                .iter()
                .map(|(key, since, _)| (*since, self.me.clone(), *key))
                .collect();
            for (name, node) in lock(&self.nodes).iter() {
                if let Some(remote) = node.endpoints.get(path) {
                    all.extend(
                        remote
                            .backends
                            .iter()
                            .map(|(k, s, _)| (*s, name.clone(), *k)),
                    );
                }
            }
            let max = self.limits.max_backends(path).max(1);
            if all.len() <= max {
                continue;
            }
            all.sort();
            let over = all.len() - max;
            for (_, node, key) in all.into_iter().take(over) {
                if node == self.me {
                    endpoint.close_backend(
                        key,
                        mux::CloseReason::new(
                            mux::close::SERVICE_RESTART,
                            "replaced by a new backend",
                        ),
                    );
                }
            }
        }
    }

    /// SIGTERM, first step: the other nodes hear that this one leaves (they send it nothing
    /// new), no new session is accepted, and this node's relayed WebSocket clients are closed
    /// with `reason`.
    pub async fn stop(&self, reason: mux::CloseReason) {
        self.leaving.store(true, Ordering::SeqCst);
        let _ = self.stop.send(Some(reason));
        let Some(me) = self.me_weak.upgrade() else {
            return;
        };
        let announce = async move {
            me.announce().await;
            let _ = me.nats.flush().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), self.rt.spawn(announce)).await;
    }

    /// A receiver of the SIGTERM close reason (for relayed clients).
    pub(super) fn stop_signal(&self) -> tokio::sync::watch::Receiver<Option<mux::CloseReason>> {
        self.stop.subscribe()
    }

    fn on_heartbeat(&self, subject: &str, payload: &[u8]) {
        self.received.inc();
        let opened = match self.sealer.open(subject, payload) {
            Ok(opened) => opened,
            Err(why) => return self.reject(why, ""),
        };
        let Ok(beat) = serde_json::from_slice::<Heartbeat>(opened.message) else {
            return self.reject(seal::Rejected::Invalid, "");
        };
        if *beat.node == *self.me {
            return;
        }
        if let Err(why) = check_heartbeat(&beat, opened.epoch, self.node_timeout, unix_ms()) {
            return self.reject(why, &beat.node);
        }
        let name: Arc<str> = Arc::from(beat.node.as_str());
        // Each heartbeat once, and none of an older link of the node.
        let fresh = match lock(&self.windows).get_mut(&name) {
            Some(window) => window.check(opened.epoch, opened.seq),
            None => seal::Fresh::NewEpoch,
        };
        match fresh {
            seal::Fresh::Replay => return self.reject(seal::Rejected::Replay, &name),
            seal::Fresh::NewEpoch => {
                if lock(&self.forgotten)
                    .get(&name)
                    .is_some_and(|e| opened.epoch <= *e)
                {
                    return self.reject(seal::Rejected::Replay, &name);
                }
            }
            seal::Fresh::Yes => {}
        }
        if fresh == seal::Fresh::NewEpoch {
            let tag = tag_of(&name);
            let taken = tag == tag_of(&self.me)
                || lock(&self.nodes)
                    .iter()
                    .any(|(other, node)| node.tag == tag && *other != name);
            if taken {
                // Two names, one tag: routes would be ambiguous, so the newcomer is not heard.
                return self.reject(seal::Rejected::Invalid, &name);
            }
            let known = lock(&self.windows).contains_key(&name);
            if known {
                // Its link started afresh (or it is a new process of the same name): whatever
                // crossed the old one may be lost, and the old one's sessions end.
                tracing::info!(node = %name, "cluster: node reconnected: its sessions end");
                self.node_gone(&name, "gateway node reconnected");
            }
            lock(&self.windows).insert(name.clone(), seal::Window::new(opened.epoch, opened.seq));
        }
        if beat.leaving {
            // No new client goes there; what runs there may finish (it drains), then it is
            // forgotten for good.
            if lock(&self.nodes).remove(&name).is_some() {
                tracing::info!(node = %name, "cluster: node leaves");
                self.update_gauges();
                self.directory_changed();
            }
            lock(&self.departing)
                .entry(name)
                .or_insert_with(|| Instant::now() + DEPARTURE);
            return;
        }
        lock(&self.departing).remove(&name);
        let endpoints: HashMap<String, Remote> = beat
            .endpoints
            .into_iter()
            .filter_map(|a| {
                Some((
                    a.path,
                    Remote {
                        secret: Digest::from_hex(&a.secret)?,
                        backends: a.backends,
                    },
                ))
            })
            .collect();
        let mut nodes = lock(&self.nodes);
        let new = !nodes.contains_key(&name);
        let subject = self.subject_of(&name);
        nodes.insert(
            name.clone(),
            Node {
                last_seen: Instant::now(),
                epoch: opened.epoch,
                tag: tag_of(&name),
                subject,
                endpoints,
            },
        );
        drop(nodes);
        self.enforce_pool_sizes();
        if new {
            tracing::info!(node = %name, "cluster: node joined");
            // Tell the newcomer what we hold now rather than at our next beat.
            self.announce_soon.notify_one();
            self.update_gauges();
        }
        self.directory_changed();
    }

    /// Counts an HTTP call this node answered for an endpoint served by another node.
    pub fn count_http_call(&self, path: &str, status: &'static str, seconds: f64) {
        let m = metrics();
        let mut series = lock(&self.http_series);
        let codes = series.entry(path.to_string()).or_default();
        if !codes.contains(&status) {
            codes.push(status);
        }
        m.http_requests.with_label_values(&[path, status]).inc();
        m.http_duration.with_label_values(&[path]).observe(seconds);
    }

    /// Removes the HTTP call series of endpoints no node has any more (and this one has none
    /// of its own, whose series are its own business).
    fn remove_gone_series(&self) {
        let gone: Vec<(String, Vec<&'static str>)> = {
            let nodes = lock(&self.nodes);
            let mut series = lock(&self.http_series);
            let paths: Vec<String> = series
                .keys()
                .filter(|p| !nodes.values().any(|n| n.endpoints.contains_key(*p)))
                .cloned()
                .collect();
            paths
                .into_iter()
                .filter_map(|p| series.remove_entry(&p))
                .collect()
        };
        let m = metrics();
        for (path, codes) in gone {
            if self.registry.lookup(&path).is_some() {
                continue;
            }
            for code in codes {
                let _ = m.http_requests.remove_label_values(&[&path, code]);
            }
            let _ = m.http_duration.remove_label_values(&[&path]);
        }
    }

    fn expire_silent_nodes(&self) {
        if !self.usable() {
            return;
        }
        let now = Instant::now();
        let departed: Vec<Arc<str>> = {
            let mut departing = lock(&self.departing);
            let over: Vec<Arc<str>> = departing
                .iter()
                .filter(|(_, until)| **until <= now)
                .map(|(name, _)| name.clone())
                .collect();
            for name in &over {
                departing.remove(name);
            }
            over
        };
        for node in departed {
            self.node_gone(&node, "gateway node stopped");
        }
        let silent: Vec<Arc<str>> = lock(&self.nodes)
            .iter()
            .filter(|(_, n)| now.duration_since(n.last_seen) > self.node_timeout)
            .map(|(name, _)| name.clone())
            .collect();
        for node in silent {
            tracing::warn!(node = %node, "cluster: node not heard from: taken for dead");
            self.node_gone(&node, "gateway node unavailable");
        }
    }

    /// Forgets `node`: sessions relayed to it end (their calls fail), sessions it relayed here
    /// are closed (backend calls to those clients get `-32001`).
    fn node_gone(&self, node: &str, why: &str) {
        lock(&self.nodes).remove(node);
        lock(&self.departing).remove(node);
        if let Some((name, window)) = lock(&self.windows).remove_entry(node) {
            let mut forgotten = lock(&self.forgotten);
            if forgotten.len() >= MAX_FORGOTTEN {
                // Bounded: the oldest epochs are the least likely to be replayed usefully
                // (their heartbeats are past `node_timeout` anyway).
                if let Some(oldest) = forgotten
                    .iter()
                    .min_by_key(|(_, e)| **e)
                    .map(|(n, _)| n.clone())
                {
                    forgotten.remove(&oldest);
                }
            }
            forgotten.insert(name, window.epoch());
        }
        // Its backends' calls to this node's clients are forgotten; this node's backends' calls
        // to its clients fail with -32001.
        self.forget_guests(Duration::ZERO, |(_, n, _)| &**n == node);
        self.fail_relayed_calls(|n| n == node);
        let ended: Vec<(u128, client::Relay)> = lock(&self.sessions)
            .extract_if(|_, r| &*r.node == node)
            .collect();
        for (id, relay) in ended {
            relay.end(id, mux::CloseReason::new(mux::close::TRY_AGAIN_LATER, why));
        }
        let dropped: Vec<(u128, served::Entry)> = lock(&self.served)
            .extract_if(|_, e| &*e.origin == node)
            .collect();
        drop(dropped);
        self.update_gauges();
        self.directory_changed();
    }

    /// A message on this node's own subject: taken only once, and only from a node this one
    /// hears (or that is departing).
    fn on_direct(&self, subject: &str, payload: &[u8]) {
        self.received.inc();
        let opened = match self.sealer.open(subject, payload) {
            Ok(opened) => opened,
            Err(why) => return self.reject(why, ""),
        };
        let Some(envelope) = wire::decode(opened.message) else {
            return self.reject(seal::Rejected::Invalid, "");
        };
        if !is_subject_token(envelope.from) {
            return self.reject(seal::Rejected::Invalid, "");
        }
        if !self.usable() {
            return;
        }
        let fresh = lock(&self.windows)
            .get_mut(envelope.from)
            .map(|w| w.check(opened.epoch, opened.seq));
        match fresh {
            None => return self.reject(seal::Rejected::UnknownNode, envelope.from),
            Some(seal::Fresh::Replay) => return self.reject(seal::Rejected::Replay, envelope.from),
            Some(seal::Fresh::NewEpoch) => {
                // Its link started afresh before its heartbeat said so: the sessions across the
                // old link end, and its messages are taken from the new one on.
                let name: Arc<str> = Arc::from(envelope.from);
                self.restarted(&name, opened.epoch, opened.seq);
            }
            Some(seal::Fresh::Yes) => {}
        }
        match envelope.op {
            Op::ToClient | Op::Ended { .. } => self.to_relayed_client(&envelope),
            Op::Open { .. } | Op::ToBackend | Op::Close => self.to_served(&envelope),
            Op::CallClient { key, path } => {
                let Ok(call) = crate::duplex::Message::parse(envelope.body) else {
                    return;
                };
                // Only calls, and only from a node this one hears.
                if call.kind() != crate::duplex::Kind::Request
                    || !lock(&self.nodes).contains_key(envelope.from)
                {
                    return;
                }
                self.call_from(envelope.from, path, key, call);
            }
            Op::AnswerBackend { key, path } => {
                // Only answers (with an id), and only from a node this one hears.
                let answer = crate::duplex::Message::parse(envelope.body)
                    .ok()
                    .filter(|m| m.kind() == crate::duplex::Kind::Reply && m.id().is_some());
                if answer.is_none() || !lock(&self.nodes).contains_key(envelope.from) {
                    return;
                }
                if let Some(answer) = answer {
                    self.answer_from(envelope.from, path, key, &answer);
                }
            }
            Op::CloseClient { path } => {
                let Ok(route) = std::str::from_utf8(envelope.body) else {
                    return;
                };
                if let Some(endpoint) = self.registry.lookup(path) {
                    endpoint.close_client(route, mux::CloseReason::too_fast());
                }
            }
        }
    }

    /// `node`'s link started afresh (epoch `epoch`, first seen message `seq`): the sessions
    /// across its old link end; what it holds stays known until its next heartbeat.
    fn restarted(&self, node: &Arc<str>, epoch: u64, seq: u64) {
        let held = lock(&self.nodes).remove(node);
        let departing = lock(&self.departing).get(node).copied();
        self.node_gone(node, "gateway node reconnected");
        lock(&self.forgotten).remove(node);
        lock(&self.windows).insert(node.clone(), seal::Window::new(epoch, seq));
        if let Some(mut held) = held {
            held.epoch = epoch;
            lock(&self.nodes).insert(node.clone(), held);
        }
        if let Some(until) = departing {
            lock(&self.departing).insert(node.clone(), until);
        }
        self.update_gauges();
        self.directory_changed();
    }

    /// Which node a new relayed client of `path` goes to: one whose endpoint serves and wants
    /// `secret`, spread by backends in turn. None when no other node serves it.
    fn pick(&self, path: &str, secret: &Digest) -> Option<(Arc<str>, Subject)> {
        if !self.usable() {
            return None;
        }
        let nodes = lock(&self.nodes);
        let candidates: Vec<(&Arc<str>, &Node, usize)> = nodes
            .iter()
            .filter_map(|(name, node)| {
                let remote = node.endpoints.get(path)?;
                let serving = remote.serving();
                (serving > 0 && remote.secret.matches(secret)).then_some((name, node, serving))
            })
            .collect();
        let total: usize = candidates.iter().map(|c| c.2).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = self.turn.fetch_add(1, Ordering::Relaxed) % total;
        for (name, node, serving) in candidates {
            if ticket < serving {
                return Some((name.clone(), node.subject.clone()));
            }
            ticket -= serving;
        }
        None
    }

    /// Whether `node` still has a serving backend of `path`.
    fn node_serves(&self, node: &str, path: &str) -> bool {
        self.usable()
            && lock(&self.nodes)
                .get(node)
                .and_then(|n| n.endpoints.get(path))
                .is_some_and(|r| r.serving() > 0)
    }

    /// Whether another node serves `path`.
    pub fn serves_elsewhere(&self, path: &str) -> bool {
        self.usable()
            && lock(&self.nodes)
                .values()
                .any(|n| n.endpoints.get(path).is_some_and(|r| r.serving() > 0))
    }

    /// Whether another node announces `path` (serving, or in its grace), or did when the link
    /// was lost.
    pub fn knows(&self, path: &str) -> bool {
        lock(&self.nodes)
            .values()
            .any(|n| n.endpoints.contains_key(path))
    }

    /// Whether `secret` is the secret another node announces for `path` (constant time).
    pub fn secret_matches(&self, path: &str, secret: &Digest) -> bool {
        lock(&self.nodes).values().any(|n| {
            n.endpoints
                .get(path)
                .is_some_and(|r| r.secret.matches(secret))
        })
    }

    /// Whether a publish of `path` with `secret` would join backends on other nodes that use
    /// another secret (the pool shares one; a pool of one is replaced instead).
    pub fn secret_conflicts(&self, path: &str, secret: &Digest, max_backends: usize) -> bool {
        max_backends > 1
            && self.usable()
            && lock(&self.nodes).values().any(|n| {
                n.endpoints
                    .get(path)
                    .is_some_and(|r| !r.backends.is_empty() && !r.secret.matches(secret))
            })
    }
}

/// Hex digits of a node's tag.
const TAG_HEX: usize = 16;

/// A node's tag: the first 64 bits of the SHA-256 of its name, in hex. Every route key a node
/// makes starts with it, so a backend's node can tell which node holds a client's route. No
/// name can be chosen to collide with another node's tag (that would take about 2^64 hashes),
/// and a node whose tag is already taken is not heard at all.
fn tag_of(node: &str) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(node.as_bytes())[..TAG_HEX / 2])
}

/// Whether a NATS client error says the server refused the credentials.
fn is_refusal(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("authorization violation")
        || text.contains("authentication")
        || text.contains("signing nonce")
}

/// A node name from a message, as it may be logged: only a name a node could have.
fn safe_name(name: &str) -> &str {
    if name.len() <= 64 && is_subject_token(name) {
        name
    } else {
        "(not a node name)"
    }
}

/// Checks what a heartbeat says before anything of it is believed: a node name, a time of
/// sending within `node_timeout` of `now` (older: a replay), and endpoints a node could have.
fn check_heartbeat(
    beat: &Heartbeat,
    epoch: u64,
    node_timeout: Duration,
    now: u64,
) -> Result<(), seal::Rejected> {
    use seal::Rejected::{Invalid, Replay};
    let window = u64::try_from(node_timeout.as_millis()).unwrap_or(u64::MAX);
    if beat.node.len() > 64 || !is_subject_token(&beat.node) || epoch == 0 || beat.epoch != epoch {
        return Err(Invalid);
    }
    if beat.sent > now.saturating_add(window) {
        return Err(Invalid);
    }
    if beat.sent.saturating_add(window) < now {
        return Err(Replay);
    }
    if beat.endpoints.len() > MAX_ANNOUNCED_ENDPOINTS {
        return Err(Invalid);
    }
    let latest_join = now.saturating_add(window);
    for endpoint in &beat.endpoints {
        let path_ok = endpoint.path.len() <= wire::MAX_PATH_BYTES
            && crate::auth::check_path(&endpoint.path).is_ok();
        let backends_ok = endpoint.backends.len() <= MAX_ANNOUNCED_BACKENDS
            && endpoint
                .backends
                .iter()
                .all(|(_, joined, _)| *joined <= latest_join);
        if !path_ok || !backends_ok || Digest::from_hex(&endpoint.secret).is_none() {
            return Err(Invalid);
        }
    }
    Ok(())
}

/// Now, in Unix milliseconds.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Locks a mutex, carrying on if a panicking thread poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The node's name: the configured one, or the host name (made a subject token) and a random
/// suffix.
fn node_name(configured: Option<&str>) -> String {
    if let Some(name) = configured {
        return name.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "gateway".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    let suffix: u32 = rand::random();
    format!(
        "{}-{:08x}",
        if host.is_empty() { "gateway" } else { &host },
        suffix
    )
}

/// A fresh session id.
fn session_id() -> u128 {
    // Never 0: that one marks messages about no session.
    rand::random::<u128>().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(node: &str, sent: u64, endpoints: Vec<Announced>) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            leaving: false,
            epoch: 9,
            sent,
            endpoints,
        }
    }

    fn endpoint(path: &str, backends: Vec<(u64, u64, bool)>) -> Announced {
        Announced {
            path: path.into(),
            secret: "ab".repeat(32),
            backends,
        }
    }

    #[test]
    fn a_heartbeat_is_believed_only_with_values_a_node_could_send() {
        use seal::Rejected::{Invalid, Replay};
        let now = 1_000_000_000;
        let timeout = Duration::from_secs(5);
        let check = |b: &Heartbeat| check_heartbeat(b, 9, timeout, now);
        let good = beat(
            "gw-1",
            now,
            vec![endpoint("/p", vec![(1, now - 10, false)])],
        );
        assert_eq!(check(&good), Ok(()));
        let cases: Vec<(&str, Heartbeat, seal::Rejected)> = vec![
            ("not a name", beat("a b", now, vec![]), Invalid),
            (
                "a name too long",
                beat(&"n".repeat(65), now, vec![]),
                Invalid,
            ),
            ("sent long ago", beat("gw-1", now - 6_000, vec![]), Replay),
            (
                "sent in the future",
                beat("gw-1", now + 6_000, vec![]),
                Invalid,
            ),
            (
                "a join far in the future",
                beat(
                    "gw-1",
                    now,
                    vec![endpoint("/p", vec![(1, now + 6_000, false)])],
                ),
                Invalid,
            ),
            (
                "too many backends",
                beat(
                    "gw-1",
                    now,
                    vec![endpoint(
                        "/p",
                        vec![(1, now, false); MAX_ANNOUNCED_BACKENDS + 1],
                    )],
                ),
                Invalid,
            ),
            (
                "a path too long",
                beat(
                    "gw-1",
                    now,
                    vec![endpoint(
                        &format!("/{}", "p".repeat(wire::MAX_PATH_BYTES)),
                        vec![],
                    )],
                ),
                Invalid,
            ),
            (
                "a path the gateway refuses",
                beat("gw-1", now, vec![endpoint("no-slash", vec![])]),
                Invalid,
            ),
            (
                "a secret that is no digest",
                beat(
                    "gw-1",
                    now,
                    vec![Announced {
                        secret: "zz".into(),
                        ..endpoint("/p", vec![])
                    }],
                ),
                Invalid,
            ),
        ];
        for (what, b, want) in cases {
            assert_eq!(check(&b), Err(want), "{what}");
        }
        // The epoch in the body must be the one in the trailer.
        assert_eq!(check_heartbeat(&good, 8, timeout, now), Err(Invalid));
    }

    #[test]
    fn tags_are_64_bits_of_the_name_and_refusals_are_recognised() {
        assert_eq!(tag_of("gw-1").len(), TAG_HEX);
        assert_ne!(tag_of("gw-1"), tag_of("gw-2"));
        assert!(is_refusal("authorization violation"));
        assert!(is_refusal("failed signing nonce"));
        assert!(!is_refusal("IO error"));
        assert_eq!(safe_name("gw-1"), "gw-1");
        assert_eq!(safe_name("a\nb"), "(not a node name)");
    }
}
