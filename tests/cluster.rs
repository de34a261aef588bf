//! The cluster against real processes: a real `nats-server` on a free loopback port and two or
//! three gateway processes. Clients on one node, backends on another: WebSocket and HTTP calls,
//! ids, streams both ways, backend-to-client calls, pools across nodes, a node killed under
//! load, NATS restarted, and the same refusals as one node.
//!
//! Needs `nats-server` (Debian package `nats-server`; `scripts/setup.sh` installs it): without
//! it these tests fail, they do not skip.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nats::Nats;
use common::*;
use duplex::{Call, Peer, PeerBuilder, PeerError};
use serde_json::{json, Value};

/// The cluster section (and limits a default nats-server carries) for node `name`.
fn cluster_config(nats: &Nats, name: &str, extra_limits: &str) -> String {
    format!(
        "limits:\n  max_message_bytes: 1000000\n  backend_grace: 3s\n{extra_limits}\
         cluster:\n  nats: [{}]\n  node: {name}\n  subject_prefix: test.gw\n  node_timeout: 2s\n",
        nats.url()
    )
}

/// Starts `names.len()` nodes on `nats` and waits until each hears all the others.
async fn nodes(nats: &Nats, names: &[&str], extra_limits: &str) -> Vec<Gateway> {
    let gateways: Vec<Gateway> = names
        .iter()
        .map(|name| Gateway::start(&cluster_config(nats, name, extra_limits)))
        .collect();
    for gw in &gateways {
        let n = names.len() as f64;
        wait_for_metric(gw, "duplex_gateway_cluster_nodes", &[], |v| v == Some(n)).await;
    }
    gateways
}

/// The test backend, also answering `who` with `name`.
fn named(name: &'static str) -> PeerBuilder {
    test_backend().handle("who", move |_call: Call| async move { Ok(json!(name)) })
}

async fn publish_named(gw: &Gateway, path: &str, name: &'static str) -> Peer {
    named(name)
        .connect(&gw.publish_url(path, "s"))
        .await
        .unwrap_or_else(|e| panic!("publish {name}: {e}\n{}", gw.log()))
}

async fn who(peer: &Peer) -> String {
    match tokio::time::timeout(WAIT, peer.call("who", Value::Null)).await {
        Ok(Ok(Value::String(name))) => name,
        other => panic!("who: {other:?}"),
    }
}

/// The route key of `peer` as its backend sees it (the test backend's `route` method).
async fn route_of(peer: &Peer) -> String {
    match peer.call("route", Value::Null).await {
        Ok(Value::String(route)) => route,
        other => panic!("route: {other:?}"),
    }
}

/// `backend` calls `hello` on the client `route` names, with `payload`; its answer, in time.
async fn hello(backend: &Peer, route: &str, payload: Value) -> Result<Value, PeerError> {
    let call = backend.call_route(route, "hello", payload).expect("call");
    tokio::time::timeout(WAIT, call.last())
        .await
        .expect("in time")
}

/// An HTTP call of the test backend's `slow` method (`ms` milliseconds): its status and body,
/// or None if it got no answer.
async fn slow_call(url: String, ms: u64) -> Option<(u16, String)> {
    let response = reqwest::Client::new()
        .post(url)
        .body(ms.to_string())
        .timeout(WAIT)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Waits until `backend`'s calls to `route` get -32001 (the client left).
async fn client_gone_for(backend: &Peer, route: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        match hello(backend, route, json!("again")).await {
            Err(PeerError::Rpc(e)) if e.code == -32001 => return,
            other => {
                assert!(Instant::now() < deadline, "still {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn websocket_and_http_calls_reach_a_backend_on_another_node() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let _backend = publish(b, "/e", "s").await;
    served_from(a, "/e").await;

    let (status, body) = post(a, "/e/echo?secret=s", r#"{"x":[1,2]}"#).await;
    assert_eq!((status, body.as_str()), (200, r#"{"x":[1,2]}"#));
    let (status, body) = post(a, "/e/count?secret=s", "3").await;
    assert_eq!((status, body.as_str()), (200, "1\n2\n3\n"));

    let peer = client(a, "/e", "s").await;
    for i in 0..20 {
        let got = tokio::time::timeout(WAIT, peer.call("echo", json!({ "i": i })))
            .await
            .expect("reply in time");
        assert_eq!(got, Ok(json!({ "i": i })));
    }
    // The frames crossed NATS both ways.
    let text = a.metrics().await;
    let out = metric(
        &text,
        "duplex_gateway_cluster_messages_total",
        &[("direction", "out")],
    );
    let inn = metric(
        &text,
        "duplex_gateway_cluster_messages_total",
        &[("direction", "in")],
    );
    assert!(
        out.is_some_and(|v| v >= 20.0) && inn.is_some_and(|v| v >= 20.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "duplex_gateway_cluster_connected", &[]),
        Some(1.0)
    );
    // The relayed HTTP calls (served_from's first one included) count where they were answered.
    let ok = [("endpoint", "/e"), ("code", "200")];
    assert_eq!(
        metric(&text, "duplex_gateway_http_requests_total", &ok),
        Some(3.0)
    );
}

#[tokio::test]
async fn refusals_are_the_same_as_on_one_node() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let backend = publish(b, "/r", "s").await;
    served_from(a, "/r").await;
    // Unknown endpoint: 404 on both nodes, HTTP and WebSocket.
    for gw in [a, b] {
        assert_eq!(post(gw, "/nope/echo?secret=s", "1").await.0, 404);
        assert_eq!(ws_status(&gw.client_url("/nope", "s"), &[]).await, 404);
        // Wrong secret: 401, checked on the client's node against the announced digest.
        assert_eq!(post(gw, "/r/echo?secret=wrong", "1").await.0, 401);
        assert_eq!(ws_status(&gw.client_url("/r", "wrong"), &[]).await, 401);
    }
    // A call in flight when the backend (on the other node) leaves: 503, as on one node.
    let slow = tokio::spawn({
        let url = a.http("/r/slow?secret=s");
        async move {
            reqwest::Client::new()
                .post(url)
                .body("3000")
                .timeout(WAIT)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    backend.close();
    assert_eq!(slow.await.expect("task"), Some(503));
    // The grace (3 s) runs out everywhere: 404 on both nodes.
    let deadline = Instant::now() + WAIT;
    loop {
        let (sa, sb) = (
            post(a, "/r/echo?secret=s", "1").await.0,
            post(b, "/r/echo?secret=s", "1").await.0,
        );
        if (sa, sb) == (404, 404) {
            break;
        }
        assert!(Instant::now() < deadline, "still {sa} / {sb}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And the series of the relayed calls leave a's metrics with the endpoint.
    let gone = [("endpoint", "/r"), ("code", "503")];
    wait_for_metric(a, "duplex_gateway_http_requests_total", &gone, |v| {
        v.is_none()
    })
    .await;
}

#[tokio::test]
async fn clients_on_two_nodes_using_the_same_ids_get_their_own_replies() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let _backend = publish(b, "/ids", "s").await;
    served_from(a, "/ids").await;
    // One client on each node: both number their calls from 1.
    let on_a = client(a, "/ids", "s").await;
    let on_b = client(b, "/ids", "s").await;
    for round in 0..10 {
        let (x, y) = tokio::join!(
            on_a.call("slow", json!(20 + round)),
            on_b.call("slow", json!(100 + round))
        );
        assert_eq!(x, Ok(json!(20 + round)));
        assert_eq!(y, Ok(json!(100 + round)));
    }
}

#[tokio::test]
async fn streams_cross_nodes_in_order_both_ways() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let _backend = publish(b, "/s", "s").await;
    served_from(a, "/s").await;
    let peer = client(a, "/s", "s").await;
    // Backend to client: 1..=500 in order.
    let mut replies = peer.call_stream("count", json!(500)).expect("call");
    let mut got = Vec::new();
    while let Some(next) = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("next reply in time")
    {
        got.push(next.expect("reply"));
    }
    let want: Vec<Value> = (1..=500).map(|i| json!(i)).collect();
    assert_eq!(got, want);
    // Client to backend: streamed input, summed in the order sent.
    let input: Vec<Value> = (1..=300).map(|i| json!(i)).collect();
    let sum = peer.call_with_input("add", &input).expect("call");
    let total = tokio::time::timeout(WAIT, sum.last())
        .await
        .expect("in time");
    assert_eq!(total, Ok(json!(300 * 301 / 2)));
    // And an NDJSON stream over HTTP.
    let (status, body) = post(a, "/s/count?secret=s", "100").await;
    assert_eq!(status, 200);
    let lines: Vec<String> = body.lines().map(str::to_string).collect();
    let want: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
    assert_eq!(lines, want);
}

#[tokio::test]
async fn a_backend_calls_a_client_on_another_node_and_learns_when_it_left() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let backend = publish(b, "/c", "s").await;
    served_from(a, "/c").await;
    let peer = Peer::builder()
        .handle("hello", |call: Call| async move {
            Ok(json!(format!("hello {}", call.payload)))
        })
        .connect(&a.client_url("/c", "s"))
        .await
        .expect("client");
    let route = route_of(&peer).await;
    let answer = hello(&backend, &route, json!("b")).await;
    assert_eq!(answer, Ok(json!("hello \"b\"")));

    // The client leaves: the backend's next call to it gets -32001.
    peer.close();
    client_gone_for(&backend, &route).await;
}

#[tokio::test]
async fn a_pool_spans_nodes_and_clients_stay_pinned_across() {
    let nats = Nats::start();
    let pool = "  max_backends_per_endpoint: 2\n";
    let gws = nodes(&nats, &["a", "b", "c"], pool).await;
    let (a, b, c) = (&gws[0], &gws[1], &gws[2]);
    let _on_a = publish_named(a, "/p", "a").await;
    let _on_b = publish_named(b, "/p", "b").await;
    served_from(c, "/p").await;
    // Node c has no backend: both nodes' backends serve its clients.
    let deadline = Instant::now() + WAIT;
    let mut seen = std::collections::HashSet::new();
    let mut peers = Vec::new();
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "clients of c only reached {seen:?}"
        );
        let peer = client(c, "/p", "s").await;
        let first = who(&peer).await;
        // Pinned: every later call of this client goes to the same backend.
        for _ in 0..5 {
            assert_eq!(who(&peer).await, first);
        }
        seen.insert(first);
        peers.push(peer);
    }
    // Nodes with a backend serve their own clients with it.
    for (gw, name) in [(a, "a"), (b, "b")] {
        let peer = client(gw, "/p", "s").await;
        for _ in 0..3 {
            assert_eq!(who(&peer).await, name);
        }
    }
    let text = a.metrics().await;
    assert_eq!(
        metric(&text, "duplex_gateway_backends", &[("endpoint", "/p")]),
        Some(1.0),
        "each node counts its own backends"
    );
}

#[tokio::test]
async fn max_backends_counts_the_whole_cluster() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    // A pool of one: a publish on b replaces the backend on a (1012), wherever it is.
    let old = publish_named(a, "/one", "old").await;
    served_from(b, "/one").await;
    let _new = publish_named(b, "/one", "new").await;
    let closed = tokio::time::timeout(WAIT, old.closed())
        .await
        .expect("closed in time");
    assert_eq!(closed, Some(1012));
    let peer = client(a, "/one", "s").await;
    assert_eq!(who(&peer).await, "new");
}

#[tokio::test]
async fn a_node_killed_under_load_fails_only_its_calls_and_clients_move_on() {
    let nats = Nats::start();
    let pool = "  max_backends_per_endpoint: 2\n";
    let mut gws = nodes(&nats, &["a", "b", "c"], pool).await;
    let _on_a = publish_named(&gws[0], "/k", "a").await;
    let _on_b = publish_named(&gws[1], "/k", "b").await;
    served_from(&gws[2], "/k").await;
    // Clients of c spread over both nodes' backends; a client of a stays on a.
    let c = &gws[2];
    let mut peers = Vec::new();
    let mut names = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !(names.contains(&"a".to_string()) && names.contains(&"b".to_string())) {
        assert!(Instant::now() < deadline, "not spread: {names:?}");
        let peer = client(c, "/k", "s").await;
        names.push(who(&peer).await);
        peers.push(peer);
    }
    let local_on_a = client(&gws[0], "/k", "s").await;
    // Load: every client calls in a loop; count failures per kind.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let peers = Arc::new(peers);
    let mut load = Vec::new();
    for i in 0..peers.len() {
        let (peers, stop, ok) = (peers.clone(), stop.clone(), ok.clone());
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match tokio::time::timeout(WAIT, peers[i].call("slow", json!(20))).await {
                    Ok(Ok(_)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Err(PeerError::Rpc(e))) => failures.push(e.code),
                    other => panic!("client {i}: {other:?}"),
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGKILL node b: no goodbye, found by its silence.
    let killed = gws.remove(1);
    killed.signal("KILL");
    let c = &gws[1];
    wait_for_metric(c, "duplex_gateway_cluster_nodes", &[], |v| v == Some(2.0)).await;
    let before = ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for task in load {
        failures.extend(task.await.expect("load task"));
    }
    // Only calls that were on b failed, each with -32000; afterwards every client is served.
    assert!(failures.iter().all(|code| *code == -32000), "{failures:?}");
    assert!(
        ok.load(Ordering::SeqCst) > before,
        "calls went on after the kill"
    );
    for peer in peers.iter() {
        assert_eq!(who(peer).await, "a", "every client of c is on a now");
    }
    // The client of a never noticed.
    assert_eq!(who(&local_on_a).await, "a");
    drop(killed);
}

#[tokio::test]
async fn a_dead_node_is_learned_from_the_first_call_sent_to_it() {
    let nats = Nats::start();
    let pool = "  max_backends_per_endpoint: 2\n";
    // node_timeout is 2 s here: nothing below may wait for it.
    let mut gws = nodes(&nats, &["a", "b", "c"], pool).await;
    let _on_a = publish_named(&gws[0], "/d", "a").await;
    let _on_b = publish_named(&gws[1], "/d", "b").await;
    served_from(&gws[2], "/d").await;
    // c has heard of both backends: its clients are spread over them.
    let mut on_b = None;
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while on_b.is_none() || !seen.contains(&"a".to_string()) {
        assert!(Instant::now() < deadline, "not spread: {seen:?}");
        let peer = client(&gws[2], "/d", "s").await;
        let name = who(&peer).await;
        if name == "b" {
            on_b = Some(peer);
        }
        seen.push(name);
    }
    // A call running on b when it dies fails well before node_timeout.
    let running = on_b.expect("a client on b");
    let call = tokio::spawn(async move {
        let started = Instant::now();
        let result = running.call("slow", json!(5000)).await;
        (result, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut killed = gws.remove(1);
    killed.signal("KILL");
    killed.wait_exit(WAIT).expect("b died");
    let (result, took) = call.await.expect("call task");
    assert!(
        matches!(&result, Err(PeerError::Rpc(e)) if e.code == -32000),
        "{result:?}"
    );
    assert!(
        took < Duration::from_millis(1700),
        "the running call waited {took:?}"
    );
    // HTTP calls on c, one after the other: each opens a session on a or on the dead b. The
    // first sent to b learns at once that nobody is there (NATS: no responders).
    let c = &gws[1];
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let (status, _) = post(c, "/d/echo?secret=s", "1").await;
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "a call waited {:?} (status {status})\n{}",
            started.elapsed(),
            c.log()
        );
        statuses.push(status);
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    wait_for_metric(c, "duplex_gateway_cluster_nodes", &[], |v| v == Some(2.0)).await;
    assert!(
        c.log().contains("no responders"),
        "the dead node was learned from NATS, not from its silence: {}",
        c.log()
    );
}

#[tokio::test]
async fn a_nats_restart_fails_calls_that_need_it_then_the_cluster_recovers() {
    let mut nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let _remote = publish(b, "/n", "s").await;
    let _local = publish(a, "/local", "s").await;
    served_from(a, "/n").await;

    nats.stop();
    wait_for_metric(a, "duplex_gateway_cluster_connected", &[], |v| {
        v == Some(0.0)
    })
    .await;
    // A call that needs the other node fails clearly, and at once; local traffic goes on.
    let started = Instant::now();
    let (status, body) = post(a, "/n/echo?secret=s", "1").await;
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        post(a, "/local/echo?secret=s", "7").await,
        (200, "7".into())
    );

    // NATS comes back on the same port: the nodes reconnect by themselves.
    nats.run();
    wait_for_metric(a, "duplex_gateway_cluster_connected", &[], |v| {
        v == Some(1.0)
    })
    .await;
    served_from(a, "/n").await;
    assert_eq!(post(a, "/n/echo?secret=s", "8").await, (200, "8".into()));
}

#[tokio::test]
async fn a_node_starts_without_nats_and_joins_when_it_comes() {
    let mut nats = Nats::start();
    nats.stop();
    let a = Gateway::start(&cluster_config(&nats, "a", ""));
    // Up and serving its own backends, reporting the link down.
    wait_for_metric(&a, "duplex_gateway_cluster_connected", &[], |v| {
        v == Some(0.0)
    })
    .await;
    let _local = publish(&a, "/here", "s").await;
    assert_eq!(
        post(&a, "/here/echo?secret=s", "1").await,
        (200, "1".into())
    );
    nats.run();
    wait_for_metric(&a, "duplex_gateway_cluster_connected", &[], |v| {
        v == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn a_message_size_nats_cannot_carry_stops_the_start() {
    let nats = Nats::start();
    let config = |port: u16, metrics_port: u16| {
        Gateway::config_text(port, metrics_port, "")
            + &format!(
                "cluster:\n  nats: [{}]\n  node: big\n  node_timeout: 2s\n",
                nats.url()
            )
    };
    // The default max_message_bytes (1 MiB) plus the envelope does not fit the default
    // max_payload (1 MiB).
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, config(free_port(), free_port())).expect("config");
    let out = Command::new(gateway_binary())
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1048576") && stderr.contains("max_payload"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sigterm_tells_the_other_nodes_at_once() {
    let nats = Nats::start();
    // A node timeout far longer than the test: only the goodbye can explain a quick drop.
    let long = |name: &str| {
        cluster_config(&nats, name, "").replace("node_timeout: 2s", "node_timeout: 1m")
    };
    let a = Gateway::start(&long("a"));
    let mut b = Gateway::start(&long("b"));
    wait_for_metric(&a, "duplex_gateway_cluster_nodes", &[], |v| v == Some(2.0)).await;
    b.signal("TERM");
    assert!(b.wait_exit(WAIT).is_some());
    let started = Instant::now();
    wait_for_metric(&a, "duplex_gateway_cluster_nodes", &[], |v| v == Some(1.0)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn sigterm_closes_relayed_websocket_clients_with_1001_and_lets_http_calls_finish() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let _backend = publish(a, "/t", "s").await;
    served_from(b, "/t").await;
    // A WebSocket client and an HTTP call on b, both relayed to a's backend.
    let peer = client(b, "/t", "s").await;
    assert_eq!(peer.call("echo", json!(1)).await, Ok(json!(1)));
    let slow = tokio::spawn(slow_call(b.http("/t/slow?secret=s"), 1500));
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.signal("TERM");
    let code = tokio::time::timeout(WAIT, peer.closed())
        .await
        .expect("closed in time");
    assert_eq!(code, Some(1001));
    assert_eq!(
        slow.await.expect("task"),
        Some((200, "1500".to_string())),
        "the HTTP call in progress finished"
    );
}

#[tokio::test]
async fn sigterm_of_the_backends_node_lets_http_calls_relayed_to_it_finish() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let _backend = publish(a, "/t", "s").await;
    served_from(b, "/t").await;
    // An HTTP call on b, relayed to a's backend; then a (the backend's node) stops.
    let slow = tokio::spawn(slow_call(b.http("/t/slow?secret=s"), 2000));
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.signal("TERM");
    assert_eq!(
        slow.await.expect("task"),
        Some((200, "2000".to_string())),
        "the relayed call finished as a's own would"
    );
}

#[tokio::test]
async fn a_restart_of_the_backends_node_puts_its_endpoints_in_their_grace_elsewhere() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let backend = publish(a, "/r", "s").await;
    served_from(b, "/r").await;
    // a stops (SIGTERM): it closes its backend and tells b it leaves.
    a.signal("TERM");
    assert_eq!(
        tokio::time::timeout(WAIT, backend.closed())
            .await
            .expect("closed"),
        Some(1001)
    );
    // A call on b meanwhile waits for a backend (the grace, 3 s here), never a 404; the backend
    // comes back (here on b) and the call is answered.
    let (call, _) = tokio::join!(post(b, "/r/echo?secret=s", "7"), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        publish(b, "/r", "s").await
    });
    assert_eq!(call, (200, "7".to_string()));
    // A wrong secret is still refused during a grace.
    let (status, _) = post(b, "/r/echo?secret=wrong", "7").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_table_larger_than_a_message_reaches_every_node_in_pieces_and_changes_follow() {
    // 64 KiB per message: 120 endpoints with 1,000-byte paths are about 130 KB of table, more
    // than one heartbeat could carry.
    let nats = Nats::start_with_config("max_payload: 65536\n");
    let config = |name: &str| {
        cluster_config(&nats, name, "  max_message_bytes: 32000\n")
            .replace("  max_message_bytes: 1000000\n", "")
    };
    let a = Gateway::start(&config("a"));
    let paths: Vec<String> = (0..120)
        .map(|i| format!("/p{i:03}{}", "x".repeat(990)))
        .collect();
    let mut backends = Vec::new();
    for path in &paths {
        backends.push(publish(&a, path, "s").await);
    }
    // A node that joins now learns the whole table, in pages; a's heartbeats go out all along.
    let b = Gateway::start(&config("b"));
    wait_for_metric(&b, "duplex_gateway_cluster_nodes", &[], |v| v == Some(2.0)).await;
    for path in [&paths[0], &paths[59], &paths[119]] {
        served_from(&b, path).await;
    }
    for gw in [&a, &b] {
        let connected = metric(&gw.metrics().await, "duplex_gateway_cluster_connected", &[]);
        assert_eq!(connected, Some(1.0));
    }
    // Changes follow as deltas: 20 endpoints go (after their grace), b stops knowing them.
    for backend in backends.drain(100..) {
        backend.close();
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = post(&b, &format!("{}/echo?secret=s", paths[119]), "1").await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        post(&b, &format!("{}/echo?secret=s", paths[99]), "1")
            .await
            .0,
        200
    );
    // A third node joining later hears the same table.
    let c = Gateway::start(&config("c"));
    served_from(&c, &paths[42]).await;
    assert_eq!(
        post(&c, &format!("{}/echo?secret=s", paths[110]), "1")
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn two_secrets_published_at_once_on_two_nodes_converge_to_the_first() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "  max_backends_per_endpoint: 2\n").await;
    let (a, b) = (&gws[0], &gws[1]);
    // Both publishes land before either node hears the other's: neither is refused at once.
    let (on_a, on_b) = tokio::join!(publish(a, "/two", "s1"), publish(b, "/two", "s2"));
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::select! {
            code = on_a.closed() => ("a", code),
            code = on_b.closed() => ("b", code),
        }
    })
    .await
    .expect("one of the two is closed within the heartbeats");
    assert_eq!(closed.1, Some(1008), "{closed:?}");
    // One secret is left, the same on both nodes.
    let (winner, loser) = if closed.0 == "a" {
        ("s2", "s1")
    } else {
        ("s1", "s2")
    };
    for gw in [a, b] {
        let deadline = Instant::now() + WAIT;
        loop {
            let ok = post(gw, &format!("/two/echo?secret={winner}"), "1").await;
            let refused = post(gw, &format!("/two/echo?secret={loser}"), "1").await;
            if ok == (200, "1".to_string()) && refused.0 == 401 {
                break;
            }
            assert!(Instant::now() < deadline, "{ok:?} {refused:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn max_clients_counts_a_nodes_own_clients_and_the_sessions_relayed_to_it() {
    let nats = Nats::start();
    let limits = "  max_clients_per_endpoint: 2\n";
    let gws = nodes(&nats, &["a", "b"], limits).await;
    let (a, b) = (&gws[0], &gws[1]);
    let _backend = publish(b, "/m", "s").await;
    served_from(a, "/m").await;
    let one = client(a, "/m", "s").await;
    let two = client(a, "/m", "s").await;
    assert_eq!(ws_status(&a.client_url("/m", "s"), &[]).await, 503);
    // A relayed client opens its session on b with its first call ...
    for peer in [&one, &two] {
        assert_eq!(peer.call("echo", json!("x")).await, Ok(json!("x")));
    }
    // ... and b counts the sessions relayed to it as its own clients: it is full too.
    assert_eq!(ws_status(&b.client_url("/m", "s"), &[]).await, 503);
    // One leaves: room again on both nodes.
    one.close();
    for gw in [a, b] {
        let deadline = Instant::now() + WAIT;
        while ws_status(&gw.client_url("/m", "s"), &[]).await != 101 {
            assert!(Instant::now() < deadline, "no room after a client left");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(two.call("echo", json!("y")).await, Ok(json!("y")));
}

#[tokio::test]
async fn a_drain_across_nodes_lets_running_calls_finish_and_moves_new_ones() {
    let nats = Nats::start();
    let pool = "  max_backends_per_endpoint: 2\n";
    let gws = nodes(&nats, &["a", "b", "c"], pool).await;
    let (a, b, c) = (&gws[0], &gws[1], &gws[2]);
    let old = publish_named(b, "/d", "old").await;
    served_from(c, "/d").await;
    let peer = client(c, "/d", "s").await;
    assert_eq!(who(&peer).await, "old");
    // A slow call runs on the old backend while it drains and a new one joins on another node.
    let running = peer.call_stream("slow", json!(1500)).expect("call");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _new = publish_named(a, "/d", "new").await;
    let drained = tokio::spawn(async move {
        let pending = old.drain().await;
        (old, pending)
    });
    // Node c hears of the drain and of the new backend.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new call meanwhile: it must not cut the running one, and lands on the new backend.
    let (finished, moved) = tokio::join!(
        tokio::time::timeout(WAIT, running.last()),
        tokio::time::timeout(WAIT, peer.call("who", Value::Null))
    );
    assert_eq!(
        finished.expect("in time"),
        Ok(json!(1500)),
        "the running call finished"
    );
    assert_eq!(moved.expect("in time"), Ok(json!("new")));
    let (_old, pending) = drained.await.expect("drain");
    assert_eq!(pending, Ok(0));
    // New calls go to the new backend.
    let deadline = Instant::now() + WAIT;
    while who(&peer).await != "new" {
        assert!(
            Instant::now() < deadline,
            "new calls never reached the new backend"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn any_backend_of_a_pool_calls_any_client_whichever_node_serves_it() {
    let nats = Nats::start();
    let pool = "  max_backends_per_endpoint: 2\n";
    let gws = nodes(&nats, &["a", "b"], pool).await;
    let (a, b) = (&gws[0], &gws[1]);
    let on_a = publish_named(a, "/any", "a").await;
    let on_b = publish_named(b, "/any", "b").await;
    served_from(a, "/any").await;
    served_from(b, "/any").await;
    // A client of node a, served by a's own backend: its route is a's.
    let peer = Peer::builder()
        .handle("hello", |call: Call| async move {
            Ok(json!(format!("hello {}", call.payload)))
        })
        .connect(&a.client_url("/any", "s"))
        .await
        .expect("client");
    assert_eq!(who(&peer).await, "a");
    let route = route_of(&peer).await;
    // Both backends call it, b's from the other node; both with id 1.
    let (mine, other) = tokio::join!(
        hello(&on_a, &route, json!("a")),
        hello(&on_b, &route, json!("b"))
    );
    assert_eq!(mine, Ok(json!("hello \"a\"")));
    assert_eq!(other, Ok(json!("hello \"b\"")));
    // The client leaves: b's next call to it gets -32001 from a.
    peer.close();
    client_gone_for(&on_b, &route).await;
}

#[tokio::test]
async fn a_backends_call_to_a_client_on_a_node_that_dies_fails_with_32001() {
    let nats = Nats::start();
    let pool = "  max_backends_per_endpoint: 2\n";
    let mut gws = nodes(&nats, &["a", "b"], pool).await;
    let _on_a = publish_named(&gws[0], "/gone", "a").await;
    let on_b = publish_named(&gws[1], "/gone", "b").await;
    served_from(&gws[0], "/gone").await;
    // A client of node a that never answers calls made to it.
    let peer = Peer::builder()
        .handle("hang", |_call: Call| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(Value::Null)
        })
        .connect(&gws[0].client_url("/gone", "s"))
        .await
        .expect("client");
    assert_eq!(who(&peer).await, "a");
    let route = route_of(&peer).await;
    let call = on_b.call_route(&route, "hang", Value::Null).expect("call");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Node a dies with the call open on its client: b's backend hears -32001, not silence.
    let killed = gws.remove(0);
    killed.signal("KILL");
    match tokio::time::timeout(WAIT, call.last())
        .await
        .expect("an answer in time")
    {
        Err(PeerError::Rpc(e)) => assert_eq!(e.code, -32001),
        other => panic!("{other:?}"),
    }
    drop(killed);
}

#[tokio::test]
async fn a_reload_to_a_message_size_nats_cannot_carry_makes_the_node_local_only_until_it_fits() {
    let nats = Nats::start();
    let a = Gateway::start(&cluster_config(&nats, "a", ""));
    wait_for_metric(&a, "duplex_gateway_cluster_connected", &[], |v| {
        v == Some(1.0)
    })
    .await;
    let config = |max: &str| {
        Gateway::config_text(a.port, a.metrics_port, &cluster_config(&nats, "a", "")).replace(
            "max_message_bytes: 1000000",
            &format!("max_message_bytes: {max}"),
        )
    };
    // 2 MB does not fit the default max_payload (1 MiB): local-only, with the error logged.
    a.rewrite_config(&config("2000000"));
    a.signal("HUP");
    wait_for_metric(&a, "duplex_gateway_cluster_connected", &[], |v| {
        v == Some(0.0)
    })
    .await;
    let log = a.log();
    assert!(
        log.contains("2000000") && log.contains("max_payload"),
        "{log}"
    );
    let _local = publish(&a, "/still", "s").await;
    assert_eq!(
        post(&a, "/still/echo?secret=s", "1").await,
        (200, "1".into())
    );
    // Back under the limit: connected again.
    a.rewrite_config(&config("1000000"));
    a.signal("HUP");
    wait_for_metric(&a, "duplex_gateway_cluster_connected", &[], |v| {
        v == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn a_node_silent_for_longer_than_the_timeout_is_heard_again() {
    let nats = Nats::start();
    let gws = nodes(&nats, &["a", "b"], "").await;
    let (a, b) = (&gws[0], &gws[1]);
    let _backend = publish(b, "/stall", "s").await;
    served_from(a, "/stall").await;
    // b stalls (SIGSTOP: a long pause, an overloaded machine) past node_timeout (2 s): a takes
    // it for dead.
    b.signal("STOP");
    wait_for_metric(a, "duplex_gateway_cluster_nodes", &[], |v| v == Some(1.0)).await;
    b.signal("CONT");
    // b goes on with the same link: its next heartbeats are newer than anything a saw of it,
    // so a hears it again (not as a replay) and learns its table afresh.
    wait_for_metric(a, "duplex_gateway_cluster_nodes", &[], |v| v == Some(2.0)).await;
    served_from(a, "/stall").await;
    assert!(
        a.log().contains("heard again after it was taken for dead"),
        "{}",
        a.log()
    );
}
