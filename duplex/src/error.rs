//! Error codes and the `error` object of a failed reply.
//!
//! The Duplex protocol defines no codes of its own; this project follows JSON-RPC.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The error codes this project uses.
pub mod code {
    /// The frame is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// The frame is JSON but not a valid message.
    pub const INVALID_MESSAGE: i64 = -32600;
    /// The peer has no such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// The method refused its arguments.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The method failed on its own (the peer's handler panicked).
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The endpoint's backend is not there (left, replaced, or never came back).
    pub const BACKEND_UNAVAILABLE: i64 = -32000;
    /// The client a backend called is not connected.
    pub const CLIENT_NOT_CONNECTED: i64 = -32001;
    /// No reply came in time.
    pub const CALL_TIMED_OUT: i64 = -32002;
    /// The caller has too many calls open.
    pub const TOO_MANY_PENDING_CALLS: i64 = -32003;
    /// The caller is over a rate limit of the gateway; `data.retry_after_ms` says when to try
    /// again.
    pub const RATE_LIMITED: i64 = -32004;
}

/// The `error` of a reply: `{code, message, data?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    /// The error code (see [`code`]).
    pub code: i64,
    /// What went wrong, for humans.
    pub message: String,
    /// Anything else the peer wants to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// An error without `data`.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// The same error with `data`.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// `-32601`: the method does not exist.
    pub fn method_not_found(method: &str) -> Self {
        RpcError::new(
            code::METHOD_NOT_FOUND,
            format!("method not found: {method}"),
        )
    }

    /// `-32602`: the arguments were refused.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        RpcError::new(code::INVALID_PARAMS, message)
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}
