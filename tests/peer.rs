//! The Rust peer without a gateway: one peer accepts, the other connects.

use duplex::{Peer, PeerError};
use serde_json::json;
use tokio::net::TcpListener;

async fn serve_one() -> (String, tokio::task::JoinHandle<Result<Peer, PeerError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        Peer::builder()
            .handle("echo", |call| async move { Ok(call.payload) })
            .accept(ws)
            .await
    });
    (url, server)
}

#[tokio::test]
async fn a_peer_that_accepts_answers_calls_and_unknown_methods() {
    let (url, server) = serve_one().await;
    let client = Peer::builder().connect(&url).await.expect("connect");
    let _server_peer = server.await.expect("join").expect("handshake");
    assert_eq!(
        client.call("echo", json!([1, "x"])).await,
        Ok(json!([1, "x"]))
    );
    match client.call("missing", json!(null)).await {
        Err(PeerError::Rpc(e)) => assert_eq!(e.code, -32601),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_peer_that_accepts_refuses_a_wrong_handshake() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (url, server) = serve_one().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("connect");
    ws.send(Message::Text("SIMPLEX/9.9;json".into()))
        .await
        .expect("send");
    match ws.next().await {
        Some(Ok(Message::Text(t))) => assert!(t.starts_with("-ERR"), "{t}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        server.await.expect("join"),
        Err(PeerError::Handshake(_))
    ));
}
