//! The Duplex protocol: the message model, the handshake, error codes, and a Rust peer that
//! connects to a gateway as a backend or as a client.
//!
//! This module knows nothing about the multiplexer or Pingora.

pub mod error;
pub mod handshake;
pub mod message;
pub mod peer;

pub use error::{code, RpcError};
pub use message::{Kind, Message, ParseError};
pub use peer::{Call, Peer, PeerBuilder, PeerError};
