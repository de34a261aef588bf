//! Browsers against the real binary: CORS preflights, `Access-Control-Allow-Origin` on every
//! answer to an allowed origin, and requests from other origins refused (HTTP calls and
//! WebSocket upgrades alike).

mod common;

use common::*;

const APP: &str = "https://app.example.com";

fn cors() -> &'static str {
    "cors:\n  allowed_origins: [\"https://app.example.com\"]\n"
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_gets_204_with_the_cors_headers() {
    let gw = Gateway::start(cors());
    let _backend = publish(&gw, "/b", "s").await;
    let resp = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, gw.http("/b/echo"))
        .header("origin", APP)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, x-duplex-secret",
        )
        .send()
        .await
        .expect("preflight");
    assert_eq!(resp.status().as_u16(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["access-control-allow-methods"], "POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "content-type, x-duplex-secret"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["vary"], "Origin");
    // A page sending a signed client token asks for `Authorization` too.
    let resp = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, gw.http("/b/echo"))
        .header("origin", APP)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .expect("preflight");
    assert_eq!(
        resp.headers()["access-control-allow-headers"],
        "content-type, x-duplex-secret, authorization"
    );
}

#[tokio::test]
async fn every_answer_to_an_allowed_origin_carries_allow_origin() {
    let gw = Gateway::start(cors());
    let _backend = publish(&gw, "/b", "s").await;
    let http = reqwest::Client::new();
    for (path, secret, status) in [
        ("/b/echo", "s", 200),
        ("/b/echo", "wrong", 401),
        ("/none/echo", "s", 404),
    ] {
        let resp = http
            .post(gw.http(path))
            .header("origin", APP)
            .header("content-type", "application/json")
            .header("x-duplex-secret", secret)
            .body("1")
            .send()
            .await
            .expect("call");
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(resp.headers()["access-control-allow-origin"], APP, "{path}");
        assert_eq!(resp.headers()["vary"], "Origin", "{path}");
    }
    // A stream too.
    let resp = http
        .post(gw.http("/b/count?secret=s"))
        .header("origin", APP)
        .body("3")
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.headers()["access-control-allow-origin"], APP);
    assert_eq!(resp.text().await.expect("body"), "1\n2\n3\n");
}

#[tokio::test]
async fn another_origin_is_refused_for_calls_and_websockets() {
    let gw = Gateway::start(cors());
    let _backend = publish(&gw, "/b", "s").await;
    let resp = reqwest::Client::new()
        .post(gw.http("/b/echo?secret=s"))
        .header("origin", "https://evil.example")
        .body("1")
        .send()
        .await
        .expect("call");
    assert_eq!(resp.status().as_u16(), 403);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    let status = ws_status(
        &gw.client_url("/b", "s"),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    let status = ws_status(
        &gw.publish_url("/c", "s"),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    // Without Origin (not a browser) nothing changes; from the allowed one, the upgrade works.
    assert_eq!(ws_status(&gw.client_url("/b", "s"), &[]).await, 101);
    assert_eq!(
        ws_status(&gw.client_url("/b", "s"), &[("origin", APP)]).await,
        101
    );
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            "duplex_gateway_rejected_requests_total",
            &[("reason", "origin")]
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn without_cors_options_is_405_and_no_cors_header_is_sent() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/b", "s").await;
    let http = reqwest::Client::new();
    let resp = http
        .request(reqwest::Method::OPTIONS, gw.http("/b/echo"))
        .header("origin", APP)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(resp.status().as_u16(), 405);
    let resp = http
        .post(gw.http("/b/echo?secret=s"))
        .header("origin", APP)
        .body("1")
        .send()
        .await
        .expect("call");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn tls_listeners_serve_calls_and_streams_over_http2() {
    let TlsGateway {
        gw, tls_port, ca, ..
    } = start_tls("");
    let _backend = publish(&gw, "/h2", "s").await;
    let h2 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("pem"))
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let base = format!("https://localhost:{tls_port}");
    let resp = h2
        .post(format!("{base}/h2/echo?secret=s"))
        .body(r#"{"over":"h2"}"#)
        .send()
        .await
        .expect("call");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.expect("body"), r#"{"over":"h2"}"#);
    // An NDJSON reply stream.
    let resp = h2
        .post(format!("{base}/h2/count?secret=s"))
        .body("5")
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    assert_eq!(resp.text().await.expect("body"), "1\n2\n3\n4\n5\n");
    // A WebSocket cannot be asked for over HTTP/2: a clear answer, not a hang.
    let resp = tokio::time::timeout(WAIT, h2.get(format!("{base}/h2?secret=s")).send())
        .await
        .expect("an answer in time")
        .expect("get");
    assert_eq!(resp.status().as_u16(), 426);
    assert!(resp.text().await.expect("body").contains("HTTP/1.1"));
}
