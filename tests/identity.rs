//! Signed client tokens (JWT) against the real binary: every check, `ext.auth` as backends see
//! it (WebSocket, HTTP, across two nodes), expiry, `$refresh`, and key rotation by SIGHUP.

mod common;

use std::time::Duration;

use common::jwt::*;
use common::*;
use duplex::{Peer, PeerError};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

const ISSUER: &str = "https://auth.test";

/// `/app`: tokens only (RS256 key, issuer, audience `app`, leeway `leeway`); `/both`: token and
/// secret; `/jwks`: a JWK set file with key `k1`.
fn endpoints(dir: &std::path::Path, keys: &[&str], leeway: &str) -> String {
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwks("ec256", "k1")).expect("jwks");
    let keys: Vec<String> = keys.iter().map(|k| public_key(k)).collect();
    format!(
        "endpoints:\n\
         \x20 - path: /app\n    auth:\n      secret: false\n      jwt:\n        keys: [{keys}]\n        issuer: {ISSUER}\n        audience: app\n        leeway: {leeway}\n        claims_to_backend: [sub, role]\n\
         \x20 - path: /both\n    auth:\n      jwt:\n        keys: [{keys}]\n\
         \x20 - path: /jwks\n    auth:\n      secret: false\n      jwt:\n        jwks_file: {}\n",
        jwks_path.display(),
        keys = keys.join(", ")
    )
}

struct Setup {
    gw: Gateway,
    _dir: tempfile::TempDir,
}

fn start(keys: &[&str], leeway: &str) -> Setup {
    let dir = tempfile::tempdir().expect("dir");
    let text = endpoints(dir.path(), keys, leeway);
    Setup {
        gw: Gateway::start(&text),
        _dir: dir,
    }
}

/// Claims `/app` accepts, for `sub`, valid `seconds` more.
fn app_claims(sub: &str, seconds: u64) -> Value {
    let mut c = claims(sub, seconds);
    c["iss"] = json!(ISSUER);
    c["aud"] = json!(["other", "app"]);
    c
}

async fn call_with(gw: &Gateway, path_and_query: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(gw.http(path_and_query))
        .body("1");
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("answer");
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn client_with(gw: &Gateway, path: &str, token: &str) -> Result<Peer, PeerError> {
    Peer::builder().bearer(token).connect(&gw.ws(path)).await
}

#[tokio::test]
async fn every_token_check_refuses_with_401_jwt_and_names_the_check() {
    let Setup { gw, _dir } = start(&["rsa"], "1s");
    let _app = publish(&gw, "/app", "ignored").await;
    let _jwks = publish(&gw, "/jwks", "ignored").await;

    let good = sign(&app_claims("alice", 60));
    let (status, body) = call_with(&gw, "/app/echo", Some(&good)).await;
    assert_eq!(
        (status, body),
        (200, json!(1)),
        "a valid token in the header"
    );
    let (status, _) = call_with(&gw, &format!("/app/echo?access_token={good}"), None).await;
    assert_eq!(status, 200, "a valid token in the query");

    let with = |key: &str, value: Value| {
        let mut c = app_claims("alice", 60);
        c[key] = value;
        sign(&c)
    };
    let public_pem = std::fs::read(public_key("rsa")).expect("pub");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("expired", Some(with("exp", json!(now() - 30))), "expired"),
        (
            "not yet valid",
            Some(with("nbf", json!(now() + 60))),
            "not yet valid",
        ),
        (
            "wrong issuer",
            Some(with("iss", json!("https://evil.test"))),
            "issuer",
        ),
        (
            "wrong audience",
            Some(with("aud", json!("other"))),
            "audience",
        ),
        (
            "signed by another key",
            Some(sign_with(
                Algorithm::RS256,
                "rsa2",
                None,
                &app_claims("alice", 60),
            )),
            "signature",
        ),
        (
            "alg none",
            Some(unsigned(&app_claims("alice", 60))),
            "`none`",
        ),
        (
            "the RSA public key used as an HS256 secret",
            Some(sign_hs256(&public_pem, &app_claims("alice", 60))),
            "HS256 is not allowed",
        ),
        (
            "an algorithm of another key type",
            Some(sign_with(
                Algorithm::ES256,
                "ec256",
                None,
                &app_claims("alice", 60),
            )),
            "ES256 is not allowed",
        ),
        ("malformed", Some("not-a-token".into()), "malformed"),
        ("missing", None, "missing token"),
    ];
    for (name, token, expected) in cases {
        let (status, body) = call_with(&gw, "/app/echo", token.as_deref()).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(status, 401, "{name}: {body}");
        assert!(message.contains(expected), "{name}: {message}");
        if let Some(token) = &token {
            assert!(
                !body.to_string().contains(token.as_str()),
                "{name}: the token is echoed"
            );
        }
        // The same check refuses a WebSocket client.
        let status = match &token {
            Some(t) => {
                ws_status(&gw.ws("/app"), &[("authorization", &format!("Bearer {t}"))]).await
            }
            None => ws_status(&gw.ws("/app"), &[]).await,
        };
        assert_eq!(status, 401, "{name} (WebSocket)");
    }
    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "jwt")]
        )
        .is_some_and(|n| n >= 18.0),
        "{metrics}"
    );

    // A JWK set picks its key by `kid`.
    let claims = claims("bob", 60);
    let by_kid = sign_with(Algorithm::ES256, "ec256", Some("k1"), &claims);
    assert_eq!(call_with(&gw, "/jwks/echo", Some(&by_kid)).await.0, 200);
    let unknown = sign_with(Algorithm::ES256, "ec256", Some("k2"), &claims);
    let (status, body) = call_with(&gw, "/jwks/echo", Some(&unknown)).await;
    assert_eq!(status, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("key id"),
        "{body}"
    );
    // A WebSocket client in a browser sends it in the query.
    let raw = Raw::connect(&gw.ws(&format!("/jwks?access_token={by_kid}")), &[]).await;
    assert!(raw.is_ok(), "access_token in the query");
}

#[tokio::test]
async fn an_endpoint_with_token_and_secret_wants_both() {
    let Setup { gw, _dir } = start(&["rsa"], "1s");
    let _backend = publish(&gw, "/both", "s").await;
    let token = sign(&claims("carol", 60));
    assert_eq!(
        call_with(&gw, "/both/echo?secret=s", Some(&token)).await.0,
        200
    );
    let (status, body) = call_with(&gw, "/both/echo", Some(&token)).await;
    assert_eq!(
        (status, body["error"]["message"].as_str()),
        (401, Some("missing or wrong secret"))
    );
    let (status, body) = call_with(&gw, "/both/echo?secret=s", None).await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("missing token"));
    // A backend still publishes with its publish token in the header on such a path.
    let publisher = test_backend()
        .bearer(TOKEN)
        .header("x-duplex-secret", "s")
        .connect(&gw.ws("/both"))
        .await;
    assert!(
        publisher.is_ok(),
        "publish with Authorization: Bearer <publish token>"
    );
}

#[tokio::test]
async fn backends_see_ext_auth_on_every_request_and_a_forged_one_is_replaced() {
    let Setup { gw, _dir } = start(&["rsa"], "1s");
    let _backend = publish(&gw, "/app", "ignored").await;
    let token = sign(&app_claims("alice", 60));
    let expected = json!({"auth": {"sub": "alice", "role": "admin"}});

    // HTTP: the claims listed in claims_to_backend, nothing else of the token.
    let (status, body) = call_with(&gw, "/app/ext", Some(&token)).await;
    assert_eq!((status, &body["auth"]), (200, &expected["auth"]), "{body}");

    // WebSocket, through the library.
    let peer = client_with(&gw, "/app", &token).await.expect("client");
    assert_eq!(peer.call("ext", Value::Null).await.expect("ext"), expected);

    // A raw client that forges its own ext.auth, beside a key of its own.
    let mut raw = Raw::connect(&gw.ws(&format!("/app?access_token={token}")), &[])
        .await
        .expect("connect");
    raw.send("SIMPLEX/1.0;json").await;
    assert_eq!(raw.next().await, Seen::Text("+OK".into()));
    raw.send_json(&json!({"type":"req","method":"ext","id":7,"ext":{"auth":{"sub":"root"},"k":1}}))
        .await;
    let reply = raw.recv().await;
    assert_eq!(reply["id"], 7, "{reply}");
    assert_eq!(
        reply["payload"],
        json!({"auth": {"sub": "alice", "role": "admin"}, "k": 1}),
        "{reply}"
    );
    // The client gets its own ext back, as it sent it.
    assert_eq!(
        reply["ext"],
        json!({"auth": {"sub": "root"}, "k": 1}),
        "{reply}"
    );
}

#[tokio::test]
async fn a_websocket_client_is_closed_at_expiry_unless_it_refreshes_for_the_same_sub() {
    let Setup { gw, _dir } = start(&["rsa"], "0s");
    let _backend = publish(&gw, "/app", "ignored").await;

    let expiring = client_with(&gw, "/app", &sign(&app_claims("alice", 2)))
        .await
        .expect("client");
    let refreshed = client_with(&gw, "/app", &sign(&app_claims("alice", 2)))
        .await
        .expect("client");
    let other_sub = client_with(&gw, "/app", &sign(&app_claims("alice", 2)))
        .await
        .expect("client");

    let exp = refreshed
        .refresh(&sign(&app_claims("alice", 60)))
        .await
        .expect("refresh");
    assert!(exp >= now() + 50, "the new exp is answered");
    match other_sub.refresh(&sign(&app_claims("mallory", 60))).await {
        Err(PeerError::Rpc(e)) => {
            assert_eq!(e.code, -32602);
            assert!(e.message.contains("sub"), "{}", e.message);
        }
        other => panic!("a token for another sub: {other:?}"),
    }
    match refreshed.refresh("not-a-token").await {
        Err(PeerError::Rpc(e)) => assert_eq!(e.code, -32602),
        other => panic!("a malformed token: {other:?}"),
    }

    // At exp the first and the third (still on its old token) are closed with 1008.
    for (name, peer) in [("expiring", &expiring), ("other sub", &other_sub)] {
        let code = tokio::time::timeout(Duration::from_secs(5), peer.closed())
            .await
            .unwrap_or_else(|_| panic!("{name}: not closed at expiry"));
        assert_eq!(code, Some(1008), "{name}");
    }
    // The refreshed one carries on.
    assert_eq!(
        refreshed.call("echo", json!(5)).await.expect("echo"),
        json!(5)
    );

    // $refresh on an endpoint without tokens.
    let _plain = publish(&gw, "/plain", "s").await;
    let peer = client(&gw, "/plain", "s").await;
    match peer.refresh("x.y.z").await {
        Err(PeerError::Rpc(e)) => assert_eq!(e.code, -32601),
        other => panic!("$refresh without tokens: {other:?}"),
    }
}

#[tokio::test]
async fn a_key_rotation_by_sighup_closes_the_clients_whose_token_no_longer_verifies() {
    let dir = tempfile::tempdir().expect("dir");
    let gw = Gateway::start(&endpoints(dir.path(), &["rsa"], "1s"));
    let _backend = publish(&gw, "/app", "ignored").await;
    let old_key = client_with(&gw, "/app", &sign(&app_claims("alice", 600)))
        .await
        .expect("client");
    let _plain = publish(&gw, "/plain", "s").await;
    let plain = client(&gw, "/plain", "s").await;

    // The new config signs /app with rsa2 only, and makes /plain take tokens too.
    let text = Gateway::config_text(
        gw.port,
        gw.metrics_port,
        &format!(
            "{}  - path: /plain\n    auth:\n      jwt:\n        keys: [{}]\n",
            endpoints(dir.path(), &["rsa2"], "1s"),
            public_key("rsa2")
        ),
    );
    gw.rewrite_config(&text);
    gw.signal("HUP");
    for (name, peer) in [("old key", &old_key), ("no token", &plain)] {
        let code = tokio::time::timeout(Duration::from_secs(5), peer.closed())
            .await
            .unwrap_or_else(|_| panic!("{name}: not closed by the reload\n{}", gw.log()));
        assert_eq!(code, Some(1008), "{name}");
    }
    let new_token = sign_with(Algorithm::RS256, "rsa2", None, &app_claims("alice", 600));
    let new_key = client_with(&gw, "/app", &new_token).await.expect("new key");
    assert_eq!(
        new_key.call("echo", json!(1)).await.expect("echo"),
        json!(1)
    );
    assert_eq!(
        call_with(&gw, "/app/echo", Some(&sign(&app_claims("alice", 600))))
            .await
            .0,
        401
    );

    // A JWK set file is read again too: its key now under `kid` k2.
    let _jwks = publish(&gw, "/jwks", "ignored").await;
    let k1 = sign_with(Algorithm::ES256, "ec256", Some("k1"), &claims("bob", 600));
    assert_eq!(call_with(&gw, "/jwks/echo", Some(&k1)).await.0, 200);
    std::fs::write(dir.path().join("jwks.json"), jwks("ec256", "k2")).expect("jwks");
    gw.signal("HUP");
    let k2 = sign_with(Algorithm::ES256, "ec256", Some("k2"), &claims("bob", 600));
    let deadline = std::time::Instant::now() + WAIT;
    while call_with(&gw, "/jwks/echo", Some(&k2)).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new JWK set never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call_with(&gw, "/jwks/echo", Some(&k1)).await.0, 401);
}

#[tokio::test]
async fn ext_auth_crosses_nodes_with_the_frames() {
    let nats = common::nats::Nats::start();
    let dir = tempfile::tempdir().expect("dir");
    let cluster = |name: &str| {
        format!(
            "{}limits:\n  max_message_bytes: 1000000\ncluster:\n  nats: [{}]\n  node: {name}\n  subject_prefix: test.jwt\n  node_timeout: 2s\n",
            endpoints(dir.path(), &["rsa"], "1s"),
            nats.url()
        )
    };
    let a = Gateway::start(&cluster("a"));
    let b = Gateway::start(&cluster("b"));
    for gw in [&a, &b] {
        wait_for_metric(gw, "duplex_gateway_cluster_nodes", &[], |v| v == Some(2.0)).await;
    }
    let _backend = publish(&a, "/app", "ignored").await;
    let token = sign(&app_claims("alice", 60));
    let expected = json!({"auth": {"sub": "alice", "role": "admin"}});
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let answer = call_with(&b, "/app/ext", Some(&token)).await;
        if answer.0 != 404 {
            assert_eq!(
                (answer.0, &answer.1["auth"]),
                (200, &expected["auth"]),
                "through b"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "/app never reached b");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peer = client_with(&b, "/app", &token).await.expect("client on b");
    assert_eq!(peer.call("ext", json!(null)).await.expect("ext"), expected);
    // The token is checked on the client's node.
    assert_eq!(
        call_with(&b, "/app/echo", Some(&unsigned(&app_claims("alice", 60))))
            .await
            .0,
        401
    );
}

/// The README's walk-through: the demo script's HS256 token through the example backend.
#[tokio::test]
async fn the_demo_script_mints_a_token_the_gateway_takes() {
    const SECRET: &str = "demo-secret-of-at-least-32-bytes-0123";
    let gw = Gateway::start(
        "endpoints:\n  - path: /demo\n    auth:\n      secret: false\n      jwt:\n        hs256_secret: demo-secret-of-at-least-32-bytes-0123\n",
    );
    let _backend = publish(&gw, "/demo", "ignored").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/browser/mint-token.py"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("alice")
        .env("DEMO_JWT_SECRET", SECRET)
        .output()
        .expect("python3 runs the script");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("utf-8");
    let (status, body) = call_with(&gw, "/demo/ext", Some(token.trim())).await;
    assert_eq!(
        (status, &body["auth"]),
        (200, &json!({"sub": "alice"})),
        "{body}"
    );
}
