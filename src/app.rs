//! The gateway's shared state: the config in force, the endpoints, the certificates, and the
//! requests in progress. Every request-handling module reads it; none of them owns it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;

use crate::config::{Config, Limits, Source};
use crate::mux::{self, Registry};
use crate::tls::CertResolver;
use crate::ws::WsSettings;

/// Everything the gateway's request handling shares: the config in force and the endpoints.
pub struct App {
    /// The config in force; replaced as a whole on reload.
    pub config: ArcSwap<Config>,
    /// Where the config comes from (reload reads it again).
    pub source: Source,
    /// All endpoints.
    pub registry: Arc<Registry>,
    /// The certificate of each TLS listener, by address.
    pub certs: Vec<(SocketAddr, Arc<CertResolver>)>,
    /// Requests in progress, for the graceful stop.
    pub active: Active,
    /// Held by a reload while it swaps the config and decides what it revokes, and by a publish
    /// while it checks its token against the config in force and registers: so no backend slips
    /// in with a token the reload just revoked.
    pub publish_lock: std::sync::Mutex<()>,
    /// The cluster this node belongs to (set at start-up when the config has one).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// What one client address, or one endpoint, may take (`limits.*_per_ip`,
    /// `endpoints[].calls_per_second`).
    pub edge: Arc<crate::edge::Edge>,
    /// Changes after every applied reload: WebSocket clients with signed tokens check theirs
    /// against the new keys.
    pub reloads: tokio::sync::watch::Sender<()>,
    /// The host name, for access lines of a node outside a cluster.
    pub host: String,
}

/// Counts requests in progress, so a graceful stop can wait for them.
#[derive(Default)]
pub struct Active {
    /// Set when the gateway stops: new requests get 503.
    pub draining: AtomicBool,
    /// HTTP calls in progress.
    pub http: Arc<AtomicUsize>,
    /// WebSocket connections open (they outlive their request: see [`crate::ws`]).
    pub websockets: Arc<AtomicUsize>,
}

/// Counts one request or connection while it lives.
pub(crate) struct Counted(Arc<AtomicUsize>);

impl Counted {
    pub(crate) fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Counted(counter.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl App {
    /// A gateway running on `config`, read from `source`, with the certificates `keys` of its
    /// TLS listeners (see [`crate::tls::load_all`]).
    pub fn new(config: Config, source: Source, keys: Vec<(SocketAddr, CertifiedKey)>) -> Arc<App> {
        let registry = Registry::new(mux_limits(&config.limits));
        let edge = Arc::new(crate::edge::Edge::new(&config));
        Arc::new(App {
            edge,
            config: ArcSwap::from_pointee(config),
            source,
            registry,
            certs: keys
                .into_iter()
                .map(|(addr, key)| (addr, CertResolver::new(key)))
                .collect(),
            active: Active::default(),
            publish_lock: std::sync::Mutex::new(()),
            cluster: std::sync::OnceLock::new(),
            reloads: tokio::sync::watch::Sender::new(()),
            host: crate::access::host_name(),
        })
    }

    /// This node's name in access lines: its cluster name, else the host name.
    pub fn node_name(&self) -> String {
        match self.cluster.get() {
            Some(cluster) => cluster.name().to_string(),
            None => self.host.clone(),
        }
    }
}

/// The multiplexer's share of the limits.
pub fn mux_limits(limits: &Limits) -> mux::Limits {
    mux::Limits {
        max_pending_calls_per_client: limits.max_pending_calls_per_client,
        backend_grace: limits.backend_grace,
        // A client may fall behind by 16 messages of the largest size before it counts as not
        // reading (16 MiB with the default limit).
        client_queue_bytes: queue_bytes(limits),
        // A backend's queue has the same bound: clients then wait for it to read.
        backend_queue_bytes: queue_bytes(limits),
        drain_timeout: limits.drain_timeout,
        max_queued_bytes: limits.max_queued_bytes,
        max_methods_per_endpoint: limits.max_methods_per_endpoint,
    }
}

/// What the gateway holds for one peer that does not read: 16 messages of the largest size (16
/// MiB with the default limit), at least 64 KiB.
fn queue_bytes(limits: &Limits) -> usize {
    limits.max_message_bytes.saturating_mul(16).max(64 << 10)
}

/// WebSocket settings from the limits.
pub fn ws_settings(limits: &Limits) -> WsSettings {
    WsSettings {
        max_message_bytes: limits.max_message_bytes,
        handshake_timeout: limits.handshake_timeout,
        ping_interval: limits.ping_interval,
        write_timeout: std::time::Duration::from_secs(10),
    }
}
