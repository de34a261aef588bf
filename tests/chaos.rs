//! Faults under load, against real processes: three gateway nodes on a real nats-server, a
//! backend on each of two of them, WebSocket and HTTP clients on the third (every call crosses
//! NATS), while NATS is restarted, one backend node is killed and the other stopped with SIGTERM
//! and started again. Every call must end (a reply or an error) within `call_timeout` +
//! `cluster.node_timeout`, WebSocket calls included, and every error must be one the cluster
//! may give when a node or the link goes (`-32000`, HTTP 503).
//!
//! Needs `nats-server` (see `tests/cluster.rs`).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nats::Nats;
use common::*;
use duplex::PeerError;
use serde_json::json;

/// `call_timeout` (HTTP) and `cluster.node_timeout` here: no call may take longer than their sum
/// (and a little for the machine).
const CALL_TIMEOUT: Duration = Duration::from_secs(4);
const NODE_TIMEOUT: Duration = Duration::from_secs(2);
const BOUND: Duration = Duration::from_secs(7);

fn config(nats: &Nats, name: &str) -> String {
    format!(
        "limits:\n  max_message_bytes: 1000000\n  backend_grace: 3s\n  call_timeout: {}s\n  max_backends_per_endpoint: 2\n\
         cluster:\n  nats: [{}]\n  node: {name}\n  subject_prefix: chaos.gw\n  node_timeout: {}s\n",
        CALL_TIMEOUT.as_secs(),
        nats.url(),
        NODE_TIMEOUT.as_secs()
    )
}

/// What went wrong with the calls: the slowest, and the errors no fault explains.
#[derive(Default)]
struct Seen {
    ok: usize,
    failed: usize,
    slowest: Duration,
    unexpected: Vec<String>,
}

impl Seen {
    fn took(&mut self, elapsed: Duration) {
        self.slowest = self.slowest.max(elapsed);
    }
}

#[tokio::test]
async fn every_call_ends_in_time_while_nats_restarts_and_nodes_die_and_restart() {
    let mut nats = Nats::start();
    let a = Gateway::start(&config(&nats, "a"));
    let b = Gateway::start(&config(&nats, "b"));
    let mut c = Gateway::start(&config(&nats, "c"));
    for gw in [&a, &b, &c] {
        wait_for_metric(gw, "duplex_gateway_cluster_nodes", &[], |v| v == Some(3.0)).await;
    }
    let on_a = Arc::new(Mutex::new(Some(publish(&a, "/x", "s").await)));
    let mut on_c = Some(publish(&c, "/x", "s").await);
    served_from(&b, "/x").await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut load = Vec::new();
    // WebSocket clients of b: a call at a time, each bounded only by this test.
    for i in 0..8 {
        let (stop, seen, url) = (stop.clone(), seen.clone(), b.client_url("/x", "s"));
        load.push(tokio::spawn(async move {
            let mut peer = None;
            while !stop.load(Ordering::SeqCst) {
                if peer.is_none() {
                    match duplex::Peer::builder().connect(&url).await {
                        Ok(p) => peer = Some(p),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
                let Some(p) = peer.as_ref() else { continue };
                let started = Instant::now();
                let call = tokio::time::timeout(BOUND * 2, p.call("slow", json!(30))).await;
                let elapsed = started.elapsed();
                let mut seen = seen.lock().expect("seen");
                seen.took(elapsed);
                match call {
                    Ok(Ok(_)) => seen.ok += 1,
                    Ok(Err(PeerError::Rpc(e))) if e.code == -32000 => seen.failed += 1,
                    // The client was closed (its node's grace ran out, 1013): connect again.
                    Ok(Err(PeerError::Closed(_))) => {
                        seen.failed += 1;
                        peer = None;
                    }
                    Ok(Err(other)) => seen.unexpected.push(format!("ws {i}: {other:?}")),
                    Err(_) => seen
                        .unexpected
                        .push(format!("ws {i}: no answer in {:?}", BOUND * 2)),
                }
            }
        }));
    }
    // HTTP callers on b.
    for i in 0..4 {
        let (stop, seen, url) = (stop.clone(), seen.clone(), b.http("/x/slow?secret=s"));
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let sent = http.post(&url).body("30").timeout(BOUND * 2).send().await;
                let elapsed = started.elapsed();
                let mut seen = seen.lock().expect("seen");
                seen.took(elapsed);
                match sent.map(|r| r.status().as_u16()) {
                    Ok(200) => seen.ok += 1,
                    Ok(503) => seen.failed += 1,
                    Ok(other) => seen.unexpected.push(format!("http {i}: {other}")),
                    Err(e) => seen.unexpected.push(format!("http {i}: {e}")),
                }
            }
        }));
    }

    let pause = Duration::from_millis(1500);
    tokio::time::sleep(pause).await;
    // NATS restarts, twice.
    for _ in 0..2 {
        nats.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        nats.run();
        tokio::time::sleep(pause).await;
    }
    // Node a dies (SIGKILL); its backend comes back on b.
    a.signal("KILL");
    on_a.lock().expect("a").take();
    let again = publish(&b, "/x", "s").await;
    tokio::time::sleep(pause).await;
    // Node c stops (SIGTERM) and starts again; its backend comes back on it.
    c.signal("TERM");
    on_c.take();
    c.wait_exit(Duration::from_secs(15)).expect("c stopped");
    let c2 = Gateway::start(&config(&nats, "c"));
    let back = publish(&c2, "/x", "s").await;
    tokio::time::sleep(pause * 2).await;

    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.expect("load task");
    }
    let seen = seen.lock().expect("seen");
    assert!(
        seen.unexpected.is_empty(),
        "errors no fault explains: {:?}",
        seen.unexpected
    );
    assert!(
        seen.slowest <= BOUND,
        "a call took {:?} (bound {BOUND:?}); {} ok, {} failed",
        seen.slowest,
        seen.ok,
        seen.failed
    );
    assert!(seen.ok > 100, "calls went through: {} ok", seen.ok);
    drop((again, back));
}
