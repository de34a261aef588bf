//! What happens to a connection as it is accepted, before Pingora's HTTP code sees it: it is
//! counted against its address's limit (over it, answered 429 and closed), a plain-TCP socket is
//! moved onto the runtime that serves it (`rehome`), and it is wrapped in the
//! [`GuardedStream`] that holds it to its HTTP deadlines ([`crate::timeouts`]).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, ALPN};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::edge::ConnectionGuard;
use crate::timeouts::{GuardedStream, Timeouts, WRITE_BUFFER};

/// A `ServerApp` that moves a plain-TCP connection onto the runtime serving it (`rehome`),
/// guards it, then hands it to `inner` (Pingora's HTTP proxy).
pub struct Front<A> {
    inner: Arc<A>,
    timeouts: Timeouts,
    count: CountConnection,
    draining: Draining,
}

/// Whether the gateway's own drain runs (it ends the process when it is done).
pub type Draining = Arc<dyn Fn() -> bool + Send + Sync>;

/// Counts a new connection against its address's limit (see [`crate::edge`]); the guard lives as
/// long as the connection (a WebSocket's included). None: not counted; Err: over the limit.
pub type CountConnection =
    Arc<dyn Fn(&Stream) -> Option<Result<ConnectionGuard, ConnectionGuard>> + Send + Sync>;

impl<A> Front<A> {
    /// Guards the connections `inner` serves with the timeouts `timeouts()` gives:
    /// `(request_header_timeout, http_idle_timeout)`, and counts each with `count`. While
    /// `draining()`, idle keep-alive connections stay open (see [`Front::cleanup`]).
    pub fn new(inner: A, timeouts: Timeouts, count: CountConnection, draining: Draining) -> Self {
        Front {
            inner: Arc::new(inner),
            timeouts,
            count,
            draining,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Front<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // HTTP/2 has its own connection handling (and no header-by-header reads to guard here;
        // its deadlines are the watchdog's and `h2_idle_timeout`): the guard only counts it.
        if let Some(watchdog) = crate::edge::WATCHDOG.get() {
            if let Some(cookie) = stream
                .get_socket_digest()
                .and_then(|d| d.socket_cookie().ok())
            {
                watchdog.handshake_done(cookie);
            }
        }
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let connection = match (self.count)(&stream) {
            None => None,
            Some(Ok(guard)) => Some(guard),
            Some(Err(_over)) => {
                // Over its address's limit: told so at once (HTTP/1 reads the answer to the
                // request it sends), and closed.
                crate::metrics::metrics().reject(crate::metrics::Rejection::IpConnections);
                let mut stream = stream;
                let answer = async {
                    if !h2 {
                        stream.write_all(crate::edge::TOO_MANY_CONNECTIONS).await?;
                    }
                    stream.shutdown().await
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
                // What the peer sends meanwhile (its request) is read and dropped for a moment,
                // so that the close does not reset the connection before the answer is read;
                // a silent peer does not hold the descriptor longer than that.
                let drain = async {
                    let mut sink = [0u8; 1024];
                    let mut left: usize = 64 << 10;
                    while left > 0 {
                        match stream.read(&mut sink).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => left = left.saturating_sub(n),
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_millis(100), drain).await;
                return None;
            }
        };
        if h2 {
            let guarded = GuardedStream::open(stream, self.timeouts.clone(), connection);
            return self.inner.process_new(Box::new(guarded), shutdown).await;
        }
        let stream = rehome(stream).unwrap_or_else(|stream| stream);
        // Plain TCP has no write buffer of Pingora's (see `server::l4_buffer`): the guard's
        // takes its place. TLS has its own.
        let buffer = if (*stream).as_any().is::<L4Stream>() {
            WRITE_BUFFER
        } else {
            0
        };
        let guarded = GuardedStream::new(stream, self.timeouts.clone(), buffer, connection);
        self.inner.process_new(Box::new(guarded), shutdown).await
    }

    /// Pingora's HTTP app closes every idle keep-alive connection here, as soon as the
    /// listeners stop: a request the peer sends a moment later meets a reset. While the gateway
    /// drains (SIGTERM), they are kept instead: a request on one is answered 503 (`stopping`)
    /// and the connection closed, until the drain ends the process.
    async fn cleanup(&self) {
        if (self.draining)() {
            std::future::pending::<()>().await;
        }
        self.inner.cleanup().await;
    }
}

/// Registers a plain-TCP connection's socket with the runtime of the task serving it.
///
/// Pingora accepts every connection on the runtime (thread) of the listener's accept loop, where
/// the socket is registered for readiness, then serves it on a runtime it picks at random. For
/// every other connection each readiness event then woke the accept loop's thread first, which
/// woke the serving thread in turn: two thread wake-ups (and a system call between threads) per
/// event instead of one. The socket is duplicated, the copy registered here, and the original
/// dropped (nothing has been read from it yet). Err: left as it is (TLS, or a socket that cannot
/// be duplicated: out of descriptors).
fn rehome(stream: Stream) -> Result<Stream, Stream> {
    let Some(l4) = (*stream).as_any().downcast_ref::<L4Stream>() else {
        return Err(stream);
    };
    // SAFETY: the descriptor stays open while `stream`, which owns it, lives (below).
    let copy = unsafe { BorrowedFd::borrow_raw(l4.as_raw_fd()) }.try_clone_to_owned();
    // The addresses accept() gave: kept, so the peer's is not asked for again (and is known
    // even if the peer has reset the connection meanwhile).
    let addresses = l4
        .get_socket_digest()
        .map(|d| (d.peer_addr.get().cloned(), d.local_addr.get().cloned()));
    let Ok(tcp) =
        copy.and_then(|fd| tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd)))
    else {
        return Err(stream);
    };
    // Deregisters the original from the accepting runtime and closes its descriptor; the socket
    // lives on in the copy.
    drop(stream);
    let mut moved = L4Stream::from(tcp);
    let digest = SocketDigest::from_raw_fd(moved.as_raw_fd());
    if let Some((peer, local)) = addresses {
        if let Some(peer) = peer {
            let _ = digest.peer_addr.set(peer);
        }
        if let Some(local) = local {
            let _ = digest.local_addr.set(local);
        }
    }
    moved.set_socket_digest(digest);
    Ok(Box::new(moved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_socket_is_served_by_the_runtime_it_moved_to() {
        use std::io::{Read, Write};
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        };
        // Accepted on one runtime, as Pingora's accept loop does; then that runtime goes away,
        // and with it the registration the socket had there.
        let accepting = runtime();
        let listener = accepting
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, _) = accepting.block_on(listener.accept()).expect("accept");
        let client_addr = client.local_addr().expect("local addr");
        // As Pingora's accept loop leaves it: the peer's address noted from accept().
        let mut server = L4Stream::from(accepted);
        let digest = SocketDigest::from_raw_fd(server.as_raw_fd());
        let noted = pingora::protocols::l4::socket::SocketAddr::Inet(client_addr);
        let _ = digest.peer_addr.set(Some(noted));
        server.set_socket_digest(digest);
        let server: Stream = Box::new(server);
        drop(listener);
        drop(accepting);

        runtime().block_on(async move {
            let Ok(mut moved) = rehome(server) else {
                panic!("a plain TCP stream moves");
            };
            // Carried over, not asked for again.
            let peer = moved
                .get_socket_digest()
                .and_then(|d| d.peer_addr.get().cloned().flatten());
            assert_eq!(peer.as_ref().and_then(|a| a.as_inet()), Some(&client_addr));
            client.write_all(b"ping").expect("write");
            let mut buf = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), moved.read_exact(&mut buf))
                .await
                .expect("readable here")
                .expect("read");
            assert_eq!(&buf, b"ping");
            moved.write_all(b"pong").await.expect("write");
            moved.flush().await.expect("flush");
            let mut buf = [0u8; 4];
            client.read_exact(&mut buf).expect("read");
            assert_eq!(&buf, b"pong");
        });
    }
}
