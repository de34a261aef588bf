//! What an operator sees, against the real binary: per-method call metrics with their cap.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn calls_are_counted_per_method_and_code_with_the_rest_as_other() {
    let gw = Gateway::start("limits:\n  max_methods_per_endpoint: 2\n  backend_grace: 200ms\n");
    let backend = publish(&gw, "/m", "s").await;
    let peer = client(&gw, "/m", "s").await;
    for i in 0..2 {
        peer.call("echo", json!(i)).await.expect("echo");
    }
    assert_eq!(post(&gw, "/m/echo?secret=s", "3").await.0, 200);
    peer.call("count", json!(2)).await.expect("count");
    // A third method is over the cap: `other`, with the backend's error code.
    let _ = peer.call("fail", json!({"code": -5})).await;
    let _ = peer.call("fail", json!({"code": -5})).await;

    let text = gw.metrics().await;
    let calls = |method: &str, code: &str| {
        metric(
            &text,
            "duplex_gateway_calls_total",
            &[("endpoint", "/m"), ("method", method), ("code", code)],
        )
    };
    assert_eq!(calls("echo", "ok"), Some(3.0), "{text}");
    assert_eq!(calls("count", "ok"), Some(1.0), "{text}");
    assert_eq!(calls("other", "-5"), Some(2.0), "{text}");
    assert_eq!(calls("fail", "-5"), None, "{text}");
    let durations = |method: &str| {
        metric(
            &text,
            "duplex_gateway_call_duration_seconds_count",
            &[("endpoint", "/m"), ("method", method)],
        )
    };
    assert_eq!(durations("echo"), Some(3.0), "{text}");
    assert_eq!(durations("other"), Some(2.0), "{text}");

    // An async call is counted as sent; a call whose caller leaves first, as cancelled.
    assert_eq!(post(&gw, "/m/echo?secret=s&async=true", "1").await.0, 202);
    wait_for_metric(
        &gw,
        "duplex_gateway_calls_total",
        &[("endpoint", "/m"), ("method", "echo"), ("code", "sent")],
        |v| v == Some(1.0),
    )
    .await;
    let quitter = client(&gw, "/m", "s").await;
    let slow = {
        let p = quitter.clone();
        tokio::spawn(async move { p.call("slow", json!(3000)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    quitter.close();
    drop(slow);
    wait_for_metric(
        &gw,
        "duplex_gateway_calls_total",
        &[
            ("endpoint", "/m"),
            ("method", "other"),
            ("code", "cancelled"),
        ],
        |v| v == Some(1.0),
    )
    .await;

    // A call open when its backend leaves ends with -32000.
    let slow = tokio::spawn({
        let peer = client(&gw, "/m", "s").await;
        async move { peer.call("slow", json!(5000)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    backend.close();
    assert!(slow.await.expect("task").is_err());
    wait_for_metric(
        &gw,
        "duplex_gateway_calls_total",
        &[("endpoint", "/m"), ("method", "other"), ("code", "-32000")],
        |v| v == Some(1.0),
    )
    .await;

    // The endpoint gone (its grace over), its series go with it.
    wait_for_metric(
        &gw,
        "duplex_gateway_calls_total",
        &[("endpoint", "/m"), ("method", "echo"), ("code", "ok")],
        |v| v.is_none(),
    )
    .await;
    let text = gw.metrics().await;
    assert!(!text.contains("endpoint=\"/m\""), "{text}");
}

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// `00-<trace>-<span>-<flags>`, split.
fn parts(traceparent: &serde_json::Value) -> (String, String, String) {
    let text = traceparent
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent: {traceparent}"));
    let p: Vec<&str> = text.split('-').collect();
    assert_eq!(p.len(), 4, "{text}");
    assert_eq!((p[0], p[1].len(), p[2].len()), ("00", 32, 16), "{text}");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

/// The `ext` the test backend of `endpoint` saw for an HTTP call with `traceparent`, if any.
async fn ext_seen(gw: &Gateway, endpoint: &str, traceparent: Option<&str>) -> serde_json::Value {
    let mut req = reqwest::Client::new()
        .post(gw.http(&format!("{endpoint}/ext?secret=s")))
        .body("null");
    if let Some(h) = traceparent {
        req = req.header("traceparent", h);
    }
    req.send().await.expect("call").json().await.expect("json")
}

#[tokio::test]
async fn backends_see_the_callers_trace_with_the_gateways_hop_as_parent() {
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/t", "s").await;

    // HTTP with a traceparent: same trace and flags, a new parent span.
    let seen = ext_seen(&gw, "/t", Some(PARENT)).await;
    let (trace, span, flags) = parts(&seen["traceparent"]);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(span, "00f067aa0ba902b7");
    assert_eq!(flags, "01");

    // HTTP without one (or with a malformed one): a new trace.
    for header in [None, Some("00-zz-yy-01")] {
        let seen = ext_seen(&gw, "/t", header).await;
        let (trace, _, _) = parts(&seen["traceparent"]);
        assert_ne!(trace, "0".repeat(32));
        assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    // WebSocket: a request's own traceparent is re-parented; one without stays without.
    let mut raw = Raw::open(&gw.client_url("/t", "s")).await;
    raw.send_json(
        &json!({"type":"req","method":"ext","id":1,"ext":{"traceparent": PARENT, "k": 1}}),
    )
    .await;
    let reply = raw.recv().await;
    let (trace, span, _) = parts(&reply["payload"]["traceparent"]);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736", "{reply}");
    assert_ne!(span, "00f067aa0ba902b7");
    assert_eq!(reply["payload"]["k"], 1);
    assert_eq!(
        reply["ext"]["traceparent"], PARENT,
        "the client gets its own ext back"
    );
    raw.send_json(&json!({"type":"req","method":"ext","id":2}))
        .await;
    let reply = raw.recv().await;
    assert_eq!(reply["payload"], json!({}), "{reply}");
}

const ADMIN: &str = "admin-token-0123456789";

async fn admin(
    gw: &Gateway,
    method: reqwest::Method,
    path_and_query: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let url = format!("http://127.0.0.1:{}{path_and_query}", gw.metrics_port);
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("admin answer");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

#[tokio::test]
async fn the_admin_api_needs_its_token_and_lists_drains_and_closes() {
    use reqwest::Method;
    // Without admin.token there is no admin API.
    let plain = Gateway::start("");
    assert_eq!(
        admin(&plain, Method::GET, "/admin/endpoints", Some(ADMIN))
            .await
            .0,
        404
    );

    let gw = Gateway::start(&format!(
        "admin:\n  token: {ADMIN}\nendpoints:\n  - path: /a\n    max_backends: 2\n"
    ));
    let first = publish(&gw, "/a", "s").await;
    let second = publish(&gw, "/a", "s").await;
    let peer = client(&gw, "/a", "s").await;
    peer.call("echo", json!(1)).await.expect("echo");
    for token in [None, Some("wrong-token-0123456789")] {
        let (status, body) = admin(&gw, Method::GET, "/admin/endpoints", token).await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, list) = admin(&gw, Method::GET, "/admin/endpoints", Some(ADMIN)).await;
    assert_eq!(status, 200, "{list}");
    let endpoint = list["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["path"] == "/a"))
        .unwrap_or_else(|| panic!("/a listed: {list}"))
        .clone();
    assert_eq!(endpoint["clients"], 1, "{endpoint}");
    let backends = endpoint["backends"].as_array().expect("backends").clone();
    assert_eq!(backends.len(), 2, "{endpoint}");
    for b in &backends {
        assert_eq!(b["token"], "main");
        assert_eq!(b["draining"], false);
        assert!(
            b["connected_since"]
                .as_u64()
                .is_some_and(|t| t > 1_600_000_000_000),
            "{b}"
        );
    }
    let pinned: u64 = backends
        .iter()
        .map(|b| b["clients"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(pinned, 1, "the client is pinned to one backend: {endpoint}");
    let ids: Vec<String> = backends
        .iter()
        .map(|b| b["id"].as_str().expect("id").to_string())
        .collect();

    // Another node's backend: 404 here (ask that node).
    assert_eq!(
        admin(
            &gw,
            Method::POST,
            "/admin/drain?endpoint=%2Fa&backend=1&node=elsewhere",
            Some(ADMIN)
        )
        .await
        .0,
        404
    );
    // Unknown endpoint or backend: 404; a GET on an action: 405.
    let q = |rest: &str| format!("/admin/drain?endpoint=%2Fa&{rest}");
    assert_eq!(
        admin(&gw, Method::POST, &q("backend=999"), Some(ADMIN))
            .await
            .0,
        404
    );
    assert_eq!(
        admin(
            &gw,
            Method::POST,
            "/admin/drain?endpoint=%2Fnone&backend=1",
            Some(ADMIN)
        )
        .await
        .0,
        404
    );
    assert_eq!(
        admin(&gw, Method::GET, &q("backend=1"), Some(ADMIN))
            .await
            .0,
        405
    );

    // Drain the first, then the listing says so.
    let (status, body) = admin(
        &gw,
        Method::POST,
        &q(&format!("backend={}", ids[0])),
        Some(ADMIN),
    )
    .await;
    assert_eq!((status, &body["draining"]), (200, &json!(true)), "{body}");
    let (_, list) = admin(&gw, Method::GET, "/admin/endpoints", Some(ADMIN)).await;
    let drained = list["endpoints"][0]["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["id"] == ids[0].as_str()).cloned())
        .expect("still listed");
    assert_eq!(drained["draining"], true, "{list}");

    // Close the second backend: 1008. (The drained first one stays until it leaves.)
    let (status, body) = admin(
        &gw,
        Method::POST,
        &format!("/admin/close?endpoint=%2Fa&backend={}", ids[1]),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let closed = [&first, &second].iter().position(|p| p.is_closed());
    let code = tokio::time::timeout(WAIT, async {
        loop {
            for p in [&first, &second] {
                if p.is_closed() {
                    return p.closed().await;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no backend closed ({closed:?})"));
    assert_eq!(code, Some(1008));

    // Close the endpoint's clients: 1008.
    let (status, body) = admin(
        &gw,
        Method::POST,
        "/admin/close?endpoint=%2Fa&clients=all",
        Some(ADMIN),
    )
    .await;
    assert_eq!(
        (status, &body["closed_clients"]),
        (200, &json!(1)),
        "{body}"
    );
    let code = tokio::time::timeout(WAIT, peer.closed())
        .await
        .expect("client closed");
    assert_eq!(code, Some(1008));
}

#[tokio::test]
async fn the_admin_listing_shows_every_nodes_backends() {
    let nats = common::nats::Nats::start();
    let node = |name: &str| {
        format!(
            "admin:\n  token: {ADMIN}\nlimits:\n  max_message_bytes: 1000000\ncluster:\n  nats: [{}]\n  node: {name}\n  subject_prefix: test.admin\n",
            nats.url()
        )
    };
    let a = Gateway::start(&node("a"));
    let b = Gateway::start(&node("b"));
    for gw in [&a, &b] {
        wait_for_metric(gw, "duplex_gateway_cluster_nodes", &[], |v| v == Some(2.0)).await;
    }
    let _backend = publish(&a, "/x", "s").await;
    served_from(&b, "/x").await;
    let (status, list) = admin(&b, reqwest::Method::GET, "/admin/endpoints", Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(list["node"], "b", "{list}");
    let x = list["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["path"] == "/x"))
        .unwrap_or_else(|| panic!("/x listed on b: {list}"));
    assert_eq!(x["backends"][0]["node"], "a", "{list}");
}

/// The access lines of a log (the JSON lines with a `transport`).
fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("transport").is_some())
        .collect()
}

#[tokio::test]
async fn the_access_log_has_a_json_line_per_call_and_refusal_and_no_credential() {
    const SECRET: &str = "access-secret-0123456789";
    let gw = Gateway::start_logging("info", |port, metrics| {
        Gateway::config_text(port, metrics, "log:\n  access: true\n  format: json\n")
    });
    let _backend = publish(&gw, "/acc", SECRET).await;
    assert_eq!(
        post(&gw, &format!("/acc/echo?secret={SECRET}"), "[1,2]")
            .await
            .0,
        200
    );
    assert_eq!(post(&gw, "/acc/echo?secret=wrong", "1").await.0, 401);
    let peer = client(&gw, "/acc", SECRET).await;
    peer.call("echo", json!("hi")).await.expect("echo");
    let _ = peer
        .call("fail", json!({"code": -7, "message": "no"}))
        .await;
    assert_eq!(ws_status(&gw.ws("/nothing-here"), &[]).await, 404);

    let deadline = std::time::Instant::now() + WAIT;
    let lines = loop {
        let lines = access_lines(&gw.log());
        if lines.len() >= 5 || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = gw.log();
    // Every line of the log is one JSON object, access lines or not.
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    assert!(
        !log.contains(SECRET) && !log.contains("secret="),
        "a credential in the log:\n{log}"
    );
    let find = |transport: &str,
                method: Option<&str>,
                pred: &dyn Fn(&serde_json::Value) -> bool| {
        lines
            .iter()
            .find(|l| {
                l["transport"] == transport && method.is_none_or(|m| l["method"] == m) && pred(l)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {transport} {method:?} line in {lines:#?}"))
    };
    let http_ok = find("http", Some("echo"), &|l| l["status"] == 200);
    assert_eq!(http_ok["endpoint"], "/acc");
    assert_eq!(http_ok["bytes_in"], 5);
    assert_eq!(http_ok["bytes_out"], 5);
    assert_eq!(http_ok["client_ip"], "127.0.0.1");
    assert!(http_ok["backend"].is_string(), "{http_ok}");
    assert_eq!(
        http_ok["trace_id"].as_str().map(str::len),
        Some(32),
        "{http_ok}"
    );
    for key in ["ts", "node", "duration_us"] {
        assert!(http_ok.get(key).is_some(), "{key} in {http_ok}");
    }
    let refused = find("http", Some("echo"), &|l| l["status"] == 401);
    assert_eq!(refused["endpoint"], "/acc");
    let ws_ok = find("ws", Some("echo"), &|l| l.get("code").is_none());
    assert!(ws_ok["backend"].is_string(), "{ws_ok}");
    assert!(ws_ok["bytes_in"].as_u64() > Some(0) && ws_ok["bytes_out"].as_u64() > Some(0));
    let ws_err = find("ws", Some("fail"), &|_| true);
    assert_eq!(ws_err["code"], -7);
    let ws_refused = find("ws", None, &|l| l["status"] == 404);
    assert_eq!(ws_refused["endpoint"], "/nothing-here");
}

#[tokio::test]
async fn without_log_access_there_is_no_access_line_and_text_lines_say_access() {
    let quiet = Gateway::start("");
    let _backend = publish(&quiet, "/q", "s").await;
    assert_eq!(post(&quiet, "/q/echo?secret=s", "1").await.0, 200);
    let text = Gateway::start("log:\n  access: true\n");
    let _backend2 = publish(&text, "/q", "s").await;
    assert_eq!(post(&text, "/q/echo?secret=s", "1").await.0, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!quiet.log().contains("ACCESS"), "{}", quiet.log());
    let log = text.log();
    let line = log
        .lines()
        .find(|l| l.contains(" ACCESS "))
        .unwrap_or_else(|| panic!("no access line: {log}"));
    assert!(
        line.contains("endpoint=/q method=echo transport=http status=200"),
        "{line}"
    );
}

/// A small OTLP/HTTP receiver: every JSON body posted to it comes out of the channel.
async fn otlp_receiver() -> (u16, tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>) {
    use http_body_util::BodyExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await?.to_bytes();
                            if path == "/v1/traces" {
                                if let Ok(v) = serde_json::from_slice(&body) {
                                    let _ = tx.send(v);
                                }
                            }
                            Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"{}"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, rx)
}

/// The spans of an OTLP/JSON export.
fn spans_of(export: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut spans = Vec::new();
    for rs in export["resourceSpans"].as_array().into_iter().flatten() {
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            spans.extend(ss["spans"].as_array().into_iter().flatten().cloned());
        }
    }
    spans
}

fn attribute(span: &serde_json::Value, key: &str) -> Option<serde_json::Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| a["value"].clone())
}

#[tokio::test]
async fn each_call_is_exported_as_a_span_with_its_parent_and_attributes() {
    let (receiver, mut exports) = otlp_receiver().await;
    let gw = Gateway::start(&format!(
        "tracing:\n  otlp_endpoint: http://127.0.0.1:{receiver}\n"
    ));
    let _backend = publish(&gw, "/sp", "s").await;
    // An HTTP call with a trace context: the backend sees the gateway's span as its parent.
    let seen = ext_seen(&gw, "/sp", Some(PARENT)).await;
    let (_, http_hop, _) = parts(&seen["traceparent"]);
    // A WebSocket call with its own.
    let mut raw = Raw::open(&gw.client_url("/sp", "s")).await;
    let ws_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    raw.send_json(&json!({"type":"req","method":"ext","id":1,"ext":{"traceparent": ws_parent}}))
        .await;
    let reply = raw.recv().await;
    let (_, ws_hop, _) = parts(&reply["payload"]["traceparent"]);

    let mut spans = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while spans.len() < 2 {
        match tokio::time::timeout_at(deadline, exports.recv()).await {
            Ok(Some(export)) => spans.extend(spans_of(&export)),
            _ => panic!("spans did not arrive: {spans:#?}\n{}", gw.log()),
        }
    }
    let http = spans
        .iter()
        .find(|s| s["spanId"] == http_hop.as_str())
        .unwrap_or_else(|| panic!("no span {http_hop}: {spans:#?}"));
    assert_eq!(http["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(http["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(
        attribute(http, "duplex.endpoint"),
        Some(json!({"stringValue": "/sp"}))
    );
    assert_eq!(
        attribute(http, "duplex.method"),
        Some(json!({"stringValue": "ext"}))
    );
    assert_eq!(
        attribute(http, "duplex.transport"),
        Some(json!({"stringValue": "http"}))
    );
    let status = attribute(http, "http.response.status_code").expect("status");
    assert_eq!(
        status["intValue"].to_string().trim_matches('"'),
        "200",
        "{status}"
    );
    assert!(attribute(http, "duplex.backend").is_some(), "{http}");
    assert!(attribute(http, "duplex.node").is_some(), "{http}");
    let ws = spans
        .iter()
        .find(|s| s["spanId"] == ws_hop.as_str())
        .unwrap_or_else(|| panic!("no span {ws_hop}: {spans:#?}"));
    assert_eq!(ws["traceId"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(ws["parentSpanId"], "b7ad6b7169203331");
    assert_eq!(
        attribute(ws, "duplex.transport"),
        Some(json!({"stringValue": "ws"}))
    );
}
