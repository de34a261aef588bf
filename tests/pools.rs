//! Endpoint pools against the real binary: several backends per endpoint, clients and HTTP
//! calls spread over them, failover when one dies, drain with no failed call, 409 on a secret
//! conflict, replacement of the longest-connected backend, revocation of one backend only, and
//! calls to a client from a backend that is not its own.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use duplex::{Call, Peer, PeerBuilder, PeerError};
use serde_json::{json, Value};

fn pool(size: usize) -> String {
    format!("limits:\n  max_backends_per_endpoint: {size}\n  backend_grace: 10s\n")
}

/// The test backend, answering `who` with its name, and `slow_who` (waits payload ms) too.
fn named(name: &'static str) -> PeerBuilder {
    test_backend()
        .handle("who", move |_call: Call| async move { Ok(json!(name)) })
        .handle("slow_who", move |call: Call| async move {
            let ms = call.payload.as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!(name))
        })
}

async fn publish_named(gw: &Gateway, path: &str, name: &'static str) -> Peer {
    named(name)
        .connect(&gw.publish_url(path, "s"))
        .await
        .unwrap_or_else(|e| panic!("publish {name}: {e}\n{}", gw.log()))
}

/// Waits until the endpoint's pool has `n` live backends.
async fn pool_size_is(gw: &Gateway, path: &str, n: usize) {
    let want = (n > 0).then_some(n as f64);
    wait_for_metric(gw, "duplex_gateway_backends", &[("endpoint", path)], |v| {
        v == want
    })
    .await;
}

/// `POST <path>` with the secret `s`: the body, without its JSON quotes.
async fn http_who(gw: &Gateway, http: &reqwest::Client, path: &str) -> String {
    let body = http
        .post(gw.http(&format!("{path}?secret=s")))
        .send()
        .await
        .expect("call")
        .text()
        .await
        .expect("body");
    body.trim_matches('"').to_string()
}

async fn who(peer: &Peer) -> String {
    match peer.call("who", Value::Null).await {
        Ok(Value::String(name)) => name,
        other => panic!("who: {other:?}"),
    }
}

fn tally(names: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for name in names {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn clients_and_http_calls_are_spread_over_the_pool() {
    let gw = Gateway::start(&pool(4));
    let _a = publish_named(&gw, "/p", "a").await;
    let _b = publish_named(&gw, "/p", "b").await;
    let _c = publish_named(&gw, "/p", "c").await;
    pool_size_is(&gw, "/p", 3).await;

    // Six WebSocket clients: two pinned to each backend, and every call of one client goes to
    // its own backend.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(client(&gw, "/p", "s").await);
    }
    let mut pinned = Vec::new();
    for c in &clients {
        let first = who(c).await;
        for _ in 0..3 {
            assert_eq!(who(c).await, first, "a client's calls stay on its backend");
        }
        pinned.push(first);
    }
    let counts = tally(pinned);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 2), "{counts:?}");

    // Six HTTP calls one after another: all backends idle, so they go round in turn.
    let http = reqwest::Client::new();
    let mut answered = Vec::new();
    for _ in 0..6 {
        answered.push(http_who(&gw, &http, "/p/who").await);
    }
    let counts = tally(answered);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 2), "{counts:?}");
}

#[tokio::test]
async fn http_calls_go_to_the_backend_with_the_fewest_pending_calls() {
    let gw = Gateway::start(&pool(2));
    let _a = publish_named(&gw, "/q", "a").await;
    let _b = publish_named(&gw, "/q", "b").await;
    pool_size_is(&gw, "/q", 2).await;
    let http = reqwest::Client::new();
    // A long call keeps one backend busy; the next calls all go to the other.
    let long = tokio::spawn({
        let url = gw.http("/q/slow_who?secret=s");
        let http = http.clone();
        async move {
            let resp = http.post(url).body("5000").send().await.expect("long");
            resp.text().await.expect("body")
        }
    });
    wait_for_metric(
        &gw,
        "duplex_gateway_pending_calls",
        &[("endpoint", "/q")],
        |v| v == Some(1.0),
    )
    .await;
    let mut answered = Vec::new();
    for _ in 0..4 {
        answered.push(http_who(&gw, &http, "/q/who").await);
    }
    let busy = long.await.expect("long call");
    let busy = busy.trim_matches('"');
    assert!(
        answered.iter().all(|a| a != busy),
        "every quick call on the idle backend, none on {busy}: {answered:?}"
    );
}

#[tokio::test]
async fn a_killed_backend_fails_only_its_own_calls_and_its_clients_move() {
    let gw = Gateway::start(&pool(2));
    let survivor = publish_named(&gw, "/f", "survivor").await;
    // The victim is a process of its own (the example backend), killed with SIGKILL.
    let victim_bin = example_binary("duplex-gateway", "echo_backend");
    let mut victim = Command::new(victim_bin)
        .args(["/f", "--secret", "s", "--once", "--gateway"])
        .arg(format!("ws://127.0.0.1:{}", gw.port))
        .env("DUPLEX_GATEWAY_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("victim");
    pool_size_is(&gw, "/f", 2).await;

    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(client(&gw, "/f", "s").await);
    }
    // The example backend has no `who`: its clients get -32601.
    let mut on_victim = Vec::new();
    let mut on_survivor = Vec::new();
    for c in clients {
        match c.call("who", Value::Null).await {
            Ok(_) => on_survivor.push(c),
            Err(PeerError::Rpc(e)) if e.code == -32601 => on_victim.push(c),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((on_victim.len(), on_survivor.len()), (2, 2));

    // Calls in flight on both: a long stream on the victim, slow calls on the survivor.
    let mut streams = Vec::new();
    for c in &on_victim {
        let mut s = c.call_stream("count", json!(1_000_000)).expect("stream");
        assert!(s.next().await.is_some_and(|r| r.is_ok()), "the stream runs");
        streams.push(s);
    }
    let slow: Vec<_> = on_survivor
        .iter()
        .map(|c| c.call_stream("slow", json!(800)).expect("slow"))
        .collect();
    let _ = victim.kill();
    let _ = victim.wait();

    // The victim's own calls fail with -32000 ...
    for mut s in streams {
        let ended = loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                other => break other,
            }
        };
        match ended {
            Some(Err(PeerError::Rpc(e))) => assert_eq!(e.code, -32000, "{e:?}"),
            other => panic!("the victim's stream ended with {other:?}"),
        }
    }
    // ... the survivor's finish ...
    for s in slow {
        assert_eq!(s.last().await, Ok(json!(800)));
    }
    // ... and every later call of every client works, on the survivor, none disconnected.
    for c in on_victim.iter().chain(on_survivor.iter()) {
        assert_eq!(who(c).await, "survivor");
        assert_eq!(c.call("echo", json!(1)).await, Ok(json!(1)));
        assert!(!c.is_closed());
    }
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            "duplex_gateway_backend_failovers_total",
            &[("endpoint", "/f")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "duplex_gateway_backends", &[("endpoint", "/f")]),
        Some(1.0)
    );
    drop(survivor);
}

#[tokio::test]
async fn a_draining_backend_loses_no_call_under_load() {
    let gw = Gateway::start(&pool(2));
    let old = publish_named(&gw, "/d", "old").await;
    let _other = publish_named(&gw, "/d", "other").await;
    pool_size_is(&gw, "/d", 2).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + Duration::from_millis(2500);
    let mut load = Vec::new();
    for i in 0..4 {
        let c = client(&gw, "/d", "s").await;
        let (failures, calls) = (failures.clone(), calls.clone());
        load.push(tokio::spawn(async move {
            while Instant::now() < stop {
                match c.call("slow", json!(40)).await {
                    Ok(_) => calls.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("client {i}: {e}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for _ in 0..2 {
        let url = gw.http("/d/slow?secret=s");
        let (failures, calls) = (failures.clone(), calls.clone());
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while Instant::now() < stop {
                match http.post(&url).body("40").send().await {
                    Ok(r) if r.status() == 200 => calls.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("http: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    // A deploy: drain the old backend, close it, publish its replacement.
    let pending = tokio::time::timeout(WAIT, old.drain())
        .await
        .expect("drain answered")
        .expect("drain");
    assert_eq!(pending, 0);
    old.close();
    let _new = publish_named(&gw, "/d", "new").await;
    for task in load {
        task.await.expect("load");
    }
    assert!(calls.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "calls failed during the drain"
    );
}

#[tokio::test]
async fn gateway_methods_are_reserved() {
    let gw = Gateway::start("");
    let backend = publish(&gw, "/r", "s").await;
    let answer = backend.call("$nope", Value::Null).await;
    match answer {
        Err(PeerError::Rpc(e)) => assert_eq!(e.code, -32601),
        other => panic!("{other:?}"),
    }
    // An idle backend drains at once.
    assert_eq!(backend.drain().await, Ok(0));
}

#[tokio::test]
async fn a_publish_with_another_secret_than_the_pool_gets_409() {
    let gw = Gateway::start(&pool(2));
    let _a = publish(&gw, "/c", "s").await;
    let status = ws_status(&gw.publish_url("/c", "other"), &[]).await;
    assert_eq!(status, 409);
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "secret_conflict")]
        ),
        Some(1.0)
    );
    // The pool's own secret joins.
    let _b = publish(&gw, "/c", "s").await;
    pool_size_is(&gw, "/c", 2).await;
}

#[tokio::test]
async fn a_full_pool_replaces_its_longest_connected_backend() {
    let gw = Gateway::start(&pool(2));
    let a = publish_named(&gw, "/full", "a").await;
    let b = publish_named(&gw, "/full", "b").await;
    pool_size_is(&gw, "/full", 2).await;
    let c = publish_named(&gw, "/full", "c").await;
    let code = tokio::time::timeout(WAIT, a.closed())
        .await
        .expect("a closed");
    assert_eq!(code, Some(1012));
    assert!(!b.is_closed() && !c.is_closed());
    pool_size_is(&gw, "/full", 2).await;
    let peer = client(&gw, "/full", "s").await;
    let name = who(&peer).await;
    assert!(name == "b" || name == "c", "{name}");
}

#[tokio::test]
async fn a_revoked_token_closes_only_its_own_backend() {
    let gw = Gateway::start(&pool(2));
    let team = named("team")
        .connect(&gw.ws(&format!("/team/x?token={TEAM_TOKEN}&secret=s")))
        .await
        .expect("team publish");
    let main = publish_named(&gw, "/team/x", "main").await;
    pool_size_is(&gw, "/team/x", 2).await;
    let peer = client(&gw, "/team/x", "s").await;
    // Without the team token.
    let text = format!(
        "listen:\n  - address: 127.0.0.1:{}\nmetrics:\n  address: 127.0.0.1:{}\ntokens:\n  - name: main\n    token: {TOKEN}\n    endpoints: [\"/*\"]\n{}",
        gw.port,
        gw.metrics_port,
        pool(2)
    );
    gw.rewrite_config(&text);
    gw.signal("HUP");
    let code = tokio::time::timeout(WAIT, team.closed())
        .await
        .expect("team closed");
    assert_eq!(code, Some(1008));
    assert!(!main.is_closed());
    pool_size_is(&gw, "/team/x", 1).await;
    assert_eq!(who(&peer).await, "main");
    assert!(!peer.is_closed());
}

#[tokio::test]
async fn any_backend_of_the_pool_may_call_any_client() {
    let gw = Gateway::start(&pool(2));
    let a = publish_named(&gw, "/call", "a").await;
    let b = publish_named(&gw, "/call", "b").await;
    pool_size_is(&gw, "/call", 2).await;
    let peer = Peer::builder()
        .handle("hello", |call: Call| async move {
            // Long enough for both calls to be open at once, under the same id.
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(json!(format!("hello {}", call.payload)))
        })
        .connect(&gw.client_url("/call", "s"))
        .await
        .expect("client");
    let own = who(&peer).await;
    let route = match peer.call("route", Value::Null).await {
        Ok(Value::String(route)) => route,
        other => panic!("{other:?}"),
    };
    // Each backend calls the client, the one it is not pinned to included, both with id 1: the
    // replies come back to the backend that asked.
    let other = if own == "a" { &b } else { &a };
    let mine = if own == "a" { &a } else { &b };
    let (x, y) = tokio::join!(
        async {
            let call = other
                .call_route(&route, "hello", json!("other"))
                .expect("call");
            tokio::time::timeout(WAIT, call.last())
                .await
                .expect("an answer")
        },
        async {
            let call = mine
                .call_route(&route, "hello", json!("own"))
                .expect("call");
            tokio::time::timeout(WAIT, call.last())
                .await
                .expect("an answer")
        }
    );
    assert_eq!(x, Ok(json!("hello \"other\"")));
    assert_eq!(y, Ok(json!("hello \"own\"")));
}

#[tokio::test]
async fn when_the_last_serving_backend_drains_new_calls_wait_for_the_next() {
    let gw = Gateway::start(&pool(2));
    let old = publish_named(&gw, "/w", "old").await;
    pool_size_is(&gw, "/w", 1).await;
    let peer = client(&gw, "/w", "s").await;
    assert_eq!(who(&peer).await, "old");
    // Idle: answered at once; from now on new calls wait for another backend.
    assert_eq!(old.drain().await, Ok(0));
    let waiting = tokio::spawn({
        let peer = peer.clone();
        async move { peer.call("who", Value::Null).await }
    });
    let http = tokio::spawn({
        let url = gw.http("/w/who?secret=s");
        async move {
            let resp = reqwest::Client::new().post(url).send().await.expect("call");
            (
                resp.status().as_u16(),
                resp.text().await.unwrap_or_default(),
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished() && !http.is_finished(),
        "calls waited"
    );
    let _new = publish_named(&gw, "/w", "new").await;
    assert_eq!(waiting.await.expect("join"), Ok(json!("new")));
    assert_eq!(http.await.expect("join"), (200, "\"new\"".to_string()));
    old.close();
}

#[tokio::test]
async fn clients_of_a_replaced_backend_count_as_failovers() {
    let gw = Gateway::start(&pool(2));
    let _a = publish_named(&gw, "/rf", "a").await;
    let _b = publish_named(&gw, "/rf", "b").await;
    pool_size_is(&gw, "/rf", 2).await;
    let mut on_a = Vec::new();
    for _ in 0..4 {
        let c = client(&gw, "/rf", "s").await;
        if who(&c).await == "a" {
            on_a.push(c);
        }
    }
    assert_eq!(on_a.len(), 2);
    let _c = publish_named(&gw, "/rf", "c").await;
    for c in &on_a {
        let now = who(c).await;
        assert!(now == "b" || now == "c", "{now}");
    }
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            "duplex_gateway_backend_failovers_total",
            &[("endpoint", "/rf")]
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_drain_is_answered_with_what_still_runs_after_drain_timeout() {
    let gw = Gateway::start("limits:\n  drain_timeout: 300ms\n");
    let backend = publish(&gw, "/dt", "s").await;
    let peer = client(&gw, "/dt", "s").await;
    let long = peer.call_stream("slow", json!(3000)).expect("call");
    wait_for_metric(
        &gw,
        "duplex_gateway_pending_calls",
        &[("endpoint", "/dt")],
        |v| v == Some(1.0),
    )
    .await;
    let pending = tokio::time::timeout(Duration::from_secs(2), backend.drain())
        .await
        .expect("answered at the drain timeout, before the call ends");
    assert_eq!(pending, Ok(1));
    // The running call still finishes.
    assert_eq!(long.last().await, Ok(json!(3000)));
}

#[tokio::test]
async fn a_reload_to_a_smaller_pool_closes_the_longest_connected_backends() {
    let gw = Gateway::start(&pool(3));
    let oldest = publish_named(&gw, "/shrink", "oldest").await;
    pool_size_is(&gw, "/shrink", 1).await;
    let middle = publish_named(&gw, "/shrink", "middle").await;
    pool_size_is(&gw, "/shrink", 2).await;
    let newest = publish_named(&gw, "/shrink", "newest").await;
    pool_size_is(&gw, "/shrink", 3).await;
    let peer = client(&gw, "/shrink", "s").await;
    gw.rewrite_config(&Gateway::config_text(gw.port, gw.metrics_port, &pool(1)));
    gw.signal("HUP");
    for old in [&oldest, &middle] {
        let code = tokio::time::timeout(WAIT, old.closed())
            .await
            .expect("closed");
        assert_eq!(code, Some(1012));
    }
    assert!(!newest.is_closed());
    pool_size_is(&gw, "/shrink", 1).await;
    assert_eq!(who(&peer).await, "newest");
    assert!(!peer.is_closed());
}
