//! The pool's life: backends joining (replacing the longest-connected one of a full pool) and
//! leaving (every way out goes through [`Endpoint::remove_backends`]), the grace after the last
//! one, and `$drain`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use super::state::{drain_reply, request_answer, BackendSlot, DrainRequest, Fallout, Owed};
use super::{BackendConn, BackendKey, CloseCell, Digest, Dropped, Endpoint, PublishError, Route};
use crate::duplex::Message;
use crate::mux::queue::{send_nowait, BackendTx, Push};
use crate::mux::{close, CloseReason};

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why backends leave the pool: how their connections are closed, what their pending calls
/// are failed with, and the log line.
pub(super) struct Leaving {
    /// The close code and reason for their connections (None: the connection already ended).
    pub(super) close: Option<CloseReason>,
    /// The `-32000` message their pending calls get.
    pub(super) why: &'static str,
    /// What the log says.
    pub(super) log: &'static str,
}

impl Endpoint {
    /// Adds a backend to the pool; when the pool already has `max_backends`, the
    /// longest-connected ones are replaced (closed with 1012). `fixed_secret`: the endpoint's
    /// secret comes from the config, so a publish may change it; otherwise a publish whose
    /// secret differs from the live backends' is refused. None if the endpoint was removed
    /// meanwhile.
    pub(in crate::mux) fn attach_backend(
        self: &Arc<Self>,
        secret: Digest,
        token: (&str, Digest),
        max_backends: usize,
        fixed_secret: bool,
    ) -> Option<Result<BackendConn, PublishError>> {
        let (token_name, token) = token;
        let limits = self.limits();
        let times = self.grace_and_hold();
        let mut s = self.state();
        if s.removed {
            return None;
        }
        if !fixed_secret && s.secret_conflicts(&secret, max_backends) {
            return Some(Err(PublishError::SecretConflict));
        }
        let over = (s.backends.len() + 1).saturating_sub(max_backends.max(1));
        let oldest: Vec<BackendKey> = s.backends.iter().take(over).map(|b| b.key).collect();
        let reason = CloseReason::new(close::SERVICE_RESTART, "replaced by a new backend");
        let (fallout, _) = s.remove_backends(&oldest, Some(&reason), "backend replaced", times);
        if !oldest.is_empty() {
            let pool = s.backends.len();
            tracing::info!(endpoint = %self.logged(), pool, "longest-connected backend replaced by a new publish");
        }
        let (tx, rx) = BackendTx::channel(limits.backend_queue_bytes);
        let close: CloseCell = Arc::new(OnceLock::new());
        let key = s.next_key;
        s.next_key += 1;
        s.secret = secret;
        s.grace_until = None;
        s.runtime = tokio::runtime::Handle::try_current().ok();
        s.backends.push(BackendSlot {
            key,
            since_ms: unix_ms(),
            tx,
            close: close.clone(),
            token_name: token_name.to_string(),
            token,
            calls: HashMap::new(),
            next_id: 1,
            pinned: 0,
            draining: false,
            drain_request: None,
        });
        s.pin_unpinned();
        if s.gauges.is_none() {
            s.gauges = Some(self.series.gauges());
        }
        s.update_gauges();
        let pool = s.backends.len();
        drop(s);
        tracing::info!(endpoint = %self.logged(), token = %token_name, pool, "backend joined the pool");
        self.settle(fallout);
        self.changed.notify_waiters();
        self.pool_changed();
        Some(Ok(BackendConn {
            endpoint: self.clone(),
            key,
            rx,
            close,
        }))
    }

    /// Takes the backends `pick` chooses (under the lock) out of the pool, the one way every
    /// backend leaves: their pending calls fail, their clients go to the backends left, or wait
    /// for the grace when none is. Returns the token names of the backends taken out.
    pub(super) fn remove_backends(
        self: &Arc<Self>,
        leaving: Leaving,
        pick: impl FnOnce(&super::State) -> Vec<BackendKey>,
    ) -> Vec<String> {
        let times = self.grace_and_hold();
        let mut s = self.state();
        if s.removed {
            return Vec::new();
        }
        let keys = pick(&s);
        let (fallout, removed) =
            s.remove_backends(&keys, leaving.close.as_ref(), leaving.why, times);
        let emptied = !removed.is_empty() && s.backends.is_empty();
        let pool = s.backends.len();
        drop(s);
        if !removed.is_empty() {
            tracing::info!(endpoint = %self.logged(), closed = removed.len(), pool, "{}", leaving.log);
            // Counted before the failed calls are answered: a client that calls again at once
            // must see that its place changed.
            self.pool_changed();
        }
        self.settle(fallout);
        if emptied {
            self.start_grace();
        }
        removed
    }

    /// Closes the backend `key` with `reason` (the cluster replaced it: its pool is full with a
    /// newer backend on another node). Returns whether it was live.
    pub fn close_backend(self: &Arc<Self>, key: u64, reason: CloseReason) -> bool {
        let leaving = Leaving {
            close: Some(reason),
            why: "backend replaced",
            log: "backend replaced by a newer one on another node",
        };
        !self.remove_backends(leaving, |_| vec![key]).is_empty()
    }

    /// Drains backend `key` as its own `$drain` would (no one is answered): returns the calls
    /// still running on it, or None when it is not in the pool.
    pub fn drain_backend(self: &Arc<Self>, key: BackendKey) -> Option<usize> {
        let running = self.state().slot(key)?.calls.len();
        let request = DrainRequest {
            id: None,
            ext: None,
        };
        self.start_drain(key, request);
        Some(running)
    }

    /// Closes backend `key` (1008, by an operator): its pending calls fail with `-32000`, its
    /// clients move to the rest of the pool. Returns whether it was in the pool.
    pub fn close_backend_by_operator(self: &Arc<Self>, key: BackendKey) -> bool {
        let leaving = Leaving {
            close: Some(CloseReason::new(close::POLICY, "closed by an operator")),
            why: "backend unavailable",
            log: "backend closed by the admin API",
        };
        !self.remove_backends(leaving, |_| vec![key]).is_empty()
    }

    /// Closes the backends whose token `revoked` says is no longer good (reload), or all of
    /// them (`revoked` always true: shutdown). Returns the names of the tokens of the backends
    /// closed.
    pub fn close_backends(
        self: &Arc<Self>,
        reason: CloseReason,
        revoked: impl Fn(&Digest) -> bool,
    ) -> Vec<String> {
        let leaving = Leaving {
            close: Some(reason),
            why: "backend unavailable",
            log: "backends closed",
        };
        self.remove_backends(leaving, |s| {
            s.backends
                .iter()
                .filter(|b| revoked(&b.token))
                .map(|b| b.key)
                .collect()
        })
    }

    /// Closes the longest-connected backends over `size` (reload: a smaller pool) with 1012.
    pub fn shrink_pool(self: &Arc<Self>, size: usize) -> usize {
        let leaving = Leaving {
            close: Some(CloseReason::new(
                close::SERVICE_RESTART,
                "pool made smaller by a reload",
            )),
            why: "backend unavailable",
            log: "pool made smaller",
        };
        self.remove_backends(leaving, |s| {
            let over = s.backends.len().saturating_sub(size.max(1));
            s.backends.iter().take(over).map(|b| b.key).collect()
        })
        .len()
    }

    /// The backend `key` has gone (its connection ended): take it out of the pool.
    pub(super) fn backend_left(self: &Arc<Self>, key: BackendKey) {
        let leaving = Leaving {
            close: None,
            why: "backend unavailable",
            log: "backend left",
        };
        self.remove_backends(leaving, |_| vec![key]);
    }

    /// Delivers what a change left to deliver, and counts the failovers.
    pub(super) fn settle(&self, fallout: Fallout) {
        for (route, tx, msg) in fallout.deliveries {
            self.deliver(&route, &tx, msg);
        }
        for owed in fallout.owed {
            owed.send();
        }
        self.series.failovers(fallout.failovers);
        for (method, started) in fallout.failed_calls {
            self.series.call_ended(
                &method,
                super::series::CallEnd::Error(crate::duplex::code::BACKEND_UNAVAILABLE),
                started.elapsed().as_secs_f64(),
            );
        }
    }

    /// Hands a frame to a client; a client whose queue is over its budget is not reading (fast
    /// enough) and is closed.
    pub(super) fn deliver(&self, route: &Route, tx: &crate::mux::queue::ClientTx, msg: Message) {
        match tx.push(msg) {
            Push::Sent => self.series.to_client.inc(),
            Push::Gone => self.dropped(Dropped::ClientGone),
            Push::Full => {
                self.dropped(Dropped::ClientQueueFull);
                let reason = CloseReason::new(
                    close::POLICY,
                    "client too slow: it did not read its messages",
                );
                self.remove_clients(Some(&reason), |_| [route.clone()]);
                tracing::info!(endpoint = %self.logged(), "closed a client that did not read");
            }
        }
    }

    /// The last backend is gone: clients wait `backend_grace` for one to come back, then the
    /// endpoint is removed.
    fn start_grace(self: &Arc<Self>) {
        let grace = self.limits().backend_grace;
        let mut s = self.state();
        if s.removed || !s.backends.is_empty() {
            return;
        }
        if s.gauges.take().is_some() {
            self.series.remove_gauges();
        }
        // `grace_until` was set as the last backend left (`State::remove_backends`).
        let generation = s.next_key;
        drop(s);
        tracing::info!(endpoint = %self.logged(), grace_ms = grace.as_millis() as u64, "last backend left: grace");
        let me = self.clone();
        let expire = async move {
            tokio::time::sleep(grace).await;
            me.grace_over(generation);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(expire);
            }
            Err(_) => self.grace_over(generation),
        }
    }

    /// The grace that began when backend keys had reached `generation` ran out: if no backend
    /// came back, remove the endpoint and close its clients with 1013.
    fn grace_over(self: &Arc<Self>, generation: BackendKey) {
        let mut s = self.state();
        if s.next_key != generation || !s.backends.is_empty() || s.removed {
            return;
        }
        s.removed = true;
        drop(s);
        let reason = CloseReason::new(close::TRY_AGAIN_LATER, "backend unavailable");
        let clients = self.remove_clients(Some(&reason), |s| {
            s.clients.keys().cloned().collect::<Vec<_>>()
        });
        tracing::info!(endpoint = %self.logged(), clients, "endpoint removed: backend did not come back");
        self.changed.notify_waiters();
        if let Some(registry) = self.registry.upgrade() {
            registry.remove(self);
            registry.note_pool_change();
        }
    }

    /// Backend `key` asked to drain: no new clients or calls; its clients go elsewhere for their
    /// next calls; `{"pending": 0}` once its last call ends, or `{"pending": N}` after
    /// `drain_timeout`.
    pub(super) fn start_drain(
        self: &Arc<Self>,
        key: BackendKey,
        request: DrainRequest,
    ) -> Option<Message> {
        let limits = self.limits();
        let (_, hold) = self.grace_and_hold();
        let mut s = self.state();
        let slot = s.slot_mut(key)?;
        let first = !slot.draining;
        slot.draining = true;
        let pending = slot.calls.len();
        // Nothing running: answered at once. Else kept (when it has an id) for the answer; a
        // drain asked for again gets the earlier request answered now, with what is running.
        let (immediate, earlier) = if pending == 0 {
            (Some(request), None)
        } else if request.id.is_some() {
            let earlier = slot
                .drain_request
                .replace(request)
                .map(|req| Owed::Local(slot.tx.clone(), vec![drain_reply(&req, pending)]));
            (None, earlier)
        } else {
            (None, None)
        };
        s.repin_clients_of(key);
        s.hold_new_calls_if_none_serve(hold);
        let pool = s.backends.len();
        drop(s);
        if first {
            self.pool_changed();
        }
        if let Some(owed) = earlier {
            owed.send();
        }
        if let Some(request) = immediate {
            tracing::info!(endpoint = %self.logged(), pending = 0, pool, "backend drained");
            // Answered only when it has an id: a request without one expects no reply.
            return request_answer(&request);
        }
        tracing::info!(endpoint = %self.logged(), pending, pool, "backend draining");
        if !first {
            return None;
        }
        let me = self.clone();
        let timeout = limits.drain_timeout;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(timeout).await;
                let mut s = me.state();
                let Some(slot) = s.slot_mut(key) else { return };
                let Some(request) = slot.drain_request.take() else {
                    return;
                };
                let answer = drain_reply(&request, slot.calls.len());
                let tx = slot.tx.clone();
                drop(s);
                send_nowait(&tx, vec![answer]);
            });
        }
        None
    }
}
