//! Limits, keepalive, hostile input and churn, against the real binary. Every test also checks
//! that a well-behaved client of the same endpoint and the backend are unaffected.

mod common;

use std::time::{Duration, Instant};

use common::*;
use duplex::{Peer, PeerError};
use futures_util::future::join_all;
use serde_json::{json, Value};

/// Asserts that the endpoint still serves a well-behaved client.
async fn still_serves(good: &Peer, what: &str) {
    let n = json!(what);
    assert_eq!(good.call("echo", n.clone()).await, Ok(n), "after {what}");
}

#[tokio::test]
async fn a_frame_over_max_message_bytes_closes_only_its_sender_with_1009() {
    let gw = Gateway::start("limits:\n  max_message_bytes: 1000\n  backend_grace: 5s\n");
    let _backend = publish(&gw, "/big", "s").await;
    let good = client(&gw, "/big", "s").await;
    let mut bad = Raw::open(&gw.client_url("/big", "s")).await;
    let big = format!(
        r#"{{"type":"req","method":"echo","id":1,"payload":"{}"}}"#,
        "x".repeat(2000)
    );
    bad.send(&big).await;
    assert_eq!(bad.closed().await, Some(1009));
    still_serves(&good, "a big client frame").await;

    // A backend sending a frame over the limit is closed too; its clients wait for the next one.
    let mut raw_backend = Raw::open(&gw.publish_url("/big2", "s")).await;
    let c = client(&gw, "/big2", "s").await;
    raw_backend
        .send(&big.replace("\"req\",\"method\":\"echo\"", "\"rep\""))
        .await;
    assert_eq!(raw_backend.closed().await, Some(1009));
    assert!(!c.is_closed());
    let _again = publish(&gw, "/big2", "s").await;
    still_serves(&c, "a big backend frame").await;
    still_serves(&good, "a big backend frame elsewhere").await;
}

#[tokio::test]
async fn max_clients_per_endpoint_refuses_the_extra_client_with_503() {
    let gw = Gateway::start("limits:\n  max_clients_per_endpoint: 2\n");
    let _backend = publish(&gw, "/full", "s").await;
    let a = client(&gw, "/full", "s").await;
    let b = client(&gw, "/full", "s").await;
    assert_eq!(ws_status(&gw.client_url("/full", "s"), &[]).await, 503);
    let resp = reqwest::Client::new()
        .post(gw.http("/full/echo?secret=s"))
        .body("1")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 503);
    still_serves(&a, "a refused client").await;
    // A place frees up when a client leaves.
    b.close();
    tokio::time::timeout(WAIT, b.closed())
        .await
        .expect("closed");
    let mut ok = false;
    for _ in 0..100 {
        if ws_status(&gw.client_url("/full", "s"), &[]).await == 101 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the freed place is given to a new client");
}

#[tokio::test]
async fn the_call_over_max_pending_calls_gets_32003() {
    let gw = Gateway::start("limits:\n  max_pending_calls_per_client: 2\n");
    let _backend = publish(&gw, "/pend", "s").await;
    let good = client(&gw, "/pend", "s").await;
    let mut raw = Raw::open(&gw.client_url("/pend", "s")).await;
    for id in 1..=2 {
        raw.send_json(&json!({"type":"req","method":"slow","id":id,"payload":500}))
            .await;
    }
    raw.send_json(&json!({"type":"req","method":"slow","id":3,"payload":1}))
        .await;
    let first = raw.recv().await;
    assert_eq!(
        first["id"],
        json!(3),
        "the extra call is refused at once: {first}"
    );
    assert_eq!(first["error"]["code"], json!(-32003));
    still_serves(&good, "a full client").await;
    let mut done: Vec<u64> = [raw.recv().await, raw.recv().await]
        .iter()
        .map(|r| r["id"].as_u64().expect("id"))
        .collect();
    done.sort();
    assert_eq!(done, vec![1, 2]);
    // With the calls done, there is room again.
    raw.send_json(&json!({"type":"req","method":"echo","id":4,"payload":4}))
        .await;
    assert_eq!(raw.recv().await["payload"], json!(4));
}

/// What a peer must get back for a bad frame: Some((code, id)) for an error reply, None for
/// silence.
type Expected = Option<(i64, Value)>;

/// Sends a bad frame (as text when it is UTF-8, else binary) and checks the answer: an error
/// reply with the expected code and id, or silence. Returns the frame as shown in messages.
async fn send_bad_frame(peer: &mut Raw, frame: &[u8], want: Expected) -> String {
    match std::str::from_utf8(frame) {
        Ok(text) => peer.send(text).await,
        Err(_) => peer.send_binary(frame).await,
    }
    let shown = String::from_utf8_lossy(frame).to_string();
    match want {
        Some((code, id)) => {
            let answer = peer.recv().await;
            assert_eq!(answer["type"], "rep", "{shown}: {answer}");
            assert_eq!(answer["error"]["code"], json!(code), "{shown}: {answer}");
            assert_eq!(
                answer.get("id").cloned().unwrap_or(Value::Null),
                id,
                "{shown}: {answer}"
            );
        }
        None => peer.silent_for(100).await,
    }
    shown
}

/// Frames a client may send, and what it must get back.
fn bad_client_frames() -> Vec<(Vec<u8>, Expected)> {
    let t = |s: &str| s.as_bytes().to_vec();
    vec![
        (t("not json"), Some((-32700, Value::Null))),
        (t("{\"type\":"), Some((-32700, Value::Null))),
        (t("[1,2]"), Some((-32600, Value::Null))),
        (t("42"), Some((-32600, Value::Null))),
        (
            t(r#"{"type":"call","method":"echo","id":1}"#),
            Some((-32600, Value::Null)),
        ),
        (
            t(r#"{"method":"echo","id":1}"#),
            Some((-32600, Value::Null)),
        ),
        (t(r#"{"type":"req","id":2}"#), Some((-32600, json!(2)))),
        (
            t(r#"{"type":"req","method":5,"id":3}"#),
            Some((-32600, json!(3))),
        ),
        (
            t(r#"{"type":"req","method":"echo","id":-1}"#),
            Some((-32600, Value::Null)),
        ),
        (
            t(r#"{"type":"req","method":"echo","id":1.5}"#),
            Some((-32600, Value::Null)),
        ),
        (
            t(r#"{"type":"req","method":"echo","id":"7"}"#),
            Some((-32600, Value::Null)),
        ),
        (
            t(r#"{"type":"req","method":"echo","id":4,"ext":"x"}"#),
            Some((-32600, json!(4))),
        ),
        (
            t(r#"{"type":"req","method":"echo","id":5,"more":"yes"}"#),
            Some((-32600, json!(5))),
        ),
        (
            t(r#"{"type":"req","method":"echo","id":6,"error":7}"#),
            Some((-32600, json!(6))),
        ),
        (t(r#"{"type":"rep","id":77,"payload":1}"#), None),
        (t(r#"{"type":"rep","payload":1}"#), None),
        (t(r#"{"type":"rep","id":"x"}"#), None),
        (vec![0xff, 0x00, 0x13, 0x37], Some((-32700, Value::Null))),
        (t("\u{0}\u{0}\u{0}"), Some((-32700, Value::Null))),
        (
            t("{\"type\":\"req\",\"method\":\"echo\",\"id\":8,\"payload\":\"\u{0}\"}"),
            Some((-32700, Value::Null)),
        ),
    ]
}

#[tokio::test]
async fn malformed_input_from_a_client_gets_its_error_and_harms_nobody() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/mal", "s").await;
    let good = client(&gw, "/mal", "s").await;
    let mut raw = Raw::open(&gw.client_url("/mal", "s")).await;
    for (i, (frame, want)) in bad_client_frames().into_iter().enumerate() {
        let shown = send_bad_frame(&mut raw, &frame, want).await;
        // The sender itself carries on.
        let id = 1000 + i as u64;
        raw.send_json(&json!({"type":"req","method":"echo","id":id,"payload":"ok"}))
            .await;
        let reply = raw.recv().await;
        assert_eq!(
            (reply["id"].clone(), reply["payload"].clone()),
            (json!(id), json!("ok")),
            "after {shown}"
        );
        still_serves(&good, &shown).await;
    }
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_only_its_sender_with_1007() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/utf", "s").await;
    let good = client(&gw, "/utf", "s").await;
    let mut raw = Raw::open(&gw.client_url("/utf", "s")).await;
    raw.send_invalid_utf8_text(&[b'{', 0xc3, 0x28, b'}']).await;
    assert_eq!(raw.closed().await, Some(1007));
    still_serves(&good, "invalid UTF-8").await;
}

#[tokio::test]
async fn malformed_input_from_the_backend_gets_its_error_and_harms_nobody() {
    let gw = Gateway::start("");
    let mut backend = Raw::open(&gw.publish_url("/bm", "s")).await;
    let mut c = Raw::open(&gw.client_url("/bm", "s")).await;
    let frames: Vec<(&[u8], Expected)> = vec![
        (b"not json", Some((-32700, Value::Null))),
        (b"[]", Some((-32600, Value::Null))),
        (
            br#"{"type":"req","method":"m","id":9,"ext":[]}"#,
            Some((-32600, json!(9))),
        ),
        (br#"{"type":"rep","id":12345,"payload":1}"#, None),
        (br#"{"type":"rep","payload":1}"#, None),
        (
            br#"{"type":"req","method":"m","ext":{"route":"nobody"}}"#,
            None,
        ),
        (&[0xfe, 0xff, 0x00], Some((-32700, Value::Null))),
    ];
    for (frame, want) in frames {
        let shown = send_bad_frame(&mut backend, frame, want).await;
        // The backend connection and the client carry on.
        c.send_json(&json!({"type":"req","method":"echo","id":1,"payload":shown}))
            .await;
        let req = backend.recv().await;
        assert_eq!(req["payload"], json!(shown));
        backend
            .send_json(&json!({"type":"rep","id":req["id"],"payload":"fine","ext":req["ext"]}))
            .await;
        assert_eq!(c.recv().await["payload"], "fine", "after {shown}");
    }
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_and_the_others_keep_going() {
    // 16 x 4096 bytes is this client's budget of undelivered frames (the minimum is 64 KiB).
    let gw = Gateway::start("limits:\n  max_message_bytes: 4096\n");
    let _backend = publish(&gw, "/slow", "s").await;
    let good = client(&gw, "/slow", "s").await;
    let mut stuck = Raw::open(&gw.client_url("/slow", "s")).await;
    // Ask for far more than socket buffers hold, then never read.
    stuck
        .send_json(&json!({"type":"req","method":"count","id":1,"payload":200000}))
        .await;
    let started = Instant::now();
    for i in 0..300 {
        assert_eq!(good.call("echo", json!(i)).await, Ok(json!(i)));
    }
    assert!(
        started.elapsed() < WAIT,
        "the other client was held up: {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let text = gw.metrics().await;
        let dropped = metric(
            &text,
            "duplex_gateway_dropped_messages_total",
            &[("endpoint", "/slow"), ("reason", "client_queue_full")],
        );
        let clients = metric(&text, "duplex_gateway_clients", &[("endpoint", "/slow")]);
        if dropped.is_some() && clients == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stuck client was not closed: {dropped:?} {clients:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_serves(&good, "a stuck client").await;
    drop(stuck);
}

#[tokio::test]
async fn a_dead_backend_is_detected_within_three_ping_intervals() {
    let gw = Gateway::start("limits:\n  ping_interval: 300ms\n  backend_grace: 10s\n");
    // A backend that stops answering anything (it is never read again): like a paused process.
    let frozen = Raw::open(&gw.publish_url("/dead", "s")).await;
    let c = client(&gw, "/dead", "s").await;
    let pending = c
        .call_stream("echo", json!("never answered"))
        .expect("call");
    let started = Instant::now();
    match tokio::time::timeout(WAIT, pending.last())
        .await
        .expect("the call ends")
    {
        Err(PeerError::Rpc(e)) => assert_eq!(e.code, -32000),
        other => panic!("{other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(900 + 500),
        "detected after {took:?}"
    );
    // The client answered every ping: it is still connected, and a new backend serves it.
    let _again = publish(&gw, "/dead", "s").await;
    still_serves(&c, "a dead backend").await;
    drop(frozen);
}

#[tokio::test]
async fn a_dead_client_is_closed_and_live_ones_stay() {
    let gw = Gateway::start("limits:\n  ping_interval: 200ms\n");
    let _backend = publish(&gw, "/dc", "s").await;
    let live = client(&gw, "/dc", "s").await;
    let frozen = Raw::open(&gw.client_url("/dc", "s")).await;
    let started = Instant::now();
    let deadline = Instant::now() + WAIT;
    loop {
        let clients = metric(
            &gw.metrics().await,
            "duplex_gateway_clients",
            &[("endpoint", "/dc")],
        );
        if clients == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the frozen client stays: {clients:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three intervals (600 ms), with room for a slow machine.
    assert!(
        started.elapsed() < Duration::from_millis(600 + 700),
        "{:?}",
        started.elapsed()
    );
    // Idle for several intervals, the live client is still there.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!live.is_closed());
    still_serves(&live, "a dead client").await;
    drop(frozen);
}

#[tokio::test]
async fn churn_leaves_no_client_or_call_behind() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/churn", "s").await;
    let url = gw.client_url("/churn", "s");
    let http = gw.http("/churn/echo?secret=s");
    let tasks = (0..40).map(|t| {
        let url = url.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let web = reqwest::Client::new();
            for round in 0..5 {
                let c = Peer::builder().connect(&url).await.expect("connect");
                // Calls in flight when the client leaves are part of the churn.
                let _abandoned = c.call_stream("slow", json!(50)).expect("call");
                for i in 0..3 {
                    let v = json!([t, round, i]);
                    assert_eq!(c.call("echo", v.clone()).await, Ok(v));
                }
                let resp = web
                    .post(&http)
                    .body(json!([t, round]).to_string())
                    .send()
                    .await
                    .expect("post");
                assert_eq!(resp.status().as_u16(), 200);
                c.close();
            }
        })
    });
    for r in join_all(tasks).await {
        r.expect("task");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let text = gw.metrics().await;
        let clients = metric(&text, "duplex_gateway_clients", &[("endpoint", "/churn")]);
        let pending = metric(
            &text,
            "duplex_gateway_pending_calls",
            &[("endpoint", "/churn")],
        );
        if clients == Some(0.0) && pending == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: clients {clients:?}, pending {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_long_burst_reaches_clients_that_read() {
    // A burst far longer than any frame count limit, well within the default byte budget.
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/burst", "s").await;
    let c = client(&gw, "/burst", "s").await;
    let mut replies = c.call_stream("count", json!(20000)).expect("call");
    let mut n = 0u64;
    while let Some(item) = replies.next().await {
        n += 1;
        assert_eq!(item, Ok(json!(n)));
    }
    assert_eq!(n, 20000);
    let resp = reqwest::Client::new()
        .post(gw.http("/burst/count?secret=s"))
        .body("20000")
        .send()
        .await
        .expect("post");
    let text = resp.text().await.expect("body");
    assert_eq!(text.lines().count(), 20000);
    assert_eq!(text.lines().last(), Some("20000"));
}

#[tokio::test]
async fn a_call_waiting_in_the_grace_does_not_count_as_a_silent_peer() {
    let gw = Gateway::start("limits:\n  ping_interval: 200ms\n  backend_grace: 5s\n");
    let backend = publish(&gw, "/wait", "s").await;
    let c = client(&gw, "/wait", "s").await;
    backend.close();
    tokio::time::timeout(WAIT, backend.closed())
        .await
        .expect("closed");
    // Once the gateway has seen it leave (else the call could still go to the old backend).
    wait_for_metric(
        &gw,
        "duplex_gateway_backends",
        &[("endpoint", "/wait")],
        |v| v.is_none(),
    )
    .await;
    // This call waits for the next backend, far longer than two ping intervals.
    let waiting = c.call_stream("echo", json!("later")).expect("call");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _again = publish(&gw, "/wait", "s").await;
    assert_eq!(waiting.last().await, Ok(json!("later")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !c.is_closed(),
        "the client was taken for dead while the gateway held its call"
    );
    still_serves(&c, "a long wait").await;
}
