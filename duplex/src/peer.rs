//! A Duplex peer over WebSocket: connect (`ws://` or `wss://`), handshake, make calls (plain,
//! streamed replies, streamed input, fire-and-forget) and answer calls with registered handlers.
//!
//! A backend is a peer that connects with `?token=...&secret=...` and registers handlers; a client
//! is a peer that connects with `?secret=...` and calls them. Both can do both: a backend can call a
//! method on one client by naming its route (see [`Peer::call_route`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), duplex::PeerError> {
//! use duplex::Peer;
//! use serde_json::json;
//! let backend = Peer::builder()
//!     .handle("echo", |call| async move { Ok(call.payload) })
//!     .connect("ws://127.0.0.1:8080/demo?token=T&secret=S")
//!     .await?;
//! let client = Peer::builder().connect("ws://127.0.0.1:8080/demo?secret=S").await?;
//! assert_eq!(client.call("echo", json!("hi")).await?, json!("hi"));
//! # drop(backend);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{Connector, WebSocketStream};

use super::error::RpcError;
use super::handshake;
use super::message::{Kind, Message};

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, RpcError>> + Send>>;
type Handler = Arc<dyn Fn(Call) -> HandlerFuture + Send + Sync>;

/// Why a peer operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PeerError {
    /// The WebSocket connection could not be opened (the network, TLS, or a malformed URL).
    #[error("connect failed: {0}")]
    Connect(String),
    /// The server answered the upgrade with an HTTP status (401, 404, 429, 503, ...) instead.
    #[error("connect failed: HTTP {status} {body}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The answer's body (the gateway's says why).
        body: String,
        /// Its `Retry-After` (whole seconds), if it had one.
        retry_after: Option<std::time::Duration>,
    },
    /// The gateway refused the handshake.
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// The far side answered the call with an error.
    #[error("call failed: {0}")]
    Rpc(RpcError),
    /// The connection is closed (with the close code the far side sent, if any).
    #[error("connection closed (code {0:?})")]
    Closed(Option<u16>),
    /// A reconnecting peer ([`crate::Persistent`]) has no connection up right now: the call was
    /// not sent (nothing is buffered).
    #[error("not connected: the connection was lost and is being opened again")]
    NotConnected,
}

impl PeerError {
    /// The HTTP status of a refused WebSocket upgrade, if that is what happened.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            PeerError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A call received by a handler.
pub struct Call {
    /// The method called.
    pub method: String,
    /// The first frame's payload.
    pub payload: Value,
    /// The request's `ext` (a gateway puts the caller's route key in `ext.route`).
    pub ext: Option<Map<String, Value>>,
    input: Option<mpsc::UnboundedReceiver<Value>>,
    id: Option<u64>,
    out: Out,
}

impl Call {
    /// The next frame of streamed input, or None once the caller sent its last frame.
    pub async fn next_input(&mut self) -> Option<Value> {
        match &mut self.input {
            Some(rx) => rx.recv().await,
            None => None,
        }
    }

    /// Sends one frame of a reply stream (`more: true`); the handler's return value ends it.
    /// The frame leaves as soon as the connection can take it; when [`STREAM_WINDOW`] frames
    /// of this peer's streams are still unwritten, this waits, so a fast producer is held to the
    /// pace of the connection instead of filling memory.
    pub async fn send(&self, payload: &Value) -> Result<(), PeerError> {
        let mut reply = Message::reply(self.id, payload, true);
        if let Some(ext) = &self.ext {
            reply.set_ext(Some(ext));
        }
        self.out
            .send_paced(WsMessage::Text(reply.to_json().into()))
            .await
    }

    /// The caller's route key (`ext.route`), set by a gateway.
    pub fn route(&self) -> Option<&str> {
        self.ext.as_ref()?.get("route")?.as_str()
    }
}

/// Configures and opens a [`Peer`]. Cloning it keeps its handlers (shared), headers and TLS
/// settings: what [`PeerBuilder::connect_persistent`] opens each connection with.
#[derive(Default, Clone)]
pub struct PeerBuilder {
    handlers: HashMap<String, Handler>,
    headers: Vec<(String, String)>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl PeerBuilder {
    /// Answers calls of `method` with `handler`. Unknown methods are answered with `-32601`.
    ///
    /// A handler is first polled by the connection's reader as the call arrives: if it has its
    /// answer at once, the reply is queued there and then (no task, no wake-up); if it waits
    /// (I/O, a timer, streamed input), it goes on in a task of its own, and other calls are read
    /// meanwhile. So a handler should not compute for long before its first `.await`: hand
    /// heavy work to `tokio::task::spawn_blocking` (and await it), as on any Tokio runtime. Nor
    /// may it block the thread waiting for something this connection has yet to read (say,
    /// `futures::executor::block_on(peer.call(..))`): that would wait forever. Await it instead.
    pub fn handle<F, Fut>(mut self, method: &str, handler: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, RpcError>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |call| Box::pin(handler(call)));
        self.handlers.insert(method.to_string(), handler);
        self
    }

    /// Adds an HTTP header to the upgrade request (e.g. `Authorization` or `X-Duplex-Secret`).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sends `Authorization: Bearer <token>` with the upgrade request: a client's signed token
    /// (JWT) for a gateway endpoint that takes them (renew it with [`Peer::refresh`]).
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// Uses this TLS configuration for `wss://` (for example one trusting a private CA).
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Opens the WebSocket and does the Duplex handshake.
    pub async fn connect(self, url: &str) -> Result<Peer, PeerError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| PeerError::Connect(e.to_string()))?;
        for (name, value) in &self.headers {
            let name = tokio_tungstenite::tungstenite::http::header::HeaderName::from_bytes(
                name.as_bytes(),
            )
            .map_err(|e| PeerError::Connect(e.to_string()))?;
            let value = tokio_tungstenite::tungstenite::http::header::HeaderValue::from_str(value)
                .map_err(|e| PeerError::Connect(e.to_string()))?;
            request.headers_mut().insert(name, value);
        }
        let connector = self.tls.clone().map(Connector::Rustls);
        let (mut ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector)
                .await
                .map_err(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(resp) => PeerError::Refused {
                        status: resp.status().as_u16(),
                        body: body_text(resp.body()),
                        retry_after: resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(std::time::Duration::from_secs),
                    },
                    other => PeerError::Connect(other.to_string()),
                })?;

        ws.send(WsMessage::Text(handshake::HANDSHAKE.into()))
            .await
            .map_err(|e| PeerError::Connect(e.to_string()))?;
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(text))) if text.is_empty() => continue,
                Some(Ok(WsMessage::Text(text))) => {
                    if handshake::is_accepted(&text) {
                        break;
                    }
                    return Err(PeerError::Handshake(text.to_string()));
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    return Err(PeerError::Closed(frame.map(|f| u16::from(f.code))))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(PeerError::Connect(e.to_string())),
                None => return Err(PeerError::Closed(None)),
            }
        }

        Ok(self.run(ws))
    }

    /// Serves a WebSocket connection this side accepted: waits for the peer's handshake, answers
    /// `+OK` (or `-ERR` and close 1002 for another protocol, version or codec), then answers calls
    /// with the registered handlers and can make calls too. This is a Duplex server without a
    /// gateway (the benchmarks' "direct" baseline uses it).
    pub async fn accept<S>(self, mut ws: WebSocketStream<S>) -> Result<Peer, PeerError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        loop {
            let frame = match ws.next().await {
                Some(Ok(WsMessage::Text(text))) => text.as_bytes().to_vec(),
                Some(Ok(WsMessage::Binary(bytes))) => bytes.to_vec(),
                Some(Ok(WsMessage::Close(frame))) => {
                    return Err(PeerError::Closed(frame.map(|f| u16::from(f.code))))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(PeerError::Connect(e.to_string())),
                None => return Err(PeerError::Closed(None)),
            };
            if frame.is_empty() {
                continue;
            }
            match handshake::check(&frame) {
                Ok(()) => break,
                Err(reason) => {
                    let _ = ws
                        .send(WsMessage::Text(handshake::refusal(&reason.0).into()))
                        .await;
                    let _ = ws
                        .send(WsMessage::Close(Some(CloseFrame {
                            code: CloseCode::Protocol,
                            reason: "bad handshake".into(),
                        })))
                        .await;
                    return Err(PeerError::Handshake(reason.0));
                }
            }
        }
        ws.send(WsMessage::Text(handshake::ACCEPT.into()))
            .await
            .map_err(|e| PeerError::Connect(e.to_string()))?;
        Ok(self.run(ws))
    }

    /// Runs an open, handshaken connection: a writer task, and a reader task that routes replies
    /// to pending calls and requests to the handlers.
    fn run<S>(self, ws: WebSocketStream<S>) -> Peer
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing>();
        let out_tx = Out {
            tx: out_tx,
            room: Arc::new(Semaphore::new(STREAM_WINDOW)),
        };
        let (closed_tx, closed_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            out: out_tx.clone(),
            closed: closed_rx,
        });
        let (mut sink, mut stream) = ws.split();

        // Writer: everything this peer sends goes through one queue. What is queued is written
        // with one flush (up to MAX_BATCH frames), so a busy backend does not pay a system call
        // per reply, and a long stream still leaves batch by batch.
        let writer = tokio::spawn(async move {
            'outer: while let Some((msg, permit)) = out_rx.recv().await {
                let mut closing = matches!(msg, WsMessage::Close(_));
                // Room in the stream window is given back once the frames are written.
                let mut held = vec![permit];
                let mut batched = 1;
                if sink.feed(msg).await.is_err() {
                    break;
                }
                // Two rounds, with one yield between them: the tasks about to queue a frame
                // (handlers finishing their replies) get to do so first, so a backend carrying
                // many callers writes bigger batches with fewer system calls.
                for round in 0..2 {
                    if round == 1 {
                        if closing {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    while !closing && batched < MAX_BATCH {
                        let Ok((msg, permit)) = out_rx.try_recv() else {
                            break;
                        };
                        closing = matches!(msg, WsMessage::Close(_));
                        held.push(permit);
                        batched += 1;
                        if sink.feed(msg).await.is_err() {
                            break 'outer;
                        }
                    }
                }
                if sink.flush().await.is_err() || closing {
                    break;
                }
                drop(held);
            }
        });

        // Reader: replies go to their pending calls, requests to the handlers.
        let reader_shared = shared.clone();
        let handlers = self.handlers;
        tokio::spawn(async move {
            let mut incoming: HashMap<u64, mpsc::UnboundedSender<Value>> = HashMap::new();
            let mut close_code = None;
            while let Some(frame) = stream.next().await {
                // The frame's own buffer, not a copy of it.
                let text: Bytes = match frame {
                    Ok(WsMessage::Text(text)) => text.into(),
                    Ok(WsMessage::Binary(bytes)) => bytes,
                    Ok(WsMessage::Close(frame)) => {
                        close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                };
                if text.is_empty() {
                    continue;
                }
                let Ok(msg) = Message::parse(&text) else {
                    continue;
                };
                match msg.kind() {
                    Kind::Reply => reader_shared.deliver(msg),
                    Kind::Request => {
                        dispatch(&handlers, &mut incoming, &reader_shared.out, msg);
                    }
                }
            }
            let _ = closed_tx.send(Some(close_code));
            // Fail every call still waiting.
            let pending = std::mem::take(&mut *lock(&reader_shared.pending));
            for (_, tx) in pending {
                let _ = tx.send(Err(PeerError::Closed(close_code)));
            }
            writer.abort();
        });

        Peer { shared }
    }
}

fn body_text(body: &Option<Vec<u8>>) -> String {
    body.as_deref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Routes one incoming request to its handler (or to the input stream of a call in progress).
fn dispatch(
    handlers: &HashMap<String, Handler>,
    incoming: &mut HashMap<u64, mpsc::UnboundedSender<Value>>,
    out: &Out,
    msg: Message,
) {
    let id = msg.id();
    if let Some(id) = id {
        if let Some(input) = incoming.get(&id) {
            let _ = input.send(msg.payload());
            if !msg.more() {
                incoming.remove(&id);
            }
            return;
        }
    }
    let method = msg.method().unwrap_or_default();
    let ext = msg.ext();
    let Some(handler) = handlers.get(&method).cloned() else {
        if id.is_some() {
            let mut reply = Message::error_reply(id, &RpcError::method_not_found(&method));
            if let Some(ext) = &ext {
                reply.set_ext(Some(ext));
            }
            let _ = out.send(WsMessage::Text(reply.to_json().into()));
        }
        return;
    };
    let input = match (id, msg.more()) {
        (Some(id), true) => {
            let (tx, rx) = mpsc::unbounded_channel();
            incoming.insert(id, tx);
            Some(rx)
        }
        _ => None,
    };
    let call = Call {
        method,
        payload: msg.payload(),
        ext: ext.clone(),
        input,
        id,
        out: out.clone(),
    };
    // A handler that has its answer at once (it never waits) is answered here, in order,
    // without a task of its own: no spawn, no wake-up of another worker. One that waits is
    // polled again by a task of its own (which gives it a real waker). A handler that panics
    // fails its call (-32603); the connection goes on.
    let first = catch_unwind(AssertUnwindSafe(|| {
        let mut running = handler(call);
        let mut cx = Context::from_waker(Waker::noop());
        match running.as_mut().poll(&mut cx) {
            Poll::Ready(result) => Ok(result),
            Poll::Pending => Err(running),
        }
    }));
    let mut running = match first {
        Ok(Err(running)) => running,
        Ok(Ok(result)) => return answer(out, id, ext.as_ref(), result),
        Err(_) => return answer(out, id, ext.as_ref(), Err(panicked())),
    };
    let out = out.clone();
    tokio::spawn(async move {
        // The handler is dropped inside the guarded future too: a panic in its drop fails the
        // call like any other.
        let guarded = async move {
            let result = running.as_mut().await;
            drop(running);
            result
        };
        let result = AssertUnwindSafe(guarded)
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(panicked()));
        answer(&out, id, ext.as_ref(), result);
    });
}

fn panicked() -> RpcError {
    RpcError::new(
        crate::code::INTERNAL_ERROR,
        "the handler failed (it panicked)",
    )
}

/// Queues a handler's answer to call `id` (nothing for a notification).
fn answer(
    out: &Out,
    id: Option<u64>,
    ext: Option<&Map<String, Value>>,
    result: Result<Value, RpcError>,
) {
    if id.is_none() {
        return;
    }
    let mut reply = match result {
        Ok(payload) => Message::reply(id, &payload, false),
        Err(error) => Message::error_reply(id, &error),
    };
    if let Some(ext) = ext {
        reply.set_ext(Some(ext));
    }
    let _ = out.send(WsMessage::Text(reply.to_json().into()));
}

/// How many frames of a peer's reply streams may wait unwritten before [`Call::send`] waits.
pub const STREAM_WINDOW: usize = 256;
/// The most frames written with one flush.
const MAX_BATCH: usize = 64;

/// A frame to write, with the room it holds in the stream window (if it is a stream frame).
type Outgoing = (WsMessage, Option<OwnedSemaphorePermit>);

/// The sending side of a peer's write queue.
#[derive(Clone)]
struct Out {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Room in the stream window.
    room: Arc<Semaphore>,
}

impl Out {
    /// Queues a frame (calls, replies, closes: never held back).
    fn send(&self, msg: WsMessage) -> Result<(), PeerError> {
        self.tx
            .send((msg, None))
            .map_err(|_| PeerError::Closed(None))
    }

    /// Queues a stream frame once there is room in the stream window.
    async fn send_paced(&self, msg: WsMessage) -> Result<(), PeerError> {
        let permit = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PeerError::Closed(None))?;
        self.tx
            .send((msg, Some(permit)))
            .map_err(|_| PeerError::Closed(None))
    }
}

type ReplySender = mpsc::UnboundedSender<Result<Message, PeerError>>;

struct Shared {
    pending: Mutex<HashMap<u64, ReplySender>>,
    next_id: AtomicU64,
    out: Out,
    closed: watch::Receiver<Option<Option<u16>>>,
}

impl Shared {
    fn deliver(&self, msg: Message) {
        let Some(id) = msg.id() else { return };
        let mut pending = lock(&self.pending);
        let ends = msg.ends_call();
        if let Some(tx) = pending.get(&id) {
            let _ = tx.send(Ok(msg));
        }
        if ends {
            pending.remove(&id);
        }
    }

    fn send(&self, msg: &Message) -> Result<(), PeerError> {
        if let Some(code) = *self.closed.borrow() {
            return Err(PeerError::Closed(code));
        }
        self.out
            .send(WsMessage::Text(msg.to_json().into()))
            .map_err(|_| PeerError::Closed(None))
    }
}

/// The replies of one call, in order. The stream ends after the frame without `more`.
pub struct Replies {
    rx: mpsc::UnboundedReceiver<Result<Message, PeerError>>,
    done: bool,
}

impl Replies {
    /// The next reply frame, decoded: `Ok(payload)`, or the error that ended the call.
    pub async fn next(&mut self) -> Option<Result<Value, PeerError>> {
        self.next_message().await.map(|r| {
            r.and_then(|msg| match msg.error() {
                Some(error) => Err(PeerError::Rpc(error)),
                None => Ok(msg.payload()),
            })
        })
    }

    /// The next reply frame as it arrived (to inspect `id`, `more`, `ext` and unknown fields).
    pub async fn next_message(&mut self) -> Option<Result<Message, PeerError>> {
        if self.done {
            return None;
        }
        let item = self.rx.recv().await;
        match &item {
            Some(Ok(msg)) if !msg.ends_call() => {}
            _ => self.done = true,
        }
        item
    }

    /// Waits for the whole reply: the last frame's payload.
    pub async fn last(mut self) -> Result<Value, PeerError> {
        let mut last = Err(PeerError::Closed(None));
        while let Some(item) = self.next().await {
            last = item;
            if last.is_err() {
                break;
            }
        }
        last
    }
}

/// An open Duplex connection.
#[derive(Clone)]
pub struct Peer {
    shared: Arc<Shared>,
}

impl Peer {
    /// Starts configuring a peer.
    pub fn builder() -> PeerBuilder {
        PeerBuilder::default()
    }

    /// Calls `method` and waits for its (last) reply.
    pub async fn call(&self, method: &str, payload: Value) -> Result<Value, PeerError> {
        self.start(method, &[payload], None)?.last().await
    }

    /// Asks the gateway to drain this backend (`$drain`): it sends no new clients or calls here,
    /// lets the running ones finish, and answers with how many were still running when it
    /// answered (`0` once all have ended, or the count left at the gateway's drain timeout).
    /// Close the peer afterwards: no call is lost.
    pub async fn drain(&self) -> Result<u64, PeerError> {
        let answer = self.call("$drain", Value::Null).await?;
        answer["pending"].as_u64().ok_or_else(|| {
            PeerError::Rpc(RpcError::new(
                crate::code::INVALID_MESSAGE,
                format!("unexpected answer to $drain: {answer}"),
            ))
        })
    }

    /// Renews this client's signed token on a gateway endpoint that takes them (`$refresh`):
    /// `token` must verify and name the same `sub`. Returns the new token's `exp`. Until its
    /// expiry (plus the gateway's leeway) the connection stays open; without a refresh the
    /// gateway closes it with 1008 when the token it connected with expires.
    pub async fn refresh(&self, token: &str) -> Result<u64, PeerError> {
        let answer = self
            .call("$refresh", Value::String(token.to_string()))
            .await?;
        answer["exp"].as_u64().ok_or_else(|| {
            PeerError::Rpc(RpcError::new(
                crate::code::INVALID_MESSAGE,
                format!("unexpected answer to $refresh: {answer}"),
            ))
        })
    }

    /// Calls `method` and returns its reply stream.
    pub fn call_stream(&self, method: &str, payload: Value) -> Result<Replies, PeerError> {
        self.start(method, &[payload], None)
    }

    /// Calls `method` with streamed input: one request frame per item, `more: true` on all but
    /// the last.
    pub fn call_with_input(&self, method: &str, input: &[Value]) -> Result<Replies, PeerError> {
        self.start(method, input, None)
    }

    /// Calls `method` on the client whose route key is `route` (for backends behind a gateway).
    pub fn call_route(
        &self,
        route: &str,
        method: &str,
        payload: Value,
    ) -> Result<Replies, PeerError> {
        let mut ext = Map::new();
        ext.insert("route".into(), Value::String(route.to_string()));
        self.start(method, &[payload], Some(&ext))
    }

    /// Sends `method` without an id: no reply is expected.
    pub fn notify(&self, method: &str, payload: Value) -> Result<(), PeerError> {
        self.shared
            .send(&Message::request(method, None, &payload, false))
    }

    /// Sends a raw frame as it is (for tests and tools that need full control).
    pub fn send_raw(&self, text: &str) -> Result<(), PeerError> {
        self.shared
            .out
            .send(WsMessage::Text(text.to_string().into()))
            .map_err(|_| PeerError::Closed(None))
    }

    fn start(
        &self,
        method: &str,
        input: &[Value],
        ext: Option<&Map<String, Value>>,
    ) -> Result<Replies, PeerError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.shared.pending).insert(id, tx);
        let last = input.len().saturating_sub(1);
        let null = [Value::Null];
        let input = if input.is_empty() { &null[..] } else { input };
        for (i, payload) in input.iter().enumerate() {
            let mut msg = Message::request(method, Some(id), payload, i < last);
            if ext.is_some() {
                msg.set_ext(ext);
            }
            if let Err(e) = self.shared.send(&msg) {
                lock(&self.shared.pending).remove(&id);
                return Err(e);
            }
        }
        Ok(Replies { rx, done: false })
    }

    /// Waits until the connection is closed; returns the close code the far side sent.
    pub async fn closed(&self) -> Option<u16> {
        let mut rx = self.shared.closed.clone();
        loop {
            if let Some(code) = *rx.borrow_and_update() {
                return code;
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.borrow().is_some()
    }

    /// Closes the connection with code 1000.
    pub fn close(&self) {
        let _ = self.shared.out.send(WsMessage::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })));
    }
}
