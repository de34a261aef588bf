//! Abuse controls at the edge: what one client address, or one endpoint, may take of the
//! gateway.
//!
//! - **Connections per address** (`limits.max_connections_per_ip`): counted from the accept to
//!   the close; a connection over the limit is remembered by its socket cookie, and its first
//!   request gets 429 (`ip_connections`) and the connection is closed.
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

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Cookies of the connections over `max_connections_per_ip` (their first request is
    /// refused), and how many there are (so the common case looks at no lock).
    over: Mutex<HashSet<u64>>,
    over_count: AtomicUsize,
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
            over: Mutex::new(HashSet::new()),
            over_count: AtomicUsize::new(0),
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
            bucket: None,
            failures: None,
        });
        f(address)
    }

    /// A connection from `ip` opened (its socket's cookie is `cookie`). The guard counts it
    /// until it is dropped; a connection over the limit has its first request refused.
    pub fn connection(self: &Arc<Self>, ip: IpAddr, cookie: Option<u64>) -> ConnectionGuard {
        let limits = self.limits.load();
        let count = self.with_address(ip, |a| {
            a.connections += 1;
            a.connections
        });
        if let (Some(max), Some(cookie)) = (limits.max_connections, cookie) {
            if count > max {
                lock(&self.over).insert(cookie);
                self.over_count.fetch_add(1, Ordering::Relaxed);
            }
        }
        ConnectionGuard {
            edge: self.clone(),
            ip,
            cookie,
        }
    }

    /// Whether some connection is over `max_connections_per_ip` now.
    pub fn any_over(&self) -> bool {
        self.over_count.load(Ordering::Relaxed) > 0
    }

    /// Whether the connection with `cookie` is over `max_connections_per_ip` (then its request
    /// is refused and it is closed).
    pub fn over_connections(&self, cookie: Option<u64>) -> Option<Limited> {
        if self.over_count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let cookie = cookie?;
        lock(&self.over).contains(&cookie).then_some(Limited {
            reason: Rejection::IpConnections,
            retry_after: Duration::from_secs(1),
        })
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
    cookie: Option<u64>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut shard = self.edge.shard(&self.ip);
        if let Some(a) = shard.peek_mut(&self.ip) {
            a.connections = a.connections.saturating_sub(1);
        }
        drop(shard);
        if let Some(cookie) = self.cookie {
            if self.edge.over_count.load(Ordering::Relaxed) > 0
                && lock(&self.edge.over).remove(&cookie)
            {
                self.edge.over_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

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
/// bound on the TLS handshake is 60 s, and HTTP/2 has none.
pub struct Watchdog {
    /// Connections being watched, by socket cookie.
    watched: Mutex<HashMap<u64, ()>>,
    timeout: Arc<dyn Fn() -> Duration + Send + Sync>,
}

impl Watchdog {
    /// A watchdog with the header timeout `timeout()` gives (read at each accept).
    pub fn new(timeout: Arc<dyn Fn() -> Duration + Send + Sync>) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            watched: Mutex::new(HashMap::new()),
            timeout,
        })
    }

    /// Starts watching the connection on `fd`.
    pub fn watch(self: &Arc<Self>, fd: std::os::fd::RawFd) {
        let Some(cookie) = socket_cookie(fd) else {
            return;
        };
        lock(&self.watched).insert(cookie, ());
        let me = self.clone();
        let deadline = Instant::now() + (self.timeout)();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if lock(&me.watched).remove(&cookie).is_none() {
                return;
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
    }

    /// The connection with `cookie` sent its first request's headers.
    pub fn arrived(&self, cookie: u64) {
        let mut watched = lock(&self.watched);
        if !watched.is_empty() {
            watched.remove(&cookie);
        }
    }
}

#[async_trait::async_trait]
impl pingora::listeners::PreTlsProcess for Watchdog {
    async fn process(
        &self,
        stream: &mut pingora::protocols::l4::stream::Stream,
    ) -> pingora::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = stream.as_raw_fd();
        // `watch` needs the Arc: the callback holds it, so take it again from the registry.
        if let Some(me) = WATCHDOG.get() {
            me.watch(fd);
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
        let e = edge("limits: {max_connections_per_ip: 2}");
        let a = e.connection(ip(1), Some(1));
        let b = e.connection(ip(1), Some(2));
        let other = e.connection(ip(2), Some(3));
        assert_eq!(e.over_connections(Some(1)), None);
        let c = e.connection(ip(1), Some(4));
        assert_eq!(
            e.over_connections(Some(4)).map(|l| l.reason),
            Some(Rejection::IpConnections)
        );
        assert_eq!(e.over_connections(Some(3)), None);
        drop((a, c));
        let d = e.connection(ip(1), Some(5));
        assert_eq!(e.over_connections(Some(5)), None);
        drop((b, d, other));
        assert_eq!(e.over_count.load(Ordering::Relaxed), 0);
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
