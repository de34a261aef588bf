//! Assembles the Pingora server: the gateway's listeners, the metrics listener, the reload
//! watcher, and the shutdown sequence.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::accept::Front;
use crate::app::App;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::mux::{close, CloseReason};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An address is taken (or not this machine's).
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The listener's (or the metrics') address.
        address: std::net::SocketAddr,
        /// What binding said.
        source: std::io::Error,
    },
    /// A TLS listener could not be set up.
    #[error("TLS listener {address}: {reason}")]
    Tls {
        /// The listener's address.
        address: std::net::SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The cluster could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Starts the gateway and runs until SIGTERM or SIGINT.
pub fn run(app: Arc<App>) -> Result<(), StartError> {
    let config: Arc<Config> = app.config.load_full();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let tmp = std::env::temp_dir();
    let id = std::process::id();
    let conf = ServerConf {
        threads,
        pid_file: tmp
            .join(format!("duplex-gateway-{id}.pid"))
            .display()
            .to_string(),
        upgrade_sock: tmp
            .join(format!("duplex-gateway-{id}.sock"))
            .display()
            .to_string(),
        // On SIGTERM Pingora stops the listeners, then waits this long with the services still
        // running: our drain (below) uses that time and exits as soon as it is done.
        grace_period_seconds: Some(HTTP_DRAIN.as_secs() + WS_DRAIN.as_secs() + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        // One single-threaded runtime per thread, as nginx has one process per core: a
        // connection, and the tasks it starts, stay on the thread that accepted it, so fewer
        // wake-ups cross threads (and no task migrates between them). Measured side by side:
        // http_rpc / http_direct 0.41-0.42 against 0.29-0.33 with work stealing, 12 % less CPU
        // per HTTP call, WebSocket calls unchanged (BENCHMARKS.md).
        work_stealing: false,
        ..ServerConf::default()
    };
    // Pingora retries a taken port for half a minute, then its service thread panics and the
    // process lives on, listening on nothing: find a taken address first and say so.
    check_addresses(&config)?;
    crate::metrics::metrics().touch();
    // Before anything listens: a cluster whose NATS cannot carry our frames stops the start.
    if let Some(cluster_config) = &config.cluster {
        let weak = Arc::downgrade(&app);
        let cluster = crate::cluster::Cluster::start(
            cluster_config,
            config.limits.max_message_bytes,
            app.registry.clone(),
            Box::new(ConfigLimits(weak)),
        )?;
        let _ = app.cluster.set(cluster);
    }
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let timeouts_app = app.clone();
    let mut http = pingora::proxy::http_proxy(&server.configuration, Gateway::new(app.clone()));
    // An HTTP/2 connection with no stream open for `http_idle_timeout` is closed (GOAWAY), as an
    // idle HTTP/1.1 keep-alive connection is. Pingora reads it once: a reload applies after a
    // restart.
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(config.limits.http_idle_timeout);
    http.server_options = Some(options);
    let count_app = app.clone();
    let draining_app = app.clone();
    let front = Front::new(
        http,
        Arc::new(move || {
            let limits = &timeouts_app.config.load().limits;
            (limits.request_header_timeout, limits.http_idle_timeout)
        }),
        Arc::new(move |stream| count_connection(&count_app, stream)),
        Arc::new(move || draining_app.active.draining.load(Ordering::SeqCst)),
    );
    let mut proxy = pingora::services::listening::Service::new("duplex-gateway".to_string(), front);
    // TLS connections are watched from their accept until their first request (the TLS
    // handshake and HTTP/2 are not under Front's deadlines).
    let watchdog_app = app.clone();
    let watchdog = crate::edge::Watchdog::new(
        Arc::new(move || watchdog_app.config.load().limits.request_header_timeout),
        app.edge.clone(),
    );
    let _ = crate::edge::WATCHDOG.set(watchdog.clone());
    proxy.endpoints().set_pre_tls_callback(watchdog);
    for listener in &config.listeners {
        let addr = listener.address.to_string();
        match &listener.tls {
            None => {
                proxy.add_listener(ListenerConfig::tcp(addr.clone()).l4_buffer(l4_buffer(false)))
            }
            Some(_) => {
                // The certificate was loaded and checked at start-up; the resolver serves it and
                // takes the new one on reload.
                let resolver = app
                    .certs
                    .iter()
                    .find(|(a, _)| *a == listener.address)
                    .map(|(_, r)| r.clone())
                    .ok_or_else(|| StartError::Tls {
                        address: listener.address,
                        reason: "certificate not loaded".into(),
                    })?;
                let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "")
                    .map_err(|e| StartError::Tls {
                        address: listener.address,
                        reason: e.to_string(),
                    })?;
                settings.set_cert_resolver(resolver);
                // HTTP/2 for HTTP calls, as browsers prefer; WebSocket upgrades stay on HTTP/1.1
                // (a client that asks for h2 only cannot upgrade, and gets 426).
                settings.enable_h2();
                proxy.add_listener(
                    ListenerConfig::tcp(addr.clone())
                        .tls(settings)
                        .l4_buffer(l4_buffer(true)),
                );
            }
        }
    }
    server.add_service(proxy);

    if let Some(addr) = config.metrics {
        let mut service = pingora::services::listening::Service::new(
            "metrics".to_string(),
            crate::admin::MetricsApp { app: app.clone() },
        );
        service.add_tcp(&addr.to_string());
        service.threads = Some(1);
        server.add_service(service);
    }

    server.add_service(pingora::services::background::background_service(
        "reload",
        crate::reload::Reloader { app: app.clone() },
    ));
    crate::reload::record_success();

    tracing::info!(
        listeners = ?config.listeners.iter().map(|l| l.address).collect::<Vec<_>>(),
        threads,
        "duplex-gateway starting"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Shutdown { app }),
    });
    Ok(())
}

/// Fails with one line naming the first listener (or metrics) address that cannot be bound.
fn check_addresses(config: &Config) -> Result<(), StartError> {
    let addresses = config
        .listeners
        .iter()
        .map(|l| l.address)
        .chain(config.metrics);
    // All held at once, so overlapping addresses (0.0.0.0:P and 127.0.0.1:P) are found too.
    let mut bound = Vec::new();
    for addr in addresses {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => bound.push(listener),
            Err(source) => {
                return Err(StartError::Listen {
                    address: addr,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Pingora's signal handling, plus closing every WebSocket with 1001 on SIGTERM.
struct Shutdown {
    app: Arc<App>,
}

#[async_trait]
impl ShutdownSignalWatch for Shutdown {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        // SIGQUIT would hand the listening sockets to whichever process listens on the upgrade
        // socket, a path in a shared temporary directory that anyone could have taken first:
        // it is ignored.
        let quit_ignored = async {
            while quit.recv().await.is_some() {
                tracing::warn!("SIGQUIT ignored: this gateway does not hand its listeners over");
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = quit_ignored => ShutdownSignal::FastShutdown,
            _ = term.recv() => {
                // Pingora stops accepting once this returns; the drain runs meanwhile on a
                // thread of its own and ends the process when it is done. Marked before
                // Pingora hears of it, so the listeners' cleanup keeps idle connections.
                self.app.active.draining.store(true, Ordering::SeqCst);
                let app = self.app.clone();
                let spawned = std::thread::Builder::new()
                    .name("drain".into())
                    .spawn(move || {
                        match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => rt.block_on(async {
                                // SIGINT still means "stop now", drain or not.
                                let interrupt = async {
                                    match signal(SignalKind::interrupt()) {
                                        Ok(mut s) => {
                                            s.recv().await;
                                        }
                                        Err(_) => std::future::pending::<()>().await,
                                    }
                                };
                                tokio::select! {
                                    _ = drain(&app) => {}
                                    _ = interrupt => tracing::info!("SIGINT: stopping now"),
                                }
                            }),
                            Err(e) => tracing::error!("cannot drain ({e}): stopping now"),
                        }
                        // The spans of the last calls go out before the process does.
                        crate::otlp::flush();
                        std::process::exit(0);
                    });
                if let Err(e) = spawned {
                    tracing::error!("cannot start the drain: {e}");
                }
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

/// Socket buffers for every accepted connection. Pingora's default read buffer is 64 KiB per
/// connection, which dominated the memory of idle WebSockets. On plain TCP there are none at
/// all: request headers and bodies are read straight into Pingora's own buffers, and WebSocket
/// frames into the framing's; the connection's socket moves to the runtime serving it anyway
/// (see `timeouts`), and the connection guard buffers HTTP writes, so a response header and its
/// body still go out in one write. TLS keeps small ones, because the TLS layer reads and writes
/// in small pieces.
fn l4_buffer(tls: bool) -> L4BufferSettings {
    if tls {
        L4BufferSettings::new(4096, 1460)
    } else {
        L4BufferSettings::new(0, 0)
    }
}

/// How long HTTP calls in progress may take to finish on SIGTERM.
const HTTP_DRAIN: Duration = Duration::from_secs(10);
/// How long WebSockets get to send their close frames.
const WS_DRAIN: Duration = Duration::from_secs(2);

/// The graceful stop: refuse new requests (on connections already open; the listeners are
/// closed), close WebSocket clients with 1001, let HTTP calls finish (their backends stay up for
/// them), then close the backends with 1001.
async fn drain(app: &App) {
    tracing::info!("SIGTERM: closing WebSockets, letting HTTP calls finish");
    let active = &app.active;
    active.draining.store(true, Ordering::SeqCst);
    let reason = CloseReason::new(close::GOING_AWAY, "gateway shutting down");
    // The other nodes hear first, so they send nothing new here; relayed clients close too.
    if let Some(cluster) = app.cluster.get() {
        cluster.stop(reason.clone()).await;
    }
    for endpoint in app.registry.endpoints() {
        endpoint.close_websocket_clients(reason.clone());
    }
    // HTTP calls relayed here from other nodes finish like this node's own.
    let relayed = || app.cluster.get().map_or(0, |c| c.relayed_http_calls());
    wait_until(
        || active.http.load(Ordering::SeqCst) + relayed() == 0,
        HTTP_DRAIN,
    )
    .await;
    for endpoint in app.registry.endpoints() {
        endpoint.close_backends(reason.clone(), |_| true);
        endpoint.close_websocket_clients(reason.clone());
    }
    wait_until(|| active.websockets.load(Ordering::SeqCst) == 0, WS_DRAIN).await;
    // The other nodes hear the end of every session relayed here before the process goes.
    if let Some(cluster) = app.cluster.get() {
        cluster.flush().await;
    }
    tracing::info!(
        http_calls_left = active.http.load(Ordering::SeqCst),
        websockets_left = active.websockets.load(Ordering::SeqCst),
        "stopping"
    );
}

/// Waits until `done()`, for `limit` at most.
async fn wait_until(done: impl Fn() -> bool, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The cluster's view of the config in force (a weak link: the cluster lives in the app).
struct ConfigLimits(std::sync::Weak<App>);

impl crate::cluster::PathLimits for ConfigLimits {
    fn max_backends(&self, path: &str) -> usize {
        self.0
            .upgrade()
            .map_or(1, |app| app.config.load().max_backends(path))
    }

    fn max_clients(&self, path: &str) -> usize {
        self.0
            .upgrade()
            .map_or(0, |app| app.config.load().max_clients(path))
    }
}

/// Counts a new connection against its address's `max_connections_per_ip` (none when the limit
/// is off, or when the peer is a trusted proxy, which carries many clients' connections).
fn count_connection(
    app: &App,
    stream: &pingora::protocols::Stream,
) -> Option<Result<crate::edge::ConnectionGuard, crate::edge::ConnectionGuard>> {
    let config = app.config.load();
    config.limits.max_connections_per_ip?;
    let digest = stream.get_socket_digest()?;
    let peer = digest.peer_addr()?.as_inet()?.ip();
    if config.trusted_proxies.iter().any(|net| net.contains(&peer)) {
        return None;
    }
    Some(app.edge.connection(peer))
}
