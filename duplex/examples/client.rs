//! A client: calls `echo` and `count` at `/demo` of a gateway on 127.0.0.1:8080.
//!
//! ```text
//! cargo run -p duplex --example client
//! ```

use duplex::Peer;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), duplex::PeerError> {
    let client = Peer::builder()
        .connect("ws://127.0.0.1:8080/demo?secret=s3cret")
        .await?;
    println!("{}", client.call("echo", json!({"hello": "world"})).await?);
    let mut replies = client.call_stream("count", json!(3))?;
    while let Some(reply) = replies.next().await {
        println!("{}", reply?);
    }
    Ok(())
}
