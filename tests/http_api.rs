//! `POST <endpoint>/<method>`: every HTTP row of the status table, streams, async calls, and no
//! state left behind, against the real binary.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn post(url: &str, body: &str) -> (u16, String, String) {
    let resp = reqwest::Client::new()
        .post(url)
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, ct, resp.text().await.expect("body"))
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Reads one HTTP/1.1 response with a Content-Length body from a raw connection.
async fn read_response(conn: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head[9..12].parse().expect("status");
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                buf.drain(..end + 4 + len);
                return (status, body);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(
            n > 0,
            "connection closed; got {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn a_post_calls_the_method_and_answers_json() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/team/a", "s").await;
    let (status, ct, body) = post(
        &gw.http("/team/a/echo?secret=s"),
        r#"{"x":[1,2.50,123456789012345678901234567890]}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ct, "application/json");
    assert_eq!(body, r#"{"x":[1,2.50,123456789012345678901234567890]}"#);
    // An empty body is null; the secret may come in a header.
    let resp = reqwest::Client::new()
        .post(gw.http("/team/a/echo"))
        .header("x-duplex-secret", "s")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.expect("body"), "null");
}

#[tokio::test]
async fn not_found_bad_secret_bad_json_and_backend_errors_get_their_status() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/e", "s").await;
    let cases: Vec<(String, &str, u16, Option<i64>)> = vec![
        (gw.http("/nowhere/echo?secret=s"), "1", 404, Some(404)),
        (gw.http("/e/echo"), "1", 401, Some(401)),
        (gw.http("/e/echo?secret=bad"), "1", 401, Some(401)),
        (gw.http("/e/echo?secret=s"), "{not json", 400, Some(400)),
        (gw.http("/e/nosuch?secret=s"), "1", 501, Some(-32601)),
        (
            gw.http("/e/fail?secret=s"),
            r#"{"code":-32602,"message":"bad n"}"#,
            400,
            Some(-32602),
        ),
        (
            gw.http("/e/fail?secret=s"),
            r#"{"code":7,"message":"boom"}"#,
            500,
            Some(7),
        ),
    ];
    for (url, body, want, code) in cases {
        let (status, ct, text) = post(&url, body).await;
        assert_eq!(status, want, "{url} {body}: {text}");
        assert_eq!(ct, "application/json", "{url}");
        let v = json_of(&text);
        assert_eq!(v["error"]["code"].as_i64(), code, "{url}: {text}");
        assert!(v["error"]["message"].is_string(), "{text}");
    }
}

#[tokio::test]
async fn a_reply_stream_arrives_as_ndjson_lines_in_order() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/s", "s").await;
    let resp = reqwest::Client::new()
        .post(gw.http("/s/count?secret=s"))
        .body("50")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    assert!(resp.headers().get("content-length").is_none());
    let text = resp.text().await.expect("body");
    let lines: Vec<&str> = text.lines().collect();
    let want: Vec<String> = (1..=50).map(|i| i.to_string()).collect();
    assert_eq!(lines, want, "{text}");
    assert!(text.ends_with('\n'));
}

#[tokio::test]
async fn an_async_call_answers_202_and_reaches_the_backend_without_an_id() {
    let gw = Gateway::start("");
    let mut backend = Raw::open(&gw.publish_url("/a", "s")).await;
    let (status, _, body) = post(&gw.http("/a/notify?secret=s&async=true"), r#"{"n":1}"#).await;
    assert_eq!(status, 202, "{body}");
    let seen = backend.recv().await;
    assert_eq!(seen["method"], "notify");
    assert_eq!(seen["payload"], json!({"n": 1}));
    assert!(seen.get("id").is_none(), "{seen}");
    // Even if the backend answers it anyway, nothing breaks for anyone.
    backend
        .send_json(&json!({"type":"rep","payload":1,"ext":seen["ext"]}))
        .await;
    let (status, _, _) = post(&gw.http("/a/notify?secret=s&async=true"), "2").await;
    assert_eq!(status, 202);
    assert_eq!(backend.recv().await["payload"], json!(2));
}

#[tokio::test]
async fn a_call_pending_when_the_backend_leaves_gets_503_promptly() {
    let gw = Gateway::start("limits:\n  backend_grace: 30s\n");
    let backend = publish(&gw, "/b", "s").await;
    let url = gw.http("/b/slow?secret=s");
    let call = tokio::spawn(async move { post(&url, "20000").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    backend.close();
    let (status, _, body) = call.await.expect("join");
    assert_eq!(status, 503, "{body}");
    assert_eq!(json_of(&body)["error"]["code"], json!(-32000));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn no_reply_within_the_call_timeout_is_504() {
    let gw = Gateway::start("limits:\n  call_timeout: 300ms\n");
    let _backend = publish(&gw, "/t", "s").await;
    let (status, _, body) = post(&gw.http("/t/slow?secret=s"), "3000").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(json_of(&body)["error"]["code"], json!(-32002));
    // A fast call still works.
    assert_eq!(post(&gw.http("/t/slow?secret=s"), "1").await.0, 200);
}

#[tokio::test]
async fn a_call_timeout_of_zero_waits_for_the_reply() {
    // 0 means "wait forever", not "time out at once".
    let gw = Gateway::start("limits:\n  call_timeout: 0\n");
    let _backend = publish(&gw, "/t", "s").await;
    let (status, _, body) = post(&gw.http("/t/slow?secret=s"), "1500").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body), json!(1500));
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_without_being_read() {
    let gw = Gateway::start("limits:\n  max_http_body_bytes: 1000\n");
    let _backend = publish(&gw, "/big", "s").await;
    // Declared too large: refused before a single body byte is sent.
    let mut conn = gw
        .send_raw(b"POST /big/echo?secret=s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
        .await;
    let (status, body) = read_response(&mut conn).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(json_of(&body)["error"]["code"], json!(413));
    // Chunked, no length: refused once the limit is passed.
    let big = format!("\"{}\"", "x".repeat(5000));
    let resp = reqwest::Client::new()
        .post(gw.http("/big/echo?secret=s"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            vec![Ok::<_, std::io::Error>(big.clone())],
        )))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 413);
    // Just under the limit is fine.
    let ok = format!("\"{}\"", "y".repeat(990));
    assert_eq!(post(&gw.http("/big/echo?secret=s"), &ok).await.0, 200);
}

#[tokio::test]
async fn expect_100_continue_and_keep_alive_work() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/k", "s").await;
    let mut conn = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let body = format!("\"{}\"", "z".repeat(2000));
    let head = format!(
        "POST /k/echo?secret=s HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(WAIT, conn.read_exact(&mut b))
            .await
            .expect("100 Continue in time")
            .expect("read");
        interim.push(b[0]);
    }
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    conn.write_all(body.as_bytes()).await.expect("body");
    let (status, text) = read_response(&mut conn).await;
    assert_eq!(status, 200);
    assert_eq!(text, body);
    // The same connection serves a second call.
    conn.write_all(b"POST /k/echo?secret=s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n42")
        .await
        .expect("write");
    let (status, text) = read_response(&mut conn).await;
    assert_eq!((status, text.as_str()), (200, "42"));
}

#[tokio::test]
async fn http_callers_and_websocket_clients_share_the_backend_without_collisions() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/mix", "s").await;
    let mut ws = Vec::new();
    for _ in 0..3 {
        ws.push(Raw::open(&gw.client_url("/mix", "s")).await);
    }
    let url = gw.http("/mix/echo?secret=s");
    let mut tasks = Vec::new();
    for caller in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..25 {
                let body = json!({"caller": caller, "i": i}).to_string();
                let resp = http
                    .post(&url)
                    .body(body.clone())
                    .send()
                    .await
                    .expect("post");
                assert_eq!(resp.status().as_u16(), 200);
                assert_eq!(resp.text().await.expect("text"), body);
            }
        }));
    }
    // Meanwhile the WebSocket clients use id 1, which the HTTP calls use too.
    for round in 0..25 {
        for (c, raw) in ws.iter_mut().enumerate() {
            raw.send_json(&json!({"type":"req","method":"echo","id":1,"payload":[c, round]}))
                .await;
        }
        for (c, raw) in ws.iter_mut().enumerate() {
            let reply = raw.recv().await;
            assert_eq!(reply["payload"], json!([c, round]), "{reply}");
            assert_eq!(reply["id"], json!(1));
        }
    }
    for t in tasks {
        t.await.expect("caller");
    }
}

/// The `duplex_gateway_pending_calls` gauge of `endpoint`: the size of its call table.
async fn pending(gw: &Gateway, endpoint: &str) -> Option<f64> {
    metric(
        &gw.metrics().await,
        "duplex_gateway_pending_calls",
        &[("endpoint", endpoint)],
    )
}

async fn wait_pending_zero(gw: &Gateway, endpoint: &str, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let p = pending(gw, endpoint).await;
        if p == Some(0.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: pending calls stay at {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn no_http_call_leaves_state_behind() {
    let gw = Gateway::start("limits:\n  call_timeout: 300ms\n  backend_grace: 10s\n");
    let backend = publish(&gw, "/leak", "s").await;
    let url = |m: &str| gw.http(&format!("/leak/{m}?secret=s"));

    // A call in progress is in the table.
    let slow = url("slow");
    let call = tokio::spawn(async move { post(&slow, "250").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pending(&gw, "/leak").await, Some(1.0));
    assert_eq!(call.await.expect("join").0, 200);
    wait_pending_zero(&gw, "/leak", "reply").await;

    assert_eq!(post(&url("count"), "5").await.0, 200);
    wait_pending_zero(&gw, "/leak", "stream").await;
    assert_eq!(post(&url("fail"), r#"{"code":1}"#).await.0, 500);
    wait_pending_zero(&gw, "/leak", "error").await;
    // The backend would answer only after the test is over: only the gateway can clean up.
    assert_eq!(post(&url("slow"), "30000").await.0, 504);
    wait_pending_zero(&gw, "/leak", "timeout").await;

    // The caller hangs up before the reply.
    let conn = gw
        .send_raw(b"POST /leak/slow?secret=s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n30000")
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(conn);
    wait_pending_zero(&gw, "/leak", "hang-up").await;

    // The backend leaves mid-call; when it comes back, nothing of the old call is left.
    let slow = url("slow");
    let call = tokio::spawn(async move { post(&slow, "5000").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    backend.close();
    assert_eq!(call.await.expect("join").0, 503);
    let _again = publish(&gw, "/leak", "s").await;
    wait_pending_zero(&gw, "/leak", "backend gone").await;
}

#[tokio::test]
async fn a_caller_hanging_up_ends_its_call_at_once() {
    let gw = Gateway::start("limits:\n  call_timeout: 60s\n");
    let _backend = publish(&gw, "/hang", "s").await;
    let conn = gw
        .send_raw(b"POST /hang/slow?secret=s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n30000")
        .await;
    let deadline = Instant::now() + WAIT;
    while pending(&gw, "/hang").await != Some(1.0) {
        assert!(Instant::now() < deadline, "the call never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
    // Well before the backend's 30 s reply or the 60 s timeout, the call is gone.
    wait_pending_zero(&gw, "/hang", "hang-up").await;
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            "duplex_gateway_http_requests_total",
            &[("endpoint", "/hang"), ("code", "499")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn backend_errors_other_than_the_mapped_ones_are_500() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/codes", "s").await;
    for code in [-32002, -32003, -32700, 42] {
        let body = json!({"code": code, "message": "m"}).to_string();
        let (status, _, text) = post(&gw.http("/codes/fail?secret=s"), &body).await;
        assert_eq!(status, 500, "{code}: {text}");
        assert_eq!(json_of(&text)["error"]["code"], json!(code));
    }
}

#[tokio::test]
async fn stream_lines_are_written_as_they_arrive() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/tick", "s").await;
    let started = Instant::now();
    let mut resp = reqwest::Client::new()
        .post(gw.http("/tick/ticks?secret=s"))
        .body("4")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let first = resp.chunk().await.expect("chunk").expect("a first chunk");
    let first_at = started.elapsed();
    assert_eq!(&first[..], b"1\n");
    let mut rest = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(String::from_utf8_lossy(&rest), "2\n3\n4\n");
    // The backend takes 900 ms for the whole stream; the first line came long before.
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        first_at < Duration::from_millis(600),
        "first line after {first_at:?}"
    );
}

#[tokio::test]
async fn an_async_call_without_a_backend_is_503_not_202() {
    let gw = Gateway::start("limits:\n  backend_grace: 300ms\n");
    let backend = publish(&gw, "/gone", "s").await;
    backend.close();
    tokio::time::timeout(WAIT, backend.closed())
        .await
        .expect("closed");
    // In the grace the call waits for a backend; none comes, so nothing was sent.
    let (status, _, body) = post(&gw.http("/gone/m?secret=s&async=true"), "1").await;
    assert_eq!(status, 503, "{body}");
}
