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
