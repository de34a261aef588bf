//! Deadlines on HTTP connections from the open internet: a connection must send a request's
//! complete headers within `limits.request_header_timeout`, and a keep-alive connection idle for
//! `limits.http_idle_timeout` is closed.
//!
//! Pingora only has per-read timeouts (and makes HTTP/1.1 keep-alive wait forever), so a peer
//! sending one header byte now and then, or nothing after a first request, could hold a socket
//! indefinitely. The accept step (`accept::Front`) wraps every accepted connection in a
//! [`GuardedStream`] before Pingora sees it. The stream knows which phase its connection is in,
//! and the gateway tells it when a request's headers have been read, when its answer is done,
//! and when it became a WebSocket:
//!
//! ```text
//!  accept ──> Headers ──(request_filter starts)──> Busy ──(answered)──> Idle ──(first byte)──> Headers ...
//!                                                   └──(101 Switching Protocols)──> Open (no deadline)
//! ```
//!
//! In `Headers` the deadline counts from the connection's start (first request) or from the
//! first byte of the next request; in `Idle` from the end of the previous answer. When it
//! passes, reads end as if the peer had closed, and Pingora drops the connection.
//!

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::Stream;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::edge::ConnectionGuard;

/// What the guard's write buffer holds at most: a response's header and a small body go out in
/// one write (the size Pingora's own buffer had for plain TCP).
pub(crate) const WRITE_BUFFER: usize = 1460;

/// The two timeouts, read when a phase starts (so a reload applies from the next phase on).
pub type Timeouts = Arc<dyn Fn() -> (Duration, Duration) + Send + Sync>;

// The phase word: the phase in its low two bits, above them a count of phase changes, so a
// phase entered again (say, idle after idle) gets a fresh deadline.
const HEADERS: u32 = 0;
const BUSY: u32 = 1;
const IDLE: u32 = 2;
const OPEN: u32 = 3;
const PHASE_BITS: u32 = 3;

/// The phase word for `phase`, one change after `word`.
fn next(word: u32, phase: u32) -> u32 {
    (word & !PHASE_BITS).wrapping_add(PHASE_BITS + 1) | phase
}

/// What a request handler tells the guard of its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The request's headers were read; it is being served (no deadline).
    Busy,
    /// The answer is done; the connection waits for its next request.
    Idle,
    /// The connection became a WebSocket (no deadline from now on).
    Open,
}

/// Tells the guard of `stream` (if it has one) that its connection entered `phase`.
pub fn enter(stream: Option<&Stream>, phase: Phase) {
    let Some(guard) = stream.and_then(|s| (**s).as_any().downcast_ref::<GuardedStream>()) else {
        return;
    };
    let value = match phase {
        Phase::Busy => BUSY,
        Phase::Idle => IDLE,
        Phase::Open => OPEN,
    };
    let _ = guard
        .phase
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
            Some(next(word, value))
        });
}

/// Takes the guard off a stream that no longer needs it (a WebSocket), so its frames do not pass
/// through it; the connection's count against its address (if any) comes along, to live as long
/// as the WebSocket.
pub fn unwrap(stream: Stream) -> (Stream, Option<ConnectionGuard>) {
    if !(*stream).as_any().is::<GuardedStream>() {
        return (stream, None);
    }
    match stream.into_any().downcast::<GuardedStream>() {
        // Bytes still buffered (never, as Pingora flushes a 101 at once) keep the guard on,
        // so the next flush sends them; its reads pass straight through once open.
        Ok(guarded) if !guarded.inner.buffer().is_empty() => (guarded, None),
        // Nothing buffered: the guard's drop has nothing to send.
        Ok(mut guarded) => {
            let placeholder: Stream = Box::new(std::io::Cursor::new(Vec::<u8>::new()));
            let connection = guarded.connection.take();
            let inner =
                std::mem::replace(&mut guarded.inner, BufWriter::with_capacity(0, placeholder))
                    .into_inner();
            (inner, connection)
        }
        Err(_) => unreachable!("checked above"),
    }
}

/// A connection with a deadline on reading headers and on waiting idle.
pub struct GuardedStream {
    /// The connection, with a write buffer for a plain-TCP one (Pingora's stream has none
    /// there): a response's header and body go out in one write. Capacity 0 (TLS, which has
    /// its own): writes go straight through.
    inner: BufWriter<Stream>,
    timeouts: Timeouts,
    /// The phase word, set by the request handler (through [`enter`]) and by the first byte
    /// after `Idle`.
    phase: AtomicU32,
    /// The phase word `started` belongs to (`u32::MAX`: none).
    seen: u32,
    /// When that phase began: its deadline counts from here.
    started: Instant,
    /// Made (or moved) only when a read has to wait, so a request whose headers arrive in one
    /// read touches no timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// The connection's count against its address's limit, while it lives.
    connection: Option<ConnectionGuard>,
}

impl GuardedStream {
    /// Guards `inner` from its first request on, with a write buffer of `write_buffer` bytes
    /// (0: none) and the connection's count against its address, if any.
    pub(crate) fn new(
        inner: Stream,
        timeouts: Timeouts,
        write_buffer: usize,
        connection: Option<ConnectionGuard>,
    ) -> Self {
        // The first request's headers count from the connection's start.
        GuardedStream {
            inner: BufWriter::with_capacity(write_buffer, inner),
            timeouts,
            phase: AtomicU32::new(HEADERS),
            seen: HEADERS,
            started: Instant::now(),
            timer: None,
            connection,
        }
    }

    /// Notes that the phase `word` began now (if it is not the one already noted).
    fn begin(&mut self, word: u32) {
        if self.seen != word {
            self.seen = word;
            self.started = Instant::now();
        }
    }

    /// Whether the current phase's deadline has passed; otherwise the task is woken at it.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let (header, idle) = (self.timeouts)();
        let limit = if self.seen & PHASE_BITS == IDLE {
            idle
        } else {
            header
        };
        let at = self.started + limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        timer.as_mut().poll(cx).is_ready()
    }
}

impl GuardedStream {
    /// An HTTP/2 connection: no HTTP/1 deadlines to guard (its own are the watchdog's and
    /// `h2_idle_timeout`), only its count kept.
    pub(crate) fn open(
        inner: Stream,
        timeouts: Timeouts,
        connection: Option<ConnectionGuard>,
    ) -> Self {
        let mut guarded = GuardedStream::new(inner, timeouts, 0, connection);
        guarded.phase = AtomicU32::new(OPEN);
        guarded.seen = OPEN;
        guarded
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        // A last try for what is still buffered (a response cut short by an error), as
        // Pingora's own buffered stream does: whatever the socket takes now, without waiting.
        if !self.inner.buffer().is_empty() {
            let waker = std::task::Waker::noop();
            let _ = Pin::new(&mut self.inner).poll_flush(&mut Context::from_waker(waker));
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let word = this.phase.load(Ordering::Acquire);
        let phase = word & PHASE_BITS;
        if phase == BUSY || phase == OPEN {
            if phase == OPEN {
                this.timer = None;
            }
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        this.begin(word);
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if phase == IDLE && buf.filled().len() > before {
                    // The next request began: its headers now have their own deadline.
                    let headers = next(word, HEADERS);
                    if this
                        .phase
                        .compare_exchange(word, headers, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        this.begin(headers);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.expired(cx) {
                    // As if the peer had closed: Pingora ends the connection.
                    tracing::debug!(
                        phase = if phase == IDLE { "idle" } else { "headers" },
                        "HTTP connection timed out"
                    );
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        let _ = self.inner.flush().await;
        Shutdown::shutdown(&mut **self.inner.get_mut()).await
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.get_ref().id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ref().get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ref().get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.get_ref().selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_ref().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_ref().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_ref().get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_ref().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.get_mut().set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_ref().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.get_mut().set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.get_mut().try_peek(buf).await
    }
}

impl fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", self.inner.get_ref())
            .field("phase", &(self.phase.load(Ordering::Relaxed) & PHASE_BITS))
            .finish()
    }
}

/// Guards `stream` (for tests of the phases without a server).
#[cfg(test)]
fn guard(stream: Stream, timeouts: Timeouts) -> Stream {
    Box::new(GuardedStream::new(stream, timeouts, 0, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn timeouts(header_ms: u64, idle_ms: u64) -> Timeouts {
        Arc::new(move || {
            (
                Duration::from_millis(header_ms),
                Duration::from_millis(idle_ms),
            )
        })
    }

    async fn pair() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.expect("accept");
        let server: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(server));
        (server, client.expect("connect"))
    }

    #[tokio::test(start_paused = true)]
    async fn headers_that_never_complete_end_the_read() {
        let (server, mut client) = pair().await;
        let mut guarded = guard(server, timeouts(500, 5000));
        client
            .write_all(b"GET / HTTP/1.1\r\nHo")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let n = guarded.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\nHo");
        let started = Instant::now();
        let n = guarded.read(&mut buf).await.expect("read");
        assert_eq!(n, 0, "the deadline ends the read like a close");
        assert!(started.elapsed() < Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_has_no_deadline_and_an_idle_one_has_its_own() {
        let (server, mut client) = pair().await;
        let mut guarded = guard(server, timeouts(100, 1000));
        enter(Some(&guarded), Phase::Busy);
        let read = tokio::time::timeout(Duration::from_secs(5), guarded.read(&mut [0u8; 8])).await;
        assert!(read.is_err(), "busy: no deadline from the guard");
        enter(Some(&guarded), Phase::Idle);
        let started = Instant::now();
        let n = guarded.read(&mut [0u8; 8]).await.expect("read");
        assert_eq!(n, 0);
        assert!(started.elapsed() >= Duration::from_millis(1000));
        // Bytes after idle start a header deadline of their own.
        enter(Some(&guarded), Phase::Idle);
        client.write_all(b"G").await.expect("write");
        assert_eq!(guarded.read(&mut [0u8; 8]).await.expect("read"), 1);
        let started = Instant::now();
        assert_eq!(guarded.read(&mut [0u8; 8]).await.expect("read"), 0);
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn buffered_writes_go_out_on_flush_and_in_order() {
        let (server, mut client) = pair().await;
        let mut guarded = GuardedStream::new(server, timeouts(1000, 1000), WRITE_BUFFER, None);
        guarded
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4 * WRITE_BUFFER];
        let early = tokio::time::timeout(Duration::from_millis(100), client.read(&mut buf)).await;
        assert!(early.is_err(), "held until flushed");
        guarded.flush().await.expect("flush");
        let n = client.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"HTTP/1.1 200 OK\r\n\r\n");
        // What is buffered goes before a write too large to buffer.
        let large = vec![b'x'; 2 * WRITE_BUFFER];
        guarded.write_all(b"head").await.expect("write");
        guarded.write_all(&large).await.expect("write");
        guarded.flush().await.expect("flush");
        let mut got = vec![0u8; 4 + large.len()];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&b| b == b'x'));
        // Unflushed bytes keep the guard on when unwrapped, so a flush still sends them.
        let mut guarded: Stream = Box::new(guarded);
        enter(Some(&guarded), Phase::Open);
        guarded.write_all(b"tail").await.expect("write");
        let (mut stream, _) = unwrap(guarded);
        assert!((*stream).as_any().is::<GuardedStream>());
        stream.flush().await.expect("flush");
        let mut tail = [0u8; 4];
        client.read_exact(&mut tail).await.expect("read");
        assert_eq!(&tail, b"tail");
        // What a dropped stream still buffers gets a last try, as with Pingora's own buffer.
        stream.write_all(b"bye").await.expect("write");
        drop(stream);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b"bye");
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_connection_is_never_cut_and_unwraps() {
        let (server, _client) = pair().await;
        let mut guarded = guard(server, timeouts(100, 100));
        enter(Some(&guarded), Phase::Open);
        let read = tokio::time::timeout(Duration::from_secs(5), guarded.read(&mut [0u8; 8])).await;
        assert!(read.is_err(), "open: no deadline");
        let (inner, _) = unwrap(guarded);
        assert!(!(*inner).as_any().is::<GuardedStream>());
    }
}
