//! The cluster's bus secured, against a real `nats-server` configured for each way of logging
//! in (user and password, in `auth` and in the URL; token; NKey; TLS with a private CA, and
//! client certificates) and against strangers on an open bus: forged, altered, replayed and
//! junk messages sent with a hand-written NATS client must change nothing a client or backend
//! can see, and must be counted.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nats::{Nats, RawNats};
use common::*;
use duplex::{Call, Peer, PeerError};
use serde_json::json;

const KEY: &str = "cluster-key-for-the-tests-0123456789abcdef";
const PASSWORD: &str = "nats-password-4f1c9a";
const TOKEN_NATS: &str = "nats-token-7d2e11b0";

/// The config of node `name` on NATS servers `urls`, with `cluster_extra` lines (indented) in
/// its `cluster` section and `extra` top-level sections.
fn node_config(urls: &str, name: &str, cluster_extra: &str, extra: &str) -> String {
    format!(
        "limits:\n  max_message_bytes: 1000000\n  backend_grace: 3s\n{extra}\
         cluster:\n  nats: [{urls}]\n  node: {name}\n  subject_prefix: test.gw\n  node_timeout: 2s\n{cluster_extra}"
    )
}

fn start_node(urls: &str, name: &str, cluster_extra: &str, extra: &str) -> Gateway {
    let text = node_config(urls, name, cluster_extra, extra);
    // Everything the NATS client would say, its trace lines included.
    Gateway::start_logging("debug,async_nats=trace", move |port, metrics_port| {
        Gateway::config_text(port, metrics_port, &text)
    })
}

/// Waits until every node hears `n` nodes.
async fn all_hear(gws: &[&Gateway], n: f64) {
    for gw in gws {
        wait_for_metric(gw, "duplex_gateway_cluster_nodes", &[], |v| v == Some(n)).await;
    }
}

/// A backend that counts its `count` calls.
async fn counting_backend(gw: &Gateway, path: &str) -> (Peer, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let peer = test_backend()
        .handle("count", move |_call: Call| {
            let seen = seen.clone();
            async move { Ok(json!(seen.fetch_add(1, Ordering::SeqCst) + 1)) }
        })
        .connect(&gw.publish_url(path, "s"))
        .await
        .unwrap_or_else(|e| panic!("publish: {e}\n{}", gw.log()));
    (peer, count)
}

async fn rejected(gw: &Gateway, reason: &str) -> f64 {
    metric(
        &gw.metrics().await,
        "duplex_gateway_cluster_rejected_messages_total",
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// Every node's log, checked for `secrets`.
fn assert_no_secret_in_logs(gws: &[&Gateway], secrets: &[&str]) {
    for gw in gws {
        let log = gw.log();
        assert!(!log.is_empty());
        for secret in secrets {
            assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        }
    }
}

/// Two nodes on `nats` that must hear each other and carry a call from one to the other.
async fn two_nodes_carry_a_call(urls: [&str; 2], cluster_extra: [&str; 2]) -> [Gateway; 2] {
    let a = start_node(urls[0], "a", cluster_extra[0], "");
    let b = start_node(urls[1], "b", cluster_extra[1], "");
    all_hear(&[&a, &b], 2.0).await;
    let _backend = publish(&b, "/auth", "s").await;
    served_from(&a, "/auth").await;
    [a, b]
}

#[tokio::test]
async fn a_user_and_password_work_in_auth_and_in_the_url_and_never_reach_a_log() {
    let nats = Nats::start_with_config(&format!(
        "authorization {{ user: gw, password: \"{PASSWORD}\" }}\n"
    ));
    let in_url = format!("nats://gw:{PASSWORD}@127.0.0.1:{}", nats.port);
    let in_auth = format!("  auth:\n    user: gw\n    password: {PASSWORD}\n  key: {KEY}\n");
    let [a, b] = two_nodes_carry_a_call(
        [&nats.url(), &in_url],
        [&in_auth, &format!("  key: {KEY}\n")],
    )
    .await;
    assert_no_secret_in_logs(&[&a, &b], &[PASSWORD, KEY]);
    assert!(
        b.log().contains("gw:***@127.0.0.1"),
        "the URL is shown without its password:\n{}",
        b.log()
    );
}

#[tokio::test]
async fn a_token_and_an_nkey_authenticate() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let nats = Nats::start_with_config(&format!(
        "authorization {{ users = [ {{ user: tok, password: \"{TOKEN_NATS}\" }}, {{ nkey: \"{}\" }} ] }}\n",
        user.public_key()
    ));
    // nats-server takes a token alone or users, not both: the token has a server of its own.
    let token_nats =
        Nats::start_with_config(&format!("authorization {{ token: \"{TOKEN_NATS}\" }}\n"));
    let dir = tempfile::tempdir().expect("dir");
    let seed_file = dir.path().join("gw.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("seed file");
    let nkey = format!("  auth:\n    nkey_seed_file: {}\n", seed_file.display());
    let [a, b] = two_nodes_carry_a_call([&nats.url(), &nats.url()], [&nkey, &nkey]).await;
    assert_no_secret_in_logs(&[&a, &b], &[&seed]);
    drop((a, b));
    let token = format!("  auth:\n    token: {TOKEN_NATS}\n");
    let [a, b] =
        two_nodes_carry_a_call([&token_nats.url(), &token_nats.url()], [&token, &token]).await;
    assert_no_secret_in_logs(&[&a, &b], &[TOKEN_NATS]);
}

#[tokio::test]
async fn credentials_the_server_refuses_stop_the_start_with_one_line() {
    let nats = Nats::start_with_config(&format!(
        "authorization {{ user: gw, password: \"{PASSWORD}\" }}\n"
    ));
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.yaml");
    let wrong = "  auth:\n    user: gw\n    password: not-the-password-991\n";
    let text = Gateway::config_text(
        free_port(),
        free_port(),
        &node_config(&nats.url(), "a", wrong, ""),
    );
    std::fs::write(&path, text).expect("config");
    let started = Instant::now();
    let out = Command::new(gateway_binary())
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        line.contains(&format!("127.0.0.1:{}", nats.port)) && line.contains("refused"),
        "{line}"
    );
    assert!(!stderr.contains("not-the-password-991"), "{stderr}");

    // --check reads the files `auth` names.
    let missing = dir.path().join("missing.creds");
    let text = Gateway::config_text(
        free_port(),
        free_port(),
        &node_config(
            &nats.url(),
            "a",
            &format!("  auth:\n    credentials_file: {}\n", missing.display()),
            "",
        ),
    );
    std::fs::write(&path, text).expect("config");
    let out = Command::new(gateway_binary())
        .args(["--check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.creds"), "{stderr}");
}

/// A CA, and certificates it signs for the NATS server (127.0.0.1) and for a client.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("dir");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("ca");
        for (name, sans) in [
            ("server", vec!["127.0.0.1", "localhost"]),
            ("client", vec!["gw"]),
        ] {
            let params = rcgen::CertificateParams::new(
                sans.into_iter().map(String::from).collect::<Vec<_>>(),
            )
            .expect("params");
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &ca).expect("sign");
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).expect("cert");
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem())
                .expect("key");
        }
        Pki { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[tokio::test]
async fn tls_with_a_private_ca_and_with_client_certificates() {
    let pki = Pki::new();
    let server_tls = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
        pki.file("server.pem"),
        pki.file("server.key")
    );
    let nats = Nats::start_with_config(&server_tls);
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let ca = format!("  tls:\n    ca: {}\n", pki.file("ca.pem"));
    let [a, b] = two_nodes_carry_a_call([&url, &url], [&ca, &ca]).await;
    drop((a, b));

    let mtls = Nats::start_with_config(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}\n",
        pki.file("server.pem"),
        pki.file("server.key"),
        pki.file("ca.pem")
    ));
    let url = format!("tls://127.0.0.1:{}", mtls.port);
    let client = format!(
        "  tls:\n    ca: {}\n    cert: {}\n    key: {}\n",
        pki.file("ca.pem"),
        pki.file("client.pem"),
        pki.file("client.key")
    );
    let [a, b] = two_nodes_carry_a_call([&url, &url], [&client, &client]).await;
    // Without a client certificate the server does not let a node in.
    let lone = start_node(&url, "c", &ca, "");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = lone.metrics().await;
    assert_eq!(
        metric(&m, "duplex_gateway_cluster_connected", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric(&a.metrics().await, "duplex_gateway_cluster_nodes", &[]),
        Some(2.0)
    );
    drop(b);
}

/// The frame of a forged session: `Open` of `path` from `from`, carrying a `count` call.
fn forged_open(from: &str, path: &str) -> Vec<u8> {
    let digest = sha256_hex(b"s");
    format!(
        "O {:032x} {from} 0 {digest} {path}\n{{\"type\":\"req\",\"method\":\"count\",\"id\":1}}",
        0x1234_5678_u128
    )
    .into_bytes()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Appends a trailer as a node without a key would: epoch and sequence number.
fn with_counters(mut message: Vec<u8>, epoch: u64, seq: u64) -> Vec<u8> {
    message.extend_from_slice(&epoch.to_be_bytes());
    message.extend_from_slice(&seq.to_be_bytes());
    message
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

#[tokio::test]
async fn forged_altered_replayed_and_junk_messages_change_nothing_with_a_key() {
    let nats = Nats::start();
    let key = format!("  key: {KEY}\n");
    let a = start_node(&nats.url(), "a", &key, "");
    let b = start_node(&nats.url(), "b", &key, "");
    all_hear(&[&a, &b], 2.0).await;
    let (backend, count) = counting_backend(&b, "/p").await;
    served_from(&a, "/p").await;
    let mut spy = RawNats::connect(&nats, "{}").await;
    spy.subscribe("test.gw.node.b", 1).await;
    // One genuine relayed call, captured on its way to b.
    assert_eq!(
        post(&a, "/p/count?secret=s", "null").await,
        (200, "1".to_string())
    );
    let mut captured = None;
    while let Some(msg) = spy.next(Duration::from_secs(2)).await {
        if msg.payload.starts_with(b"O ") {
            captured = Some(msg);
            break;
        }
    }
    let captured = captured.expect("the Open of the relayed call");

    let mut stranger = RawNats::connect(&nats, "{}").await;
    let signature_before = rejected(&b, "signature").await;
    let replay_before = rejected(&b, "replay").await;
    // An Open with no tag, one with a wrong tag, one altered, and the genuine one again.
    stranger
        .publish("test.gw.node.b", &forged_open("a", "/p"))
        .await;
    let mut wrong_tag = with_counters(forged_open("a", "/p"), u64::MAX, 1);
    wrong_tag.extend_from_slice(&[0x5a; 32]);
    stranger.publish("test.gw.node.b", &wrong_tag).await;
    let mut altered = captured.payload.clone();
    let at = altered.len() / 2;
    altered[at] ^= 0x20;
    stranger.publish("test.gw.node.b", &altered).await;
    stranger.publish(&captured.subject, &captured.payload).await;
    // Junk on every subject.
    for subject in ["test.gw.hb", "test.gw.node.a", "test.gw.node.b"] {
        stranger.publish(subject, b"junk").await;
        stranger.publish(subject, &[0u8; 100]).await;
    }
    wait_for_metric(
        &b,
        "duplex_gateway_cluster_rejected_messages_total",
        &[("reason", "replay")],
        |v| v >= Some(replay_before + 1.0),
    )
    .await;
    wait_for_metric(
        &b,
        "duplex_gateway_cluster_rejected_messages_total",
        &[("reason", "signature")],
        |v| v >= Some(signature_before + 3.0 + 4.0),
    )
    .await;
    wait_for_metric(
        &a,
        "duplex_gateway_cluster_rejected_messages_total",
        &[("reason", "signature")],
        |v| v >= Some(2.0),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The backend saw the one genuine call, and the cluster still works.
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(
        post(&a, "/p/count?secret=s", "null").await,
        (200, "2".to_string())
    );
    all_hear(&[&a, &b], 2.0).await;
    assert_no_secret_in_logs(&[&a, &b], &[KEY]);
    drop(backend);
}

#[tokio::test]
async fn nodes_with_different_keys_do_not_hear_each_other() {
    let nats = Nats::start();
    let a = start_node(&nats.url(), "a", &format!("  key: {KEY}\n"), "");
    let b = start_node(
        &nats.url(),
        "b",
        "  key: another-cluster-key-0123456789abcdef\n",
        "",
    );
    wait_for_metric(
        &b,
        "duplex_gateway_cluster_rejected_messages_total",
        &[("reason", "signature")],
        |v| v >= Some(1.0),
    )
    .await;
    for gw in [&a, &b] {
        let m = gw.metrics().await;
        assert_eq!(metric(&m, "duplex_gateway_cluster_nodes", &[]), Some(1.0));
    }
}

#[tokio::test]
async fn without_a_key_heartbeats_are_checked_and_strangers_open_no_session() {
    let nats = Nats::start();
    let a = start_node(&nats.url(), "a", "", "");
    let b = start_node(&nats.url(), "b", "", "");
    all_hear(&[&a, &b], 2.0).await;
    assert!(
        b.log().contains("not authenticated"),
        "no warning without a key:\n{}",
        b.log()
    );
    let (backend, count) = counting_backend(&b, "/p").await;
    served_from(&a, "/p").await;
    let mut stranger = RawNats::connect(&nats, "{}").await;
    // A heartbeat announcing a backend of /p that joins in a day: newest of the pool (of one),
    // it would have b close its real backend with 1012.
    let now = unix_ms();
    let beat = json!({
        "node": "evil", "epoch": 77, "sent": now,
        "endpoints": [{"path": "/p", "secret": sha256_hex(b"s"),
                       "backends": [[1, now + 86_400_000, false]]}],
    });
    for seq in 1..=3u64 {
        let bytes = with_counters(beat.to_string().into_bytes(), 77, seq);
        stranger.publish("test.gw.hb", &bytes).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // An old heartbeat (sent long ago) and an impossible one (a path no node can have).
    let old = json!({"node": "evil2", "epoch": 5, "sent": now - 3_600_000, "endpoints": []});
    stranger
        .publish(
            "test.gw.hb",
            &with_counters(old.to_string().into_bytes(), 5, 1),
        )
        .await;
    // A session opened by a node nobody hears.
    stranger
        .publish(
            "test.gw.node.b",
            &with_counters(forged_open("evil3", "/p"), 9, 1),
        )
        .await;
    wait_for_metric(
        &b,
        "duplex_gateway_cluster_rejected_messages_total",
        &[("reason", "invalid")],
        |v| v >= Some(3.0),
    )
    .await;
    wait_for_metric(
        &b,
        "duplex_gateway_cluster_rejected_messages_total",
        &[("reason", "replay")],
        |v| v >= Some(1.0),
    )
    .await;
    wait_for_metric(
        &b,
        "duplex_gateway_cluster_rejected_messages_total",
        &[("reason", "unknown_node")],
        |v| v >= Some(1.0),
    )
    .await;
    // The real backend is still there, and saw no call but the test's.
    assert_eq!(
        post(&a, "/p/count?secret=s", "null").await,
        (200, "1".to_string())
    );
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(
        post(&b, "/p/count?secret=s", "null").await,
        (200, "2".to_string())
    );
    drop(backend);
    all_hear(&[&a, &b], 2.0).await;
}

#[tokio::test]
async fn a_client_admitted_elsewhere_with_a_secret_the_serving_node_dropped_is_refused() {
    let nats = Nats::start();
    let fixed = |secret: &str| format!("endpoints:\n  - path: /f\n    secret: {secret}\n");
    let a = start_node(&nats.url(), "a", "", &fixed("old-secret-0000000"));
    let b = start_node(&nats.url(), "b", "", &fixed("old-secret-0000000"));
    all_hear(&[&a, &b], 2.0).await;
    let _backend = test_backend()
        .connect(&b.publish_url("/f", "old-secret-0000000"))
        .await
        .expect("publish");
    let deadline = Instant::now() + WAIT;
    while post(&a, "/f/echo?secret=old-secret-0000000", "1").await.0 != 200 {
        assert!(Instant::now() < deadline, "not served through a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // b's reload changes the secret; a still has the old one (its own config, and b's last
    // announcement): the call a relays with it is refused where it is served.
    let text = std::fs::read_to_string(&b.config_path).expect("config");
    b.rewrite_config(&text.replace("old-secret-0000000", "new-secret-1111111"));
    b.signal("HUP");
    wait_for_metric(
        &b,
        "duplex_gateway_config_reloads_total",
        &[("result", "success")],
        |v| v == Some(1.0),
    )
    .await;
    let (status, body) = post(&a, "/f/echo?secret=old-secret-0000000", "1").await;
    assert_eq!(status, 401, "{body}");
    // A WebSocket client of a with the old secret is refused: at the upgrade (401) once a has
    // heard the new digest, else with 1008 on its first call, where it is served.
    match Raw::connect(&a.client_url("/f", "old-secret-0000000"), &[]).await {
        Ok(mut raw) => {
            raw.send("SIMPLEX/1.0;json").await;
            assert_eq!(raw.next().await, Seen::Text("+OK".into()));
            raw.send(r#"{"type":"req","method":"echo","id":1,"payload":1}"#)
                .await;
            assert_eq!(raw.closed().await, Some(1008));
        }
        Err(status) => assert_eq!(status, 401),
    }
}

#[tokio::test]
async fn a_client_flooding_answers_to_another_nodes_backend_that_does_not_read_stays_bounded() {
    let nats = Nats::start();
    // A pool of two: the client is served on its own node a, the calling backend is on b.
    let pool = "endpoints:\n  - path: /p\n    max_backends: 2\n";
    let a = start_node(&nats.url(), "a", "", pool);
    let b = start_node(&nats.url(), "b", "", pool);
    all_hear(&[&a, &b], 2.0).await;
    let _local = publish(&a, "/p", "s").await;
    // A backend on b that does the handshake, calls the client once, and never reads again.
    let mut stuck = Raw::open(&b.publish_url("/p", "s")).await;
    let mut client = Raw::open(&a.client_url("/p", "s")).await;
    client
        .send(r#"{"type":"req","method":"route","id":1}"#)
        .await;
    let route = client.recv().await["payload"]
        .as_str()
        .expect("route")
        .to_string();
    // Wait until b knows a's backend too (the pool spans both), then call the client.
    wait_for_metric(&b, "duplex_gateway_cluster_nodes", &[], |v| v == Some(2.0)).await;
    let call = json!({"type": "req", "method": "flood", "id": 1, "ext": {"route": route}});
    stuck.send(&call.to_string()).await;
    let incoming = client.recv().await;
    assert_eq!(incoming["method"], json!("flood"), "{incoming}");
    let id = incoming["id"].clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = (rss(a.pid()), rss(b.pid()));
    let payload = "x".repeat(900_000);
    let frames = 64u64;
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        for _ in 0..frames {
            let frame = json!({"type": "rep", "id": id, "more": true, "payload": payload});
            if !client.try_send(&frame.to_string()).await {
                break;
            }
            sent += 1;
        }
        (client, sent)
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let grown = (
        rss(a.pid()).saturating_sub(before.0),
        rss(b.pid()).saturating_sub(before.1),
    );
    for (node, grown) in [("a", grown.0), ("b", grown.1)] {
        assert!(
            grown < 40 << 20,
            "node {node} grew by {} MiB for a backend that does not read ({frames} frames of 900 KB sent)",
            grown >> 20
        );
    }
    // The client was put out (it cannot be held back across nodes), as the docs say.
    let (mut client, sent) = sender.await.expect("sender");
    assert!(sent < frames, "all {frames} frames were taken in");
    let deadline = Instant::now() + WAIT;
    loop {
        match client.next().await {
            Seen::Close(code) => {
                assert!(matches!(code, Some(1008) | None), "{code:?}");
                break;
            }
            Seen::Text(_) => assert!(Instant::now() < deadline, "never closed"),
        }
    }
    // b refused the answers its backend had no room for.
    let dropped = metric(
        &b.metrics().await,
        "duplex_gateway_dropped_messages_total",
        &[("endpoint", "/p"), ("reason", "backend_full")],
    );
    assert!(dropped >= Some(1.0), "{dropped:?}");
    drop(stuck);
}

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn the_shipped_nats_config_and_cluster_config_run_as_written() {
    // docs/operations.md shows conf/nats-server.conf as it is.
    let conf = std::fs::read_to_string(repo().join("conf/nats-server.conf")).expect("conf");
    let docs = std::fs::read_to_string(repo().join("docs/operations.md")).expect("docs");
    assert!(
        docs.contains(conf.trim_end()),
        "docs/operations.md does not show conf/nats-server.conf as it is"
    );
    let password = "gateways-nats-password-1";
    let app_password = "apps-nats-password-2";
    let nats = Nats::start_with_file(
        &repo().join("conf/nats-server.conf"),
        &[
            ("DUPLEX_GATEWAY_NATS_PASSWORD", password),
            ("APP_NATS_PASSWORD", app_password),
        ],
    );
    // The gateways read their secrets from the environment, as the README runs them.
    std::env::set_var("DUPLEX_GATEWAY_NATS_PASSWORD", password);
    std::env::set_var("DUPLEX_GATEWAY_CLUSTER_KEY", KEY);
    std::env::set_var("DUPLEX_GATEWAY_TOKEN", TOKEN);
    let node = std::fs::read_to_string(repo().join("conf/cluster.yaml")).expect("cluster.yaml");
    let start = |name: &'static str| {
        let node = node.clone();
        let nats_port = nats.port;
        Gateway::start_with(move |port, metrics_port| {
            node.replace("127.0.0.1:4222", &format!("127.0.0.1:{nats_port}"))
                .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
                .replace("127.0.0.1:9100", &format!("127.0.0.1:{metrics_port}"))
                .replace("gw-1", name)
        })
    };
    let (one, two) = (start("gw-1"), start("gw-2"));
    all_hear(&[&one, &two], 2.0).await;
    let _backend = test_backend()
        .connect(&format!(
            "ws://127.0.0.1:{}/demo?token={TOKEN}&secret=s",
            two.port
        ))
        .await
        .expect("publish");
    served_from(&one, "/demo").await;
    assert_no_secret_in_logs(&[&one, &two], &[password, KEY]);
    // Another user of the server can neither publish nor listen on the gateways' subjects.
    let mut app = RawNats::connect(
        &nats,
        &format!(r#"{{"user":"app","pass":"{app_password}"}}"#),
    )
    .await;
    let refused = app.publish_answer("duplex_gateway.hb", b"{}").await;
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("Permissions Violation")),
        "{refused:?}"
    );
    app.subscribe("duplex_gateway.>", 1).await;
    let refused = app.publish_answer("other.subject", b"x").await;
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("Permissions Violation")),
        "the subscription was not refused: {refused:?}"
    );
    // A stranger without credentials is not let in at all.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", nats.port))
        .await
        .expect("connect");
    let mut stream = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await.expect("INFO");
    stream
        .get_mut()
        .write_all(b"CONNECT {}\r\nPING\r\n")
        .await
        .expect("write");
    line.clear();
    stream.read_line(&mut line).await.expect("answer");
    assert!(line.contains("Authorization Violation"), "{line}");
}

/// Base64url without padding, as JWTs are written.
fn b64url(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(bytes)
}

/// An operator JWT, self-signed (the `nats-jwt` crate makes account and user JWTs only).
fn operator_jwt(operator: &nkeys::KeyPair) -> String {
    let header = b64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({
        "jti": format!("OPERATOR{now}"),
        "iat": now,
        "iss": operator.public_key(),
        "sub": operator.public_key(),
        "name": "test operator",
        "nats": {"type": "operator", "version": 2},
    });
    let claims = b64url(claims.to_string().as_bytes());
    let signed = format!("{header}.{claims}");
    let signature = operator.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64url(&signature))
}

#[tokio::test]
async fn a_credentials_file_authenticates_against_an_operator_mode_server() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let account_jwt = nats_jwt::Token::new_account(account.public_key())
        .name("gateways")
        .sign(&operator);
    let user_jwt = nats_jwt::Token::new_user(account.public_key(), user.public_key())
        .name("gw")
        .sign(&account);
    let nats = Nats::start_with_config(&format!(
        "operator: \"{}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n}}\n",
        operator_jwt(&operator),
        account.public_key(),
        account_jwt
    ));
    let dir = tempfile::tempdir().expect("dir");
    let creds = dir.path().join("gw.creds");
    let seed = user.seed().expect("seed");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .expect("creds");
    let auth = format!("  auth:\n    credentials_file: {}\n", creds.display());
    let [a, b] = two_nodes_carry_a_call([&nats.url(), &nats.url()], [&auth, &auth]).await;
    assert_no_secret_in_logs(&[&a, &b], &[&seed]);
}

#[tokio::test]
async fn a_call_whose_session_was_lost_on_the_way_fails_within_a_tick() {
    // Without a key a message can be forged (the bus must be kept private for that); here it
    // stands for a frame core NATS dropped: b forgets a session a's client still uses.
    let nats = Nats::start();
    let a = start_node(&nats.url(), "a", "", "");
    let b = start_node(&nats.url(), "b", "", "");
    all_hear(&[&a, &b], 2.0).await;
    let _backend = publish(&b, "/lost", "s").await;
    served_from(&a, "/lost").await;
    let mut sniffer = RawNats::connect(&nats, "{}").await;
    sniffer.subscribe("test.gw.node.b", 1).await;
    let peer = client(&a, "/lost", "s").await;
    // Its call opens the session: the sniffer reads its id, and a's epoch and sequence.
    let call = tokio::spawn(async move {
        let started = Instant::now();
        let result = peer.call("slow", json!(8000)).await;
        (result, started.elapsed())
    });
    let opened = loop {
        let msg = sniffer
            .next(WAIT)
            .await
            .expect("a's open of the session, seen on the bus");
        if msg.payload.starts_with(b"O ") {
            break msg.payload;
        }
    };
    let session = String::from_utf8_lossy(&opened[2..34]).to_string();
    let trailer = &opened[opened.len() - 16..];
    let epoch = u64::from_be_bytes(trailer[..8].try_into().expect("epoch"));
    let seq = u64::from_be_bytes(trailer[8..].try_into().expect("seq"));
    // b is told the client left: it drops the session; the client's call is still open on a.
    let close = format!("C {session} a\n").into_bytes();
    sniffer
        .publish("test.gw.node.b", &with_counters(close, epoch, seq + 1000))
        .await;
    let (result, took) = tokio::time::timeout(WAIT, call)
        .await
        .expect("the call ends")
        .expect("call task");
    assert!(
        matches!(&result, Err(PeerError::Rpc(e)) if e.code == -32000),
        "{result:?}"
    );
    assert!(took < Duration::from_secs(4), "it took {took:?}");
}

/// A stand-in node `f` on the bus: its heartbeats announce `/r` (secret `s`) with one backend,
/// or, once `leaving` is set, say it stops. Every message it sends takes the next number of
/// `seq` (one replay window per node).
async fn fake_node_heartbeats(
    nats: &Nats,
    epoch: u64,
    seq: Arc<std::sync::atomic::AtomicU64>,
    leaving: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    use duplex_gateway::cluster::wire::{entry_digest, Announced, Heartbeat};
    let mut nats = RawNats::connect(nats, "{}").await;
    tokio::spawn(async move {
        let secret = sha256_hex(b"s");
        let backends = vec![(1, unix_ms() - 1000, false)];
        // Bounded: 20 s of heartbeats at most.
        for _ in 0..100 {
            let stopping = leaving.load(Ordering::SeqCst);
            let endpoints = if stopping {
                Vec::new()
            } else {
                vec![Announced {
                    path: "/r".into(),
                    secret: secret.clone(),
                    backends: backends.clone(),
                }]
            };
            let beat = Heartbeat {
                node: "f".into(),
                leaving: stopping,
                epoch,
                sent: unix_ms(),
                count: endpoints.len() as u64,
                digest: endpoints
                    .iter()
                    .map(|e| entry_digest(&e.path, &e.secret, &e.backends))
                    .fold(0, |a, b| a ^ b),
                endpoints,
                ..Heartbeat::default()
            };
            let n = seq.fetch_add(1, Ordering::SeqCst);
            let bytes = serde_json::to_vec(&beat).expect("heartbeat");
            nats.publish("test.gw.hb", &with_counters(bytes, epoch, n))
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test]
async fn a_session_refused_at_its_open_goes_again_and_its_call_waits_for_a_backend() {
    // A node that stops refuses new sessions before its heartbeat saying so reaches the others:
    // the calls it refused reached no backend, so their node sends them again and, once no node
    // serves, they wait in the grace for one (as on one node), instead of failing with 503 or
    // -32000. An HTTP call and a WebSocket client's call alike.
    let nats = Nats::start();
    let b = start_node(&nats.url(), "b", "", "");
    let epoch = 4242;
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beats = fake_node_heartbeats(&nats, epoch, seq.clone(), leaving.clone()).await;
    let mut f = RawNats::connect(&nats, "{}").await;
    f.subscribe("test.gw.node.f", 1).await;
    all_hear(&[&b], 2.0).await;
    let started = Instant::now();
    let call = tokio::spawn({
        let url = b.http("/r/echo?secret=s");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .body("7")
                .timeout(WAIT)
                .send()
                .await
                .expect("POST");
            let status = response.status().as_u16();
            (status, response.text().await.expect("body"))
        }
    });
    let ws_call = tokio::spawn({
        let peer = client(&b, "/r", "s").await;
        async move { peer.call("echo", json!(8)).await }
    });
    // f refuses every session opened on it (as a stopping node does); a third open shows b
    // sent a call again. Then f says it stops.
    let refused = Arc::new(AtomicUsize::new(0));
    let refuser = tokio::spawn({
        let (refused, seq) = (refused.clone(), seq.clone());
        async move {
            while let Some(msg) = f.next(WAIT).await {
                if !msg.payload.starts_with(b"O ") {
                    continue;
                }
                assert!(
                    String::from_utf8_lossy(&msg.payload).contains("\"echo\""),
                    "the open carries the call"
                );
                let session = String::from_utf8_lossy(&msg.payload[2..34]).to_string();
                let refusal = format!("N {session} f 1001 gateway node stopping\n").into_bytes();
                let n = seq.fetch_add(1, Ordering::SeqCst);
                f.publish("test.gw.node.b", &with_counters(refusal, epoch, n))
                    .await;
                refused.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    while refused.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "b did not open the call's session again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    leaving.store(true, Ordering::SeqCst);
    // No node serves now: the call waits (3 s grace) for a backend, which comes on b.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!call.is_finished(), "the call did not wait for a backend");
    let _backend = publish(&b, "/r", "s").await;
    let (status, body) = tokio::time::timeout(WAIT, call)
        .await
        .expect("the call ends")
        .expect("call task");
    assert_eq!((status, body.as_str()), (200, "7"), "{}", b.log());
    let answer = tokio::time::timeout(WAIT, ws_call)
        .await
        .expect("the WebSocket call ends")
        .expect("call task");
    assert_eq!(answer, Ok(json!(8)));
    assert!(started.elapsed() < Duration::from_secs(4));
    beats.abort();
    refuser.abort();
}
