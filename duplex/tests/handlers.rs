//! How a peer runs its handlers: answered at once or later, and a handler that panics fails
//! only its own call. Two peers over a real loopback WebSocket.

use std::time::Duration;

use duplex::{code, Peer, PeerBuilder, PeerError, RpcError};
use serde_json::{json, Value};

/// Serves `handlers` on a loopback port and returns a client peer connected to it (and the
/// serving peer, kept alive by the caller).
async fn pair(handlers: PeerBuilder) -> (Peer, Peer) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        handlers.accept(ws).await.expect("handshake")
    });
    let client = Peer::builder()
        .connect(&format!("ws://{address}/"))
        .await
        .expect("connect");
    let server = server.await.expect("server");
    (client, server)
}

fn handlers() -> PeerBuilder {
    Peer::builder()
        .handle("now", |call| async move { Ok(call.payload) })
        .handle("later", |call| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(call.payload)
        })
        .handle("count", |call| async move {
            // Starts at once (the window has room), then waits for room: it moves to a task.
            let n = call.payload.as_u64().unwrap_or(0);
            for i in 1..n {
                call.send(&json!(i))
                    .await
                    .map_err(|e| RpcError::new(-32000, e.to_string()))?;
            }
            Ok(json!(n))
        })
        .handle("sum", |mut call| async move {
            let mut total = call.payload.as_i64().unwrap_or(0);
            while let Some(more) = call.next_input().await {
                total += more.as_i64().unwrap_or(0);
            }
            Ok(json!(total))
        })
        .handle("panic_now", |_call| async move {
            if true {
                panic!("a handler bug, before any await");
            }
            Ok(Value::Null)
        })
        .handle("panic_later", |_call| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if true {
                panic!("a handler bug, after an await");
            }
            Ok(Value::Null)
        })
}

fn rpc_code(result: Result<Value, PeerError>) -> Option<i64> {
    match result {
        Err(PeerError::Rpc(e)) => Some(e.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_that_answer_at_once_or_later_are_both_answered() {
    let (client, _server) = pair(handlers()).await;
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            let method = if i % 2 == 0 { "now" } else { "later" };
            tokio::spawn(async move { (i, client.call(method, json!(i)).await) })
        })
        .collect();
    for call in calls {
        let (i, result) = call.await.expect("call task");
        assert_eq!(result, Ok(json!(i)), "call {i}");
    }
}

#[tokio::test]
async fn a_panicking_handler_fails_its_call_and_the_connection_goes_on() {
    let (client, _server) = pair(handlers()).await;
    for method in ["panic_now", "panic_later"] {
        let result = tokio::time::timeout(Duration::from_secs(5), client.call(method, json!(1)))
            .await
            .expect("a panicking handler's call is answered");
        assert_eq!(rpc_code(result), Some(code::INTERNAL_ERROR), "{method}");
        // The same connection still serves calls, at once and later.
        assert_eq!(client.call("now", json!("still")).await, Ok(json!("still")));
        assert_eq!(client.call("later", json!("here")).await, Ok(json!("here")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_window_arrives_whole_and_in_order() {
    let (client, _server) = pair(handlers()).await;
    // Well over the stream window: the handler starts in the reader, then waits for room.
    let n = 3 * duplex::peer::STREAM_WINDOW as u64;
    let mut replies = client.call_stream("count", json!(n)).expect("call");
    let mut got = Vec::new();
    while let Some(item) = replies.next().await {
        got.push(item.expect("frame"));
    }
    let expected: Vec<Value> = (1..=n).map(|i| json!(i)).collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn streamed_input_reaches_a_handler_that_waits_for_it() {
    let (client, _server) = pair(handlers()).await;
    let input: Vec<Value> = (1..=100).map(|i| json!(i)).collect();
    let total = client
        .call_with_input("sum", &input)
        .expect("call")
        .last()
        .await;
    assert_eq!(total, Ok(json!(5050)));
}
