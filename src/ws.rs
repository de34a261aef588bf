//! WebSocket connections: the upgrade answer, framing (tungstenite's `WebSocketContext` over
//! in-memory buffers), the Duplex handshake, keepalive pings, and the loop that moves frames
//! between the socket and the multiplexer.
//!
//! The upgrade is decided and answered inside Pingora's `request_filter`. Right after the `101`,
//! the connection leaves Pingora: [`WsStream::upgrade`] takes the socket out of the session (with
//! any bytes the peer sent behind its request) and the caller serves it in a task of its own, so
//! Pingora's request task, its per-request state and its HTTP buffers are freed. An idle
//! WebSocket then costs only its socket buffers, its framing state and its multiplexer slot.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, MissedTickBehavior};
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message as WsMessage;

use crate::cluster::Client;
use crate::duplex::{handshake, Message};
use crate::metrics::{metrics, Rejection};
use crate::mux::{close, BackendConn, CloseReason, Outcome};

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

/// What tungstenite's (blocking-style) framing reads from and writes to. Reads come from the
/// socket through the [`Gate`] when a task context is given (`WouldBlock` when it has nothing,
/// with the task registered for wake-up). Writes only ever append to `output`;
/// [`WsStream::flush`] sends it.
struct Io<'a, 'c> {
    socket: Option<(&'a mut Stream, &'a mut Context<'c>, &'a mut Gate, usize)>,
    output: &'a mut Vec<u8>,
}

impl<'a> Io<'a, 'static> {
    /// For writing only: frames go to `output`, nothing is read.
    fn writer(output: &'a mut Vec<u8>) -> Self {
        Io {
            socket: None,
            output,
        }
    }
}

impl Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some((stream, cx, gate, max_frame)) = self.socket.as_mut() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        gate.read(stream, cx, buf, *max_frame)
    }
}

/// Holds a frame back from the framing until all of it has come in.
///
/// tungstenite reserves room for a frame's whole announced length as soon as it reads the
/// frame's header: a peer that sends 10 bytes announcing a 1 MiB frame (and nothing more) would
/// make the gateway set aside 1 MiB. The gate reads the socket into a buffer of its own, which
/// grows only with the bytes that actually came, and hands the framing whole frames only (a
/// header announcing more than the limit goes through at once, for the framing to refuse).
#[derive(Default)]
struct Gate {
    /// Bytes read from the socket; those before `taken` were handed over.
    held: Vec<u8>,
    /// How many of `held` were handed over.
    taken: usize,
    /// Where the whole frames end in `held` (all before it may be handed over).
    ready: usize,
    /// The socket has ended: everything held goes, then the end.
    ended: bool,
}

/// Bytes kept in an empty gate's buffer between reads (beyond it, the buffer is given back).
const GATE_KEEP: usize = 4096;

impl Gate {
    fn read(
        &mut self,
        stream: &mut Stream,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        max_frame: usize,
    ) -> io::Result<usize> {
        loop {
            if self.ready > self.taken {
                let n = (self.ready - self.taken).min(buf.len());
                buf[..n].copy_from_slice(&self.held[self.taken..self.taken + n]);
                self.taken += n;
                if self.taken == self.held.len() {
                    // All handed over: start again at the front.
                    self.held.clear();
                    self.taken = 0;
                    self.ready = 0;
                    if self.held.capacity() > GATE_KEEP {
                        self.held = Vec::new();
                    }
                }
                return Ok(n);
            }
            if self.ended {
                if self.taken == self.held.len() {
                    return Ok(0);
                }
                self.ready = self.held.len();
                continue;
            }
            if self.taken > 0 {
                // What was handed over goes; the incomplete frame moves to the front.
                self.held.drain(..self.taken);
                self.ready -= self.taken;
                self.taken = 0;
            }
            // Read straight into the buffer's spare room (nothing zeroed first): as much as
            // the framing asked for, within bounds.
            let want = buf.len().clamp(512, 16 << 10);
            self.held.reserve(want);
            let start = self.held.len();
            let spare = &mut self.held.spare_capacity_mut()[..want];
            let mut read = ReadBuf::uninit(spare);
            let polled = Pin::new(&mut *stream).poll_read(cx, &mut read);
            let got = read.filled().len();
            // SAFETY: `ReadBuf` guarantees its first `got` bytes, in the spare room right after
            // the buffer's length, were written.
            unsafe { self.held.set_len(start + got) };
            match polled {
                Poll::Ready(Ok(())) if got == 0 => self.ended = true,
                Poll::Ready(Ok(())) => self.scan(max_frame),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {
                    if self.held.is_empty() {
                        // Idle: an idle connection holds no buffer of the gate's.
                        self.held = Vec::new();
                    }
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
        }
    }

    /// Marks the whole frames that follow the ready ones as ready.
    fn scan(&mut self, max_frame: usize) {
        while let Some((header, payload)) = frame_extent(&self.held[self.ready..]) {
            if payload > max_frame as u64 {
                // The framing refuses it from its header alone.
                self.ready = self.held.len().min(self.ready + header);
                return;
            }
            let whole = header + payload as usize;
            if self.held.len() - self.ready < whole {
                return;
            }
            self.ready += whole;
        }
    }
}

/// The header length and the announced payload length of the frame `bytes` starts with, once
/// enough of its header has come to tell.
fn frame_extent(bytes: &[u8]) -> Option<(usize, u64)> {
    let second = *bytes.get(1)?;
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    let (extra, len) = match second & 0x7f {
        126 => (
            2,
            u64::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
        ),
        127 => {
            let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
            (8, u64::from_be_bytes(raw))
        }
        n => (0, u64::from(n)),
    };
    Some((2 + extra + mask, len))
}

impl Write for Io<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What reading the socket produced.
enum Incoming {
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
    fn set_max_message(&mut self, max: usize) {
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
    async fn read(&mut self, max_message: &impl Fn() -> usize) -> Incoming {
        std::future::poll_fn(|cx| self.poll_read(cx, max_message)).await
    }

    fn poll_read(
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
    fn queue_ready<S: Side>(&mut self, side: &mut S, max: usize) -> usize {
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
    fn queue_text(&mut self, text: String) {
        let _ = self.ctx.write(
            &mut Io::writer(&mut self.output),
            WsMessage::Text(text.into()),
        );
    }

    /// Writes everything queued to the socket.
    async fn flush(&mut self) -> bool {
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
    async fn finish(mut self) {
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
    async fn close(&mut self, reason: &CloseReason) {
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
    async fn accept_handshake(&mut self) -> bool {
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
    async fn pump<S: Side>(&mut self, side: &mut S, settings: &impl Fn() -> WsSettings) {
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
                                    let answer = side.on_frame(msg).await;
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

/// A ticker for pings every `period` (zero: effectively never), first tick one period from now.
fn ping_ticker(period: Duration) -> tokio::time::Interval {
    let period = if period.is_zero() {
        Duration::from_secs(24 * 3600)
    } else {
        period
    };
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One side of the multiplexer as seen by a WebSocket connection.
trait Side {
    /// A frame from the peer; returns an answer to write back to the peer, if any.
    async fn on_frame(&mut self, msg: Message) -> Outcome;
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
    async fn on_frame(&mut self, msg: Message) -> Outcome {
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

/// The rates a WebSocket client's calls are held to: its address's
/// (`limits.requests_per_ip_per_second`) and its endpoint's (`endpoints[].calls_per_second`).
pub struct CallLimits {
    /// The edge's state.
    pub edge: Arc<crate::edge::Edge>,
    /// The client's address (None: unknown, no per-address limit).
    pub ip: Option<std::net::IpAddr>,
    /// The endpoint's bucket, if it has a rate.
    pub endpoint: Option<Arc<crate::edge::EndpointBucket>>,
}

/// A client whose requests are held to its [`CallLimits`]: a request over a rate is answered
/// `-32004` (with `data.retry_after_ms`) and never reaches the backend.
pub struct LimitedClient {
    client: Client,
    limits: CallLimits,
}

impl LimitedClient {
    /// `client`, held to `limits`.
    pub fn new(client: Client, limits: CallLimits) -> LimitedClient {
        LimitedClient { client, limits }
    }

    fn admit(&self) -> Result<(), crate::edge::Limited> {
        if let Some(ip) = self.limits.ip {
            self.limits.edge.request(ip)?;
        }
        match &self.limits.endpoint {
            Some(bucket) => bucket.take(),
            None => Ok(()),
        }
    }
}

impl Side for LimitedClient {
    async fn on_frame(&mut self, msg: Message) -> Outcome {
        if msg.kind() == crate::duplex::Kind::Request {
            if let Err(limited) = self.admit() {
                crate::metrics::metrics().reject(limited.reason);
                let Some(id) = msg.id() else {
                    return Outcome::Done;
                };
                let millis = u64::try_from(limited.retry_after.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let error =
                    crate::duplex::RpcError::new(crate::duplex::code::RATE_LIMITED, "rate limited")
                        .with_data(serde_json::json!({ "retry_after_ms": millis }));
                let mut reply = Message::error_reply(Some(id), &error);
                if let Some(ext) = msg.ext_raw() {
                    reply.set_raw("ext", ext.to_owned());
                }
                return Outcome::Answer(reply);
            }
        }
        self.client.send(msg).await
    }
    fn on_malformed(&mut self, error: &crate::duplex::ParseError) {
        self.client.malformed(error);
    }
    async fn next_out(&mut self) -> Option<String> {
        self.client.recv().await.map(|m| m.to_json())
    }
    fn try_next_out(&mut self) -> Option<String> {
        self.client.try_recv().map(|m| m.to_json())
    }
    fn close_reason(&self) -> CloseReason {
        self.client.close_reason()
    }
}

/// Takes the connection out of an upgraded session: its socket, and the bytes the peer sent
/// right behind its request (Pingora read them with the header and holds them as the start of
/// the upgraded body). A placeholder session, reading nothing and writing nowhere, is left behind
/// for Pingora to finish.
fn detach(
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

#[cfg(test)]
mod tests {
    use super::frame_extent;

    #[test]
    fn a_frame_header_tells_its_length_once_enough_of_it_has_come() {
        assert_eq!(frame_extent(&[0x81]), None);
        assert_eq!(frame_extent(&[0x81, 0x85]), Some((6, 5)), "masked, 5 bytes");
        assert_eq!(frame_extent(&[0x81, 5]), Some((2, 5)), "unmasked");
        assert_eq!(frame_extent(&[0x81, 0x80 | 126, 1]), None);
        assert_eq!(frame_extent(&[0x81, 0x80 | 126, 1, 0]), Some((8, 256)));
        let mut long = vec![0x82, 127];
        long.extend_from_slice(&(1u64 << 20).to_be_bytes());
        assert_eq!(frame_extent(&long[..9]), None);
        assert_eq!(frame_extent(&long), Some((10, 1 << 20)));
    }
}
