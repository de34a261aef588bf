//! The WebSocket rows of the status table (`docs/http-api.md`) and the command line, against the
//! real binary.

mod common;

use common::*;
use serde_json::Value;

async fn status_of(method: &str, url: &str) -> (u16, Option<String>, Value) {
    let resp = reqwest::Client::new()
        .request(method.parse().expect("method"), url)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let allow = resp
        .headers()
        .get("allow")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, allow, body)
}

#[tokio::test]
async fn every_websocket_row_of_the_status_table() {
    let gw = Gateway::start("endpoints:\n  - path: /small\n    max_clients: 1\n");
    let _backend = publish(&gw, "/live", "s").await;

    // 405 with Allow, and a JSON error body.
    for method in ["PUT", "DELETE", "PATCH"] {
        let (status, allow, body) = status_of(method, &gw.http("/live")).await;
        assert_eq!(status, 405, "{method}");
        assert_eq!(allow.as_deref(), Some("GET, POST"));
        assert_eq!(body["error"]["code"], 405, "{body}");
    }
    // Publishing: 401 unknown token, 403 path not allowed, 400 no secret, 426 no upgrade.
    assert_eq!(
        ws_status(&gw.ws("/p?token=not-configured-token&secret=s"), &[]).await,
        401
    );
    assert_eq!(
        ws_status(&gw.ws(&format!("/other?token={TEAM_TOKEN}&secret=s")), &[]).await,
        403
    );
    assert_eq!(
        ws_status(&gw.ws(&format!("/team?token={TEAM_TOKEN}&secret=s")), &[]).await,
        403
    );
    assert_eq!(
        ws_status(&gw.ws(&format!("/p?token={TOKEN}")), &[]).await,
        400
    );
    let (status, _, body) = status_of("GET", &gw.http(&format!("/p?token={TOKEN}&secret=s"))).await;
    assert_eq!(status, 426);
    assert!(body["error"]["message"].is_string(), "{body}");
    // The order of the checks: a bad token is 401 even without an upgrade.
    let (status, _, _) = status_of("GET", &gw.http("/p?token=not-configured-token")).await;
    assert_eq!(status, 401);

    // Clients: 426 no upgrade, 404 no backend, 401 missing or wrong secret.
    let (status, _, _) = status_of("GET", &gw.http("/live?secret=s")).await;
    assert_eq!(status, 426);
    assert_eq!(ws_status(&gw.client_url("/nobody", "s"), &[]).await, 404);
    assert_eq!(ws_status(&gw.ws("/live"), &[]).await, 401);
    assert_eq!(ws_status(&gw.client_url("/live", "wrong"), &[]).await, 401);
    assert_eq!(ws_status(&gw.client_url("/live", "s"), &[]).await, 101);

    // 503 when the endpoint is at max_clients.
    let _small = publish(&gw, "/small", "s").await;
    let _one = client(&gw, "/small", "s").await;
    assert_eq!(ws_status(&gw.client_url("/small", "s"), &[]).await, 503);

    // No credential ever reaches the log.
    let log = gw.log();
    for secret in [TOKEN, TEAM_TOKEN, "not-configured-token"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[test]
fn check_reports_an_unknown_key_with_its_line() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listen:\n  - address: 127.0.0.1:1\nlimits:\n  call_timout: 5s\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex-gateway"))
        .args(["--check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("call_timout"), "{text}");
    assert!(text.contains("line 4"), "{text}");

    std::fs::write(&path, "listen:\n  - address: 127.0.0.1:1\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex-gateway"))
        .args(["--check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_config_naming_an_unset_variable_does_not_start() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("env.yaml");
    std::fs::write(
        &path,
        "listen:\n  - address: 127.0.0.1:1\ntokens:\n  - name: t\n    token: ${DUPLEX_TEST_SURELY_UNSET}\n    endpoints: [/a]\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex-gateway"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("DUPLEX_TEST_SURELY_UNSET is not set") && text.contains("line 5"),
        "{text}"
    );
}

#[tokio::test]
async fn an_endpoints_own_max_clients_replaces_the_global_limit_and_a_post_needs_a_method() {
    let gw = Gateway::start(
        "endpoints:\n  - path: /big\n    max_clients: 3\nlimits:\n  max_clients_per_endpoint: 1\n",
    );
    let _backend = publish(&gw, "/big", "s").await;
    let _clients = [
        client(&gw, "/big", "s").await,
        client(&gw, "/big", "s").await,
        client(&gw, "/big", "s").await,
    ];
    assert_eq!(ws_status(&gw.client_url("/big", "s"), &[]).await, 503);
    let (status, _, body) = status_of("POST", &gw.http("/big/?secret=s")).await;
    assert_eq!(status, 404, "{body}");
}
