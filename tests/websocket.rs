//! Publishing backends and multiplexing WebSocket clients, against the real binary.

mod common;

use std::time::Duration;

use common::*;
use duplex::{Peer, PeerError};
use serde_json::{json, Value};

#[tokio::test]
async fn publish_and_call_round_trip() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/chat", "s1").await;
    let c = client(&gw, "/chat", "s1").await;
    assert_eq!(
        c.call("echo", json!({"hello": [1, 2]})).await,
        Ok(json!({"hello": [1, 2]}))
    );
    let err = c
        .call("nope", json!(null))
        .await
        .expect_err("unknown method");
    assert!(
        matches!(err, PeerError::Rpc(ref e) if e.code == -32601),
        "{err:?}"
    );
}

#[tokio::test]
async fn five_clients_with_the_same_ids_get_their_own_replies() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/chat", "s").await;
    let mut raws = Vec::new();
    for _ in 0..5 {
        raws.push(Raw::open(&gw.client_url("/chat", "s")).await);
    }
    // Every client uses ids 1..=20, all in flight at once.
    for (c, raw) in raws.iter_mut().enumerate() {
        for id in 1..=20 {
            raw.send_json(
                &json!({"type":"req","method":"echo","id":id,"payload":format!("c{c}-{id}")}),
            )
            .await;
        }
    }
    for (c, raw) in raws.iter_mut().enumerate() {
        let mut seen = Vec::new();
        for _ in 1..=20 {
            let reply = raw.recv().await;
            let id = reply["id"].as_u64().expect("id");
            assert_eq!(reply["payload"], json!(format!("c{c}-{id}")), "{reply}");
            assert_eq!(reply["type"], "rep");
            seen.push(id);
        }
        seen.sort();
        assert_eq!(seen, (1..=20).collect::<Vec<_>>());
        raw.silent_for(100).await;
    }
}

#[tokio::test]
async fn two_clients_streaming_input_on_the_same_id_get_separate_results() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/sum", "s").await;
    let mut a = Raw::open(&gw.client_url("/sum", "s")).await;
    let mut b = Raw::open(&gw.client_url("/sum", "s")).await;
    // Interleave the two input streams, both on id 7.
    for i in 1..=5 {
        a.send_json(&json!({"type":"req","method":"add","id":7,"payload":i,"more":true}))
            .await;
        b.send_json(&json!({"type":"req","method":"add","id":7,"payload":i * 100,"more":true}))
            .await;
    }
    a.send_json(&json!({"type":"req","method":"add","id":7,"payload":0}))
        .await;
    b.send_json(&json!({"type":"req","method":"add","id":7,"payload":0}))
        .await;
    let ra = a.recv().await;
    let rb = b.recv().await;
    assert_eq!(
        (ra["id"].clone(), ra["payload"].clone()),
        (json!(7), json!(15)),
        "{ra}"
    );
    assert_eq!(
        (rb["id"].clone(), rb["payload"].clone()),
        (json!(7), json!(1500)),
        "{rb}"
    );
}

#[tokio::test]
async fn streamed_replies_keep_the_client_id_and_more_flags() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/count", "s").await;
    let mut raw = Raw::open(&gw.client_url("/count", "s")).await;
    raw.send_json(&json!({"type":"req","method":"count","id":42,"payload":4}))
        .await;
    for i in 1..=4 {
        let reply = raw.recv().await;
        assert_eq!(reply["id"], json!(42), "{reply}");
        assert_eq!(reply["payload"], json!(i), "{reply}");
        let more = reply.get("more").and_then(Value::as_bool).unwrap_or(false);
        assert_eq!(more, i < 4, "{reply}");
    }
}

#[tokio::test]
async fn unknown_fields_big_numbers_and_ext_reach_the_backend_intact_and_route_never_leaks() {
    let gw = Gateway::start("");
    let mut backend = Raw::open(&gw.publish_url("/raw", "s")).await;
    let mut c = Raw::open(&gw.client_url("/raw", "s")).await;
    let frame = r#"{"type":"req","method":"m","id":5,"payload":{"big":123456789012345678901234567890,"f":1.50},"x-custom":{"keep":[true,null]},"ext":{"trace":"abc","route":"client-own"}}"#;
    c.send(frame).await;
    let seen = match backend.next().await {
        Seen::Text(t) => t,
        other => panic!("{other:?}"),
    };
    assert!(seen.contains("123456789012345678901234567890"), "{seen}");
    assert!(seen.contains(r#""f":1.50"#), "{seen}");
    assert!(
        seen.contains(r#""x-custom":{"keep":[true,null]}"#),
        "{seen}"
    );
    let seen: Value = serde_json::from_str(&seen).expect("json");
    let route = seen["ext"]["route"].as_str().expect("route").to_string();
    assert_eq!(route.len(), 32, "128-bit route key in hex: {route}");
    assert_ne!(route, "client-own");
    assert_eq!(seen["ext"]["trace"], "abc");
    let backend_id = seen["id"].clone();

    // The backend copies ext onto its reply, adds a field of its own.
    backend
        .send_json(
            &json!({"type":"rep","id":backend_id,"payload":{"n":1},"ext":seen["ext"],"x-extra":1}),
        )
        .await;
    let reply = match c.next().await {
        Seen::Text(t) => t,
        other => panic!("{other:?}"),
    };
    assert!(
        !reply.contains(&route),
        "route leaked to the client: {reply}"
    );
    let reply: Value = serde_json::from_str(&reply).expect("json");
    assert_eq!(reply["id"], json!(5));
    assert_eq!(reply["ext"], json!({"trace":"abc","route":"client-own"}));
    assert_eq!(reply["x-extra"], json!(1));

    // A client that sends no ext gets no ext back.
    c.send(r#"{"type":"req","method":"m","id":6}"#).await;
    let seen = backend.recv().await;
    backend
        .send_json(&json!({"type":"rep","id":seen["id"],"payload":2,"ext":seen["ext"]}))
        .await;
    let reply = c.recv().await;
    assert_eq!(reply["id"], json!(6));
    assert!(reply.get("ext").is_none(), "{reply}");
}

#[tokio::test]
async fn the_backend_calls_a_method_on_a_client() {
    let gw = Gateway::start("");
    let mut backend = Raw::open(&gw.publish_url("/cb", "s")).await;
    let client = Peer::builder()
        .handle("greet", |call| async move {
            Ok(json!(format!(
                "hello {}",
                call.payload.as_str().unwrap_or("?")
            )))
        })
        .connect(&gw.client_url("/cb", "s"))
        .await
        .expect("client");
    // The client announces itself so the backend learns its route.
    client.notify("hello", json!(null)).expect("notify");
    let hello = backend.recv().await;
    assert!(
        hello.get("id").is_none(),
        "a request without id stays without id: {hello}"
    );
    let route = hello["ext"]["route"].as_str().expect("route").to_string();

    backend
        .send_json(&json!({"type":"req","method":"greet","id":900,"payload":"backend","ext":{"route":route}}))
        .await;
    let answer = backend.recv().await;
    assert_eq!(answer["type"], "rep");
    assert_eq!(
        answer["id"],
        json!(900),
        "the backend's own id comes back: {answer}"
    );
    assert_eq!(answer["payload"], json!("hello backend"));
    assert_eq!(answer["ext"]["route"], json!(route));
}

#[tokio::test]
async fn calling_a_vanished_client_gives_32001() {
    let gw = Gateway::start("");
    let mut backend = Raw::open(&gw.publish_url("/gone", "s")).await;
    let mut c = Raw::open(&gw.client_url("/gone", "s")).await;
    c.send(r#"{"type":"req","method":"hi"}"#).await;
    let route = backend.recv().await["ext"]["route"].clone();
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    backend
        .send_json(&json!({"type":"req","method":"greet","id":3,"ext":{"route":route}}))
        .await;
    let answer = backend.recv().await;
    assert_eq!(answer["id"], json!(3));
    assert_eq!(answer["error"]["code"], json!(-32001), "{answer}");
    // An unknown route gets the same answer.
    backend
        .send_json(&json!({"type":"req","method":"greet","id":4,"ext":{"route":"00"}}))
        .await;
    assert_eq!(backend.recv().await["error"]["code"], json!(-32001));
    // Without an id it is dropped silently.
    backend
        .send_json(&json!({"type":"req","method":"greet","ext":{"route":"00"}}))
        .await;
    backend.silent_for(200).await;
}

#[tokio::test]
async fn a_client_leaving_mid_call_answers_the_backends_call_with_32001() {
    let gw = Gateway::start("");
    let mut backend = Raw::open(&gw.publish_url("/mid", "s")).await;
    let mut c = Raw::open(&gw.client_url("/mid", "s")).await;
    c.send(r#"{"type":"req","method":"hi"}"#).await;
    let route = backend.recv().await["ext"]["route"].clone();
    backend
        .send_json(&json!({"type":"req","method":"think","id":11,"ext":{"route":route}}))
        .await;
    assert_eq!(c.recv().await["id"], json!(11));
    drop(c);
    let answer = backend.recv().await;
    assert_eq!(answer["id"], json!(11));
    assert_eq!(answer["error"]["code"], json!(-32001));
}

#[tokio::test]
async fn two_endpoints_route_to_their_own_backends_and_secrets() {
    let gw = Gateway::start("");
    let a = test_backend()
        .handle("who", |_| async { Ok(json!("a")) })
        .connect(&gw.publish_url("/a", "sa"))
        .await
        .expect("a");
    let b = test_backend()
        .handle("who", |_| async { Ok(json!("b")) })
        .connect(&gw.publish_url("/team/b", "sb"))
        .await
        .expect("b");
    let ca = client(&gw, "/a", "sa").await;
    let cb = client(&gw, "/team/b", "sb").await;
    assert_eq!(ca.call("who", json!(null)).await, Ok(json!("a")));
    assert_eq!(cb.call("who", json!(null)).await, Ok(json!("b")));
    assert_eq!(ws_status(&gw.client_url("/a", "sb"), &[]).await, 401);
    assert_eq!(ws_status(&gw.client_url("/team/b", "sa"), &[]).await, 401);
    drop((a, b));
}

#[tokio::test]
async fn header_credentials_work_like_query_parameters() {
    let gw = Gateway::start("");
    let _backend = test_backend()
        .header("authorization", &format!("Bearer {TOKEN}"))
        .header("x-duplex-secret", "hs")
        .connect(&gw.ws("/hdr"))
        .await
        .expect("publish with headers");
    let c = Peer::builder()
        .header("x-duplex-secret", "hs")
        .connect(&gw.ws("/hdr"))
        .await
        .expect("connect with header secret");
    assert_eq!(c.call("echo", json!(1)).await, Ok(json!(1)));
    assert_eq!(
        ws_status(&gw.ws("/hdr"), &[("x-duplex-secret", "wrong")]).await,
        401
    );
    assert_eq!(
        ws_status(
            &gw.ws("/x?secret=s"),
            &[("authorization", "Bearer not-a-token-at-all")]
        )
        .await,
        401
    );
}

#[tokio::test]
async fn a_fixed_endpoint_secret_is_enforced() {
    let gw = Gateway::start("endpoints:\n  - path: /fixed\n    secret: the-fixed-one\n");
    // A publisher naming another secret is refused; naming none is fine.
    assert_eq!(
        ws_status(&gw.publish_url("/fixed", "other"), &[]).await,
        401
    );
    let _backend = test_backend()
        .connect(&gw.ws(&format!("/fixed?token={TOKEN}")))
        .await
        .expect("publish without secret");
    assert_eq!(ws_status(&gw.client_url("/fixed", "other"), &[]).await, 401);
    let c = client(&gw, "/fixed", "the-fixed-one").await;
    assert_eq!(c.call("echo", json!("ok")).await, Ok(json!("ok")));
}

#[tokio::test]
async fn a_refused_handshake_closes_only_that_peer() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/hs", "s").await;
    let good = client(&gw, "/hs", "s").await;
    for bad in [
        "SIMPLEX/2.0;json",
        "SIMPLEX/1.0;msgpack",
        "HELLO",
        "{\"type\":\"req\"}",
    ] {
        let mut raw = Raw::connect(&gw.client_url("/hs", "s"), &[])
            .await
            .expect("upgrade");
        raw.send(bad).await;
        match raw.next().await {
            Seen::Text(t) => assert!(t.starts_with("-ERR"), "{bad}: {t}"),
            other => panic!("{bad}: {other:?}"),
        }
        assert_eq!(raw.closed().await, Some(1002), "{bad}");
    }
    assert_eq!(
        good.call("echo", json!("still here")).await,
        Ok(json!("still here"))
    );
}

#[tokio::test]
async fn a_peer_without_handshake_is_closed_after_the_timeout() {
    let gw = Gateway::start("limits:\n  handshake_timeout: 300ms\n");
    let _backend = publish(&gw, "/slow", "s").await;
    let mut raw = Raw::connect(&gw.client_url("/slow", "s"), &[])
        .await
        .expect("upgrade");
    let started = std::time::Instant::now();
    assert_eq!(raw.closed().await, Some(1002));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_second_publish_replaces_the_first_and_clients_carry_on() {
    let gw = Gateway::start("");
    let first = test_backend()
        .handle("who", |_| async { Ok(json!("first")) })
        .connect(&gw.publish_url("/dup", "s"))
        .await
        .expect("first");
    let c = client(&gw, "/dup", "s").await;
    assert_eq!(c.call("who", json!(null)).await, Ok(json!("first")));
    // A call pending on the first backend fails with -32000 when it is replaced.
    let pending = c.call_stream("slow", json!(3000)).expect("call");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _second = test_backend()
        .handle("who", |_| async { Ok(json!("second")) })
        .connect(&gw.publish_url("/dup", "s"))
        .await
        .expect("second");
    assert_eq!(
        tokio::time::timeout(WAIT, first.closed())
            .await
            .expect("first closed"),
        Some(1012)
    );
    match pending.last().await {
        Err(PeerError::Rpc(e)) => assert_eq!(e.code, -32000),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.call("who", json!(null)).await, Ok(json!("second")));
}

#[tokio::test]
async fn a_backend_leaving_fails_pending_calls_and_a_republish_within_the_grace_picks_clients_up() {
    let gw = Gateway::start("limits:\n  backend_grace: 5s\n");
    let backend = publish(&gw, "/grace", "s").await;
    let c = client(&gw, "/grace", "s").await;
    let pending = c.call_stream("slow", json!(5000)).expect("call");
    tokio::time::sleep(Duration::from_millis(100)).await;
    backend.close();
    match pending.last().await {
        Err(PeerError::Rpc(e)) => assert_eq!(e.code, -32000),
        other => panic!("{other:?}"),
    }
    // A call made in the grace waits for the new backend.
    let waiting = c.call_stream("echo", json!("waited")).expect("call");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _again = publish(&gw, "/grace", "s").await;
    assert_eq!(waiting.last().await, Ok(json!("waited")));
    assert_eq!(c.call("echo", json!(2)).await, Ok(json!(2)));
    assert!(!c.is_closed());
}

#[tokio::test]
async fn after_the_grace_clients_are_closed_with_1013_and_the_endpoint_is_gone() {
    let gw = Gateway::start("limits:\n  backend_grace: 300ms\n");
    let backend = publish(&gw, "/bye", "s").await;
    let c = client(&gw, "/bye", "s").await;
    // In the grace, new clients may still connect.
    backend.close();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ws_status(&gw.client_url("/bye", "s"), &[]).await, 101);
    assert_eq!(
        tokio::time::timeout(WAIT, c.closed())
            .await
            .expect("closed"),
        Some(1013)
    );
    assert_eq!(ws_status(&gw.client_url("/bye", "s"), &[]).await, 404);
}

#[tokio::test]
async fn empty_frames_are_ignored() {
    let gw = Gateway::start("");
    let mut backend = Raw::open(&gw.publish_url("/empty", "s")).await;
    let mut raw = Raw::connect(&gw.client_url("/empty", "s"), &[])
        .await
        .expect("upgrade");
    // Before the handshake too.
    raw.send("").await;
    raw.send("SIMPLEX/1.0;json").await;
    assert_eq!(raw.next().await, Seen::Text("+OK".into()));
    raw.send("").await;
    raw.send_binary(b"").await;
    raw.send(r#"{"type":"req","method":"after","id":1}"#).await;
    let first = backend.recv().await;
    assert_eq!(
        first["method"], "after",
        "the empty frames were not forwarded: {first}"
    );
    // And from the backend's side.
    backend.send("").await;
    backend
        .send_json(&json!({"type":"rep","id":first["id"],"payload":"ok","ext":first["ext"]}))
        .await;
    assert_eq!(raw.recv().await["payload"], "ok");
}

#[tokio::test]
async fn binary_frames_holding_json_are_accepted() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/bin", "s").await;
    let mut raw = Raw::open(&gw.client_url("/bin", "s")).await;
    raw.send_binary(br#"{"type":"req","method":"echo","id":1,"payload":"b"}"#)
        .await;
    let reply = raw.recv().await;
    assert_eq!(
        (reply["id"].clone(), reply["payload"].clone()),
        (json!(1), json!("b"))
    );
}

#[tokio::test]
async fn malformed_frames_get_an_error_and_harm_nobody() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/bad", "s").await;
    let good = client(&gw, "/bad", "s").await;
    let mut raw = Raw::open(&gw.client_url("/bad", "s")).await;
    raw.send("not json").await;
    let answer = raw.recv().await;
    assert_eq!(answer["error"]["code"], json!(-32700), "{answer}");
    assert!(answer.get("id").is_none(), "{answer}");
    raw.send(r#"{"type":"req","method":"echo","id":9,"ext":[1]}"#)
        .await;
    let answer = raw.recv().await;
    assert_eq!(answer["id"], json!(9));
    assert_eq!(answer["error"]["code"], json!(-32600), "{answer}");
    raw.send(r#"{"type":"req","method":"echo","id":10,"payload":"fine"}"#)
        .await;
    assert_eq!(raw.recv().await["payload"], "fine");
    assert_eq!(good.call("echo", json!(1)).await, Ok(json!(1)));
}

#[tokio::test]
async fn pings_from_a_peer_are_answered_at_once() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/ping", "s").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.client_url("/ping", "s"))
        .await
        .expect("connect");
    ws.send(WsMessage::Text("SIMPLEX/1.0;json".into()))
        .await
        .expect("send");
    assert!(matches!(ws.next().await, Some(Ok(WsMessage::Text(t))) if t.as_str() == "+OK"));
    ws.send(WsMessage::Ping(b"hello".to_vec().into()))
        .await
        .expect("ping");
    // The default ping interval is 30 s: the pong must not wait for anything else.
    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
        Ok(Some(Ok(WsMessage::Pong(data)))) => assert_eq!(&data[..], b"hello"),
        other => panic!("no pong: {other:?}"),
    }
}

#[tokio::test]
async fn a_scoped_token_publishing_elsewhere_gets_403_even_for_a_malformed_path() {
    let gw = Gateway::start("");
    assert_eq!(
        ws_status(
            &gw.ws(&format!("/other//x?token={TEAM_TOKEN}&secret=s")),
            &[]
        )
        .await,
        403
    );
    assert_eq!(
        ws_status(&gw.ws(&format!("/team/a/../b?token={TOKEN}&secret=s")), &[]).await,
        400
    );
}

#[tokio::test]
async fn a_backend_call_reaches_the_client_without_the_gateway_route() {
    let gw = Gateway::start("");
    let mut backend = Raw::open(&gw.publish_url("/nr", "s")).await;
    let mut c = Raw::open(&gw.client_url("/nr", "s")).await;
    c.send(r#"{"type":"req","method":"hi"}"#).await;
    let route = backend.recv().await["ext"]["route"].clone();
    backend
        .send_json(&json!({"type":"req","method":"ask","id":5,"ext":{"route":route,"trace":"t"}}))
        .await;
    let got = c.recv().await;
    assert_eq!(got["method"], "ask");
    assert_eq!(got["id"], json!(5));
    assert_eq!(got["ext"], json!({"trace":"t"}), "{got}");
}

#[tokio::test]
async fn frames_sent_in_the_same_packet_as_the_upgrade_are_not_lost() {
    use tokio::io::AsyncReadExt;
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/chat", "s1").await;
    // The upgrade request, the Duplex handshake and a call in one write: the gateway reads them
    // together with the request header and must hand them to the WebSocket, in order.
    let mut bytes = upgrade_request("/chat?secret=s1", "HTTP/1.1");
    bytes.extend(client_frame("SIMPLEX/1.0;json"));
    bytes.extend(client_frame(
        r#"{"type":"req","method":"echo","id":7,"payload":"early"}"#,
    ));
    let mut tcp = gw.send_raw(&bytes).await;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("the reply in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen).to_string();
        if text.contains("\"early\"") {
            break text;
        }
    };
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    let ok = text.find("+OK").expect("+OK");
    let reply = text.find(r#""id":7"#).expect("the reply to id 7");
    assert!(ok < reply, "{text}");
}
