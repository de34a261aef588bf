//! A backend: publishes `echo` and `count` at `/demo` of a gateway on 127.0.0.1:8080.
//!
//! ```text
//! DUPLEX_GATEWAY_TOKEN=my-long-publish-token-123 cargo run -p duplex --example backend
//! ```

use duplex::{Call, Peer, RpcError};
use serde_json::{json, Value};

async fn count(call: Call) -> Result<Value, RpcError> {
    let n = call.payload.as_u64().unwrap_or(0);
    for i in 1..n {
        // Waits when the connection falls behind: the stream leaves as it is produced.
        call.send(&json!(i))
            .await
            .map_err(|e| RpcError::new(-32000, e.to_string()))?;
    }
    Ok(json!(n))
}

#[tokio::main]
async fn main() -> Result<(), duplex::PeerError> {
    let token = std::env::var("DUPLEX_GATEWAY_TOKEN")
        .unwrap_or_else(|_| "my-long-publish-token-123".to_string());
    let backend = Peer::builder()
        .handle("echo", |call| async move { Ok(call.payload) })
        .handle("count", count)
        .header("authorization", &format!("Bearer {token}"))
        .connect("ws://127.0.0.1:8080/demo?secret=s3cret")
        .await?;
    println!("published /demo");
    let code = backend.closed().await;
    println!("closed: {code:?}");
    Ok(())
}
