//! An example backend: publishes `echo`, `count` and `add` on a path of a gateway, and publishes
//! again whenever the connection drops.
//!
//! ```text
//! cargo run --example echo_backend -- /demo --token "$DUPLEX_GATEWAY_TOKEN" --secret s3cret
//! ```
//!
//! - `echo`: answers with its payload.
//! - `count`: payload `n` (1 to 1,000,000): streams the replies 1, 2, ..., n.
//! - `add`: sums numbers: a number or an array of numbers, or streamed input of those.
//!
//! Ctrl-C (SIGINT) drains it first: the gateway sends no new calls here, the running ones
//! finish, then it exits. Start the new version before stopping the old one (with
//! `limits.max_backends_per_endpoint` of 2 or more) and a deploy loses no call.

use std::time::Duration;

use clap::Parser;
use duplex::{Call, Peer, PeerError, RpcError};
use serde_json::{json, Value};

/// Publishes echo, count and add on PATH.
#[derive(Parser)]
struct Args {
    /// The endpoint path to publish, e.g. /demo.
    path: String,
    /// The gateway's WebSocket base URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    gateway: String,
    /// Publish token (default: $DUPLEX_GATEWAY_TOKEN).
    #[arg(long, env = "DUPLEX_GATEWAY_TOKEN", hide_env_values = true)]
    token: String,
    /// The secret clients must present.
    #[arg(long, default_value = "s3cret")]
    secret: String,
    /// Exit when the connection drops instead of publishing again.
    #[arg(long)]
    once: bool,
}

/// The example's handlers, on a peer builder.
fn backend() -> duplex::PeerBuilder {
    Peer::builder()
        .handle("echo", |call: Call| async move { Ok(call.payload) })
        .handle("count", count)
        .handle("add", add)
        // Who is calling: on an endpoint with signed client tokens the gateway sets `ext.auth`
        // (`sub` and the claims it is told to pass); elsewhere there is none.
        .handle("whoami", |call: Call| async move {
            Ok(call
                .ext
                .as_ref()
                .and_then(|ext| ext.get("auth"))
                .cloned()
                .unwrap_or(Value::Null))
        })
}

async fn count(call: Call) -> Result<Value, RpcError> {
    let n = call
        .payload
        .as_u64()
        .filter(|n| (1..=1_000_000).contains(n))
        .ok_or_else(|| RpcError::invalid_params("count takes an integer from 1 to 1000000"))?;
    for i in 1..n {
        // Each line leaves as the connection takes it (the peer holds a fast stream back).
        call.send(&json!(i))
            .await
            .map_err(|e| RpcError::new(-32000, e.to_string()))?;
    }
    Ok(json!(n))
}

async fn add(mut call: Call) -> Result<Value, RpcError> {
    let mut sum = Sum::default();
    sum.add(&call.payload)?;
    while let Some(more) = call.next_input().await {
        sum.add(&more)?;
    }
    Ok(sum.value())
}

/// A sum that stays an exact integer while every term is one.
#[derive(Default)]
struct Sum {
    int: i64,
    float: Option<f64>,
}

impl Sum {
    fn add(&mut self, value: &Value) -> Result<(), RpcError> {
        match value {
            Value::Array(items) => items.iter().try_for_each(|v| self.add(v)),
            Value::Number(n) => {
                match (n.as_i64(), self.float) {
                    (Some(i), None) => match self.int.checked_add(i) {
                        Some(s) => self.int = s,
                        None => self.float = Some(self.int as f64 + i as f64),
                    },
                    _ => {
                        let f = n.as_f64().unwrap_or(0.0);
                        self.float = Some(self.float.unwrap_or(self.int as f64) + f);
                    }
                }
                Ok(())
            }
            Value::Null => Ok(()),
            _ => Err(RpcError::invalid_params(
                "add takes numbers or arrays of numbers",
            )),
        }
    }

    fn value(&self) -> Value {
        match self.float {
            Some(f) => json!(f),
            None => json!(self.int),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), PeerError> {
    let args = Args::parse();
    let url = format!("{}{}", args.gateway.trim_end_matches('/'), args.path);
    loop {
        let result = backend()
            .header("authorization", &format!("Bearer {}", args.token))
            .header("x-duplex-secret", &args.secret)
            .connect(&url)
            .await;
        match result {
            Ok(peer) => {
                eprintln!("published echo, count and add at {url}");
                tokio::select! {
                    code = peer.closed() => eprintln!("connection closed (code {code:?})"),
                    _ = tokio::signal::ctrl_c() => {
                        // A rolling deploy: no new calls come here; the running ones finish.
                        eprintln!("draining: no new calls, waiting for the running ones");
                        match peer.drain().await {
                            Ok(pending) => eprintln!("drained ({pending} calls still running)"),
                            Err(e) => eprintln!("drain failed: {e}"),
                        }
                        peer.close();
                        // Let the close frame go out before the process ends.
                        let _ = tokio::time::timeout(Duration::from_secs(2), peer.closed()).await;
                        return Ok(());
                    }
                }
            }
            Err(e) => {
                eprintln!("cannot publish at {url}: {e}");
                if args.once || e.http_status().is_some_and(|s| s != 503) {
                    return Err(e);
                }
            }
        }
        if args.once {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
