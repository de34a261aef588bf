//! A real `nats-server` for the cluster tests, on a free loopback port, with a config file when
//! the test needs one (authentication, TLS, permissions), and a raw NATS client that speaks the
//! text protocol by hand: what a stranger on the bus can send.
//!
//! Needs `nats-server` (Debian package `nats-server`; `scripts/setup.sh` installs it): without
//! it the tests fail, they do not skip.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::Process;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{free_port, WAIT};

/// A `nats-server` process on a loopback port.
pub struct Nats {
    child: Option<Process>,
    /// Its client port.
    pub port: u16,
    /// Its config file, if it has one.
    config: Option<PathBuf>,
    /// Its environment.
    envs: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

/// Where Debian's `nats-server` is.
pub fn nats_binary() -> PathBuf {
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    let found = Command::new("sh")
        .args(["-c", "command -v nats-server"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match found {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => panic!(
            "nats-server is not installed: run scripts/setup.sh (Debian package nats-server)"
        ),
    }
}

impl Nats {
    /// An open server (no authentication).
    pub fn start() -> Nats {
        let mut nats = Nats {
            child: None,
            port: free_port(),
            config: None,
            envs: Vec::new(),
            _dir: None,
        };
        nats.run();
        nats
    }

    /// A server on the config `text` (its `port` and `host` are given on the command line).
    pub fn start_with_config(text: &str) -> Nats {
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("nats.conf");
        std::fs::write(&config, text).expect("nats config");
        let mut nats = Nats {
            child: None,
            port: free_port(),
            config: Some(config),
            envs: Vec::new(),
            _dir: Some(dir),
        };
        nats.run();
        nats
    }

    /// A server on the config file at `path`, with `envs` in its environment (a config's `$NAME`
    /// takes the variable's value).
    pub fn start_with_file(path: &std::path::Path, envs: &[(&str, &str)]) -> Nats {
        let mut nats = Nats {
            child: None,
            port: free_port(),
            config: Some(path.to_path_buf()),
            envs: Vec::new(),
            _dir: None,
        };
        nats.envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        nats.run();
        nats
    }

    /// Starts the server (again) on its port and waits until it accepts connections.
    pub fn run(&mut self) {
        let mut command = Command::new(nats_binary());
        command.envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(Process::new(child));
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|p| p.child().try_wait()) {
                panic!("nats-server exited: {status}");
            }
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        // Dropping the guard kills it and waits for it.
        self.child.take();
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// A NATS client written by hand over a TCP socket: `CONNECT`, `PUB`, `SUB` and the messages
/// it receives, nothing checked, nothing signed.
pub struct RawNats {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

/// One message a [`RawNats`] received.
pub struct RawMsg {
    /// Its subject.
    pub subject: String,
    /// Its bytes.
    pub payload: Vec<u8>,
}

impl RawNats {
    /// Connects to `nats` with `connect` as the CONNECT options (`{}` for none).
    pub async fn connect(nats: &Nats, connect: &str) -> RawNats {
        let stream = TcpStream::connect(("127.0.0.1", nats.port))
            .await
            .expect("connect to nats");
        let (read, writer) = stream.into_split();
        let mut raw = RawNats {
            reader: BufReader::new(read),
            writer,
        };
        let mut info = String::new();
        raw.reader.read_line(&mut info).await.expect("INFO");
        assert!(info.starts_with("INFO"), "{info}");
        raw.send(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
            .await;
        loop {
            let mut line = String::new();
            raw.reader.read_line(&mut line).await.expect("PONG");
            if line.starts_with("PONG") {
                return raw;
            }
            assert!(!line.starts_with("-ERR"), "{line}");
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write to nats");
    }

    /// Publishes `payload` on `subject`.
    pub async fn publish(&mut self, subject: &str, payload: &[u8]) {
        let mut out = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\nPING\r\n");
        self.send(&out).await;
        // The PONG (read by `next` or dropped) tells the server took it.
    }

    /// Publishes `payload` on `subject` and waits for the server's answer: the `-ERR` line it
    /// sent (a permissions violation), or None when it took the message.
    pub async fn publish_answer(&mut self, subject: &str, payload: &[u8]) -> Option<String> {
        self.publish(subject, payload).await;
        let mut refused = None;
        loop {
            let mut line = String::new();
            match tokio::time::timeout(super::WAIT, self.reader.read_line(&mut line)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => panic!("no answer from nats-server"),
            }
            if line.starts_with("-ERR") {
                refused = Some(line.trim().to_string());
            } else if line.starts_with("PONG") {
                return refused;
            }
        }
    }

    /// Subscribes to `subject` (wildcards allowed).
    pub async fn subscribe(&mut self, subject: &str, sid: u32) {
        self.send(format!("SUB {subject} {sid}\r\nPING\r\n").as_bytes())
            .await;
    }

    /// The next message, within `limit`; None if none came.
    pub async fn next(&mut self, limit: Duration) -> Option<RawMsg> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout_at(deadline, self.reader.read_line(&mut line)).await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
            if line.starts_with("PING") {
                self.send(b"PONG\r\n").await;
                continue;
            }
            if !line.starts_with("MSG ") {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let subject = parts.get(1).expect("subject").to_string();
            let len: usize = parts.last().and_then(|n| n.parse().ok()).expect("length");
            let mut payload = vec![0u8; len + 2];
            self.reader.read_exact(&mut payload).await.expect("payload");
            payload.truncate(len);
            return Some(RawMsg { subject, payload });
        }
    }
}
