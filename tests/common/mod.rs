//! Test harness: starts the real `duplex-gateway` binary on free loopback ports with a config
//! written for the test, and talks to it over real sockets.
#![allow(dead_code)]

pub mod jwt;
pub mod nats;
pub mod process;

pub use process::{free_port, gateway_binary, Process};

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use duplex::{Call, Peer, PeerBuilder, RpcError};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A token that may publish everything.
pub const TOKEN: &str = "main-token-0123456789";
/// A token that may publish `/team/*` only.
pub const TEAM_TOKEN: &str = "team-token-0123456789";
/// How long a test waits for anything before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// An example program of the workspace, built (as `cargo run --example` would) in the test
/// profile's directory.
pub fn example_binary(package: &str, name: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let status = Command::new(cargo)
        .args(["build", "-p", package, "--example", name, "--manifest-path"])
        .arg(&manifest)
        .status()
        .expect("cargo build");
    assert!(status.success());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("debug/examples").join(name)
}

/// The tests' log level: `GATEWAY_LOG`, else info with the gateway's own debug lines.
fn log_level() -> String {
    std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "info,duplex_gateway=debug".into())
}

/// Runs the gateway binary on `config`, logging at `level` to `log`.
fn spawn_gateway(config: &std::path::Path, log: std::fs::File, level: &str) -> std::process::Child {
    Command::new(gateway_binary())
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start duplex-gateway")
}

/// A running gateway process.
pub struct Gateway {
    child: Process,
    /// The gateway listener's port.
    pub port: u16,
    /// The metrics listener's port.
    pub metrics_port: u16,
    /// The config file (rewrite it and `reload()`).
    pub config_path: PathBuf,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// The standard config plus `extra` YAML sections (e.g. `limits:` or `endpoints:`).
    pub fn config_text(port: u16, metrics_port: u16, extra: &str) -> String {
        format!(
            "listen:\n  - address: 127.0.0.1:{port}\nmetrics:\n  address: 127.0.0.1:{metrics_port}\n\
             tokens:\n  - name: main\n    token: {TOKEN}\n    endpoints: [\"/*\"]\n\
             \x20 - name: team\n    token: {TEAM_TOKEN}\n    endpoints: [\"/team/*\"]\n{extra}\n"
        )
    }

    /// Starts a gateway on the standard config plus `extra`.
    pub fn start(extra: &str) -> Gateway {
        Gateway::start_with(|port, metrics_port| Gateway::config_text(port, metrics_port, extra))
    }

    /// Starts a gateway on the config `make(port, metrics_port)` returns. A port another test
    /// process took in the meantime makes the gateway fail to start: it is tried again on others.
    pub fn start_with(make: impl Fn(u16, u16) -> String) -> Gateway {
        Gateway::start_logging(&log_level(), make)
    }

    /// Starts a gateway like [`Gateway::start_with`], logging at `level` (a `RUST_LOG` value).
    pub fn start_logging(level: &str, make: impl Fn(u16, u16) -> String) -> Gateway {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Gateway::try_start(level, &make) {
                Ok(gw) => return gw,
                Err(log) if attempt < 5 => eprintln!("gateway did not start, retrying: {log}"),
                Err(log) => panic!("gateway did not start:\n{log}"),
            }
        }
    }

    fn try_start(level: &str, make: &impl Fn(u16, u16) -> String) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let metrics_port = free_port();
        let config_path = dir.path().join("gateway.yaml");
        std::fs::write(&config_path, make(port, metrics_port)).expect("write config");
        let log_path = dir.path().join("gateway.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = spawn_gateway(&config_path, log, level);
        let mut gw = Gateway {
            child: Process::new(child),
            port,
            metrics_port,
            config_path,
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let up = [port, metrics_port]
                .iter()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok());
            if up {
                return Ok(gw);
            }
            if let Ok(Some(_)) = gw.child.child().try_wait() {
                return Err(gw.log());
            }
            if Instant::now() > deadline {
                return Err(format!("not listening after {WAIT:?}: {}", gw.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `port` accepts connections.
    pub fn wait_for_port(&self, port: u16) {
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "gateway did not listen on {port}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ws://127.0.0.1:PORT{path_and_query}`.
    pub fn ws(&self, path_and_query: &str) -> String {
        format!("ws://127.0.0.1:{}{path_and_query}", self.port)
    }

    /// `http://127.0.0.1:PORT{path_and_query}`.
    pub fn http(&self, path_and_query: &str) -> String {
        format!("http://127.0.0.1:{}{path_and_query}", self.port)
    }

    /// The publish URL of `path` with the main token.
    pub fn publish_url(&self, path: &str, secret: &str) -> String {
        self.ws(&format!("{path}?token={TOKEN}&secret={secret}"))
    }

    /// The client URL of `path`.
    pub fn client_url(&self, path: &str, secret: &str) -> String {
        self.ws(&format!("{path}?secret={secret}"))
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Opens a plain TCP connection to the gateway and writes `bytes` (requests written by hand).
    pub async fn send_raw(&self, bytes: &[u8]) -> TcpStream {
        use tokio::io::AsyncWriteExt;
        let mut tcp = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect");
        tcp.write_all(bytes).await.expect("write");
        tcp
    }

    /// What the gateway logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends a signal to the gateway.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Kills the gateway (SIGKILL) and starts it again on the same ports and config, logging
    /// to the same file: what clients see of a crash and a restart.
    pub fn restart(&mut self) {
        let _ = self.child.child().kill();
        let _ = self.child.child().wait();
        let deadline = Instant::now() + WAIT;
        loop {
            let log = std::fs::OpenOptions::new()
                .append(true)
                .open(&self.log_path)
                .expect("log file");
            self.child = Process::new(spawn_gateway(&self.config_path, log, &log_level()));
            let up = loop {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    break true;
                }
                if let Ok(Some(_)) = self.child.child().try_wait() {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if up {
                return;
            }
            // The port may still be held by the old process's sockets for a moment.
            assert!(
                Instant::now() < deadline,
                "the gateway did not restart: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Rewrites the config file.
    pub fn rewrite_config(&self, text: &str) {
        let mut f = std::fs::File::create(&self.config_path).expect("config");
        f.write_all(text.as_bytes()).expect("write config");
    }

    /// Waits for the process to exit; returns how long it took, or None after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = self.child.child().try_wait() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

/// The value of metric `name{labels}` in Prometheus text (labels as written, e.g.
/// `endpoint="/a"`), or None when the series is absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            let count = if rest.is_empty() {
                0
            } else {
                rest.split(',').count()
            };
            (all && count == labels.len()).then(|| value.parse().ok())?
        })
}

/// Waits until `done` holds for the value of metric `name{labels}` (None: the series is
/// absent), so a test knows the gateway has seen what it did. Fails after [`WAIT`].
pub async fn wait_for_metric(
    gw: &Gateway,
    name: &str,
    labels: &[(&str, &str)],
    done: impl Fn(Option<f64>) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(&gw.metrics().await, name, labels);
        if done(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} stayed {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, written to `dir` as
/// `{name}.pem` and `{name}.key`: (certificate path, key path, certificate).
pub fn write_cert(dir: &std::path::Path, name: &str) -> (String, String, rcgen::Certificate) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("cert");
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("key");
    (
        cert.display().to_string(),
        key.display().to_string(),
        ck.cert,
    )
}

/// A gateway with a TLS listener besides its plain one, on a certificate made for the test.
pub struct TlsGateway {
    /// The gateway (its plain listener is `gw.port`).
    pub gw: Gateway,
    /// The TLS listener's port.
    pub tls_port: u16,
    /// The certificate to trust.
    pub ca: rcgen::Certificate,
    /// The certificate and key files the listener uses (rewrite them and reload to rotate).
    pub cert: String,
    /// See `cert`.
    pub key: String,
    /// Where they are.
    pub dir: tempfile::TempDir,
}

/// Starts a gateway on the standard config plus `extra`, with a TLS listener too.
pub fn start_tls(extra: &str) -> TlsGateway {
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key, ca) = write_cert(dir.path(), "tls");
    let tls_port = free_port();
    let gw = Gateway::start_with(|port, metrics_port| {
        Gateway::config_text(port, metrics_port, extra).replacen(
            "listen:\n",
            &format!("listen:\n  - address: 127.0.0.1:{tls_port}\n    tls: {{ cert: {cert}, key: {key} }}\n"),
            1,
        )
    });
    gw.wait_for_port(tls_port);
    TlsGateway {
        gw,
        tls_port,
        ca,
        cert,
        key,
        dir,
    }
}

/// A backend peer with the test methods: `echo`, `count` (streams 1..=n), `add` (sums streamed
/// input), `ext` (answers with the request's `ext`, its route left out), `route` (answers with
/// the caller's route), `fail` (answers with the error in its
/// payload), `slow` (waits payload ms, then echoes), `ticks` (streams 1..=n, 300 ms apart).
pub fn test_backend() -> PeerBuilder {
    Peer::builder()
        .handle("echo", |call: Call| async move { Ok(call.payload) })
        .handle("count", |call: Call| async move {
            let n = call.payload.as_u64().unwrap_or(0);
            for i in 1..n {
                let _ = call.send(&json!(i)).await;
            }
            Ok(json!(n))
        })
        .handle("add", |mut call: Call| async move {
            let mut sum = call.payload.as_i64().unwrap_or(0);
            while let Some(v) = call.next_input().await {
                sum += v.as_i64().unwrap_or(0);
            }
            Ok(json!(sum))
        })
        .handle("ext", |call: Call| async move {
            let mut ext = call.ext.clone().unwrap_or_default();
            ext.remove("route");
            Ok(Value::Object(ext))
        })
        .handle("route", |call: Call| async move {
            Ok(json!(call.route().map(str::to_string)))
        })
        .handle("fail", |call: Call| async move {
            let code = call.payload["code"].as_i64().unwrap_or(-1);
            let message = call.payload["message"]
                .as_str()
                .unwrap_or("failed")
                .to_string();
            Err(RpcError::new(code, message))
        })
        .handle("ticks", |call: Call| async move {
            let n = call.payload.as_u64().unwrap_or(0);
            for i in 1..n {
                let _ = call.send(&json!(i)).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(json!(n))
        })
        .handle("slow", |call: Call| async move {
            let ms = call.payload.as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(call.payload)
        })
}

/// Publishes the test backend at `path` with the main token.
pub async fn publish(gw: &Gateway, path: &str, secret: &str) -> Peer {
    test_backend()
        .connect(&gw.publish_url(path, secret))
        .await
        .unwrap_or_else(|e| panic!("publish {path}: {e}\n{}", gw.log()))
}

/// Connects a library client to `path`.
pub async fn client(gw: &Gateway, path: &str, secret: &str) -> Peer {
    Peer::builder()
        .connect(&gw.client_url(path, secret))
        .await
        .unwrap_or_else(|e| panic!("connect {path}: {e}\n{}", gw.log()))
}

/// A raw WebSocket peer: every frame is written and read as it is.
pub struct Raw {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a raw peer saw next.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// A text frame.
    Text(String),
    /// A close frame with its code (None: no code, or the TCP connection ended).
    Close(Option<u16>),
}

impl Raw {
    /// Opens a WebSocket (no Duplex handshake). Err holds the HTTP status of a refusal.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Raw, u16> {
        let mut request = url.into_client_request().expect("request");
        for (k, v) in headers {
            request.headers_mut().insert(
                http::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        // Nagle off, as the peer library does: small frames must not wait for a delayed ACK.
        match tokio_tungstenite::connect_async_with_config(request, None, true).await {
            Ok((ws, _)) => Ok(Raw { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("connect {url}: {e}"),
        }
    }

    /// Opens a WebSocket on a connection already made (say, from a chosen source address) and
    /// does the Duplex handshake.
    pub async fn open_on(url: &str, tcp: TcpStream) -> Raw {
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let mut raw = Raw { ws };
        raw.send("SIMPLEX/1.0;json").await;
        assert_eq!(raw.next().await, Seen::Text("+OK".into()));
        raw
    }

    /// Opens a WebSocket and does the Duplex handshake.
    pub async fn open(url: &str) -> Raw {
        let mut raw = Raw::connect(url, &[])
            .await
            .unwrap_or_else(|s| panic!("connect {url}: HTTP {s}"));
        raw.send("SIMPLEX/1.0;json").await;
        assert_eq!(raw.next().await, Seen::Text("+OK".into()));
        raw
    }

    /// Sends a text frame; false when the connection is gone.
    pub async fn try_send(&mut self, text: &str) -> bool {
        self.ws
            .send(WsMessage::Text(text.to_string().into()))
            .await
            .is_ok()
    }

    /// Sends a text frame.
    pub async fn send(&mut self, text: &str) {
        self.ws
            .send(WsMessage::Text(text.to_string().into()))
            .await
            .expect("send");
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: &[u8]) {
        self.ws
            .send(WsMessage::Binary(data.to_vec().into()))
            .await
            .expect("send");
    }

    /// Sends a text frame whose bytes are not UTF-8 (a protocol violation).
    pub async fn send_invalid_utf8_text(&mut self, data: &[u8]) {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        let frame = Frame::message(data.to_vec(), OpCode::Data(Data::Text), true);
        self.ws.send(WsMessage::Frame(frame)).await.expect("send");
    }

    /// Writes bytes straight to the socket, under the WebSocket framing (a partial frame, say).
    pub async fn send_raw_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let socket = self.ws.get_mut();
        socket.write_all(bytes).await.expect("write");
        socket.flush().await.expect("flush");
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, value: &Value) {
        self.send(&value.to_string()).await;
    }

    /// The next text frame or close (pings and pongs are skipped). Fails after [`WAIT`].
    pub async fn next(&mut self) -> Seen {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("nothing arrived in time");
            match frame {
                Some(Ok(WsMessage::Text(t))) => return Seen::Text(t.to_string()),
                Some(Ok(WsMessage::Binary(b))) => {
                    return Seen::Text(String::from_utf8_lossy(&b).into_owned())
                }
                Some(Ok(WsMessage::Close(f))) => return Seen::Close(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Seen::Close(None),
            }
        }
    }

    /// The next frame, parsed as JSON.
    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Seen::Text(t) => serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Reads until the close frame; returns its code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            if let Seen::Close(code) = self.next().await {
                return code;
            }
        }
    }

    /// Asserts nothing but pings arrive for `ms` milliseconds.
    pub async fn silent_for(&mut self, ms: u64) {
        let end = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            match tokio::time::timeout_at(end, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }
}

/// The HTTP status of a plain GET (no upgrade) or of a refused WebSocket upgrade.
pub async fn ws_status(url: &str, headers: &[(&str, &str)]) -> u16 {
    match Raw::connect(url, headers).await {
        Ok(_) => 101,
        Err(status) => status,
    }
}

/// A WebSocket upgrade request for `path_and_query`, written by hand (for tests that need the
/// exact bytes on the wire: pipelined frames, HTTP versions).
pub fn upgrade_request(path_and_query: &str, version: &str) -> Vec<u8> {
    format!(
        "GET {path_and_query} {version}\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// A masked client text frame (payloads under 126 bytes).
pub fn client_frame(text: &str) -> Vec<u8> {
    assert!(text.len() < 126, "a short frame");
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend(mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The resident memory of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Waits until an HTTP call of `path` (its `echo`, secret `s`) through `gw` succeeds: in a
/// cluster, until `gw` knows the node that serves it.
pub async fn served_from(gw: &Gateway, path: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let status = http
            .post(gw.http(&format!("{path}/echo?secret=s")))
            .body("1")
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok();
        if status == Some(200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} not served through this node: {status:?}\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs `body` to `path_and_query` on `gw`: its status and body.
pub async fn post(gw: &Gateway, path_and_query: &str, body: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(gw.http(path_and_query))
        .body(body.to_string())
        .timeout(WAIT)
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}
