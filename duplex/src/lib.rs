#![doc = include_str!("../README.md")]
//!
//! ## A backend and a client, end to end
//!
//! Here the backend accepts the client's connection itself (a gateway would sit between them):
//!
//! ```
//! use duplex::Peer;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let address = listener.local_addr()?;
//! let backend = tokio::spawn(async move {
//!     let (tcp, _) = listener.accept().await.expect("accept");
//!     let ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
//!     Peer::builder()
//!         .handle("echo", |call| async move { Ok(call.payload) })
//!         .accept(ws)
//!         .await
//! });
//! let client = Peer::builder().connect(&format!("ws://{address}/demo")).await?;
//! let _backend = backend.await??;
//! assert_eq!(client.call("echo", json!({"hi": 1})).await?, json!({"hi": 1}));
//! # Ok(())
//! # }
//! ```
//!
//! This crate knows nothing about the gateway's multiplexer or Pingora.

pub mod address;
pub mod error;
pub mod handshake;
pub mod message;
pub mod peer;
pub mod reconnect;

pub use error::{code, RpcError};
pub use message::{Kind, Message, ParseError};
pub use peer::{Call, Peer, PeerBuilder, PeerError};
pub use reconnect::{retryable, Backoff, Persistent};
