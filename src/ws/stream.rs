//! One WebSocket connection out of Pingora: the upgrade, the socket taken out of the session,
//! the Duplex handshake, and the loop that moves frames between the socket and a [`Side`] of
//! the multiplexer, with pings and the close.

use std::io::{self};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior};
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message as WsMessage;

use crate::duplex::{handshake, Message};
use crate::metrics::{metrics, Rejection};
use crate::mux::{close, CloseReason, Outcome};

use super::frames::*;
use super::*;

/// What reading the socket produced.
pub(super) enum Incoming {
    /// A text or binary message.
    Data(Bytes),
    /// A ping: its pong is queued and must be flushed.
    Control,
    /// The peer closed (or the connection ended).
    Closed,
    /// The peer broke the WebSocket protocol; close with this code.
    Broken(CloseReason),
}

/// A WebSocket connection on a socket taken out of its Pingora session.
pub struct WsStream {
    stream: Stream,
    ctx: WebSocketContext,
    /// Frames waiting to be written.
    output: Vec<u8>,
    last_heard: Instant,
    /// The message size limit the framing enforces now.
    max_message: usize,
    /// How long one write may take before the connection is dropped.
    write_timeout: Duration,
    /// The connection's count against its address's limit (see [`crate::edge`]).
    _connection: Option<crate::edge::ConnectionGuard>,
    /// What the socket sent that the framing has not taken yet.
    gate: Gate,
}

impl WsStream {
    /// Answers the upgrade with `101 Switching Protocols`, then takes the connection out of
    /// Pingora's session (see the module documentation). None when the connection is gone (or
    /// is not HTTP/1, which has no upgrade); the session is then finished as usual.
    /// `read_chunk` is how much is read from the socket at a time (see [`CLIENT_READ_CHUNK`]).
    pub async fn upgrade(
        session: &mut Session,
        settings: &WsSettings,
        read_chunk: usize,
    ) -> Option<WsStream> {
        let key = session
            .req_header()
            .headers
            .get("sec-websocket-key")
            .map(|v| tungstenite::handshake::derive_accept_key(v.as_bytes()))
            .unwrap_or_default();
        let mut resp = ResponseHeader::build_no_case(101, Some(4)).ok()?;
        resp.insert_header("upgrade", "websocket").ok()?;
        resp.insert_header("connection", "Upgrade").ok()?;
        resp.insert_header("sec-websocket-accept", key).ok()?;
        session.set_write_timeout(Some(settings.write_timeout));
        session
            .write_response_header(Box::new(resp), false)
            .await
            .ok()?;
        let (mut stream, preread, connection) = detach(session)?;
        // Pingora may still hold the 101 in its write buffer.
        tokio::time::timeout(settings.write_timeout, stream.flush())
            .await
            .ok()?
            .ok()?;
        // Small buffers: an idle connection should cost little memory. Frames are written
        // straight into our own output buffer (no write buffer of tungstenite's own).
        let config = WebSocketConfig::default()
            .read_buffer_size(read_chunk)
            .write_buffer_size(0)
            .max_message_size(Some(settings.max_message_bytes))
            .max_frame_size(Some(settings.max_message_bytes));
        Some(WsStream {
            stream,
            ctx: WebSocketContext::from_partially_read(preread, Role::Server, Some(config)),
            output: Vec::new(),
            last_heard: Instant::now(),
            max_message: settings.max_message_bytes,
            write_timeout: settings.write_timeout,
            _connection: connection,
            gate: Gate::default(),
        })
    }

    /// Applies a message size limit to the frames read from now on.
    pub(super) fn set_max_message(&mut self, max: usize) {
        if max != self.max_message {
            self.max_message = max;
            self.ctx.set_config(|c| {
                c.max_message_size = Some(max);
                c.max_frame_size = Some(max);
            });
        }
    }

    /// Reads the next text or binary message, under the size limit `max_message()` gives when
    /// the bytes arrive (a reload applies to a read already waiting). Cancel-safe: no bytes are
    /// lost if the future is dropped while waiting for the socket.
    pub(super) async fn read(&mut self, max_message: &impl Fn() -> usize) -> Incoming {
        std::future::poll_fn(|cx| self.poll_read(cx, max_message)).await
    }

    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        max_message: &impl Fn() -> usize,
    ) -> Poll<Incoming> {
        loop {
            self.set_max_message(max_message());
            let mut io = Io {
                socket: Some((&mut self.stream, cx, &mut self.gate, self.max_message)),
                output: &mut self.output,
            };
            let incoming = match self.ctx.read(&mut io) {
                Ok(WsMessage::Text(text)) => Incoming::Data(Bytes::from(text)),
                Ok(WsMessage::Binary(data)) => Incoming::Data(data),
                Ok(WsMessage::Close(_)) => return Poll::Ready(Incoming::Closed),
                // The context queued the pong; the caller flushes it now.
                Ok(WsMessage::Ping(_)) => Incoming::Control,
                Ok(_) => {
                    // Pong, raw frame.
                    self.last_heard = Instant::now();
                    continue;
                }
                // The socket has nothing more for now; this task is woken when it has.
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Poll::Pending
                }
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                    metrics().reject(Rejection::TooLarge);
                    Incoming::Broken(CloseReason::new(
                        close::TOO_BIG,
                        format!("message of {size} bytes is over the limit of {max_size}"),
                    ))
                }
                Err(WsError::Capacity(_)) => {
                    metrics().reject(Rejection::TooLarge);
                    Incoming::Broken(CloseReason::new(close::TOO_BIG, "frame too large"))
                }
                Err(WsError::Utf8(_)) => {
                    Incoming::Broken(CloseReason::new(1007, "text frame is not UTF-8"))
                }
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))
                | Err(WsError::ConnectionClosed)
                | Err(WsError::AlreadyClosed) => Incoming::Closed,
                Err(WsError::Protocol(e)) => {
                    Incoming::Broken(CloseReason::new(1002, e.to_string()))
                }
                Err(_) => Incoming::Closed,
            };
            if matches!(incoming, Incoming::Data(_) | Incoming::Control) {
                self.last_heard = Instant::now();
            }
            return Poll::Ready(incoming);
        }
    }

    /// Queues up to `max` frames `side` already has waiting; returns how many.
    pub(super) fn queue_ready<S: Side>(&mut self, side: &mut S, max: usize) -> usize {
        let mut queued = 0;
        while queued < max && self.output.len() < MAX_BATCH_BYTES {
            match side.try_next_out() {
                Some(frame) => self.queue_text(frame),
                None => break,
            }
            queued += 1;
        }
        queued
    }

    /// Queues a text message (written by the next [`WsStream::flush`]).
    pub(super) fn queue_text(&mut self, text: String) {
        let _ = self.ctx.write(
            &mut Io::writer(&mut self.output),
            WsMessage::Text(text.into()),
        );
    }

    /// Writes everything queued to the socket.
    pub(super) async fn flush(&mut self) -> bool {
        let _ = self.ctx.flush(&mut Io::writer(&mut self.output));
        if self.output.is_empty() {
            return true;
        }
        let stream = &mut self.stream;
        let out = &self.output;
        let written = tokio::time::timeout(self.write_timeout, async {
            stream.write_all(out).await?;
            stream.flush().await
        })
        .await;
        self.output.clear();
        if self.output.capacity() > KEEP_OUTPUT {
            self.output = Vec::new();
        }
        matches!(written, Ok(Ok(())))
    }

    /// Ends the connection once the multiplexer is done with it: a FIN (and TLS `close_notify`)
    /// after everything written, then what the peer still sends is read and dropped until it
    /// closes too, for at most [`LINGER`]. Closing a socket with unread bytes in it sends a
    /// reset, which can destroy the close frame on its way to the peer (after a 1009, the
    /// rest of the oversized frame is still unread).
    pub(super) async fn finish(mut self) {
        let _ = tokio::time::timeout(LINGER, async {
            let _ = self.stream.shutdown().await;
            let mut sink = [0u8; 512];
            while let Ok(n) = self.stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    /// Sends a close frame with `reason` and flushes it.
    pub(super) async fn close(&mut self, reason: &CloseReason) {
        let frame = CloseFrame {
            code: CloseCode::from(reason.code),
            reason: truncate(&reason.reason, 120).into(),
        };
        let _ = self
            .ctx
            .close(&mut Io::writer(&mut self.output), Some(frame));
        self.flush().await;
    }

    /// Answers a valid handshake with `+OK`.
    pub(super) async fn accept_handshake(&mut self) -> bool {
        self.queue_text(handshake::ACCEPT.to_string());
        self.flush().await
    }

    /// Waits for the Duplex handshake; a bad one is answered with `-ERR` and closed. True when it
    /// is valid: the caller registers the peer, then answers with `WsStream::accept_handshake`,
    /// so a peer that has seen `+OK` is known to the multiplexer.
    pub async fn handshake(&mut self, timeout: Duration) -> bool {
        let self_max = self.max_message;
        let max_message = move || self_max;
        let deadline = Instant::now() + timeout;
        loop {
            let incoming = tokio::select! {
                incoming = self.read(&max_message) => incoming,
                _ = tokio::time::sleep_until(deadline) => {
                    metrics().reject(Rejection::BadHandshake);
                    self.close(&CloseReason::new(1002, "no handshake in time")).await;
                    return false;
                }
            };
            match incoming {
                Incoming::Data(frame) if frame.is_empty() => {
                    self.flush().await;
                }
                Incoming::Control => {
                    self.flush().await;
                }
                Incoming::Data(frame) => {
                    return match handshake::check(&frame) {
                        // Answered by `accept_handshake`, once the peer is registered.
                        Ok(()) => true,
                        Err(reason) => {
                            metrics().reject(Rejection::BadHandshake);
                            self.queue_text(handshake::refusal(&reason.0));
                            self.close(&CloseReason::new(1002, "bad handshake")).await;
                            false
                        }
                    };
                }
                Incoming::Closed => {
                    self.flush().await;
                    return false;
                }
                Incoming::Broken(reason) => {
                    self.close(&reason).await;
                    return false;
                }
            }
        }
    }

    /// Moves frames between the socket and `side` until either ends. `settings` is read again
    /// between frames, so a reload's new limits apply to open connections too.
    pub(super) async fn pump<S: Side>(&mut self, side: &mut S, settings: &impl Fn() -> WsSettings) {
        let mut ping_interval = settings().ping_interval;
        let mut ticker = ping_ticker(ping_interval);
        self.last_heard = Instant::now();
        let max_message = || settings().max_message_bytes;
        loop {
            let now = settings().ping_interval;
            if now != ping_interval {
                ping_interval = now;
                ticker = ping_ticker(ping_interval);
            }
            tokio::select! {
                incoming = self.read(&max_message) => match incoming {
                    Incoming::Data(frame) => {
                        if frame.is_empty() {
                            // Keepalive: never forwarded.
                        } else {
                            match Message::parse(&frame) {
                                Ok(msg) => {
                                    let answer = side.on_frame(msg, frame.len()).await;
                                    // A call can wait (for a backend in its grace); the peer's
                                    // silence meanwhile is ours, not a sign it is dead.
                                    self.last_heard = Instant::now();
                                    if let Outcome::Answer(answer) = answer {
                                        if answer.id().is_some() {
                                            self.queue_text(answer.to_json());
                                        }
                                    }
                                }
                                Err(e) => {
                                    side.on_malformed(&e);
                                    if let Some(answer) = e.reply() {
                                        self.queue_text(answer.to_json());
                                    }
                                }
                            }
                        }
                        if !self.flush().await {
                            return;
                        }
                    }
                    Incoming::Control => {
                        if !self.flush().await {
                            return;
                        }
                    }
                    Incoming::Closed => {
                        self.flush().await;
                        return;
                    }
                    Incoming::Broken(reason) => {
                        self.close(&reason).await;
                        return;
                    }
                },
                out = side.next_out() => match out {
                    Some(frame) => {
                        self.queue_text(frame);
                        // Batch what else is queued into one write. Yielding once first lets the
                        // tasks that are about to queue frames here do so: on a backend that
                        // carries many callers, batches grow and write calls (on both ends) fall;
                        // measured side by side, 5-27 % more calls per second through the
                        // gateway under load (see BENCHMARKS.md). With nothing else to run, the yield
                        // returns at once.
                        let batched = 1 + self.queue_ready(side, MAX_BATCH - 1);
                        if batched < MAX_BATCH {
                            tokio::task::yield_now().await;
                            self.queue_ready(side, MAX_BATCH - batched);
                        }
                        if !self.flush().await {
                            return;
                        }
                    }
                    None => {
                        let reason = side.close_reason();
                        self.close(&reason).await;
                        return;
                    }
                },
                _ = ticker.tick(), if !ping_interval.is_zero() => {
                    if self.last_heard.elapsed() > ping_interval * 2 {
                        tracing::debug!("peer silent for two ping intervals: closing");
                        self.close(&CloseReason::new(close::GOING_AWAY, "ping timeout")).await;
                        return;
                    }
                    let _ = self.ctx.write(&mut Io::writer(&mut self.output), WsMessage::Ping(Bytes::new()));
                    if !self.flush().await {
                        return;
                    }
                }
            }
        }
    }
}

/// Takes the connection out of an upgraded session: its socket, and the bytes the peer sent
/// right behind its request (Pingora read them with the header and holds them as the start of
/// the upgraded body). A placeholder session, reading nothing and writing nowhere, is left behind
/// for Pingora to finish.
pub(super) fn detach(
    session: &mut Session,
) -> Option<(Stream, Vec<u8>, Option<crate::edge::ConnectionGuard>)> {
    let downstream = &mut *session.downstream_session;
    if !matches!(downstream, ServerSession::H1(_)) {
        return None;
    }
    // What Pingora holds comes back at once, in one piece; a read that would wait is left to
    // the socket's new owner (dropping it loses nothing).
    let preread = match downstream.read_request_body().now_or_never() {
        Some(Ok(Some(bytes))) => bytes.to_vec(),
        _ => Vec::new(),
    };
    let placeholder = ServerSession::new_http1(Box::new(io::Cursor::new(Vec::<u8>::new())));
    match std::mem::replace(downstream, placeholder) {
        // The connection's HTTP deadlines end here: a WebSocket has pings instead.
        ServerSession::H1(h1) => {
            let (stream, connection) = crate::timeouts::unwrap(h1.into_inner());
            Some((stream, preread, connection))
        }
        _ => None,
    }
}

/// A ticker for pings every `period` (zero: effectively never), first tick one period from now.
pub(super) fn ping_ticker(period: Duration) -> tokio::time::Interval {
    let period = if period.is_zero() {
        Duration::from_secs(24 * 3600)
    } else {
        period
    };
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

pub(super) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
