//! The servers this tool starts as processes of their own (`--role ...`): the echo backend, the
//! direct Duplex and HTTP servers, Pingora's floor, and the attacker of the `abuse` scenario.

use super::*;

/// The handlers every echo server has: `echo`, and `count` (a reply stream of 1..=n).
pub(crate) fn echo_handlers() -> PeerBuilder {
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

/// Writes `text` to `file` whole or not at all (beside it, then renamed over): the load tool
/// reads these files while they are rewritten.
fn write_whole(file: &str, text: &str) {
    let next = format!("{file}.next");
    if std::fs::write(&next, text).is_ok() {
        let _ = std::fs::rename(&next, file);
    }
}

pub(crate) fn run_role(role: &str, arg: &str) {
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
            // `<ws-base> <name> <count> <token> <secret>`: publishes the echo handlers at
            // `/many/<name>/0` .. `/many/<name>/<count - 1>` of a gateway, one connection each,
            // and holds them.
            "publisher" => {
                let args: Vec<&str> = arg.split(' ').collect();
                let [base, name, count, token, secret] = args[..] else {
                    eprintln!("publisher: <ws-base> <name> <count> <token> <secret>");
                    return;
                };
                let count: usize = count.parse().unwrap_or(0);
                let mut held = Vec::with_capacity(count);
                let urls: Vec<String> = (0..count)
                    .map(|i| format!("{base}/many/{name}/{i}?token={token}&secret={secret}"))
                    .collect();
                for chunk in urls.chunks(256) {
                    let batch = chunk.iter().map(|url| echo_handlers().connect(url));
                    for peer in futures_util::future::join_all(batch).await {
                        match peer {
                            Ok(peer) => held.push(peer),
                            Err(e) => eprintln!("publisher: {e}"),
                        }
                    }
                }
                std::future::pending::<()>().await;
            }
            // `<url> <count> <jitter: 0|1> <file>`: holds `count` clients of a gateway that
            // reconnect whenever they lose it (the Rust peer's persistent connection), with or
            // without the jitter of their backoff; writes the connections they have tried to
            // open so far to `file` every 20 ms.
            "storm-clients" => {
                let args: Vec<&str> = arg.split(' ').collect();
                let [url, count, jitter, file] = args[..] else {
                    eprintln!("storm-clients: <url> <count> <jitter 0|1> <file>");
                    return;
                };
                let backoff = duplex::Backoff {
                    jitter: jitter == "1",
                    ..duplex::Backoff::default()
                };
                let count: usize = count.parse().unwrap_or(0);
                let mut held = Vec::with_capacity(count);
                for i in 0..count {
                    held.push(duplex::Peer::builder().connect_persistent(url, backoff));
                    if i % 200 == 199 {
                        // The first connections, not measured, at a pace the gateway takes.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                loop {
                    let tried: u64 = held.iter().map(duplex::Persistent::attempts).sum();
                    write_whole(file, &tried.to_string());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            // `<url> <count> <file>`: holds `count` idle clients of a gateway; writes
            // `connected <n>` to `file` once they are in, then, when `<file>.go` exists, has
            // every client call `echo` once and writes `answered <n>`; holds them until killed.
            "idle-clients" => {
                let args: Vec<&str> = arg.split(' ').collect();
                let [url, count, file] = args[..] else {
                    eprintln!("idle-clients: <url> <count> <file>");
                    return;
                };
                let count: usize = count.parse().unwrap_or(0);
                let mut held = Vec::with_capacity(count);
                let mut i = 0;
                while i < count {
                    let batch = (i..(i + 200).min(count)).map(|_| Peer::builder().connect(url));
                    for peer in futures_util::future::join_all(batch).await {
                        match peer {
                            Ok(peer) => held.push(peer),
                            Err(e) => eprintln!("idle-clients: {e}"),
                        }
                    }
                    i += 200;
                }
                write_whole(file, &format!("connected {}", held.len()));
                let go = format!("{file}.go");
                // Bounded: ten minutes at most.
                for _ in 0..12_000 {
                    if std::path::Path::new(&go).exists() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let mut answered = 0;
                for chunk in held.chunks(1000) {
                    let calls = chunk.iter().enumerate().map(|(i, p)| async move {
                        p.call("echo", json!(i)).await == Ok(json!(i))
                    });
                    answered += futures_util::future::join_all(calls)
                        .await
                        .into_iter()
                        .filter(|ok| *ok)
                        .count();
                }
                write_whole(file, &format!("answered {answered}"));
                std::future::pending::<()>().await;
            }
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
pub(crate) struct Floor;

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

pub(crate) fn pingora_floor(port: u16) {
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
pub(crate) async fn serve_tcp<F, Fut>(port: u16, serve: F)
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

pub(crate) fn port(arg: &str) -> u16 {
    arg.parse().expect("port")
}

/// The address the attacker connects from.
pub(crate) const ATTACKER: [u8; 4] = [127, 0, 0, 2];

/// A TCP connection to 127.0.0.1:`port` from the attacker's address.
pub(crate) async fn attacker_connect(port: u16) -> Option<TcpStream> {
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
pub(crate) async fn hold(mut stream: impl tokio::io::AsyncRead + Unpin) {
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
pub(crate) async fn attack(arg: &str) {
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
pub(crate) fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}
