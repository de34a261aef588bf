//! Reconnecting without storms: a [`Persistent`] peer opens its connection again after it is
//! lost, waiting an exponential backoff with full jitter ([`Backoff`]) between attempts, at
//! least what a `Retry-After` of the gateway asked for, and never again after a refusal that
//! says not to: close code 1008 (policy), 1012 (a backend replaced by a newer one: coming back
//! would replace it in turn), an upgrade answered 401 or 403. A 404 is tried again: after a
//! gateway restart a client may come back before its backend has published again. Calls made
//! while it is disconnected fail at once with [`PeerError::NotConnected`]: nothing is
//! buffered.
//!
//! A backend built this way publishes again after each reconnect (its handlers are the
//! builder's). Full jitter spreads thousands of peers that lost the same gateway over the whole
//! backoff window, so they do not all come back in the same instant.
//!
//! ```no_run
//! # async fn demo() -> Result<(), duplex::PeerError> {
//! use duplex::{Backoff, Peer};
//! use serde_json::json;
//! let client = Peer::builder()
//!     .connect_persistent("ws://127.0.0.1:8080/demo?secret=S", Backoff::default());
//! client.connected().await?;
//! let answer = client.call("echo", json!("hi")).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use crate::peer::{Peer, PeerBuilder, PeerError};

/// Exponential backoff with full jitter: before attempt `n` (counted from 0 after the first
/// loss) a peer waits a random time between zero and `min(max, initial * 2^n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first window (default 0.5 s).
    pub initial: Duration,
    /// The largest window (default 30 s).
    pub max: Duration,
    /// Wait a random part of each window (default); without it every peer waits the whole
    /// window, and peers that lost the same gateway all come back at the same instants (the
    /// load tool's `reconnect_storm` measures the difference).
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl Backoff {
    /// The window of attempt `attempt`: `min(max, initial * 2^attempt)`.
    pub fn window(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// How long to wait before attempt `attempt`: a random time within its window (`fraction`
    /// in `[0, 1)` picks where), and at least `retry_after` when the gateway asked for it.
    pub fn delay(&self, attempt: u32, fraction: f64, retry_after: Option<Duration>) -> Duration {
        let jittered = self.window(attempt).mul_f64(fraction.clamp(0.0, 1.0));
        match retry_after {
            Some(asked) => jittered.max(asked),
            None => jittered,
        }
    }
}

/// Whether connecting again may succeed after `error`: not after an upgrade refused with 401
/// or 403 (credentials the gateway refuses), nor a close with 1008 (policy) or 1012 (a backend
/// replaced by a newer one).
pub fn retryable(error: &PeerError) -> bool {
    match error {
        PeerError::Refused { status, .. } => !matches!(status, 401 | 403),
        PeerError::Closed(code) => !matches!(code, Some(1008 | 1012)),
        _ => true,
    }
}

/// A connection that lived this long starts the backoff over when it is lost.
const STABLE: Duration = Duration::from_secs(10);

/// The longest `Retry-After` honoured (a gateway asking for more is waited for this long).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Where a persistent peer stands.
#[derive(Clone)]
enum State {
    /// Connecting (again); the error of the last attempt, if any.
    Connecting,
    /// Connected.
    Up(Peer),
    /// It gave up for good (see [`retryable`]).
    Stopped(PeerError),
}

/// A peer that reconnects (see the module's documentation). Dropping it closes the connection
/// and stops reconnecting.
pub struct Persistent {
    state: watch::Receiver<State>,
    task: tokio::task::JoinHandle<()>,
    attempts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl PeerBuilder {
    /// Connects to `url` and keeps connecting again after the connection is lost, waiting as
    /// `backoff` says between attempts. Must be called within a Tokio runtime.
    pub fn connect_persistent(self, url: &str, backoff: Backoff) -> Persistent {
        let (tx, rx) = watch::channel(State::Connecting);
        let url = url.to_string();
        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = attempts.clone();
        let task = tokio::spawn(async move {
            let mut attempt: u32 = 0;
            loop {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let error = match self.clone().connect(&url).await {
                    Ok(peer) => {
                        let _ = tx.send(State::Up(peer.clone()));
                        let up = tokio::time::Instant::now();
                        let code = peer.closed().await;
                        let _ = tx.send(State::Connecting);
                        // Only a connection that held a while starts the backoff over: one
                        // the gateway drops at once keeps backing off.
                        if up.elapsed() >= STABLE {
                            attempt = 0;
                        }
                        PeerError::Closed(code)
                    }
                    Err(e) => e,
                };
                if !retryable(&error) {
                    let _ = tx.send(State::Stopped(error));
                    return;
                }
                let retry_after = match &error {
                    PeerError::Refused { retry_after, .. } => {
                        retry_after.map(|r| r.min(MAX_RETRY_AFTER))
                    }
                    _ => None,
                };
                let fraction = if backoff.jitter { rand_fraction() } else { 1.0 };
                let delay = backoff.delay(attempt, fraction, retry_after);
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(delay).await;
            }
        });
        Persistent {
            state: rx,
            task,
            attempts,
        }
    }
}

impl Persistent {
    /// The connection, when it is up.
    pub fn peer(&self) -> Result<Peer, PeerError> {
        match &*self.state.borrow() {
            State::Up(peer) if !peer.is_closed() => Ok(peer.clone()),
            State::Stopped(e) => Err(e.clone()),
            _ => Err(PeerError::NotConnected),
        }
    }

    /// Waits until the connection is up; Err once the peer gave up for good.
    pub async fn connected(&self) -> Result<(), PeerError> {
        let mut state = self.state.clone();
        loop {
            match &*state.borrow_and_update() {
                State::Up(peer) if !peer.is_closed() => return Ok(()),
                State::Stopped(e) => return Err(e.clone()),
                _ => {}
            }
            if state.changed().await.is_err() {
                return Err(PeerError::NotConnected);
            }
        }
    }

    /// Calls `method` on the connection that is up; fails at once with
    /// [`PeerError::NotConnected`] while there is none.
    pub async fn call(&self, method: &str, payload: Value) -> Result<Value, PeerError> {
        self.peer()?.call(method, payload).await
    }

    /// How many connections it has tried to open so far (the first one included).
    pub fn attempts(&self) -> u64 {
        self.attempts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why it stopped reconnecting, once it has.
    pub fn stopped(&self) -> Option<PeerError> {
        match &*self.state.borrow() {
            State::Stopped(e) => Some(e.clone()),
            _ => None,
        }
    }
}

impl Drop for Persistent {
    fn drop(&mut self) {
        self.task.abort();
        if let State::Up(peer) = &*self.state.borrow() {
            peer.close();
        }
    }
}

/// A uniform fraction in `[0, 1)` (the jitter), from the process's hasher keys and the clock:
/// no random-number crate is needed for spreading reconnects.
fn rand_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_double_from_half_a_second_up_to_thirty() {
        let b = Backoff::default();
        assert_eq!(b.window(0), Duration::from_millis(500));
        assert_eq!(b.window(1), Duration::from_secs(1));
        assert_eq!(b.window(5), Duration::from_secs(16));
        assert_eq!(b.window(6), Duration::from_secs(30));
        assert_eq!(b.window(1000), Duration::from_secs(30));
    }

    #[test]
    fn delays_are_spread_over_the_window_and_honour_retry_after() {
        let b = Backoff::default();
        let delays: Vec<Duration> = (0..1000)
            .map(|_| b.delay(6, rand_fraction(), None))
            .collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(30)));
        let low = delays
            .iter()
            .filter(|d| **d < Duration::from_secs(10))
            .count();
        let high = delays
            .iter()
            .filter(|d| **d > Duration::from_secs(20))
            .count();
        assert!(
            low > 200 && high > 200,
            "{low} low, {high} high: not spread"
        );
        assert_eq!(
            b.delay(0, 0.0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            b.delay(0, 0.999, None),
            Duration::from_millis(500).mul_f64(0.999)
        );
    }

    #[test]
    fn policy_refusals_and_1008_are_final() {
        for status in [401, 403] {
            let e = PeerError::Refused {
                status,
                body: String::new(),
                retry_after: None,
            };
            assert!(!retryable(&e), "{status}");
        }
        for status in [404, 429, 503] {
            let e = PeerError::Refused {
                status,
                body: String::new(),
                retry_after: Some(Duration::from_secs(1)),
            };
            assert!(retryable(&e), "{status}");
        }
        assert!(!retryable(&PeerError::Closed(Some(1008))));
        assert!(!retryable(&PeerError::Closed(Some(1012))));
        assert!(retryable(&PeerError::Closed(Some(1001))));
        assert!(retryable(&PeerError::Connect("refused".into())));
    }
}
