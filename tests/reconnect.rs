//! Reconnecting without storms, against the real binary: the Rust peer's persistent
//! connection comes back after a gateway restart (a backend publishes again), fails calls at
//! once while it is down, never comes back after 1008, and sees a refusal's `Retry-After`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// A backoff fast enough for tests.
fn fast() -> duplex::Backoff {
    duplex::Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
        jitter: true,
    }
}

#[tokio::test]
async fn persistent_peers_come_back_after_a_gateway_restart_and_fail_calls_at_once_meanwhile() {
    let mut gw = Gateway::start("limits:\n  backend_grace: 5s\n");
    let backend = test_backend().connect_persistent(&gw.publish_url("/p", "s"), fast());
    backend.connected().await.expect("published");
    let client = duplex::Peer::builder().connect_persistent(&gw.client_url("/p", "s"), fast());
    client.connected().await.expect("connected");
    assert_eq!(client.call("echo", json!(1)).await.expect("echo"), json!(1));

    gw.restart();
    // The loss is seen, and calls fail at once while it lasts.
    let deadline = std::time::Instant::now() + WAIT;
    let started = loop {
        let started = std::time::Instant::now();
        match client.call("echo", json!(2)).await {
            Err(duplex::PeerError::NotConnected) => break started,
            _ => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the loss was never seen"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "not at once"
    );
    // Both come back; the backend published again.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(answer) = client.call("echo", json!(3)).await {
            assert_eq!(answer, json!(3));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer after the restart: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(backend.peer().is_ok());
}

#[tokio::test]
async fn a_persistent_peer_never_comes_back_after_1008() {
    let gw = Gateway::start("endpoints:\n  - path: /f\n    secret: s1\n");
    let _backend = publish(&gw, "/f", "s1").await;
    let client = duplex::Peer::builder().connect_persistent(&gw.client_url("/f", "s1"), fast());
    client.connected().await.expect("connected");
    gw.rewrite_config(&Gateway::config_text(
        gw.port,
        gw.metrics_port,
        "endpoints:\n  - path: /f\n    secret: s2\n",
    ));
    gw.signal("HUP");
    let deadline = std::time::Instant::now() + WAIT;
    while client.stopped().is_none() {
        assert!(std::time::Instant::now() < deadline, "never stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        client.stopped(),
        Some(duplex::PeerError::Closed(Some(1008)))
    );
    // And it stays down: no new connection after a few backoff windows.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(client.peer().is_err());
    let text = gw.metrics().await;
    assert_eq!(
        metric(&text, "duplex_gateway_clients", &[("endpoint", "/f")]),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_refused_upgrade_carries_its_retry_after() {
    let gw = Gateway::start("limits:\n  requests_per_ip_per_second: 1\n");
    let _backend = publish(&gw, "/r", "s").await;
    let mut refused = None;
    for _ in 0..5 {
        if let Err(e) = duplex::Peer::builder()
            .connect(&gw.client_url("/r", "s"))
            .await
        {
            refused = Some(e);
            break;
        }
    }
    match refused {
        Some(duplex::PeerError::Refused {
            status: 429,
            retry_after,
            ..
        }) => {
            assert!(
                retry_after.is_some_and(|d| d >= Duration::from_secs(1)),
                "{retry_after:?}"
            );
            // The backoff waits at least that long.
            let wait = fast().delay(0, 0.0, retry_after);
            assert!(wait >= Duration::from_secs(1));
        }
        other => panic!("no 429: {other:?}"),
    }
}
