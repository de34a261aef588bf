//! Starting and stopping what a run measures: the gateway (the release binary), the roles,
//! nginx and nats-server.

use super::*;
pub(crate) use crate::process::{free_port, gateway_binary, Process as Proc};

/// Starts this tool again as one of its `--role` servers.
pub(crate) fn spawn_role(role: &str, arg: &str) -> Proc {
    let exe = std::env::current_exe().expect("exe");
    Proc::polite(
        Command::new(exe)
            .args(["--role", role, arg])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn role"),
    )
}

pub(crate) async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Our gateway, started by this tool.
pub(crate) struct OurGateway {
    pub(crate) _proc: Proc,
    pub(crate) url: String,
    /// The port of its plain listener (the one `url` names).
    pub(crate) port: u16,
    pub(crate) pid: u32,
    pub(crate) metrics: u16,
    pub(crate) config: std::path::PathBuf,
    pub(crate) text: String,
}

impl OurGateway {
    /// Kills it (SIGKILL: a crash) and starts it again on the same config and ports.
    pub(crate) async fn restart(&mut self) {
        let _ = self._proc.child().kill();
        let _ = self._proc.child().wait();
        let child = spawn_gateway(&gateway_binary(), &self.config, false);
        self.pid = child.id();
        self._proc = Proc::polite(child);
        wait_port(self.port).await;
    }
}

/// Starts our gateway (the release binary) on free ports.
pub(crate) async fn start_gateway(dir: &std::path::Path) -> OurGateway {
    start_gateway_with(dir, "gateway.yaml", "").await
}

/// Starts our gateway with `extra` (indented under `limits:`, then any sections) added to its
/// config, written to `dir/name`.
pub(crate) async fn start_gateway_with(
    dir: &std::path::Path,
    name: &str,
    extra: &str,
) -> OurGateway {
    start_gateway_listening(dir, name, extra, "", true).await
}

/// [`start_gateway_with`], with `listeners` (YAML list items) besides the plain one; its
/// warnings shown when `warnings` (an attacked gateway's are not: one per refused connection).
pub(crate) async fn start_gateway_listening(
    dir: &std::path::Path,
    name: &str,
    extra: &str,
    listeners: &str,
    warnings: bool,
) -> OurGateway {
    start_gateway_binary(dir, name, extra, listeners, warnings, &gateway_binary()).await
}

/// [`start_gateway_listening`] with another build of the gateway (`--compare-binary`).
pub(crate) async fn start_gateway_binary(
    dir: &std::path::Path,
    name: &str,
    extra: &str,
    listeners: &str,
    warnings: bool,
    binary: &std::path::Path,
) -> OurGateway {
    let port = free_port();
    let metrics = free_port();
    let config = dir.join(name);
    // Another build (`--compare-binary`) may not know `auth`: it gets no signed endpoint.
    let signed = if binary == gateway_binary().as_path() {
        format!(
            "  - path: {SIGNED}\n    auth:\n      secret: false\n      jwt:\n        keys: [{}]\n",
            signing_key("pub")
        )
    } else {
        String::new()
    };
    let text = format!(
        "listen:\n  - address: 127.0.0.1:{port}\n{listeners}metrics:\n  address: 127.0.0.1:{metrics}\n\
         tokens:\n  - name: bench\n    token: {TOKEN}\n    endpoints: [\"/*\"]\n\
         endpoints:\n  - path: {POOL}\n    max_backends: {POOL_SIZE}\n{signed}\
         limits:\n  max_clients_per_endpoint: 1000000\n  max_pending_calls_per_client: 100000\n{extra}"
    );
    std::fs::write(&config, &text).expect("config");
    let child = spawn_gateway(binary, &config, warnings);
    let pid = child.id();
    wait_port(port).await;
    OurGateway {
        _proc: Proc::polite(child),
        url: format!("ws://127.0.0.1:{port}"),
        port,
        pid,
        metrics,
        config,
        text,
    }
}

/// The live backends of `path`, read from the gateway's metrics.
pub(crate) async fn pool_size(metrics_port: u16, path: &str) -> usize {
    gauge(metrics_port, "duplex_gateway_backends", path).await
}

/// A per-endpoint gauge of the gateway (0 when it cannot be read).
pub(crate) async fn gauge(metrics_port: u16, name: &str, path: &str) -> usize {
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", metrics_port)).await else {
        return 0;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut text = String::new();
    let _ = tcp.read_to_string(&mut text).await;
    let series = format!("{name}{{endpoint=\"{path}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as usize)
}

/// Waits until the pool of `path` has `n` live backends.
pub(crate) async fn wait_pool(metrics_port: u16, path: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool_size(metrics_port, path).await != n {
        assert!(
            Instant::now() < deadline,
            "the pool of {path} never had {n} backends"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM to a process and waits for it to exit.
pub(crate) async fn stop(mut proc: Proc) {
    proc.signal(libc::SIGTERM);
    let _ = tokio::task::spawn_blocking(move || {
        let _ = proc.child().wait();
        proc
    })
    .await;
}

/// Starts nginx in front of the HTTP echo server on `upstream`, if nginx is installed.
pub(crate) async fn start_nginx(dir: &std::path::Path, upstream: u16) -> Option<(Proc, u16)> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let port = free_port();
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).ok()?;
    let user = if std::env::var("USER").as_deref() == Ok("root") || is_root() {
        "user root;"
    } else {
        ""
    };
    let conf = format!(
        "{user}\nworker_processes auto;\nerror_log {p}/logs/error.log warn;\npid {p}/nginx.pid;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 600s;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
           fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
           upstream echo {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 100000000; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://echo;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        p = prefix.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).ok()?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()?;
    let proc = Proc::polite(child);
    wait_port(port).await;
    Some((proc, port))
}

pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The nats-server binary, if installed.
/// Starts nats-server on a free loopback port (with its monitoring on `monitor`, if given) and
/// waits until it listens. None when nats-server is not installed.
pub(crate) async fn start_nats(monitor: Option<u16>) -> Option<(Proc, u16)> {
    let nats = nats_server()?;
    let port = free_port();
    let mut command = Command::new(nats);
    command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(monitor) = monitor {
        command.args(["-m", &monitor.to_string()]);
    }
    let proc = Proc::polite(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server"),
    );
    wait_port(port).await;
    Some((proc, port))
}

pub(crate) fn nats_server() -> Option<&'static str> {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

/// Runs `binary` on `config`, its warnings shown when `warnings` (else no log at all).
fn spawn_gateway(
    binary: &std::path::Path,
    config: &std::path::Path,
    warnings: bool,
) -> std::process::Child {
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", if warnings { "warn" } else { "off" })
        .stdout(Stdio::null())
        .stderr(if warnings {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("start the gateway")
}
