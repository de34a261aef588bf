//! WebSocket connections: the upgrade answer, framing (tungstenite's `WebSocketContext` over
//! in-memory buffers), the Duplex handshake, keepalive pings, and the loop that moves frames
//! between the socket and the multiplexer.
//!
//! The upgrade is decided and answered inside Pingora's `request_filter`. Right after the `101`,
//! the connection leaves Pingora: [`WsStream::upgrade`] takes the socket out of the session (with
//! any bytes the peer sent behind its request) and the caller serves it in a task of its own, so
//! Pingora's request task, its per-request state and its HTTP buffers are freed. An idle
//! WebSocket then costs only its socket buffers, its framing state and its multiplexer slot.
//!
//! This file holds the settings, the two ways a connection is served (a client, a backend) and
//! the `Side` of the multiplexer each talks to; `stream.rs` the connection itself (upgrade,
//! handshake, the frame loop, pings, close); `frames.rs` framing over in-memory buffers;
//! `limited.rs` the request rates a client is held to; `signed.rs` a client's signed token
//! (`ext.auth`, `$refresh`, the close at its expiry).

mod frames;
mod limited;
mod signed;
mod stream;

pub use limited::{CallLimits, LimitedClient};
pub use signed::{Keys, Signed};
pub use stream::WsStream;

use std::time::Duration;

use crate::duplex::Message;
use crate::mux::{BackendConn, CloseReason, Outcome};

/// How much is read from a backend's socket at a time (a backend carries every client's
/// frames: reads of many frames at once).
pub const BACKEND_READ_CHUNK: usize = 4096;
/// How much is read from a client's socket at a time. The framing keeps a buffer of this size
/// per connection for as long as it lives, so it is most of what an idle client costs: small,
/// since a client sends its own calls only (a larger frame gets a buffer of its size while it
/// is read).
pub const CLIENT_READ_CHUNK: usize = 512;
/// The most frames written with one write call.
const MAX_BATCH: usize = 64;
/// A batch stops growing at this many bytes: what a connection holds in its output buffer stays
/// near one message, not 64 of the largest size.
const MAX_BATCH_BYTES: usize = 64 << 10;
/// How long a closed connection waits for its peer to close too (see [`WsStream::finish`]).
const LINGER: Duration = Duration::from_secs(1);
/// An output buffer grown past this by a large message is released once written, so a
/// connection that once carried a big message does not keep its buffer while idle.
const KEEP_OUTPUT: usize = 16 << 10;

/// Settings for one WebSocket connection.
#[derive(Debug, Clone, Copy)]
pub struct WsSettings {
    /// Largest message accepted; larger ones close the connection with 1009.
    pub max_message_bytes: usize,
    /// How long a peer has to send the Duplex handshake.
    pub handshake_timeout: Duration,
    /// Ping period; a peer silent for two periods is closed. Zero disables pings.
    pub ping_interval: Duration,
    /// How long one write to the peer may take before the connection is dropped.
    pub write_timeout: Duration,
}

/// Whether a request asks for a WebSocket upgrade.
pub fn is_upgrade(req: &pingora::http::RequestHeader) -> bool {
    let has_token = |name: &str, token: &str| {
        req.headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    // RFC 6455 asks for HTTP/1.1, and Pingora only switches an HTTP/1.1 connection to the
    // upgraded byte stream.
    req.version == http::Version::HTTP_11
        && has_token("upgrade", "websocket")
        && has_token("connection", "upgrade")
        && req.headers.contains_key("sec-websocket-key")
}

/// One side of the multiplexer as seen by a WebSocket connection.
trait Side {
    /// A frame from the peer (`bytes` long on the wire); returns an answer to write back to the
    /// peer, if any.
    async fn on_frame(&mut self, msg: Message, bytes: usize) -> Outcome;
    /// A frame the peer sent that is not a valid message.
    fn on_malformed(&mut self, error: &crate::duplex::ParseError);
    /// The next frame for the peer; None when the multiplexer closed this connection.
    async fn next_out(&mut self) -> Option<String>;
    /// A frame already waiting, if any.
    fn try_next_out(&mut self) -> Option<String>;
    /// Why the multiplexer closed this connection.
    fn close_reason(&self) -> CloseReason;
}

impl Side for BackendConn {
    async fn on_frame(&mut self, msg: Message, _bytes: usize) -> Outcome {
        self.handle(msg)
    }
    fn on_malformed(&mut self, error: &crate::duplex::ParseError) {
        tracing::debug!(endpoint = %crate::auth::logged(self.endpoint().path()), %error, "malformed frame from backend");
        self.endpoint().dropped(crate::mux::Dropped::Malformed);
    }
    async fn next_out(&mut self) -> Option<String> {
        self.recv().await
    }
    fn try_next_out(&mut self) -> Option<String> {
        self.try_recv()
    }
    fn close_reason(&self) -> CloseReason {
        BackendConn::close_reason(self)
    }
}

/// Serves a client that has joined its endpoint: handshake, then frames. `settings` gives the
/// limits in force (read again between frames).
pub async fn serve_client(
    mut ws: WsStream,
    mut conn: LimitedClient,
    settings: impl Fn() -> WsSettings,
) {
    let first = settings();
    if ws.handshake(first.handshake_timeout).await && ws.accept_handshake().await {
        ws.pump(&mut conn, &settings).await;
    }
    drop(conn);
    ws.finish().await;
}

/// Serves a backend: handshake, then `publish` registers it, then frames. `publish` may refuse
/// (the credentials were revoked while the handshake was under way): the connection is then
/// closed with that reason.
pub async fn serve_backend(
    mut ws: WsStream,
    settings: impl Fn() -> WsSettings,
    publish: impl FnOnce() -> Result<BackendConn, CloseReason>,
) {
    let first = settings();
    if ws.handshake(first.handshake_timeout).await {
        match publish() {
            Ok(mut conn) => {
                if ws.accept_handshake().await {
                    ws.pump(&mut conn, &settings).await;
                }
            }
            Err(reason) => ws.close(&reason).await,
        }
    }
    ws.finish().await;
}
