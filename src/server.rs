//! Assembles the Pingora server: the gateway's listeners, the metrics listener, the reload
//! watcher, and the shutdown sequence.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::gateway::{App, Gateway};
use crate::mux::{close, CloseReason};

/// Starts the gateway on `config` and runs until SIGTERM or SIGINT.
pub fn run(app: Arc<App>, config: &Config) -> Result<(), String> {
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
        // WebSockets are closed by the shutdown watch below; HTTP calls get up to 10 s.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(10),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway::new(app.clone()),
        "duplex-gateway",
    );
    for listener in &config.listeners {
        let addr = listener.address.to_string();
        match &listener.tls {
            None => proxy.add_tcp(&addr),
            Some(files) => {
                let cert = files.cert.display().to_string();
                let key = files.key.display().to_string();
                let settings = pingora::listeners::tls::TlsSettings::intermediate(&cert, &key)
                    .map_err(|e| format!("TLS listener {addr}: {e}"))?;
                proxy.add_tls_with_settings(&addr, None, settings);
            }
        }
    }
    server.add_service(proxy);

    if let Some(addr) = config.metrics {
        let mut service = pingora::services::listening::Service::new(
            "metrics".to_string(),
            crate::metrics::MetricsApp,
        );
        service.add_tcp(&addr.to_string());
        service.threads = Some(1);
        server.add_service(service);
    }

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
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: closing WebSockets, letting HTTP calls finish");
                let reason = CloseReason::new(close::GOING_AWAY, "gateway shutting down");
                for endpoint in self.app.registry.endpoints() {
                    endpoint.close_all(reason.clone());
                }
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => ShutdownSignal::FastShutdown,
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
        }
    }
}
