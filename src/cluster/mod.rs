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
//!
//! The files, one concept each: this one holds the node (start, the event loop, the link's ups
//! and downs, SIGTERM); [`link`] the NATS connection's options; `bus.rs` publishing (sealed,
//! through an ordered outbox) and the dispatch of what arrives; [`seal`] signatures and replay
//! windows; [`wire`] the message formats; `directory.rs` the other nodes and their endpoints;
//! `tables.rs` endpoint tables across nodes (versions, deltas, pages); `pools.rs` this node's
//! announcements and pools counted over the cluster; [`client`] clients relayed out to another
//! node; [`served`] clients relayed in from another node; `audit.rs` the audits that find
//! frames lost on the way; `calls.rs` backend-to-client calls that cross nodes.

mod audit;
mod bus;
mod calls;
pub mod client;
mod directory;
pub mod link;
mod pools;
pub mod seal;
pub mod served;
mod tables;
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
use crate::config::ClusterConfig;
use crate::metrics::metrics;
use crate::mux::{self, Registry};
use wire::ENVELOPE_BYTES;

pub use client::ClusterClient;
use directory::{tag_of, Node, TAG_HEX};
pub use directory::{RemotePool, MAX_ANNOUNCED_BACKENDS, MAX_ANNOUNCED_ENDPOINTS};

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
    /// This node's last heartbeat went out (it fit `max_payload`, and NATS took it): the others
    /// hear it. `duplex_gateway_cluster_connected` says 0 when not.
    heartbeats_out: AtomicBool,
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
    /// The last epoch of nodes forgotten and the highest sequence number seen of it, so their
    /// old messages stay refused (bounded).
    forgotten: Mutex<HashMap<Arc<str>, (u64, u64)>>,
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
    /// Endpoints of nodes that left or died, in their grace here: path -> the secret they
    /// wanted and the end of the grace. Their clients wait for a backend (anywhere) as on one
    /// node when its last backend leaves, rather than being told the path is unknown.
    graces: Mutex<HashMap<String, (Digest, Instant)>>,
    /// This node's endpoint table as last announced (see `pools.rs`).
    table: Mutex<tables::Table>,
    /// When this node last sent its table to each node that asked (at most every half second).
    tables_sent: Mutex<HashMap<Arc<str>, Instant>>,
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

/// What the config in force says of an endpoint path.
pub trait PathLimits: Send + Sync {
    /// Its pool size (over the whole cluster).
    fn max_backends(&self, path: &str) -> usize;
    /// The most clients one node takes (its own and the ones relayed to it).
    fn max_clients(&self, path: &str) -> usize;
}

/// How long the start-up waits for NATS before starting local-only.
const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// The shortest time between two announcements of this node's table.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(100);

/// Why a cluster node could not start (or, for [`ClusterError::Payload`], cannot use its link).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Its runtime or its thread could not be made.
    #[error("cluster: cannot start its runtime: {0}")]
    Runtime(std::io::Error),
    /// The link's settings or files.
    #[error(transparent)]
    Link(#[from] link::LinkError),
    /// The NATS client could not be set up.
    #[error("cluster: cannot set up the NATS client: {0}")]
    Client(async_nats::ConnectError),
    /// The server refused this node's credentials.
    #[error("cluster: the NATS server ({servers}) refused this node's credentials: {why}")]
    Refused {
        /// The servers, as they may be shown.
        servers: String,
        /// What the server said.
        why: String,
    },
    /// A frame of `max_message_bytes` does not fit the server's `max_payload`.
    #[error("limits.max_message_bytes {max_message} (plus {ENVELOPE_BYTES} bytes of envelope) does not fit the NATS server's max_payload {max_payload}: lower max_message_bytes to {} or raise the server's max_payload", max_payload.saturating_sub(ENVELOPE_BYTES))]
    Payload {
        /// `limits.max_message_bytes`.
        max_message: usize,
        /// The server's `max_payload`.
        max_payload: usize,
    },
}

impl Cluster {
    /// Connects to NATS (waiting up to 2 s; a node starts even when NATS is down, and keeps
    /// trying) and starts the heartbeats and the subscriptions. Fails when NATS is reachable
    /// but its `max_payload` cannot carry a frame of `max_message_bytes`.
    pub fn start(
        config: &ClusterConfig,
        max_message_bytes: usize,
        registry: Arc<Registry>,
        limits: Box<dyn PathLimits>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let me: Arc<str> = Arc::from(node_name(config.node.as_deref()));
        // One thread: the link's reads and writes, heartbeats and relayed sessions are light,
        // and a single-threaded runtime wakes its own tasks without crossing threads.
        let rt = tokio::runtime::Builder::new_current_thread()
            .thread_name("cluster")
            .enable_all()
            .build()
            .map_err(ClusterError::Runtime)?;
        let handle = rt.handle().clone();
        // The runtime lives as long as the process: its thread runs the NATS link.
        std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .map_err(ClusterError::Runtime)?;

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
            .map_err(ClusterError::Client)?;
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
            heartbeats_out: AtomicBool::new(true),
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
            graces: Mutex::new(HashMap::new()),
            table: Mutex::new(tables::Table::default()),
            tables_sent: Mutex::new(HashMap::new()),
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
            return Err(ClusterError::Refused {
                servers: shown,
                why,
            });
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

    /// Whether a frame of `max_message_bytes` plus the envelope fits the server's `max_payload`.
    fn payload_fits(&self) -> Result<(), ClusterError> {
        let max_payload = self.max_payload.load(Ordering::SeqCst);
        let max_message = self.max_message.load(Ordering::SeqCst);
        if max_payload > 0 && max_message.saturating_add(ENVELOPE_BYTES) > max_payload {
            return Err(ClusterError::Payload {
                max_message,
                max_payload,
            });
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

    fn update_gauges(&self) {
        // Called on every change of the link too.
        self.version.fetch_add(1, Ordering::SeqCst);
        let m = metrics();
        m.cluster_connected.set(i64::from(
            self.usable() && self.heartbeats_out.load(Ordering::SeqCst),
        ));
        // While the link is down this node hears nobody.
        let others = if self.usable() {
            lock(&self.nodes).len()
        } else {
            0
        };
        m.cluster_nodes.set(1 + others as i64);
    }

    /// The heartbeats, the subscriptions and the connection events, until the process ends.
    async fn run(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<async_nats::Event>) {
        let inbox = self.subject_of(&self.me);
        let (mut direct, mut beats, mut probes) = loop {
            // The client re-subscribes by itself after a reconnect: subscribing once is enough.
            let direct = self.nats.subscribe(inbox.clone()).await;
            let beats = self.nats.subscribe(self.heartbeat_subject()).await;
            let probes = self
                .nats
                .subscribe(format!("{}.*", self.probe_prefix()))
                .await;
            match (direct, beats, probes) {
                (Ok(d), Ok(b), Ok(p)) => break (d, b, p),
                (d, b, p) => {
                    let e = d
                        .err()
                        .map(|e| e.to_string())
                        .or(b.err().map(|e| e.to_string()))
                        .or(p.err().map(|e| e.to_string()));
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
        // A burst of pool changes makes one announcement, 5 ms after the first, and a node
        // announces at most every `ANNOUNCE_EVERY` (each announcement compares the whole table:
        // thousands of publishes in a row must not make one each).
        let mut announce_at: Option<Instant> = None;
        let mut announced = Instant::now();
        let soon = |announced: Instant| {
            (Instant::now() + Duration::from_millis(5)).max(announced + ANNOUNCE_EVERY)
        };
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
                msg = probes.next() => match msg {
                    Some(msg) => self.on_probe(&msg.subject, msg.status),
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
                    self.audit_sessions().await;
                    self.remove_gone_series();
                    self.announce().await;
                    announced = Instant::now();
                }
                _ = pools.changed(), if announce_at.is_none() => {
                    announce_at = Some(soon(announced));
                }
                _ = self.announce_soon.notified(), if announce_at.is_none() => {
                    announce_at = Some(soon(announced));
                }
                _ = debounce => {
                    announce_at = None;
                    self.announce().await;
                    announced = Instant::now();
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

    /// SIGTERM, last step: what the outbox still holds (the ends of sessions, answers) goes out
    /// before the process exits, for a second at most.
    pub async fn flush(&self) {
        let Some(me) = self.me_weak.upgrade() else {
            return;
        };
        let flush = async move {
            let deadline = Instant::now() + Duration::from_secs(1);
            while me.outbox_bytes.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = me.nats.flush().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), self.rt.spawn(flush)).await;
    }

    /// A receiver of the SIGTERM close reason (for relayed clients).
    pub(super) fn stop_signal(&self) -> tokio::sync::watch::Receiver<Option<mux::CloseReason>> {
        self.stop.subscribe()
    }
}

/// Whether a NATS client error says the server refused the credentials.
fn is_refusal(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("authorization violation")
        || text.contains("authentication")
        || text.contains("signing nonce")
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
    let host: String = crate::access::host_name()
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
