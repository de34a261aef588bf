//! The browser example (`examples/browser/`) in real headless Chromium, driven over the DevTools
//! protocol: the page is served from an origin other than the gateway's, calls `echo` and
//! `count` over WebSocket and `echo` with `fetch()` (a JSON body and `X-Duplex-Secret`, so the
//! browser sends a preflight), and writes the results into its DOM. Served from an origin the
//! gateway does not allow, the same page is refused. Chromium must be installed (`.ci/run` and
//! `scripts/setup.sh` install it): without it this test fails.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Serves the repository as a static site on 127.0.0.1:`port` (another origin), as
/// `python3 -m http.server` does for the README: the page at `/examples/browser/`, and the
/// JavaScript client library it imports, `/clients/js/dist/*.js` (built by
/// `clients/js/run-tests.sh`, which `scripts/test.sh` runs first).
async fn serve_example(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    assert!(
        dir.join("clients/js/dist/index.js").exists(),
        "the JavaScript client library is not built: run clients/js/run-tests.sh"
    );
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let dir = dir.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let Ok(n) = tcp.read(&mut buf).await else {
                    return;
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let path = path.split('?').next().unwrap_or("/");
                let (name, kind) = match path {
                    "/examples/browser/" | "/examples/browser/index.html" => {
                        ("examples/browser/index.html".to_string(), "text/html")
                    }
                    library
                        if library.starts_with("/clients/js/dist/")
                            && library.ends_with(".js")
                            && !library.contains("..") =>
                    {
                        (
                            library.trim_start_matches('/').to_string(),
                            "text/javascript",
                        )
                    }
                    _ => (String::new(), ""),
                };
                let response = match std::fs::read(dir.join(&name)) {
                    Ok(body) if !name.is_empty() => {
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend(body);
                        r
                    }
                    _ => {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = tcp.write_all(&response).await;
            });
        }
    });
}

/// Headless Chromium, ended with the test.
struct Chromium {
    _process: Process,
    _profile: tempfile::TempDir,
}

fn chromium_binary() -> &'static str {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("Chromium is not installed: run scripts/setup.sh (Debian package `chromium`)")
}

fn start_chromium(devtools: u16) -> Chromium {
    let profile = tempfile::tempdir().expect("profile");
    let child = Command::new(chromium_binary())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--remote-debugging-port={devtools}"),
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start Chromium");
    Chromium {
        _process: Process::new(child),
        _profile: profile,
    }
}

/// A DevTools session on one page.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl Page {
    async fn open(devtools: u16) -> Page {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let list = reqwest::get(format!("http://127.0.0.1:{devtools}/json/list")).await;
            if let Ok(resp) = list {
                if let Ok(targets) = resp.json::<Vec<Value>>().await {
                    let page = targets.iter().find(|t| t["type"] == "page");
                    if let Some(url) = page.and_then(|t| t["webSocketDebuggerUrl"].as_str()) {
                        break url.to_string();
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "Chromium's DevTools did not come up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("DevTools");
        Page { ws, next: 1 }
    }

    async fn command(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let text = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(WsMessage::Text(text.into()))
            .await
            .expect("send");
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a DevTools answer")
                .expect("open")
                .expect("frame");
            if let WsMessage::Text(text) = frame {
                let msg: Value = serde_json::from_str(&text).expect("json");
                if msg["id"] == json!(id) {
                    return msg;
                }
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let answer = self
            .command(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        answer["result"]["result"]["value"].clone()
    }

    /// Loads `url` and waits until the page says it is done; returns what it shows.
    async fn results(&mut self, url: &str) -> Value {
        self.command("Page.navigate", json!({"url": url})).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .eval("document.body && document.body.dataset.done")
            .await
            != json!("yes")
        {
            assert!(Instant::now() < deadline, "the page did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.eval(
            "JSON.stringify({ wsEcho: document.getElementById('ws-echo').textContent, \
             wsCount: document.getElementById('ws-count').textContent, \
             fetchEcho: document.getElementById('fetch-echo').textContent, \
             wsWhoami: document.getElementById('ws-whoami').textContent })",
        )
        .await
        .as_str()
        .map(|s| serde_json::from_str(s).expect("results"))
        .expect("results")
    }
}

#[tokio::test]
async fn the_browser_example_works_in_chromium_from_an_allowed_origin_only() {
    let page_port = free_port();
    let other_port = free_port();
    let gw = Gateway::start(&format!(
        "cors:\n  allowed_origins: [\"http://127.0.0.1:{page_port}\"]\n\
         endpoints:\n  - path: /signed\n    auth:\n      secret: false\n      jwt:\n        keys: [{}]\n",
        common::jwt::public_key("rsa")
    ));
    let _backend = publish(&gw, "/demo", "s3cret").await;
    let _signed = test_backend()
        .handle("whoami", |call: duplex::Call| async move {
            Ok(call
                .ext
                .and_then(|mut e| e.remove("auth"))
                .unwrap_or_default())
        })
        .connect(&gw.publish_url("/signed", "unused"))
        .await
        .expect("publish /signed");
    serve_example(page_port).await;
    serve_example(other_port).await;
    let devtools = free_port();
    let _chromium = start_chromium(devtools);
    let mut page = Page::open(devtools).await;

    let query = format!(
        "gateway=http://127.0.0.1:{}&path=/demo&secret=s3cret",
        gw.port
    );
    let shown = page
        .results(&format!(
            "http://127.0.0.1:{page_port}/examples/browser/?{query}"
        ))
        .await;
    assert_eq!(shown["wsEcho"], json!(r#"{"hello":"browser"}"#), "{shown}");
    assert_eq!(shown["wsCount"], json!("1 2 3 4 5"), "{shown}");
    assert_eq!(
        shown["fetchEcho"],
        json!(r#"200 {"via":"fetch"}"#),
        "{shown}"
    );

    assert_eq!(shown["wsWhoami"], json!("(no token)"), "{shown}");

    // The JWT variant: a signed token instead of the secret, and the backend sees who calls.
    let token = common::jwt::sign(&common::jwt::claims("alice", 600));
    let signed = page
        .results(&format!(
            "http://127.0.0.1:{page_port}/examples/browser/?gateway=http://127.0.0.1:{}&path=/signed&secret=&token={token}",
            gw.port
        ))
        .await;
    assert_eq!(
        signed["wsEcho"],
        json!(r#"{"hello":"browser"}"#),
        "{signed}"
    );
    assert_eq!(signed["wsWhoami"], json!(r#"{"sub":"alice"}"#), "{signed}");
    assert_eq!(
        signed["fetchEcho"],
        json!(r#"200 {"via":"fetch"}"#),
        "{signed}"
    );

    // The same page from an origin the gateway does not list: refused, WebSocket and fetch().
    let shown = page
        .results(&format!(
            "http://127.0.0.1:{other_port}/examples/browser/?{query}"
        ))
        .await;
    let ws = shown["wsEcho"].as_str().unwrap_or_default();
    let fetched = shown["fetchEcho"].as_str().unwrap_or_default();
    assert!(ws.starts_with("error"), "{shown}");
    assert!(fetched.starts_with("error"), "{shown}");
    let text = gw.metrics().await;
    let refused = metric(
        &text,
        "duplex_gateway_rejected_requests_total",
        &[("reason", "origin")],
    );
    assert!(refused.is_some_and(|n| n >= 2.0), "{refused:?}");
}
