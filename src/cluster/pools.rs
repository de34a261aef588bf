//! Pools across nodes: this node's announcement of its endpoints, a pool counted over the whole
//! cluster (the newest `max_backends` stay), and the HTTP series of endpoints served elsewhere.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use bytes::BytesMut;

use super::{lock, unix_ms, Cluster};
use crate::auth::Digest;
use crate::metrics::{metrics, Rejection};
use crate::mux;

impl Cluster {
    /// Announces this node's endpoint table (or that it leaves): its changes since the last
    /// announcement as deltas, each fitting a message, then its state (version, size, digest).
    pub(super) async fn announce(&self) {
        if !self.usable() {
            return;
        }
        let leaving = self.leaving.load(Ordering::SeqCst);
        let mut beats = Vec::new();
        if !leaving {
            let current = self.current_table();
            let budget = self.page_bytes();
            let mut table = lock(&self.table);
            beats = table.advance(current, budget);
            if beats.is_empty() {
                beats.push(table.state());
            }
            drop(table);
            // This node's pools that changed: settled against the other nodes' backends.
            self.enforce_pool_sizes(
                beats
                    .iter()
                    .flat_map(|b| b.endpoints.iter().map(|a| a.path.as_str())),
            );
        } else {
            beats.push(lock(&self.table).state());
        }
        let mut all_sent = true;
        for mut beat in beats {
            beat.node = self.me.to_string();
            beat.leaving = leaving;
            beat.epoch = self.epoch.load(Ordering::SeqCst);
            beat.sent = unix_ms();
            let Ok(body) = serde_json::to_vec(&beat) else {
                continue;
            };
            let max_payload = self.max_payload.load(Ordering::SeqCst);
            let fits = max_payload == 0 || body.len() <= max_payload;
            all_sent &= fits
                && self
                    .publish(
                        Subject::from(self.heartbeat_subject()),
                        BytesMut::from(&body[..]),
                    )
                    .await;
        }
        if self.heartbeats_out.swap(all_sent, Ordering::SeqCst) != all_sent {
            if all_sent {
                tracing::info!("cluster: this node's heartbeats go out again");
            } else {
                // The others cannot follow this node's table: say so, loudly, once.
                tracing::error!(
                    "cluster: this node's heartbeats do not go out: the other nodes cannot hear it"
                );
            }
            self.update_gauges();
        }
    }

    /// Closes this node's backends that a pool counted over the whole cluster has no room for:
    /// of all the backends of a path, the newest `max_backends` stay (ties by node and key, so
    /// every node comes to the same answer), the others are closed by their own node with 1012.
    /// Two publishes on two nodes within one heartbeat both succeed; this settles it.
    ///
    /// Only `paths` are looked at: the ones a change concerns (a delta heard or announced, a
    /// table fetched), never every endpoint on every message (with tens of thousands of
    /// endpoints that alone kept a node too busy to hear the others).
    pub(super) fn enforce_pool_sizes<'a>(&self, paths: impl IntoIterator<Item = &'a str>) {
        if !self.usable() {
            return;
        }
        // Backends of nodes that no longer announce their endpoint: their calls are forgotten
        // (keys restart when an endpoint is made again, so an old key must not reach a new
        // backend).
        self.forget_guests(Duration::from_secs(3), |(path, node, _)| {
            lock(&self.nodes)
                .get(node)
                .is_none_or(|n| !n.endpoints.contains_key(path))
        });
        for path in paths {
            let Some(endpoint) = self.registry.lookup(path) else {
                continue;
            };
            let Some(pool) = endpoint.snapshot() else {
                continue;
            };
            if pool.backends.is_empty() {
                continue;
            }
            let mut all: Vec<Member> = pool
                .backends
                .iter()
                .map(|(key, since, _)| Member {
                    since: *since,
                    node: self.me.clone(),
                    key: *key,
                    secret: pool.secret,
                })
                .collect();
            for (name, node) in lock(&self.nodes).iter() {
                if let Some(remote) = node.endpoints.get(path) {
                    all.extend(remote.backends.iter().map(|(key, since, _)| Member {
                        since: *since,
                        node: name.clone(),
                        key: *key,
                        secret: remote.secret,
                    }));
                }
            }
            let max = self.limits.max_backends(path).max(1);
            for (key, verdict) in settle(all, max, &self.me) {
                let reason = match verdict {
                    Verdict::Replaced => mux::CloseReason::new(
                        mux::close::SERVICE_RESTART,
                        "replaced by a new backend",
                    ),
                    Verdict::OtherSecret => {
                        metrics().reject(Rejection::SecretConflict);
                        tracing::info!(endpoint = %crate::auth::logged(path), "backend closed: the pool's first backend (on another node) uses another secret");
                        mux::CloseReason::new(
                            mux::close::POLICY,
                            "the endpoint's live backends use another secret",
                        )
                    }
                };
                endpoint.close_backend(key, reason);
            }
        }
    }

    /// Counts an HTTP call this node answered for an endpoint served by another node.
    pub fn count_http_call(&self, path: &str, status: &'static str, seconds: f64) {
        let m = metrics();
        let mut series = lock(&self.http_series);
        let codes = series.entry(path.to_string()).or_default();
        if !codes.contains(&status) {
            codes.push(status);
        }
        m.http_requests.with_label_values(&[path, status]).inc();
        m.http_duration.with_label_values(&[path]).observe(seconds);
    }

    /// Removes the HTTP call series of endpoints no node has any more (and this one has none
    /// of its own, whose series are its own business).
    pub(super) fn remove_gone_series(&self) {
        let gone: Vec<(String, Vec<&'static str>)> = {
            let nodes = lock(&self.nodes);
            let mut series = lock(&self.http_series);
            let paths: Vec<String> = series
                .keys()
                .filter(|p| !nodes.values().any(|n| n.endpoints.contains_key(*p)))
                .cloned()
                .collect();
            paths
                .into_iter()
                .filter_map(|p| series.remove_entry(&p))
                .collect()
        };
        let m = metrics();
        for (path, codes) in gone {
            if self.registry.lookup(&path).is_some() {
                continue;
            }
            for code in codes {
                let _ = m.http_requests.remove_label_values(&[&path, code]);
            }
            let _ = m.http_duration.remove_label_values(&[&path]);
        }
    }
}

/// One backend of a pool counted over the cluster.
#[derive(Debug, Clone)]
struct Member {
    /// When it joined (Unix ms).
    since: u64,
    node: Arc<str>,
    key: u64,
    /// The digest of the secret its endpoint wants.
    secret: Digest,
}

/// Why a backend of this node has to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The pool over the cluster is over `max_backends`: the longest-connected go (1012).
    Replaced,
    /// The pool's staying backends use two secrets: the first to join wins (ties: the lower
    /// node name), the others go (1008).
    OtherSecret,
}

/// The backends of node `me` that have to go, and why, so that every node comes to the same
/// answer from the same announcements: of all the backends of a path, the newest `max` stay;
/// of those, the ones whose secret is not that of the first to join go too.
fn settle(mut all: Vec<Member>, max: usize, me: &str) -> Vec<(u64, Verdict)> {
    all.sort_by(|a, b| (a.since, &a.node, a.key).cmp(&(b.since, &b.node, b.key)));
    let over = all.len().saturating_sub(max.max(1));
    let mut out: Vec<(u64, Verdict)> = all[..over]
        .iter()
        .filter(|m| &*m.node == me)
        .map(|m| (m.key, Verdict::Replaced))
        .collect();
    let staying = &all[over..];
    if let Some(first) = staying.first() {
        out.extend(
            staying
                .iter()
                .filter(|m| &*m.node == me && !m.secret.matches(&first.secret))
                .map(|m| (m.key, Verdict::OtherSecret)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(since: u64, node: &str, key: u64, secret: &[u8]) -> Member {
        Member {
            since,
            node: Arc::from(node),
            key,
            secret: Digest::of(secret),
        }
    }

    #[test]
    fn the_newest_stay_and_of_those_the_first_ones_secret_wins() {
        // A pool of 2 over the cluster: the oldest of three goes wherever it is.
        let three = vec![
            member(10, "a", 1, b"s"),
            member(20, "b", 1, b"s"),
            member(30, "a", 2, b"s"),
        ];
        assert_eq!(settle(three.clone(), 2, "a"), vec![(1, Verdict::Replaced)]);
        assert_eq!(settle(three, 2, "b"), vec![]);
        // Two secrets among the staying: the first to join keeps its secret.
        let mixed = vec![member(10, "a", 1, b"s1"), member(11, "b", 7, b"s2")];
        assert_eq!(settle(mixed.clone(), 4, "a"), vec![]);
        assert_eq!(settle(mixed, 4, "b"), vec![(7, Verdict::OtherSecret)]);
        // Joined in the same millisecond: the lower node name wins.
        let tie = vec![member(10, "b", 1, b"s1"), member(10, "a", 1, b"s2")];
        assert_eq!(settle(tie.clone(), 4, "b"), vec![(1, Verdict::OtherSecret)]);
        assert_eq!(settle(tie, 4, "a"), vec![]);
        // A pool of one replaced by a newer backend with a new secret: the new one stays.
        let renewed = vec![member(10, "a", 1, b"old"), member(20, "b", 1, b"new")];
        assert_eq!(
            settle(renewed.clone(), 1, "a"),
            vec![(1, Verdict::Replaced)]
        );
        assert_eq!(settle(renewed, 1, "b"), vec![]);
    }
}
