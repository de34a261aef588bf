//! The load tool: measures the gateway against the physical limit, side by side, in one run.
//!
//! ```text
//! cargo bench --bench load                      # full run (about 3 minutes after the build)
//! cargo bench --bench load -- --quick --json out.json
//! cargo bench --bench load -- --url ws://host:8080 --token T   # another running Duplex gateway
//! ```
//!
//! Scenarios (see BENCHMARKS.md): `ws_rpc`, `ws_rpc_direct`, `http_rpc`, `http_direct`,
//! `http_nginx` (when nginx is installed), `http_floor` (Pingora alone: a `ProxyHttp` that echoes
//! each POST's body from `request_filter`, the ceiling of any gateway built on it), `stream`, `idle`, `pool_rpc` (the same WebSocket load
//! on an endpoint served by a pool of 4 backends, each a process of its own) and
//! `rolling_deploy` (WebSocket and HTTP load on that pool while each backend in turn drains,
//! exits and is replaced: failed calls and the throughput dip), `reload` (`ws_rpc` and `http_rpc`
//! while the gateway gets SIGHUP every 100 ms, alternating two valid configs), `connect` (new
//! WebSocket clients per second: connect, handshake, one call, close) and `latency` (one client,
//! sequential calls: the p50 the gateway adds over direct), `cluster_ws_rpc` and
//! `cluster_http_rpc` (the `ws_rpc` and `http_rpc` loads with the client on one gateway node and
//! the backend on another, joined by a real nats-server; skipped when nats-server is not
//! installed), `cluster_ws_rpc_signed` (the same WebSocket load through two nodes that sign every
//! message with `cluster.key`, beside the unsigned pair), and their ratios.
//!
//! Every server runs in a process of its own: the gateway (the release binary), and this binary
//! started again with `--role ...` for the echo backend, the direct Duplex server and the direct
//! HTTP server. This process only generates load.
//!
//! The loads a ratio compares run side by side: `ws_rpc` with `ws_rpc_direct`; `http_rpc` with
//! `http_direct`, `http_floor` and `http_nginx`; `connect` with `connect_direct`; each `reload` load with the
//! same load without reloads; each cluster load with the same load on one node. Each runs half its time in turn, then the other half in reverse
//! order (A B B A), so what the shared machine gives the run (other tenants) weighs on both
//! alike. The main loads also report each process's CPU time per call (from `/proc`), which is
//! what a ratio comes from when the two cores are busy.

use std::convert::Infallible;
use std::future::Future;
use std::net::TcpListener as StdListener;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use duplex::{Call, Peer, PeerBuilder};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "bench-token-0123456789";
const SECRET: &str = "bench-secret-0123456789";
const ENDPOINT: &str = "/bench";
/// The endpoint served by a pool of backends.
const POOL: &str = "/pool";
/// Its size.
const POOL_SIZE: usize = 4;

/// What to run.
#[derive(Clone)]
struct Options {
    clients: usize,
    seconds: f64,
    idle: usize,
    stream_frames: u64,
    json: Option<String>,
    url: Option<String>,
    token: String,
}

impl Options {
    fn parse(args: &[String]) -> Options {
        let quick = args.iter().any(|a| a == "--quick");
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let num =
            |name: &str, default: f64| value(name).and_then(|v| v.parse().ok()).unwrap_or(default);
        Options {
            clients: num("--clients", if quick { 16.0 } else { 64.0 }) as usize,
            seconds: num("--seconds", if quick { 3.0 } else { 10.0 }),
            idle: num("--idle", if quick { 1000.0 } else { 10_000.0 }) as usize,
            stream_frames: num("--stream-frames", if quick { 20_000.0 } else { 100_000.0 }) as u64,
            json: value("--json"),
            url: value("--url").map(|u| u.trim_end_matches('/').to_string()),
            token: value("--token").unwrap_or_else(|| TOKEN.to_string()),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    if let Some(i) = args.iter().position(|a| a == "--role") {
        let role = args.get(i + 1).cloned().unwrap_or_default();
        let arg = args.get(i + 2).cloned().unwrap_or_default();
        return run_role(&role, &arg);
    }
    let options = Options::parse(&args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(options));
}

// ---- Servers (separate processes) ----------------------------------------------------------

/// The handlers every echo server has: `echo`, and `count` (a reply stream of 1..=n).
fn echo_handlers() -> PeerBuilder {
    Peer::builder()
        .handle("echo", |call: Call| async move { Ok(call.payload) })
        .handle("count", |call: Call| async move {
            let n = call.payload.as_u64().unwrap_or(0);
            for i in 1..n {
                let _ = call.send(&json!(i)).await;
            }
            Ok(json!(n))
        })
}

fn run_role(role: &str, arg: &str) {
    if role == "pingora-floor" {
        // Pingora runs its own runtimes: not inside ours.
        return pingora_floor(port(arg));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        match role {
            // Publishes the echo handlers at the URL (a gateway), publishing again if dropped.
            "echo-backend" => loop {
                if let Ok(peer) = echo_handlers().connect(arg).await {
                    peer.closed().await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            },
            // Publishes the echo handlers at the URL (a gateway) once; on SIGTERM drains (no new
            // calls come, the running ones finish), then exits: one step of a rolling deploy.
            "pool-backend" => {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                let Ok(peer) = echo_handlers().connect(arg).await else {
                    eprintln!("pool backend: cannot publish");
                    return;
                };
                tokio::select! {
                    _ = peer.closed() => {}
                    _ = term.recv() => {
                        let _ = peer.drain().await;
                        peer.close();
                        let _ = tokio::time::timeout(Duration::from_secs(2), peer.closed()).await;
                    }
                }
            }
            // Serves the echo handlers directly over WebSocket on 127.0.0.1:PORT.
            "ws-server" => {
                serve_tcp(port(arg), |tcp| async move {
                    if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                        if let Ok(peer) = echo_handlers().accept(ws).await {
                            peer.closed().await;
                        }
                    }
                })
                .await
            }
            // A minimal HTTP echo server (hyper) on 127.0.0.1:PORT.
            "http-server" => {
                serve_tcp(port(arg), |tcp| async move {
                    let service =
                        service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(body))
                                    .unwrap_or_default(),
                            )
                        });
                    let _ = server_http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                })
                .await
            }
            // Attacks the gateway from 127.0.0.2 until killed: ARG is "TLS_PORT PLAIN_PORT CA".
            "attacker" => attack(arg).await,
            other => eprintln!("unknown role {other}"),
        }
    });
}

/// Pingora's floor: a `ProxyHttp` that answers every request inside `request_filter` by echoing
/// its body, on 127.0.0.1:PORT, with the gateway's thread settings (one runtime per core, no work
/// stealing). What every HTTP call through the gateway pays before any of the gateway's work.
struct Floor;

#[async_trait::async_trait]
impl pingora::proxy::ProxyHttp for Floor {
    type CTX = ();
    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(
        &self,
        session: &mut pingora::proxy::Session,
        _ctx: &mut (),
    ) -> pingora::Result<bool> {
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = session.read_request_body().await? {
            body.extend_from_slice(&chunk);
        }
        let mut resp = pingora::http::ResponseHeader::build_no_case(200, Some(2))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(body.freeze()), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut pingora::proxy::Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<pingora::prelude::HttpPeer>> {
        Err(pingora::Error::new(pingora::ErrorType::InternalError))
    }
}

fn pingora_floor(port: u16) {
    let conf = pingora::server::configuration::ServerConf {
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        work_stealing: false,
        ..Default::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, Floor);
    service.add_tcp(&format!("127.0.0.1:{port}"));
    server.add_service(service);
    server.run_forever();
}

/// Accepts connections on 127.0.0.1:`port` forever, each served by `serve` in a task of its own.
async fn serve_tcp<F, Fut>(port: u16, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve(tcp));
    }
}

fn port(arg: &str) -> u16 {
    arg.parse().expect("port")
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process, stopped when dropped: SIGTERM first (nginx's master then stops its
/// workers; a SIGKILL would leave them running), SIGKILL if it has not exited within 2 s.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_role(role: &str, arg: &str) -> Proc {
    let exe = std::env::current_exe().expect("exe");
    Proc(
        Command::new(exe)
            .args(["--role", role, arg])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn role"),
    )
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Our gateway, started by this tool.
struct OurGateway {
    _proc: Proc,
    url: String,
    pid: u32,
    metrics: u16,
    config: std::path::PathBuf,
    text: String,
}

/// The gateway binary: this build's, or the one `DUPLEX_GATEWAY_BIN` names (to compare two
/// builds side by side).
fn gateway_binary() -> std::path::PathBuf {
    std::env::var_os("DUPLEX_GATEWAY_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_duplex-gateway")))
}

/// Starts our gateway (the release binary) on free ports.
async fn start_gateway(dir: &std::path::Path) -> OurGateway {
    start_gateway_with(dir, "gateway.yaml", "").await
}

/// Starts our gateway with `extra` (indented under `limits:`, then any sections) added to its
/// config, written to `dir/name`.
async fn start_gateway_with(dir: &std::path::Path, name: &str, extra: &str) -> OurGateway {
    start_gateway_listening(dir, name, extra, "", true).await
}

/// [`start_gateway_with`], with `listeners` (YAML list items) besides the plain one; its
/// warnings shown when `warnings` (an attacked gateway's are not: one per refused connection).
async fn start_gateway_listening(
    dir: &std::path::Path,
    name: &str,
    extra: &str,
    listeners: &str,
    warnings: bool,
) -> OurGateway {
    let port = free_port();
    let metrics = free_port();
    let config = dir.join(name);
    let text = format!(
        "listen:\n  - address: 127.0.0.1:{port}\n{listeners}metrics:\n  address: 127.0.0.1:{metrics}\n\
         tokens:\n  - name: bench\n    token: {TOKEN}\n    endpoints: [\"/*\"]\n\
         endpoints:\n  - path: {POOL}\n    max_backends: {POOL_SIZE}\n\
         limits:\n  max_clients_per_endpoint: 1000000\n  max_pending_calls_per_client: 100000\n{extra}"
    );
    std::fs::write(&config, &text).expect("config");
    let child = Command::new(gateway_binary())
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", if warnings { "warn" } else { "off" })
        .stdout(Stdio::null())
        .stderr(if warnings {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("start the gateway");
    let pid = child.id();
    wait_port(port).await;
    OurGateway {
        _proc: Proc(child),
        url: format!("ws://127.0.0.1:{port}"),
        pid,
        metrics,
        config,
        text,
    }
}

/// The live backends of `path`, read from the gateway's metrics.
async fn pool_size(metrics_port: u16, path: &str) -> usize {
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
    let series = format!("duplex_gateway_backends{{endpoint=\"{path}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as usize)
}

/// Waits until the pool of `path` has `n` live backends.
async fn wait_pool(metrics_port: u16, path: &str, n: usize) {
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
async fn stop(mut proc: Proc) {
    let pid = proc.0.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = proc.0.wait();
        proc
    })
    .await;
}

/// Starts nginx in front of the HTTP echo server on `upstream`, if nginx is installed.
async fn start_nginx(dir: &std::path::Path, upstream: u16) -> Option<(Proc, u16)> {
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
    let proc = Proc(child);
    wait_port(port).await;
    Some((proc, port))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

// ---- Measurements ---------------------------------------------------------------------------

/// Calls per second and latency percentiles of a closed-loop run.
struct RpcResult {
    calls: u64,
    errors: u64,
    seconds: f64,
    hist: Histogram<u64>,
    /// CPU time (user + system) per call of each watched process, in microseconds.
    cpu: Vec<(&'static str, f64)>,
}

impl RpcResult {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.seconds
    }

    fn to_json(&self, clients: usize) -> Value {
        json!({
            "clients": clients,
            "seconds": round(self.seconds, 2),
            "calls": self.calls,
            "errors": self.errors,
            "calls_per_sec": round(self.rate(), 0),
            "p50_us": self.hist.value_at_quantile(0.50),
            "p99_us": self.hist.value_at_quantile(0.99),
            "p99.9_us": self.hist.value_at_quantile(0.999),
            "cpu_us_per_call": self
                .cpu
                .iter()
                .map(|(name, us)| (name.to_string(), json!(round(*us, 1))))
                .collect::<Map<String, Value>>(),
        })
    }
}

/// The processes whose CPU time a run measures: a name, a pid, and whether its child processes
/// count with it (nginx's workers with their master).
type Watched = [(&'static str, u32, bool)];

/// CPU time (user + system, all threads) of `pid` (and of its direct children if
/// `children`), in clock ticks.
fn cpu_ticks(pid: u32, children: bool) -> u64 {
    if !children {
        return std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat_ticks(&stat).map(|(_, ticks)| ticks))
            .unwrap_or(0);
    }
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(other) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{other}/stat")) else {
            continue;
        };
        if let Some((ppid, ticks)) = stat_ticks(&stat) {
            if other == pid || ppid == pid {
                total += ticks;
            }
        }
    }
    total
}

/// The parent pid and the CPU time (utime + stime, clock ticks) in a `/proc/<pid>/stat` line.
fn stat_ticks(stat: &str) -> Option<(u32, u64)> {
    // After the command name (in parentheses, which may hold spaces): state, ppid, ...
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let ppid = u32::try_from(field(1)?).ok()?;
    Some((ppid, field(11)? + field(12)?))
}

fn cpu_sample(watch: &Watched) -> Vec<u64> {
    watch
        .iter()
        .map(|(_, pid, children)| cpu_ticks(*pid, *children))
        .collect()
}

/// The CPU time per call of each watched process between two samples.
fn cpu_per_call(
    watch: &Watched,
    before: &[u64],
    after: &[u64],
    calls: u64,
) -> Vec<(&'static str, f64)> {
    // SAFETY: sysconf has no memory effects.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    watch
        .iter()
        .zip(before.iter().zip(after))
        .map(|((name, _, _), (b, a))| {
            let seconds = a.saturating_sub(*b) as f64 / ticks_per_sec;
            (*name, seconds * 1e6 / calls.max(1) as f64)
        })
        .collect()
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

/// The payload of every call: a JSON string of 100 bytes.
fn payload() -> Value {
    Value::String("x".repeat(98))
}

/// C clients, each calling in a loop for `seconds` (after a short warm-up that is not counted).
async fn closed_loop<F, Fut>(clients: usize, seconds: f64, make: F) -> RpcResult
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Box<dyn FnMut() -> CallFuture + Send>>,
{
    closed_loop_watched(clients, seconds, &[], make).await
}

/// [`closed_loop`], also measuring the CPU time per call of the `watch`ed processes (and of
/// this load generator) over the counted seconds.
async fn closed_loop_watched<F, Fut>(
    clients: usize,
    seconds: f64,
    watch: &Watched,
    make: F,
) -> RpcResult
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Box<dyn FnMut() -> CallFuture + Send>>,
{
    let watching: Vec<(&'static str, u32, bool)> = match watch {
        [] => Vec::new(),
        _ => std::iter::once(("load generator", std::process::id(), false))
            .chain(watch.iter().copied())
            .collect(),
    };
    let mut callers = Vec::with_capacity(clients);
    for i in 0..clients {
        callers.push(make(i).await);
    }
    let warmup = Duration::from_millis(500);
    let start = Instant::now() + warmup;
    let end = start + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|mut call| {
            tokio::spawn(async move {
                let mut hist = new_hist();
                let (mut calls, mut errors) = (0u64, 0u64);
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let ok = call().await;
                    if t0 >= start {
                        if ok {
                            calls += 1;
                            let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                        } else {
                            errors += 1;
                        }
                    }
                }
                (calls, errors, hist)
            })
        })
        .collect();
    tokio::time::sleep_until(start.into()).await;
    let before = cpu_sample(&watching);
    let mut total = RpcResult {
        calls: 0,
        errors: 0,
        seconds,
        hist: new_hist(),
        cpu: Vec::new(),
    };
    for t in tasks {
        let (calls, errors, hist) = t.await.expect("caller");
        total.calls += calls;
        total.errors += errors;
        let _ = total.hist.add(hist);
    }
    let after = cpu_sample(&watching);
    total.cpu = cpu_per_call(&watching, &before, &after, total.calls);
    total
}

impl RpcResult {
    /// Two runs of the same load as one.
    fn merge(self, other: RpcResult) -> RpcResult {
        let calls = self.calls + other.calls;
        let cpu = self
            .cpu
            .iter()
            .zip(&other.cpu)
            .map(|((name, a), (_, b))| {
                let weighted = a * self.calls as f64 + b * other.calls as f64;
                (*name, weighted / calls.max(1) as f64)
            })
            .collect();
        let mut hist = self.hist;
        let _ = hist.add(other.hist);
        RpcResult {
            calls,
            errors: self.errors + other.errors,
            seconds: self.seconds + other.seconds,
            hist,
            cpu,
        }
    }
}

/// One load of a comparison: runs for the seconds given.
type Load<'a> = Box<dyn FnMut(f64) -> Pin<Box<dyn Future<Output = RpcResult> + 'a>> + 'a>;

/// Runs loads side by side: each for half of `seconds` in turn, then each again in the reverse
/// order (A B B A), so a change in what the shared machine gives this run (its other tenants
/// come and go within seconds) weighs on each load alike. Each result is its two halves.
async fn side_by_side(seconds: f64, mut loads: Vec<Load<'_>>) -> Vec<RpcResult> {
    let half = seconds / 2.0;
    let mut first = Vec::with_capacity(loads.len());
    for load in loads.iter_mut() {
        first.push(load(half).await);
    }
    let mut second = Vec::with_capacity(loads.len());
    for load in loads.iter_mut().rev() {
        second.push(load(half).await);
    }
    second.reverse();
    first
        .into_iter()
        .zip(second)
        .map(|(a, b)| a.merge(b))
        .collect()
}

/// The [`Load`] of `clients` callers that `make` opens, with the CPU time per call of `watch`
/// (none if empty).
fn load<'a, F, Fut>(clients: usize, watch: &'a Watched, make: F) -> Load<'a>
where
    F: Fn(usize) -> Fut + Clone + 'a,
    Fut: Future<Output = Box<dyn FnMut() -> CallFuture + Send>> + 'a,
{
    Box::new(move |secs| Box::pin(closed_loop_watched(clients, secs, watch, make.clone())))
}

/// [`side_by_side`] for two loads.
async fn side_by_side_pair<'a>(seconds: f64, a: Load<'a>, b: Load<'a>) -> (RpcResult, RpcResult) {
    let mut results = side_by_side(seconds, vec![a, b]).await.into_iter();
    match (results.next(), results.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("one result per load"),
    }
}

/// A load while the gateway reloads every 100 ms, side by side with the same load without
/// reloads: (with reloads, without, how many reloads were sent).
async fn reload_side_by_side<F, Fut>(
    g: &OurGateway,
    clients: usize,
    seconds: f64,
    make: F,
) -> (RpcResult, RpcResult, u64)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn FnMut() -> CallFuture + Send>>,
{
    let reloads = std::cell::Cell::new(0u64);
    let (make, counted) = (&make, &reloads);
    let (with, without) = side_by_side_pair(
        seconds,
        Box::new(|secs| {
            let load = closed_loop(clients, secs, make);
            Box::pin(async move {
                let (result, n) = with_reloads(g, load).await;
                counted.set(counted.get() + n);
                result
            })
        }),
        load(clients, &[], make),
    )
    .await;
    (with, without, reloads.get())
}

type CallFuture = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// Closes a peer when dropped (a `Peer` otherwise keeps its connection open).
struct ClosedOnDrop(Peer);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A WebSocket Duplex client calling `echo`; its connection closes when the load ends.
async fn ws_caller(url: String) -> Box<dyn FnMut() -> CallFuture + Send> {
    let peer = ClosedOnDrop(Peer::builder().connect(&url).await.expect("connect"));
    let payload = payload();
    Box::new(move || {
        let peer = peer.0.clone();
        let payload = payload.clone();
        Box::pin(async move { peer.call("echo", payload.clone()).await.as_ref() == Ok(&payload) })
    })
}

/// A keep-alive HTTP/1.1 connection POSTing the payload to `path` on 127.0.0.1:`port`.
async fn http_caller(port: u16, path: String) -> Box<dyn FnMut() -> CallFuture + Send> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let body = Bytes::from(payload().to_string());
    Box::new(move || {
        let sender = sender.clone();
        let body = body.clone();
        let path = path.clone();
        Box::pin(async move {
            let req = hyper::Request::post(path)
                .header("host", "127.0.0.1")
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))
                .expect("request");
            let mut sender = sender.lock().await;
            let Ok(resp) = sender.send_request(req).await else {
                return false;
            };
            let ok = resp.status() == 200;
            match resp.into_body().collect().await {
                Ok(got) => ok && got.to_bytes() == body,
                Err(_) => false,
            }
        })
    })
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

async fn stream_scenario(client_url: &str, frames: u64) -> Value {
    let peer = Peer::builder().connect(client_url).await.expect("connect");
    let start = Instant::now();
    let mut replies = peer.call_stream("count", json!(frames)).expect("call");
    let mut got = 0u64;
    while let Some(item) = replies.next().await {
        if item.is_err() {
            break;
        }
        got += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    json!({
        "frames": got,
        "seconds": round(secs, 3),
        "frames_per_sec": round(got as f64 / secs, 0),
    })
}

async fn idle_scenario(client_url: &str, n: usize, gateway_pid: Option<u32>) -> Value {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = gateway_pid.and_then(rss_kib);
    let mut peers = Vec::with_capacity(n);
    let start = Instant::now();
    for chunk in 0..n.div_ceil(200) {
        let batch =
            (chunk * 200..((chunk + 1) * 200).min(n)).map(|_| Peer::builder().connect(client_url));
        for p in futures_util::future::join_all(batch).await {
            peers.push(p.expect("idle client connects"));
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = gateway_pid.and_then(rss_kib);
    let calls = peers.iter().enumerate().map(|(i, p)| {
        let p = p.clone();
        async move { p.call("echo", json!(i)).await == Ok(json!(i)) }
    });
    let answered = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
    let mut out = Map::new();
    out.insert("clients".into(), json!(n));
    out.insert("answered".into(), json!(answered));
    out.insert("connect_seconds".into(), json!(round(connect_secs, 2)));
    if let (Some(b), Some(a)) = (before, after) {
        out.insert("rss_before_kib".into(), json!(b));
        out.insert("rss_after_kib".into(), json!(a));
        out.insert(
            "bytes_per_client".into(),
            json!(((a.saturating_sub(b)) * 1024) / n.max(1) as u64),
        );
    }
    drop(peers);
    Value::Object(out)
}

/// `pool_rpc`: the WebSocket load of `ws_rpc` on an endpoint served by a pool of backends, each a
/// process of its own. `rolling_deploy`: half WebSocket, half HTTP load on that pool while each
/// backend in turn drains, exits and is replaced. Returns both, and the deploy's throughput
/// against `pool_rpc`'s.
async fn pool_scenarios(
    o: &Options,
    base: &str,
    gw_port: u16,
    metrics: u16,
) -> (RpcResult, RpcResult, f64) {
    let publish_url = format!("{base}{POOL}?token={}&secret={SECRET}", o.token);
    let mut backends = Vec::new();
    for n in 1..=POOL_SIZE {
        backends.push(spawn_role("pool-backend", &publish_url));
        wait_pool(metrics, POOL, n).await;
    }
    let client_url = format!("{base}{POOL}?secret={SECRET}");
    let pool_rpc = closed_loop(o.clients, o.seconds, |_| ws_caller(client_url.clone())).await;
    print_rpc("pool_rpc", &pool_rpc);

    // The deploy: one backend every seconds / (size + 1), the load running throughout.
    let seconds = o.seconds;
    let step = Duration::from_secs_f64(seconds / (POOL_SIZE as f64 + 1.0));
    let deploy = tokio::spawn({
        let publish_url = publish_url.clone();
        async move {
            // Past the warm-up of the closed loop.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut backends = backends;
            for _ in 0..POOL_SIZE {
                tokio::time::sleep(step).await;
                let old = backends.remove(0);
                stop(old).await;
                backends.push(spawn_role("pool-backend", &publish_url));
                wait_pool(metrics, POOL, POOL_SIZE).await;
            }
            backends
        }
    });
    let call_path = format!("{POOL}/echo?secret={SECRET}");
    let half = (o.clients / 2).max(1);
    let rolling = closed_loop(o.clients, seconds, |i| {
        let (client_url, call_path) = (client_url.clone(), call_path.clone());
        async move {
            if i < half {
                ws_caller(client_url).await
            } else {
                http_caller(gw_port, call_path).await
            }
        }
    })
    .await;
    let backends = deploy.await.expect("deploy");
    drop(backends);
    let dip = rolling.rate() / pool_rpc.rate();
    println!(
        "rolling_deploy {:>10.0} calls/s   failed calls {}   throughput {:.2} x pool_rpc",
        rolling.rate(),
        rolling.errors,
        dip
    );
    (pool_rpc, rolling, dip)
}

/// Waits (20 s at most, else fails with `what`) until a client of `client_url` gets an echo.
async fn wait_for_echo(client_url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(p) = Peer::builder().connect(client_url).await {
            if p.call("echo", json!(1)).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The nats-server binary, if installed.
fn nats_server() -> Option<&'static str> {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

/// What the cluster scenarios measure: `cluster_ws_rpc` and `cluster_http_rpc`, the one-node
/// loads run side by side with them, and one client's sequential calls through the cluster.
struct ClusterResults {
    ws: RpcResult,
    http: RpcResult,
    one_node_ws: RpcResult,
    one_node_http: RpcResult,
    latency_ws: RpcResult,
    latency_http: RpcResult,
    /// `cluster_ws_rpc_signed`: the same load through a second pair of nodes that sign every
    /// message (`cluster.key`), side by side with the unsigned pair.
    signed_ws: RpcResult,
    unsigned_ws: RpcResult,
}

/// `cluster_ws_rpc`, `cluster_http_rpc`: the `ws_rpc` and `http_rpc` loads with the clients on
/// node A and the echo backend on node B, joined by a real nats-server, each side by side with
/// the same load on one node (`one_node`: the single gateway's client URL and port); then one
/// client's sequential calls the same way (for the latency the cluster adds). None without
/// nats-server.
async fn cluster_scenarios(
    o: &Options,
    dir: &std::path::Path,
    one_node: (&str, u16),
) -> Option<ClusterResults> {
    let Some(nats) = nats_server() else {
        println!("cluster_*      skipped: nats-server is not installed");
        return None;
    };
    let nats_port = free_port();
    let _nats = Proc(
        Command::new(nats)
            .args(["-a", "127.0.0.1", "-p", &nats_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server"),
    );
    wait_port(nats_port).await;
    let node = |name: &str| {
        format!(
            "  max_message_bytes: 1000000\ncluster:\n  nats: [nats://127.0.0.1:{nats_port}]\n  node: {name}\n"
        )
    };
    let a = start_gateway_with(dir, "node-a.yaml", &node("a")).await;
    let b = start_gateway_with(dir, "node-b.yaml", &node("b")).await;
    let _backend = spawn_role(
        "echo-backend",
        &format!("{}{ENDPOINT}?token={}&secret={SECRET}", b.url, o.token),
    );
    let client_url = format!("{}{ENDPOINT}?secret={SECRET}", a.url);
    wait_for_echo(&client_url, "node A never reached the backend on node B").await;
    let a_port: u16 = a
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let call_path = format!("{ENDPOINT}/echo?secret={SECRET}");
    let (one_url, one_port) = one_node;
    let clients = o.clients;
    let (ws, one_node_ws) = side_by_side_pair(
        o.seconds,
        load(clients, &[], |_| ws_caller(client_url.clone())),
        load(clients, &[], |_| ws_caller(one_url.to_string())),
    )
    .await;
    print_rpc("cluster_ws_rpc", &ws);
    print_rpc("ws, one node", &one_node_ws);
    let (http, one_node_http) = side_by_side_pair(
        o.seconds,
        load(clients, &[], |_| http_caller(a_port, call_path.clone())),
        load(clients, &[], |_| http_caller(one_port, call_path.clone())),
    )
    .await;
    print_rpc("cluster_http_rpc", &http);
    print_rpc("http, one node", &one_node_http);
    // The cost of signing: a second pair of nodes, on their own subjects, with a cluster key.
    let signed_node = |name: &str| {
        format!(
            "  max_message_bytes: 1000000\ncluster:\n  nats: [nats://127.0.0.1:{nats_port}]\n  node: {name}\n  subject_prefix: signed\n  key: bench-cluster-key-0123456789abcdef0123\n"
        )
    };
    let c = start_gateway_with(dir, "node-c.yaml", &signed_node("c")).await;
    let d = start_gateway_with(dir, "node-d.yaml", &signed_node("d")).await;
    let _signed_backend = spawn_role(
        "echo-backend",
        &format!("{}{ENDPOINT}?token={}&secret={SECRET}", d.url, o.token),
    );
    let signed_url = format!("{}{ENDPOINT}?secret={SECRET}", c.url);
    wait_for_echo(&signed_url, "node C never reached the backend on node D").await;
    let (signed_ws, unsigned_ws) = side_by_side_pair(
        o.seconds,
        load(clients, &[], |_| ws_caller(signed_url.clone())),
        load(clients, &[], |_| ws_caller(client_url.clone())),
    )
    .await;
    print_rpc("cluster_ws_rpc_signed", &signed_ws);
    print_rpc("ws, unsigned", &unsigned_ws);
    let short = o.seconds.min(5.0);
    let latency_ws = closed_loop(1, short, |_| ws_caller(client_url.clone())).await;
    let latency_http = closed_loop(1, short, |_| http_caller(a_port, call_path.clone())).await;
    Some(ClusterResults {
        ws,
        http,
        one_node_ws,
        one_node_http,
        latency_ws,
        latency_http,
        signed_ws,
        unsigned_ws,
    })
}

/// A client that, on every call, connects (handshake included), calls `echo` once and closes.
async fn connect_caller(url: String) -> Box<dyn FnMut() -> CallFuture + Send> {
    let payload = payload();
    Box::new(move || {
        let (url, payload) = (url.clone(), payload.clone());
        Box::pin(async move {
            let Ok(peer) = Peer::builder().connect(&url).await else {
                return false;
            };
            let ok = peer.call("echo", payload.clone()).await.as_ref() == Ok(&payload);
            peer.close();
            ok
        })
    })
}

/// Runs `load` while the gateway gets SIGHUP every 100 ms, its config alternating between two
/// valid versions (a limit that differs, so each reload really swaps something).
async fn with_reloads(
    g: &OurGateway,
    load: impl std::future::Future<Output = RpcResult>,
) -> (RpcResult, u64) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloader = tokio::spawn({
        let (stop, config, text, pid) = (stop.clone(), g.config.clone(), g.text.clone(), g.pid);
        async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let ping = if n.is_multiple_of(2) { "30s" } else { "31s" };
                let _ = std::fs::write(&config, format!("{text}  ping_interval: {ping}\n"));
                // A signal, not a `kill` process: forking this busy process would cost the
                // load generator more than the reload costs the gateway.
                // SAFETY: kill(2) with a pid of our own child and a valid signal number.
                let _ = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        }
    });
    let result = load.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reloads = reloader.await.unwrap_or(0);
    let _ = std::fs::write(&g.config, &g.text);
    (result, reloads)
}

// ---- abuse ----------------------------------------------------------------------------------

/// The address the attacker connects from.
const ATTACKER: [u8; 4] = [127, 0, 0, 2];

/// A TCP connection to 127.0.0.1:`port` from the attacker's address.
async fn attacker_connect(port: u16) -> Option<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket
        .bind(std::net::SocketAddr::from((ATTACKER, 0)))
        .ok()?;
    socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .ok()
}

/// Reads until the peer closes (or 30 s pass).
async fn hold(mut stream: impl tokio::io::AsyncRead + Unpin) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The attacker: from 127.0.0.2, as fast as it can, silent TCP connections on the TLS port,
/// TLS connections that ask for h2 and say nothing, HTTP headers trickled a byte at a time,
/// and secrets guessed on new connections.
async fn attack(arg: &str) {
    let mut parts = arg.split(' ');
    let tls_port = port(parts.next().unwrap_or_default());
    let plain_port = port(parts.next().unwrap_or_default());
    let ca = parts.next().unwrap_or_default().to_string();
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(pem) = std::fs::read(&ca) {
        for cert in rustls_pemfile_certs(&pem) {
            let _ = roots.add(cert);
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        tasks.push(tokio::spawn(async move {
            loop {
                match attacker_connect(tls_port).await {
                    Some(tcp) => hold(tcp).await,
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }));
    }
    for _ in 0..50 {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(tcp) = attacker_connect(tls_port).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                if let Ok(stream) = tls.connect(name, tcp).await {
                    hold(stream).await;
                }
            }
        }));
    }
    for _ in 0..50 {
        tasks.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            loop {
                let Some(mut tcp) = attacker_connect(plain_port).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                for byte in b"POST /bench/echo HTTP/1.1\r\nHost: x\r\nX-Slow: "
                    .iter()
                    .cycle()
                {
                    if tcp.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }));
    }
    for i in 0..50u64 {
        tasks.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut n = i << 32;
            loop {
                n += 1;
                let Some(mut tcp) = attacker_connect(plain_port).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let request = format!(
                    "POST {ENDPOINT}/echo?secret=guess-{n} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1"
                );
                if tcp.write_all(request.as_bytes()).await.is_ok() {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// The certificates of a PEM file.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// How many descriptors a process has open.
fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// `abuse`: the `ws_rpc` load from 127.0.0.1 (its 64 clients share that one address, so the
/// per-address rate is set far above what they make), side by side without and with an attacker
/// process on 127.0.0.2 (silent TLS and h2 connections, trickled headers, guessed secrets, as
/// fast as it can), against a gateway with the abuse controls on: the throughput kept, the
/// gateway's open descriptors at their highest under attack against the bound
/// (`max_connections_per_ip` + those of the run without attack), and its memory.
async fn abuse_scenario(o: &Options, dir: &std::path::Path) -> Value {
    const MAX_CONNECTIONS_PER_IP: usize = 256;
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate");
    let (cert, key) = (dir.join("abuse.pem"), dir.join("abuse.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("key");
    let tls_port = free_port();
    let g = start_gateway_listening(
        dir,
        "abuse.yaml",
        &format!(
            "  max_connections_per_ip: {MAX_CONNECTIONS_PER_IP}\n  requests_per_ip_per_second: 100000\n  auth_failures_per_ip_per_minute: 30\n  request_header_timeout: 2s\n"
        ),
        &format!(
            "  - address: 127.0.0.1:{tls_port}\n    tls: {{ cert: {}, key: {} }}\n",
            cert.display(),
            key.display()
        ),
        false,
    )
    .await;
    wait_port(tls_port).await;
    let (pid, url) = (g.pid, g.url.clone());
    let plain_port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let _backend = spawn_role(
        "echo-backend",
        &format!("{url}{ENDPOINT}?token={}&secret={SECRET}", o.token),
    );
    let client_url = format!("{url}{ENDPOINT}?secret={SECRET}");
    wait_for_echo(&client_url, "the abuse gateway never reached its backend").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid).unwrap_or(0);
    let fds_before = open_fds(pid).unwrap_or(0);
    let highest = Arc::new(std::sync::Mutex::new((0usize, 0u64)));
    let attack_arg = format!("{tls_port} {plain_port} {}", cert.display());
    let clients = o.clients;
    let (calm, attacked) = side_by_side_pair(
        o.seconds,
        load(clients, &[], |_| ws_caller(client_url.clone())),
        Box::new(|secs: f64| {
            let attack_arg = attack_arg.clone();
            let client_url = client_url.clone();
            let highest = highest.clone();
            Box::pin(async move {
                let attacker = spawn_role("attacker", &attack_arg);
                let sampling = tokio::spawn(async move {
                    loop {
                        let fds = open_fds(pid).unwrap_or(0);
                        let rss = rss_kib(pid).unwrap_or(0);
                        if let Ok(mut h) = highest.lock() {
                            h.0 = h.0.max(fds);
                            h.1 = h.1.max(rss);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
                let result = closed_loop(clients, secs, |_| ws_caller(client_url.clone())).await;
                sampling.abort();
                drop(attacker);
                // The attacker's connections go before the next load.
                tokio::time::sleep(Duration::from_millis(500)).await;
                result
            })
        }),
    )
    .await;
    print_rpc("abuse, calm", &calm);
    print_rpc("abuse, attacked", &attacked);
    let (max_fds, max_rss) = highest.lock().map(|h| *h).unwrap_or_default();
    let report = json!({
        "calm": calm.to_json(clients),
        "attacked": attacked.to_json(clients),
        "throughput_ratio": round(attacked.rate() / calm.rate(), 3),
        "fds_before": fds_before,
        "max_fds_attacked": max_fds,
        "fds_bound": MAX_CONNECTIONS_PER_IP + fds_before,
        "rss_kib_before": rss_before,
        "max_rss_kib_attacked": max_rss,
        "rss_ratio": round(max_rss as f64 / rss_before.max(1) as f64, 3),
    });
    println!(
        "abuse          throughput {} of calm, descriptors {} (bound {}), RSS {}x",
        report["throughput_ratio"], max_fds, report["fds_bound"], report["rss_ratio"]
    );
    report
}

fn print_rpc(name: &str, r: &RpcResult) {
    println!(
        "{name:<14} {:>10.0} calls/s   p50 {:>6} us   p99 {:>6} us   p99.9 {:>6} us   errors {}",
        r.rate(),
        r.hist.value_at_quantile(0.5),
        r.hist.value_at_quantile(0.99),
        r.hist.value_at_quantile(0.999),
        r.errors
    );
    if !r.cpu.is_empty() {
        let each: Vec<String> = r
            .cpu
            .iter()
            .map(|(name, us)| format!("{name} {us:.1}"))
            .collect();
        println!("{:<14} cpu us per call: {}", "", each.join(", "));
    }
}

async fn bench(o: Options) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut report = Map::new();
    let started = Instant::now();
    println!(
        "duplex-gateway load: {} clients, {} s per scenario, {} idle, {} stream frames",
        o.clients, o.seconds, o.idle, o.stream_frames
    );

    // The gateway: ours, or the one given with --url.
    let ours = match &o.url {
        Some(_) => None,
        None => Some(start_gateway(dir.path()).await),
    };
    let base = match (&o.url, &ours) {
        (Some(url), _) => url.clone(),
        (None, Some(g)) => g.url.clone(),
        (None, None) => unreachable!("one of the two"),
    };
    let gateway_pid = ours.as_ref().map(|g| g.pid);
    let metrics_port = ours.as_ref().map(|g| g.metrics);
    let http_base = base.replacen("ws://", "http://", 1);
    let gw_port: u16 = http_base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("gateway URL with a port");
    let backend = spawn_role(
        "echo-backend",
        &format!("{base}{ENDPOINT}?token={}&secret={SECRET}", o.token),
    );
    let client_url = format!("{base}{ENDPOINT}?secret={SECRET}");
    wait_for_echo(&client_url, "the echo backend did not publish").await;
    // Where the CPU time of a call through the gateway goes.
    let through_gateway: Vec<(&str, u32, bool)> = gateway_pid
        .map(|pid| ("gateway", pid, false))
        .into_iter()
        .chain([("echo backend", backend.0.id(), false)])
        .collect();

    // The direct servers, and nginx: up from the start, so each comparison runs side by side.
    let ws_port = free_port();
    let ws_server = spawn_role("ws-server", &ws_port.to_string());
    let http_port = free_port();
    let http_server = spawn_role("http-server", &http_port.to_string());
    let floor_port = free_port();
    let floor_server = spawn_role("pingora-floor", &floor_port.to_string());
    wait_port(ws_port).await;
    wait_port(http_port).await;
    wait_port(floor_port).await;
    let nginx_proc = start_nginx(dir.path(), http_port).await;
    let direct_url = format!("ws://127.0.0.1:{ws_port}/");
    let call_path = format!("{ENDPOINT}/echo?secret={SECRET}");
    let clients = o.clients;

    // ws_rpc / ws_rpc_direct
    let direct_server = [("direct server", ws_server.0.id(), false)];
    let (ws_rpc, ws_direct) = side_by_side_pair(
        o.seconds,
        load(clients, &through_gateway, |_| ws_caller(client_url.clone())),
        load(clients, &direct_server, |_| ws_caller(direct_url.clone())),
    )
    .await;
    print_rpc("ws_rpc", &ws_rpc);
    print_rpc("ws_rpc_direct", &ws_direct);

    // http_rpc / http_direct / http_floor / http_nginx
    let hyper = ("hyper server", http_server.0.id(), false);
    let hyper_only = [hyper];
    let floor_only = [("pingora floor", floor_server.0.id(), false)];
    let nginx_watch = nginx_proc
        .as_ref()
        .map(|(proc, _)| [("nginx", proc.0.id(), true), hyper]);
    let mut http_loads: Vec<Load> = vec![
        load(clients, &through_gateway, |_| {
            http_caller(gw_port, call_path.clone())
        }),
        load(clients, &hyper_only, move |_| {
            http_caller(http_port, "/echo".to_string())
        }),
        load(clients, &floor_only, move |_| {
            http_caller(floor_port, "/echo".to_string())
        }),
    ];
    if let (Some((_, nginx_port)), Some(watch)) = (&nginx_proc, &nginx_watch) {
        let nginx_port = *nginx_port;
        http_loads.push(load(clients, watch, move |_| {
            http_caller(nginx_port, "/echo".to_string())
        }));
    }
    let mut http_results = side_by_side(o.seconds, http_loads).await.into_iter();
    let (Some(http_rpc), Some(http_direct), Some(http_floor)) = (
        http_results.next(),
        http_results.next(),
        http_results.next(),
    ) else {
        unreachable!("three loads at least")
    };
    let nginx = http_results.next();
    print_rpc("http_rpc", &http_rpc);
    print_rpc("http_direct", &http_direct);
    print_rpc("http_floor", &http_floor);
    match &nginx {
        Some(r) => print_rpc("http_nginx", r),
        None => println!("http_nginx     skipped: nginx is not installed"),
    }
    drop(nginx_proc);
    drop(floor_server);

    // latency: one client, sequential calls; the p50 the gateway adds over direct.
    let short = o.seconds.min(5.0);
    let lat_ws = closed_loop(1, short, |_| ws_caller(client_url.clone())).await;
    let lat_ws_direct = closed_loop(1, short, |_| ws_caller(direct_url.clone())).await;
    let lat_http = closed_loop(1, short, |_| http_caller(gw_port, call_path.clone())).await;
    let lat_http_direct =
        closed_loop(1, short, |_| http_caller(http_port, "/echo".to_string())).await;
    let p50 = |r: &RpcResult| r.hist.value_at_quantile(0.5) as i64;
    let p99 = |r: &RpcResult| r.hist.value_at_quantile(0.99) as i64;
    let latency = json!({
        "ws_p50_us": p50(&lat_ws),
        "ws_direct_p50_us": p50(&lat_ws_direct),
        "ws_added_p50_us": p50(&lat_ws) - p50(&lat_ws_direct),
        "http_p50_us": p50(&lat_http),
        "http_direct_p50_us": p50(&lat_http_direct),
        "http_added_p50_us": p50(&lat_http) - p50(&lat_http_direct),
    });
    println!("latency        {latency}");

    // connect: new WebSocket clients per second (connect, handshake, one call, close).
    let connecting = o.clients.min(16);
    let (connect, connect_direct) = side_by_side_pair(
        short,
        load(connecting, &[], |_| connect_caller(client_url.clone())),
        load(connecting, &[], |_| connect_caller(direct_url.clone())),
    )
    .await;
    print_rpc("connect", &connect);
    print_rpc("connect_direct", &connect_direct);
    drop(ws_server);
    drop(http_server);

    // reload: the ws_rpc and http_rpc loads while the gateway reloads every 100 ms.
    // Each against the same load without reloads, side by side.
    let reload = match &ours {
        Some(g) => {
            let (ws, ws_quiet, n) =
                reload_side_by_side(g, clients, o.seconds, |_| ws_caller(client_url.clone())).await;
            println!("               ({n} reloads during the load)");
            print_rpc("reload ws", &ws);
            print_rpc("ws, no reload", &ws_quiet);
            let (http, http_quiet, n) = reload_side_by_side(g, clients, o.seconds, |_| {
                http_caller(gw_port, call_path.clone())
            })
            .await;
            println!("               ({n} reloads during the load)");
            print_rpc("reload http", &http);
            print_rpc("http, no reload", &http_quiet);
            Some((ws, ws_quiet, http, http_quiet))
        }
        None => None,
    };

    // stream, idle
    let stream = stream_scenario(&client_url, o.stream_frames).await;
    println!("stream         {} frames/s", stream["frames_per_sec"]);
    let idle = idle_scenario(&client_url, o.idle, gateway_pid).await;
    println!(
        "idle           {} clients, {} answered, {} bytes of gateway RSS per client",
        idle["clients"],
        idle["answered"],
        idle.get("bytes_per_client").cloned().unwrap_or(Value::Null)
    );

    // pool_rpc, rolling_deploy: only on our gateway (the pool's size is in its config).
    let pools = match metrics_port {
        Some(metrics) => Some(pool_scenarios(&o, &base, gw_port, metrics).await),
        None => {
            println!("pool_rpc       skipped: needs the gateway this tool starts");
            None
        }
    };

    // abuse: only with gateways this tool starts.
    let abuse = match &ours {
        Some(_) => Some(abuse_scenario(&o, dir.path()).await),
        None => None,
    };

    // cluster_ws_rpc, cluster_http_rpc: only with gateways this tool starts.
    let cluster = match &ours {
        Some(_) => cluster_scenarios(&o, dir.path(), (&client_url, gw_port)).await,
        None => None,
    };
    let cluster_latency = cluster.as_ref().map(|c| {
        let (lw, lh) = (&c.latency_ws, &c.latency_http);
        json!({
            "ws_p50_us": p50(lw),
            "ws_added_p50_us": p50(lw) - p50(&lat_ws),
            "ws_added_p99_us": p99(lw) - p99(&lat_ws),
            "http_p50_us": p50(lh),
            "http_added_p50_us": p50(lh) - p50(&lat_http),
            "http_added_p99_us": p99(lh) - p99(&lat_http),
        })
    });
    if let Some(l) = &cluster_latency {
        println!("cluster latency {l}");
    }

    let mut ratios = Map::new();
    ratios.insert(
        "ws_rpc / ws_rpc_direct".into(),
        json!(round(ws_rpc.rate() / ws_direct.rate(), 3)),
    );
    ratios.insert(
        "ws_rpc p99 / direct p99".into(),
        json!(round(
            ws_rpc.hist.value_at_quantile(0.99) as f64
                / ws_direct.hist.value_at_quantile(0.99).max(1) as f64,
            3
        )),
    );
    ratios.insert(
        "http_rpc / http_direct".into(),
        json!(round(http_rpc.rate() / http_direct.rate(), 3)),
    );
    ratios.insert(
        "http_rpc / http_floor".into(),
        json!(round(http_rpc.rate() / http_floor.rate(), 3)),
    );
    if let Some(n) = &nginx {
        ratios.insert(
            "http_rpc / http_nginx".into(),
            json!(round(http_rpc.rate() / n.rate(), 3)),
        );
        ratios.insert(
            "http_floor / http_nginx".into(),
            json!(round(http_floor.rate() / n.rate(), 3)),
        );
    }
    ratios.insert(
        "connect / connect_direct".into(),
        json!(round(connect.rate() / connect_direct.rate(), 3)),
    );
    if let Some((ws, ws_quiet, http, http_quiet)) = &reload {
        ratios.insert(
            "reload ws / no reload".into(),
            json!(round(ws.rate() / ws_quiet.rate(), 3)),
        );
        ratios.insert(
            "reload http / no reload".into(),
            json!(round(http.rate() / http_quiet.rate(), 3)),
        );
    }
    if let Some((pool_rpc, _, _)) = &pools {
        ratios.insert(
            "pool_rpc / ws_rpc".into(),
            json!(round(pool_rpc.rate() / ws_rpc.rate(), 3)),
        );
    }
    if let Some(c) = &cluster {
        // Against the same load on one node, run beside it.
        ratios.insert(
            "cluster_ws_rpc / one node".into(),
            json!(round(c.ws.rate() / c.one_node_ws.rate(), 3)),
        );
        ratios.insert(
            "cluster_http_rpc / one node".into(),
            json!(round(c.http.rate() / c.one_node_http.rate(), 3)),
        );
        ratios.insert(
            "cluster_ws_rpc signed / unsigned".into(),
            json!(round(c.signed_ws.rate() / c.unsigned_ws.rate(), 3)),
        );
    }
    if let Some(a) = &abuse {
        ratios.insert(
            "abuse attacked / calm".into(),
            a["throughput_ratio"].clone(),
        );
    }
    println!("ratios         {}", Value::Object(ratios.clone()));

    report.insert("ws_rpc".into(), ws_rpc.to_json(o.clients));
    report.insert("ws_rpc_direct".into(), ws_direct.to_json(o.clients));
    report.insert("http_rpc".into(), http_rpc.to_json(o.clients));
    report.insert("http_direct".into(), http_direct.to_json(o.clients));
    report.insert("http_floor".into(), http_floor.to_json(o.clients));
    report.insert(
        "http_nginx".into(),
        nginx.as_ref().map_or(Value::Null, |n| n.to_json(o.clients)),
    );
    if let Some((pool_rpc, rolling, dip)) = &pools {
        report.insert("pool_rpc".into(), pool_rpc.to_json(o.clients));
        let mut rolling_json = rolling.to_json(o.clients);
        rolling_json["failed_calls"] = json!(rolling.errors);
        rolling_json["throughput_vs_pool_rpc"] = json!(round(*dip, 3));
        report.insert("rolling_deploy".into(), rolling_json);
    }
    report.insert("latency".into(), latency);
    if let Some(c) = &cluster {
        report.insert("cluster_ws_rpc".into(), c.ws.to_json(o.clients));
        report.insert("cluster_http_rpc".into(), c.http.to_json(o.clients));
        report.insert(
            "cluster_one_node_ws".into(),
            c.one_node_ws.to_json(o.clients),
        );
        report.insert(
            "cluster_one_node_http".into(),
            c.one_node_http.to_json(o.clients),
        );
        report.insert(
            "cluster_ws_rpc_signed".into(),
            c.signed_ws.to_json(o.clients),
        );
        report.insert(
            "cluster_ws_rpc_unsigned".into(),
            c.unsigned_ws.to_json(o.clients),
        );
    }
    if let Some(l) = cluster_latency {
        report.insert("cluster_latency".into(), l);
    }
    if let Some(a) = abuse {
        report.insert("abuse".into(), a);
    }
    report.insert("connect".into(), connect.to_json(connecting));
    report.insert("connect_direct".into(), connect_direct.to_json(connecting));
    if let Some((ws, ws_quiet, http, http_quiet)) = &reload {
        let mut both = Map::new();
        both.insert("ws".into(), ws.to_json(o.clients));
        both.insert("ws_no_reload".into(), ws_quiet.to_json(o.clients));
        both.insert("http".into(), http.to_json(o.clients));
        both.insert("http_no_reload".into(), http_quiet.to_json(o.clients));
        both.insert("failed_calls".into(), json!(ws.errors + http.errors));
        report.insert("reload".into(), Value::Object(both));
    }
    report.insert("stream".into(), stream);
    report.insert("idle".into(), idle);
    report.insert("ratios".into(), Value::Object(ratios));
    report.insert(
        "machine".into(),
        json!({
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "target": if o.url.is_some() { "external gateway" } else { "duplex-gateway (release)" },
        }),
    );
    report.insert(
        "total_seconds".into(),
        json!(round(started.elapsed().as_secs_f64(), 1)),
    );
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&Value::Object(report)).expect("json");
        std::fs::write(path, text).expect("write --json file");
        println!("wrote {path}");
    }
}
