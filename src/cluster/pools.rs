//! Pools across nodes: this node's announcement of its endpoints, a pool counted over the whole
//! cluster (the newest `max_backends` stay), and the HTTP series of endpoints served elsewhere.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use bytes::BytesMut;
use tokio::time::Instant;

use super::wire::{self, Announced, Envelope, Heartbeat, Op};
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

    /// This node's endpoints as it announces them.
    fn current_table(&self) -> HashMap<String, Announced> {
        let mut current = HashMap::new();
        for endpoint in self.registry.endpoints() {
            // A path the others would refuse is served by this node only.
            if endpoint.path().len() > wire::MAX_PATH_BYTES {
                continue;
            }
            if let Some(pool) = endpoint.snapshot() {
                current.insert(
                    endpoint.path().to_string(),
                    Announced {
                        path: endpoint.path().to_string(),
                        secret: pool.secret.to_hex(),
                        backends: pool.backends,
                    },
                );
            }
        }
        current
    }

    /// The most bytes of endpoints one message carries: half the server's `max_payload` (the
    /// rest is room for the envelope), 512 KiB at most.
    pub(super) fn page_bytes(&self) -> usize {
        let max_payload = self.max_payload.load(Ordering::SeqCst);
        let max_payload = if max_payload == 0 {
            1 << 20
        } else {
            max_payload
        };
        (max_payload / 2).clamp(4096, 512 << 10)
    }

    /// Sends this node's endpoint table to `to`, which asked for it, in pages that each fit a
    /// message (at most one answer per node and half second).
    pub(super) fn send_table(&self, to: &str) {
        if !lock(&self.nodes).contains_key(to) {
            return;
        }
        {
            let now = Instant::now();
            let mut answered = lock(&self.tables_sent);
            if answered
                .get(to)
                .is_some_and(|at| now.duration_since(*at) < Duration::from_millis(500))
            {
                return;
            }
            answered.retain(|_, at| now.duration_since(*at) < Duration::from_secs(5));
            answered.insert(Arc::from(to), now);
        }
        let (version, pages) = lock(&self.table).pages(self.page_bytes());
        let count = u32::try_from(pages.len()).unwrap_or(u32::MAX);
        let subject = self.subject_of(to);
        for (index, page) in pages.into_iter().enumerate() {
            let Ok(body) = serde_json::to_vec(&page) else {
                return;
            };
            let message = Envelope {
                op: Op::TablePage {
                    version,
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    count,
                },
                session: 0,
                from: &self.me,
                body: &body,
            };
            if !self.post(subject.clone(), message.encode()) {
                // The outbox is full: the node asks again.
                return;
            }
        }
    }

    /// Closes this node's backends that a pool counted over the whole cluster has no room for:
    /// of all the backends of a path, the newest `max_backends` stay (ties by node and key, so
    /// every node comes to the same answer), the others are closed by their own node with 1012.
    /// Two publishes on two nodes within one heartbeat both succeed; this settles it.
    pub(super) fn enforce_pool_sizes(&self) {
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
        for endpoint in self.registry.endpoints() {
            let Some(pool) = endpoint.snapshot() else {
                continue;
            };
            if pool.backends.is_empty() {
                continue;
            }
            let path = endpoint.path();
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

/// This node's endpoint table as last announced.
#[derive(Default)]
pub(super) struct Table {
    entries: HashMap<String, Announced>,
    version: u64,
    digest: u64,
}

impl Table {
    /// Its state, as a heartbeat without a delta says it.
    fn state(&self) -> Heartbeat {
        Heartbeat {
            version: self.version,
            count: self.entries.len() as u64,
            digest: self.digest,
            ..Heartbeat::default()
        }
    }

    /// Moves the table to `current`: the changes, as deltas of at most `budget` bytes of
    /// endpoints each, one version each. Nothing when nothing changed.
    fn advance(
        &mut self,
        mut current: HashMap<String, Announced>,
        budget: usize,
    ) -> Vec<Heartbeat> {
        let removed: Vec<String> = self
            .entries
            .keys()
            .filter(|path| !current.contains_key(*path))
            .cloned()
            .collect();
        let mut changed: Vec<Announced> = current
            .drain()
            .filter(|(path, a)| self.entries.get(path) != Some(a))
            .map(|(_, a)| a)
            .collect();
        changed.sort_by(|a, b| a.path.cmp(&b.path));
        let mut beats = Vec::new();
        let mut removed = removed.into_iter().peekable();
        let mut changed = changed.into_iter().peekable();
        while removed.peek().is_some() || changed.peek().is_some() {
            let from = self.version;
            let mut size = 0;
            let mut delta = Heartbeat::default();
            while size < budget {
                if let Some(path) = removed.next() {
                    size += path.len() + 4;
                    if let Some(gone) = self.entries.remove(&path) {
                        self.digest ^= gone.digest();
                    }
                    delta.removed.push(path);
                } else if let Some(a) = changed.peek() {
                    if size > 0 && size + a.approx_len() > budget {
                        break;
                    }
                    let Some(a) = changed.next() else { break };
                    size += a.approx_len();
                    self.digest ^= a.digest();
                    if let Some(before) = self.entries.insert(a.path.clone(), a.clone()) {
                        self.digest ^= before.digest();
                    }
                    delta.endpoints.push(a);
                } else {
                    break;
                }
            }
            self.version += 1;
            delta.from = Some(from);
            delta.version = self.version;
            delta.count = self.entries.len() as u64;
            delta.digest = self.digest;
            beats.push(delta);
        }
        beats
    }

    /// The whole table in pages of at most `budget` bytes of endpoints, with its version.
    fn pages(&self, budget: usize) -> (u64, Vec<Vec<Announced>>) {
        let mut pages: Vec<Vec<Announced>> = vec![Vec::new()];
        let mut size = 0;
        let mut entries: Vec<&Announced> = self.entries.values().collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        for a in entries {
            if size > 0 && size + a.approx_len() > budget {
                pages.push(Vec::new());
                size = 0;
            }
            size += a.approx_len();
            if let Some(page) = pages.last_mut() {
                page.push(a.clone());
            }
        }
        (self.version, pages)
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

    fn announced(path: &str, backends: usize) -> Announced {
        Announced {
            path: path.to_string(),
            secret: "ab".repeat(32),
            backends: (0..backends as u64).map(|k| (k, 1000 + k, false)).collect(),
        }
    }

    /// What a node hearing `beats` in order ends up with: its entries and their digest.
    fn follow(view: &mut HashMap<String, Announced>, beats: &[Heartbeat]) -> u64 {
        for beat in beats {
            for gone in &beat.removed {
                view.remove(gone);
            }
            for a in &beat.endpoints {
                view.insert(a.path.clone(), a.clone());
            }
        }
        view.values().fold(0, |d, a| d ^ a.digest())
    }

    #[test]
    fn changes_go_as_small_chained_deltas_and_the_digest_follows_them() {
        let mut table = Table::default();
        let first: HashMap<String, Announced> = (0..500)
            .map(|i| {
                let a = announced(&format!("/e{i:03}{}", "x".repeat(200)), 2);
                (a.path.clone(), a)
            })
            .collect();
        let beats = table.advance(first.clone(), 8192);
        assert!(
            beats.len() > 10,
            "500 endpoints of ~400 bytes in 8 KiB deltas"
        );
        for (i, beat) in beats.iter().enumerate() {
            assert_eq!(beat.from, Some(i as u64));
            assert_eq!(beat.version, i as u64 + 1);
            let bytes: usize = beat.endpoints.iter().map(Announced::approx_len).sum();
            assert!(bytes <= 8192, "{bytes}");
        }
        let mut view = HashMap::new();
        assert_eq!(follow(&mut view, &beats), table.state().digest);
        assert_eq!(view.len(), 500);
        // Nothing changed: nothing to send.
        assert!(table.advance(first.clone(), 8192).is_empty());
        // One endpoint changes, one goes.
        let mut next = first;
        next.remove(&format!("/e000{}", "x".repeat(200)));
        let changed = announced(&format!("/e001{}", "x".repeat(200)), 3);
        next.insert(changed.path.clone(), changed);
        let beats = table.advance(next, 8192);
        assert_eq!(beats.len(), 1);
        assert_eq!((beats[0].removed.len(), beats[0].endpoints.len()), (1, 1));
        assert_eq!(follow(&mut view, &beats), table.state().digest);
        assert_eq!(table.state().count, 499);
        // The pages hold the same table.
        let (version, pages) = table.pages(8192);
        assert_eq!(version, table.state().version);
        let paged: u64 = pages.iter().flatten().fold(0, |d, a| d ^ a.digest());
        assert_eq!(paged, table.state().digest);
        assert_eq!(pages.iter().map(Vec::len).sum::<usize>(), 499);
    }

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
