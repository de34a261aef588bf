//! Abuse controls against the real binary: TLS and HTTP/2 connections under the header deadline,
//! listener roles, per-address limits (several loopback source addresses stand for several
//! clients), per-endpoint rates, and bounded path lengths.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn trusting(cert: &rcgen::Certificate, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// How long until the peer ends the connection (EOF or reset), at most `limit`.
async fn closed_within<S: AsyncReadExt + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            stream.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

async fn tls_connect(
    tls_port: u16,
    ca: &rcgen::Certificate,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(trusting(ca, alpn))
        .connect(name, tcp)
        .await
        .expect("tls")
}

#[tokio::test]
async fn silent_tls_and_http2_connections_are_closed_within_the_header_timeout() {
    let TlsGateway {
        gw: _gw,
        tls_port,
        ca,
        ..
    } = start_tls("limits:\n  request_header_timeout: 1s\n");
    let limit = Duration::from_secs(4);
    // A TCP connection that never starts the TLS handshake.
    let mut silent = TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .expect("connect");
    // A TLS connection that asked for h2 and sends nothing more.
    let mut h2_silent = tls_connect(tls_port, &ca, &[b"h2"]).await;
    assert_eq!(
        h2_silent.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the listener offers h2"
    );
    // One that sends HTTP/2's preface and its SETTINGS, then nothing.
    let mut h2_preface = tls_connect(tls_port, &ca, &[b"h2"]).await;
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    h2_preface.write_all(&preface).await.expect("preface");
    // And one on HTTP/1.1 that sends nothing after the handshake.
    let mut h1_silent = tls_connect(tls_port, &ca, &[b"http/1.1"]).await;
    let (a, b, c, d) = tokio::join!(
        closed_within(&mut silent, limit),
        closed_within(&mut h2_silent, limit),
        closed_within(&mut h2_preface, limit),
        closed_within(&mut h1_silent, limit),
    );
    for (what, closed) in [
        ("silent TCP", a),
        ("h2, silent", b),
        ("h2, preface only", c),
        ("http/1.1, silent", d),
    ] {
        assert!(closed.is_some(), "{what}: still open after {limit:?}");
    }
}

#[tokio::test]
async fn a_tls_connection_that_sends_its_request_in_time_is_served_over_h2() {
    let TlsGateway {
        gw, tls_port, ca, ..
    } = start_tls("limits:\n  request_header_timeout: 1s\n  http_idle_timeout: 1s\n");
    let _backend = publish(&gw, "/h2", "s").await;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_der(ca.der()).expect("ca"))
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let url = format!("https://localhost:{tls_port}/h2/echo?secret=s");
    for i in 0..3 {
        let response = client
            .post(&url)
            .body(i.to_string())
            .send()
            .await
            .expect("call");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.text().await.expect("body"), i.to_string());
        // Calls on the same connection past the header timeout, as long as each comes in time.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

/// The standard config with a second listener, `serves` given for both.
fn two_listeners(second: u16, first_serves: &str, second_serves: &str) -> Gateway {
    let gw = Gateway::start_with(|port, metrics_port| {
        Gateway::config_text(port, metrics_port, "").replacen(
            &format!("listen:\n  - address: 127.0.0.1:{port}\n"),
            &format!(
                "listen:\n  - address: 127.0.0.1:{port}\n    serves: {first_serves}\n  - address: 127.0.0.1:{second}\n    serves: {second_serves}\n"
            ),
            1,
        )
    });
    gw.wait_for_port(second);
    gw
}

#[tokio::test]
async fn a_listener_serves_only_its_roles() {
    let backends_port = free_port();
    let gw = two_listeners(backends_port, "[clients]", "[backends]");
    // A publish on the public listener: 403 `listener`, even with a good token.
    let status = ws_status(&gw.publish_url("/r", "s"), &[]).await;
    assert_eq!(status, 403);
    // On the private one it works.
    let _backend = test_backend()
        .connect(&format!(
            "ws://127.0.0.1:{backends_port}/r?token={TOKEN}&secret=s"
        ))
        .await
        .expect("publish on the backends listener");
    // Clients on the public one; none on the private one.
    let peer = client(&gw, "/r", "s").await;
    assert_eq!(peer.call("echo", json!(1)).await, Ok(json!(1)));
    let status = ws_status(&format!("ws://127.0.0.1:{backends_port}/r?secret=s"), &[]).await;
    assert_eq!(status, 404);
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{backends_port}/r/echo?secret=s"))
        .body("1")
        .send()
        .await
        .expect("call");
    assert_eq!(response.status().as_u16(), 404);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "listener")]
        ),
        Some(1.0)
    );
}

/// A TCP connection to `port` from the loopback address `from`.
async fn connect_from(from: IpAddr, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("connect")
}

/// Sends one HTTP/1.1 POST on `tcp` and reads its answer's head and body.
async fn post_on(tcp: &mut TcpStream, path_and_query: &str, body: &str, extra: &str) -> String {
    let request = format!(
        "POST {path_and_query} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    read_response(tcp).await
}

/// One HTTP/1.1 answer (its head and a Content-Length body).
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = String::from_utf8_lossy(&seen).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                })
                .unwrap_or(0);
            if seen.len() >= head_end + 4 + length {
                return text;
            }
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return String::from_utf8_lossy(&seen).to_string(),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// One POST on a connection of its own from `from` (a refused request's connection may be
/// closed, its body unread).
async fn post_from(from: IpAddr, port: u16, path_and_query: &str, extra: &str) -> String {
    let mut tcp = connect_from(from, port).await;
    post_on(&mut tcp, path_and_query, "1", extra).await
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[tokio::test]
async fn an_address_over_its_connections_gets_429_and_others_are_served() {
    let gw = Gateway::start("limits:\n  max_connections_per_ip: 3\n");
    let _backend = publish(&gw, "/c", "s").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = connect_from(ip(2), gw.port).await;
        let answer = post_on(&mut tcp, "/c/echo?secret=s", "1", "").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(tcp);
    }
    // The fourth connection of 127.0.0.2: its request gets 429, and the connection ends.
    let mut fourth = connect_from(ip(2), gw.port).await;
    let answer = post_on(&mut fourth, "/c/echo?secret=s", "1", "").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(
        answer.contains("ip_connections") || answer.contains("too many connections"),
        "{answer}"
    );
    assert!(closed_within(&mut fourth, WAIT).await.is_some());
    // Another address is served; so is 127.0.0.2 once one of its connections is closed.
    let mut other = connect_from(ip(3), gw.port).await;
    let answer = post_on(&mut other, "/c/echo?secret=s", "1", "").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut again = connect_from(ip(2), gw.port).await;
        let answer = post_on(&mut again, "/c/echo?secret=s", "1", "").await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "ip_connections")]
        ) >= Some(1.0)
    );
}

#[tokio::test]
async fn an_address_over_its_rate_gets_429_with_retry_after_and_its_websocket_calls_32004() {
    let gw = Gateway::start(
        "limits:\n  requests_per_ip_per_second: 5\ntls:\n  trusted_proxies: [127.0.0.1]\n",
    );
    let _backend = publish(&gw, "/q", "s").await;
    for _ in 0..5 {
        let answer = post_from(ip(4), gw.port, "/q/echo?secret=s", "").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let answer = post_from(ip(4), gw.port, "/q/echo?secret=s", "").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    // Another address has its own bucket.
    let answer = post_from(ip(5), gw.port, "/q/echo?secret=s", "").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Behind a trusted proxy (127.0.0.1), the client is the last untrusted X-Forwarded-For.
    let via_proxy = |client: &'static str| {
        let port = gw.port;
        async move {
            let header = format!("X-Forwarded-For: {client}\r\n");
            let answer = post_from(ip(1), port, "/q/echo?secret=s", &header).await;
            answer.split(' ').nth(1).unwrap_or_default().to_string()
        }
    };
    for _ in 0..5 {
        assert_eq!(via_proxy("198.51.100.7").await, "200");
    }
    assert_eq!(via_proxy("198.51.100.7").await, "429");
    assert_eq!(via_proxy("198.51.100.8, 127.0.0.1").await, "200");
    // A WebSocket client from 127.0.0.6: its upgrade takes a token, its calls the others; over
    // them, calls are answered -32004 and never reach the backend.
    let tcp = connect_from(ip(6), gw.port).await;
    let mut raw = Raw::open_on(&gw.client_url("/q", "s"), tcp).await;
    let mut limited = None;
    for id in 1..=10 {
        raw.send_json(&json!({"type":"req","method":"echo","id":id,"payload":id}))
            .await;
        let reply = raw.recv().await;
        if reply.get("error").is_some() {
            limited = Some(reply);
            break;
        }
        assert_eq!(reply["payload"], json!(id));
    }
    let limited = limited.expect("some call was limited");
    assert_eq!(limited["error"]["code"], json!(-32004), "{limited}");
    let wait = limited["error"]["data"]["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms");
    assert!((1..=1000).contains(&wait), "{limited}");
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "ip_rate")]
        ) >= Some(3.0)
    );
}

#[tokio::test]
async fn failed_authentications_close_an_address_for_the_rest_of_the_minute() {
    let gw = Gateway::start("limits:\n  auth_failures_per_ip_per_minute: 3\n");
    let _backend = publish(&gw, "/a", "s").await;
    for _ in 0..3 {
        let answer = post_from(ip(7), gw.port, "/a/echo?secret=wrong", "").await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    // Even the right secret now gets 429 until the minute is over.
    let answer = post_from(ip(7), gw.port, "/a/echo?secret=s", "").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    let retry: u64 = answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .and_then(|v| v.trim().parse().ok())
        })
        .expect("Retry-After");
    assert!((50..=60).contains(&retry), "{answer}");
    let answer = post_from(ip(8), gw.port, "/a/echo?secret=s", "").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "auth_failures")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn an_endpoint_over_its_calls_per_second_gets_429_and_32004() {
    let gw = Gateway::start("endpoints:\n  - path: /e\n    calls_per_second: 3\n");
    let _backend = publish(&gw, "/e", "s").await;
    let _other = publish(&gw, "/free", "s").await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = http
            .post(gw.http("/e/echo?secret=s"))
            .body("1")
            .send()
            .await
            .expect("call");
        statuses.push((
            response.status().as_u16(),
            response.headers().get("retry-after").is_some(),
        ));
    }
    assert_eq!(statuses[..3], [(200, false); 3]);
    assert_eq!(statuses[3], (429, true));
    // Another endpoint is not limited.
    for _ in 0..5 {
        let response = http
            .post(gw.http("/free/echo?secret=s"))
            .body("1")
            .send()
            .await
            .expect("call");
        assert_eq!(response.status().as_u16(), 200);
    }
    // A WebSocket client's calls of /e share the bucket.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut raw = Raw::open(&gw.client_url("/e", "s")).await;
    let mut codes = Vec::new();
    for id in 1..=5 {
        raw.send_json(&json!({"type":"req","method":"echo","id":id,"payload":id}))
            .await;
        let reply: Value = raw.recv().await;
        codes.push(reply["error"]["code"].as_i64());
    }
    assert_eq!(codes[..3], [None, None, None], "{codes:?}");
    assert_eq!(codes[3..], [Some(-32004), Some(-32004)], "{codes:?}");
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "endpoint_rate")]
        ) >= Some(3.0)
    );
}

#[tokio::test]
async fn long_paths_and_method_names_get_400_and_logs_carry_at_most_256_bytes_of_a_path() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/p", "s").await;
    let long = format!("/{}", "x".repeat(60_000));
    let http = reqwest::Client::new();
    let status = |path: String| {
        let http = http.clone();
        let url = gw.http(&format!("{path}?secret=s"));
        async move {
            http.post(url)
                .body("1")
                .send()
                .await
                .expect("call")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(format!("{long}/m")).await, 400);
    assert_eq!(status(format!("/p/{}", "m".repeat(257))).await, 400);
    // A 1,000-byte path is allowed (404 here: nothing is published there).
    let allowed = format!("/{}", "y".repeat(999));
    assert_eq!(status(format!("{allowed}/m")).await, 404);
    assert_eq!(
        ws_status(&gw.publish_url(&format!("/{}", "z".repeat(1100)), "s"), &[]).await,
        400
    );
    let log = gw.log();
    for line in log.lines() {
        let longest_run = line
            .split(|c: char| !c.is_ascii_alphanumeric())
            .map(str::len)
            .max()
            .unwrap_or(0);
        assert!(
            longest_run <= 256,
            "a log line with {longest_run} bytes of a path"
        );
    }
    assert!(log.len() < 20_000, "{} bytes of log", log.len());
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "bad_path")]
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn a_fixed_secret_removed_by_a_reload_admits_no_one_until_a_backend_publishes_again() {
    let fixed = "endpoints:\n  - path: /fx\n    secret: fixed-secret-000000\n";
    let gw = Gateway::start(fixed);
    let _backend = test_backend()
        .connect(&format!("{}/fx?token={TOKEN}", gw.ws("")))
        .await
        .expect("publish without a secret: the fixed one");
    let mut old = Raw::open(&gw.client_url("/fx", "fixed-secret-000000")).await;
    let text = std::fs::read_to_string(&gw.config_path).expect("config");
    gw.rewrite_config(&text.replace(fixed, ""));
    gw.signal("HUP");
    assert_eq!(old.closed().await, Some(1008));
    wait_for_metric(
        &gw,
        "duplex_gateway_config_reloads_total",
        &[("result", "success")],
        |v| v == Some(1.0),
    )
    .await;
    assert_eq!(
        ws_status(&gw.client_url("/fx", "fixed-secret-000000"), &[]).await,
        401
    );
    let response = reqwest::Client::new()
        .post(gw.http("/fx/echo?secret=fixed-secret-000000"))
        .body("1")
        .send()
        .await
        .expect("call");
    assert_eq!(response.status().as_u16(), 401);
    // A backend that publishes with a secret of its own takes over, with that secret.
    let _new = publish(&gw, "/fx", "a-new-secret-11111").await;
    let peer = client(&gw, "/fx", "a-new-secret-11111").await;
    assert_eq!(peer.call("echo", json!(2)).await, Ok(json!(2)));
}

#[tokio::test]
async fn short_secrets_are_warned_about_and_sigquit_is_ignored() {
    let gw = Gateway::start("endpoints:\n  - path: /short\n    secret: tiny\n");
    // --check warns about the fixed secret.
    let out = std::process::Command::new(gateway_binary())
        .args(["--check", "--config"])
        .arg(&gw.config_path)
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("warning: endpoints[/short].secret has fewer than 16 bytes"),
        "{stdout}"
    );
    // The publish log warns about a publisher's short secret.
    let _backend = publish(&gw, "/p", "abc").await;
    let deadline = Instant::now() + WAIT;
    while !gw.log().contains("fewer than 16 bytes: easy to guess") {
        assert!(Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!gw.log().contains("secret=abc"));
    // SIGQUIT hands nothing over: the gateway carries on serving.
    gw.signal("QUIT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peer = client(&gw, "/p", "abc").await;
    assert_eq!(peer.call("echo", json!("after")).await, Ok(json!("after")));
    assert!(gw.log().contains("SIGQUIT ignored"), "{}", gw.log());
}

#[tokio::test]
async fn a_frame_header_announcing_a_megabyte_reserves_nothing_until_the_bytes_come() {
    let gw = Gateway::start("limits:\n  max_clients_per_endpoint: 1000\n");
    let _backend = publish(&gw, "/big", "s").await;
    let mut peers = Vec::new();
    for _ in 0..4 {
        peers.push(Raw::open(&gw.client_url("/big", "s")).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss(gw.pid());
    // 300 clients, each sends the 14 bytes of a masked text frame's header that announces
    // 1 MiB - 1 KiB, and nothing more.
    let mut clients = Vec::new();
    for _ in 0..300 {
        let mut raw = Raw::open(&gw.client_url("/big", "s")).await;
        let len: u64 = (1 << 20) - 1024;
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        raw.send_raw_bytes(&header).await;
        clients.push(raw);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss(gw.pid()).saturating_sub(before);
    assert!(
        grown < 60 << 20,
        "the gateway grew by {} MiB for 300 headers announcing 300 MiB",
        grown >> 20
    );
    // The connections still work: a client that sends whole frames is served.
    let peer = client(&gw, "/big", "s").await;
    assert_eq!(peer.call("echo", json!("fine")).await, Ok(json!("fine")));
    drop(peers);
}

#[tokio::test]
async fn tls_handshakes_count_against_an_address_so_it_never_holds_more_sockets_than_its_limit() {
    let TlsGateway { gw, tls_port, .. } =
        start_tls("limits:\n  max_connections_per_ip: 3\n  request_header_timeout: 5s\n");
    // Three silent TCP connections on the TLS port hold the address's three places ...
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(ip(9), tls_port).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... so the next ones are closed at once, before any handshake.
    for _ in 0..5 {
        let mut extra = connect_from(ip(9), tls_port).await;
        let closed = closed_within(&mut extra, Duration::from_secs(2)).await;
        assert!(closed.is_some(), "an extra connection was held");
    }
    // The held ones are still open (the header timeout is 5 s), and another address is served.
    for tcp in &mut held {
        assert!(closed_within(tcp, Duration::from_millis(100))
            .await
            .is_none());
    }
    let mut other = connect_from(ip(10), gw.port).await;
    let answer = post_on(&mut other, "/none/m?secret=s", "1", "").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "ip_connections")]
        ) >= Some(5.0)
    );
}

#[tokio::test]
async fn over_max_queued_bytes_new_calls_are_refused_until_the_queues_drain() {
    let gw = Gateway::start("limits:\n  max_queued_bytes: 300000\n");
    // A backend that does its handshake and never reads again: what is sent to it stays queued.
    let stuck = Raw::open(&gw.publish_url("/stuck", "s")).await;
    let _ok = publish(&gw, "/ok", "s").await;
    let mut sender = Raw::open(&gw.client_url("/stuck", "s")).await;
    let big = "x".repeat(100_000);
    // More than the sockets' buffers hold, so that the rest waits in the gateway's queue.
    let flood = tokio::spawn(async move {
        for id in 1..=200 {
            let frame = json!({"type":"req","method":"echo","id":id,"payload":big});
            if !sender.try_send(&frame.to_string()).await {
                break;
            }
        }
        sender
    });
    // Past 300 KB queued, a call elsewhere is refused: -32003, 503 over HTTP.
    let deadline = Instant::now() + WAIT;
    let peer = client(&gw, "/ok", "s").await;
    loop {
        match peer.call("echo", json!(1)).await {
            Err(duplex::PeerError::Rpc(e)) if e.code == -32003 => break,
            other => {
                assert!(Instant::now() < deadline, "never refused: {other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let response = reqwest::Client::new()
        .post(gw.http("/ok/echo?secret=s"))
        .body("1")
        .send()
        .await
        .expect("call");
    assert_eq!(response.status().as_u16(), 503);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], json!(-32003));
    // The stuck backend goes, and its queue with it: calls are taken again.
    drop(stuck);
    flood.abort();
    let deadline = Instant::now() + WAIT;
    loop {
        match peer.call("echo", json!(2)).await {
            Ok(v) if v == json!(2) => break,
            other => {
                assert!(Instant::now() < deadline, "still refused: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
