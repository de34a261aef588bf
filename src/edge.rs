//! Abuse controls at the edge: what one client address, or one endpoint, may take of the
//! gateway.
//!
//! - **Connections per address** (`limits.max_connections_per_ip`): counted from the accept to
//!   the close, TLS handshakes in progress included; a connection over the limit is answered 429
//!   (`ip_connections`) at once and closed (a TLS connection over it, before its handshake, is
//!   closed without one), so an address never holds more descriptors than its limit.
//! - **Requests per address** (`limits.requests_per_ip_per_second`): a token bucket (GCRA, from
//!   the `governor` crate) with a burst of one second's worth, taken by HTTP calls, WebSocket
//!   upgrades and WebSocket calls.
//! - **Authentication failures per address** (`limits.auth_failures_per_ip_per_minute`): answers
//!   of 401/403 counted in a window of one minute from the first; over the limit, the address's
//!   requests get 429 (`auth_failures`) until the window is over.
//! - **Calls per endpoint** (`endpoints[].calls_per_second`): a token bucket per endpoint (per
//!   node).
//! - **TLS and HTTP/2 silence** (`limits.request_header_timeout`): a TLS connection is watched
//!   from its accept ([`Watchdog`]) and shut down when its first request's headers have not come
//!   in time, whether it stalls in the TLS handshake, in HTTP/2's preface, or after it.
//!
//! Addresses are tracked in a least-recently-used table of bounded size (the `lru` crate), so a
//! flood of distinct addresses costs a fixed amount of memory: the least recently seen address
//! is forgotten first (an address with open connections is touched by each of them).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::Config;
use crate::metrics::Rejection;

/// How many addresses are tracked at most (the least recently seen are forgotten first).
pub const MAX_ADDRESSES: usize = 65_536;

/// Shards of the address table (so that connections of different addresses rarely wait for
/// each other's lock).
const SHARDS: usize = 16;

/// The length of the window of `auth_failures_per_ip_per_minute`.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// The limits of the config in force that the edge applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct EdgeLimits {
    max_connections: Option<usize>,
    requests_per_second: Option<NonZeroU32>,
    auth_failures_per_minute: Option<u32>,
}

/// What the edge knows of one client address.
struct Address {
    connections: usize,
    /// TLS handshakes in progress (counted against the connections too).
    handshakes: usize,
    bucket: Option<(NonZeroU32, DefaultDirectRateLimiter)>,
    /// Failures counted in the window that began at the instant given.
    failures: Option<(Instant, u32)>,
}

/// Why a request is turned away, with the seconds after which it may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The rejection it is counted under.
    pub reason: Rejection,
    /// When to try again (`Retry-After`, whole seconds, at least 1).
    pub retry_after: Duration,
}

impl Limited {
    /// `Retry-After` in whole seconds (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }

    /// The message of the 429 answer.
    pub fn message(&self) -> &'static str {
        match self.reason {
            Rejection::IpConnections => "too many connections from this address",
            Rejection::AuthFailures => "too many failed authentications from this address",
            Rejection::EndpointRate => "this endpoint takes no more calls now",
            _ => "too many requests from this address",
        }
    }
}

/// The edge's state: one per process.
pub struct Edge {
    shards: Vec<Mutex<lru::LruCache<IpAddr, Address>>>,
    limits: ArcSwap<EdgeLimits>,
    /// Token buckets of endpoints that have `calls_per_second`, by path.
    endpoints: ArcSwap<HashMap<String, Arc<EndpointBucket>>>,
    /// Picks an address's shard.
    seed: std::collections::hash_map::RandomState,
}

/// The token bucket of one endpoint.
pub struct EndpointBucket {
    rate: NonZeroU32,
    limiter: DefaultDirectRateLimiter,
}

impl EndpointBucket {
    /// Takes one call; Err with when to try again.
    pub fn take(&self) -> Result<(), Limited> {
        take(&self.limiter).map_err(|retry_after| Limited {
            reason: Rejection::EndpointRate,
            retry_after,
        })
    }
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("limits", &*self.limits.load())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes a token from `limiter`; Err with the wait until the next one.
fn take(limiter: &DefaultDirectRateLimiter) -> Result<(), Duration> {
    limiter
        .check()
        .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
}

/// A bucket of `rate` tokens a second, holding one second's worth.
fn bucket(rate: NonZeroU32) -> DefaultDirectRateLimiter {
    RateLimiter::direct(Quota::per_second(rate).allow_burst(rate))
}

impl Edge {
    /// The edge for `config`.
    pub fn new(config: &Config) -> Edge {
        let per_shard = NonZeroUsize::new(MAX_ADDRESSES / SHARDS).unwrap_or(NonZeroUsize::MIN);
        let edge = Edge {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(lru::LruCache::new(per_shard)))
                .collect(),
            limits: ArcSwap::from_pointee(EdgeLimits::default()),
            endpoints: ArcSwap::from_pointee(HashMap::new()),
            seed: std::collections::hash_map::RandomState::new(),
        };
        edge.apply(config);
        edge
    }

    /// Takes the limits of `config` (start-up and reload). Buckets of endpoints whose rate is
    /// unchanged are kept.
    pub fn apply(&self, config: &Config) {
        let l = &config.limits;
        self.limits.store(Arc::new(EdgeLimits {
            max_connections: l.max_connections_per_ip,
            requests_per_second: l.requests_per_ip_per_second.and_then(NonZeroU32::new),
            auth_failures_per_minute: l.auth_failures_per_ip_per_minute,
        }));
        let old = self.endpoints.load();
        let endpoints: HashMap<String, Arc<EndpointBucket>> = config
            .endpoints
            .iter()
            .filter_map(|(path, e)| {
                let rate = NonZeroU32::new(e.calls_per_second?)?;
                let kept = old.get(path).filter(|b| b.rate == rate).cloned();
                Some((
                    path.clone(),
                    kept.unwrap_or_else(|| {
                        Arc::new(EndpointBucket {
                            rate,
                            limiter: bucket(rate),
                        })
                    }),
                ))
            })
            .collect();
        self.endpoints.store(Arc::new(endpoints));
    }

    /// The bucket of the endpoint at `path`, if it has a rate.
    pub fn endpoint(&self, path: &str) -> Option<Arc<EndpointBucket>> {
        let endpoints = self.endpoints.load();
        if endpoints.is_empty() {
            return None;
        }
        endpoints.get(path).cloned()
    }

    fn shard(&self, ip: &IpAddr) -> MutexGuard<'_, lru::LruCache<IpAddr, Address>> {
        use std::hash::BuildHasher;
        // Seeded per process: nobody can pick addresses that all land in one shard.
        let i = (self.seed.hash_one(ip) as usize) % self.shards.len();
        lock(&self.shards[i])
    }

    fn with_address<R>(&self, ip: IpAddr, f: impl FnOnce(&mut Address) -> R) -> R {
        let mut shard = self.shard(&ip);
        let address = shard.get_or_insert_mut(ip, || Address {
            connections: 0,
            handshakes: 0,
            bucket: None,
            failures: None,
        });
        f(address)
    }

    /// A connection from `ip` opened: counted until the guard is dropped. Err (with the guard,
    /// which must be dropped too) when the address is over `max_connections_per_ip`: the
    /// connection is answered 429 and closed.
    pub fn connection(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionGuard, ConnectionGuard> {
        let limits = self.limits.load();
        let count = self.with_address(ip, |a| {
            a.connections += 1;
            a.connections + a.handshakes
        });
        let guard = ConnectionGuard {
            edge: self.clone(),
            ip,
        };
        match limits.max_connections {
            Some(max) if count > max => Err(guard),
            _ => Ok(guard),
        }
    }

    /// A TLS connection from `ip` begins its handshake: false (close it now) when the address
    /// already has `max_connections_per_ip` connections and handshakes.
    pub fn begin_handshake(&self, ip: IpAddr) -> bool {
        let Some(max) = self.limits.load().max_connections else {
            return true;
        };
        self.with_address(ip, |a| {
            if a.connections + a.handshakes >= max {
                return false;
            }
            a.handshakes += 1;
            true
        })
    }

    /// A TLS handshake that [`Edge::begin_handshake`] counted is over (done or failed).
    pub fn end_handshake(&self, ip: IpAddr) {
        let mut shard = self.shard(&ip);
        if let Some(a) = shard.peek_mut(&ip) {
            a.handshakes = a.handshakes.saturating_sub(1);
        }
    }

    /// Admits a request (an HTTP call, a WebSocket upgrade or a WebSocket call) from `ip`:
    /// Err when the address has failed authentication too often this minute, or is over its
    /// rate.
    pub fn request(&self, ip: IpAddr) -> Result<(), Limited> {
        let limits = self.limits.load();
        if limits.requests_per_second.is_none() && limits.auth_failures_per_minute.is_none() {
            return Ok(());
        }
        self.with_address(ip, |a| {
            if let (Some(max), Some((since, count))) = (limits.auth_failures_per_minute, a.failures)
            {
                let elapsed = since.elapsed();
                if elapsed >= FAILURE_WINDOW {
                    a.failures = None;
                } else if count >= max {
                    return Err(Limited {
                        reason: Rejection::AuthFailures,
                        retry_after: FAILURE_WINDOW - elapsed,
                    });
                }
            }
            let Some(rate) = limits.requests_per_second else {
                return Ok(());
            };
            let limiter = match &mut a.bucket {
                Some((r, limiter)) if *r == rate => limiter,
                slot => &slot.insert((rate, bucket(rate))).1,
            };
            take(limiter).map_err(|retry_after| Limited {
                reason: Rejection::IpRate,
                retry_after,
            })
        })
    }

    /// `ip` was answered 401 or 403.
    pub fn auth_failed(&self, ip: IpAddr) {
        if self.limits.load().auth_failures_per_minute.is_none() {
            return;
        }
        self.with_address(ip, |a| match &mut a.failures {
            Some((since, count)) if since.elapsed() < FAILURE_WINDOW => *count += 1,
            slot => *slot = Some((Instant::now(), 1)),
        });
    }

    /// How many addresses are tracked now.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

/// Counts one connection of an address while it lives.
pub struct ConnectionGuard {
    edge: Arc<Edge>,
    ip: IpAddr,
}

impl std::fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("ip", &self.ip)
            .finish()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut shard = self.edge.shard(&self.ip);
        if let Some(a) = shard.peek_mut(&self.ip) {
            a.connections = a.connections.saturating_sub(1);
        }
    }
}

/// The answer to a connection over its address's limit, written before it sends anything.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 73\r\n\r\n\
{\"error\":{\"code\":429,\"message\":\"too many connections from this address\"}}";

/// The client address of a request: the peer's, or, from a trusted proxy, the last address in
/// `X-Forwarded-For` that is not a trusted proxy's.
pub fn client_ip(trusted: &[ipnet::IpNet], peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
    if !trusted.iter().any(|net| net.contains(&peer)) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut last = peer;
    for value in header.rsplit(',') {
        let Ok(ip) = value.trim().parse::<IpAddr>() else {
            // Junk in the header: what is left of it cannot be believed.
            return last;
        };
        last = ip;
        if !trusted.iter().any(|net| net.contains(&ip)) {
            return ip;
        }
    }
    last
}

/// The socket cookie of the connection on file descriptor `fd`: a number the kernel gives each
/// socket once, never reused while the system runs (unlike the descriptor).
pub fn socket_cookie(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// Watches TLS connections from their accept until their first request's headers have come,
/// and shuts down the socket of one that did not within `limits.request_header_timeout`
/// (stalled in the TLS handshake, in HTTP/2's preface, or silent after them). Pingora's own
/// bound on the TLS handshake is 60 s, and HTTP/2 has none. It also counts handshakes in
/// progress against their address's `max_connections_per_ip`.
pub struct Watchdog {
    /// Connections being watched, by socket cookie, with their address while their handshake
    /// is counted.
    watched: Mutex<HashMap<u64, Option<IpAddr>>>,
    timeout: Arc<dyn Fn() -> Duration + Send + Sync>,
    edge: Arc<Edge>,
}

impl Watchdog {
    /// A watchdog with the header timeout `timeout()` gives (read at each accept).
    pub fn new(timeout: Arc<dyn Fn() -> Duration + Send + Sync>, edge: Arc<Edge>) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            watched: Mutex::new(HashMap::new()),
            timeout,
            edge,
        })
    }

    /// Starts watching the connection on `fd` from `ip`; false when its address is over its
    /// connections (close it now).
    pub fn watch(self: &Arc<Self>, fd: std::os::fd::RawFd, ip: Option<IpAddr>) -> bool {
        let Some(cookie) = socket_cookie(fd) else {
            return true;
        };
        let counted = match ip {
            Some(ip) => {
                if !self.edge.begin_handshake(ip) {
                    return false;
                }
                Some(ip)
            }
            None => None,
        };
        lock(&self.watched).insert(cookie, counted);
        let me = self.clone();
        let deadline = Instant::now() + (self.timeout)();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            let Some(counted) = lock(&me.watched).remove(&cookie) else {
                return;
            };
            if let Some(ip) = counted {
                me.edge.end_handshake(ip);
            }
            // Still waiting for its first request: if the descriptor still holds the same
            // socket, shut it down (reads end, the handshake or the session fails, Pingora
            // drops the connection).
            if socket_cookie(fd) == Some(cookie) {
                // SAFETY: shutdown() on a descriptor only affects the socket it names, which
                // the cookie check has just shown is this connection's.
                unsafe {
                    libc::shutdown(fd, libc::SHUT_RDWR);
                }
                tracing::debug!("TLS connection silent past request_header_timeout: closed");
            }
        });
        true
    }

    /// The connection with `cookie` finished its TLS handshake: its address counts it as a
    /// connection from now on (the watch goes on until its first request).
    pub fn handshake_done(&self, cookie: u64) {
        let mut watched = lock(&self.watched);
        if let Some(counted) = watched.get_mut(&cookie) {
            if let Some(ip) = counted.take() {
                drop(watched);
                self.edge.end_handshake(ip);
            }
        }
    }

    /// The connection with `cookie` sent its first request's headers.
    pub fn arrived(&self, cookie: u64) {
        let mut watched = lock(&self.watched);
        if watched.is_empty() {
            return;
        }
        if let Some(Some(ip)) = watched.remove(&cookie) {
            drop(watched);
            self.edge.end_handshake(ip);
        }
    }
}

#[async_trait::async_trait]
impl pingora::listeners::PreTlsProcess for Watchdog {
    async fn process(
        &self,
        stream: &mut pingora::protocols::l4::stream::Stream,
    ) -> pingora::Result<()> {
        use pingora::protocols::GetSocketDigest;
        use std::os::fd::AsRawFd;
        let fd = stream.as_raw_fd();
        let ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        // `watch` needs the Arc: the callback only has `&self`.
        let admitted = match WATCHDOG.get() {
            Some(me) => me.watch(fd, ip),
            None => true,
        };
        if !admitted {
            crate::metrics::metrics().reject(Rejection::IpConnections);
            return pingora::Error::e_explain(
                pingora::ErrorType::ConnectRefused,
                "too many connections from this address",
            );
        }
        Ok(())
    }
}

/// The process's watchdog (the pre-TLS callback gets `&self`, and the timer needs an `Arc`).
pub static WATCHDOG: std::sync::OnceLock<Arc<Watchdog>> = std::sync::OnceLock::new();

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(extra: &str) -> Arc<Edge> {
        let config = crate::config::parse(
            &format!("listen: [{{address: 127.0.0.1:1}}]\n{extra}"),
            "test",
            &|_| None,
        )
        .expect("config");
        Arc::new(Edge::new(&config))
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn an_address_over_its_connections_is_refused_until_one_closes() {
        let e = edge("limits: {max_connections_per_ip: 3}");
        let a = e.connection(ip(1)).expect("first");
        assert!(
            e.begin_handshake(ip(1)),
            "a handshake counts as a connection"
        );
        let b = e.connection(ip(1)).expect("third");
        let other = e.connection(ip(2)).expect("another address");
        assert!(!e.begin_handshake(ip(1)), "three already");
        assert!(e.connection(ip(1)).is_err(), "a fourth");
        e.end_handshake(ip(1));
        let c = e.connection(ip(1)).expect("the handshake is over");
        drop((a, b));
        assert!(e.begin_handshake(ip(1)));
        drop((c, other));
    }

    #[test]
    fn the_answer_to_a_connection_over_the_limit_is_whole_http() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).expect("text");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 429 "));
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(json["error"]["code"], 429);
    }

    #[test]
    fn an_address_gets_a_second_worth_of_requests_then_waits() {
        let e = edge("limits: {requests_per_ip_per_second: 5}");
        for _ in 0..5 {
            assert_eq!(e.request(ip(1)), Ok(()));
        }
        let limited = e.request(ip(1)).expect_err("over the burst");
        assert_eq!(limited.reason, Rejection::IpRate);
        assert_eq!(limited.retry_after_secs(), 1);
        assert_eq!(
            e.request(ip(2)),
            Ok(()),
            "another address has its own bucket"
        );
    }

    #[test]
    fn failed_authentications_close_the_address_for_the_rest_of_the_minute() {
        let e = edge("limits: {auth_failures_per_ip_per_minute: 3}");
        for _ in 0..3 {
            assert_eq!(e.request(ip(1)), Ok(()));
            e.auth_failed(ip(1));
        }
        let limited = e.request(ip(1)).expect_err("over");
        assert_eq!(limited.reason, Rejection::AuthFailures);
        assert!(limited.retry_after_secs() > 50, "{limited:?}");
        assert_eq!(e.request(ip(2)), Ok(()));
    }

    #[test]
    fn a_flood_of_addresses_is_tracked_in_bounded_memory() {
        let e = edge("limits: {requests_per_ip_per_second: 5}");
        for n in 0..(MAX_ADDRESSES as u32 * 2) {
            let _ = e.request(ip(n));
        }
        assert!(e.tracked() <= MAX_ADDRESSES, "{}", e.tracked());
    }

    #[test]
    fn an_endpoint_bucket_is_kept_across_a_reload_that_keeps_its_rate() {
        let e = edge("endpoints: [{path: /a, calls_per_second: 2}]");
        let before = e.endpoint("/a").expect("bucket");
        assert!(e.endpoint("/b").is_none());
        assert!(before.take().is_ok() && before.take().is_ok());
        assert_eq!(
            before.take().map_err(|l| l.reason),
            Err(Rejection::EndpointRate)
        );
        let config = crate::config::parse(
            "listen: [{address: 127.0.0.1:1}]\nendpoints: [{path: /a, calls_per_second: 2}]",
            "test",
            &|_| None,
        )
        .expect("config");
        e.apply(&config);
        let after = e.endpoint("/a").expect("bucket");
        assert!(Arc::ptr_eq(&before, &after));
    }

    #[test]
    fn the_client_address_behind_trusted_proxies_is_the_last_untrusted_one() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let peer: IpAddr = "10.1.1.1".parse().expect("ip");
        let outsider: IpAddr = "203.0.113.9".parse().expect("ip");
        assert_eq!(client_ip(&trusted, outsider, Some("1.2.3.4")), outsider);
        assert_eq!(client_ip(&trusted, peer, None), peer);
        assert_eq!(
            client_ip(&trusted, peer, Some("1.2.3.4, 203.0.113.9, 10.2.2.2")),
            outsider
        );
        assert_eq!(
            client_ip(&trusted, peer, Some("junk, 10.2.2.2")),
            "10.2.2.2".parse::<IpAddr>().expect("ip")
        );
    }
}
