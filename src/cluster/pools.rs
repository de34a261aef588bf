//! Pools across nodes: this node's announcement of its endpoints, a pool counted over the whole
//! cluster (the newest `max_backends` stay), and the HTTP series of endpoints served elsewhere.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use bytes::BytesMut;

use super::wire::{self, Announced, Heartbeat};
use super::{lock, unix_ms, Cluster};
use crate::metrics::metrics;
use crate::mux;

impl Cluster {
    /// Announces this node's endpoints (or that it leaves).
    pub(super) async fn announce(&self) {
        if !self.usable() {
            return;
        }
        let leaving = self.leaving.load(Ordering::SeqCst);
        let mut endpoints = Vec::new();
        if !leaving {
            for endpoint in self.registry.endpoints() {
                // A path the others would refuse is served by this node only.
                if endpoint.path().len() > wire::MAX_PATH_BYTES {
                    continue;
                }
                if let Some(pool) = endpoint.snapshot() {
                    endpoints.push(Announced {
                        path: endpoint.path().to_string(),
                        secret: pool.secret.to_hex(),
                        backends: pool.backends,
                    });
                }
            }
        }
        let beat = Heartbeat {
            node: self.me.to_string(),
            leaving,
            epoch: self.epoch.load(Ordering::SeqCst),
            sent: unix_ms(),
            endpoints,
        };
        match serde_json::to_vec(&beat) {
            Ok(body) => {
                let max_payload = self.max_payload.load(Ordering::SeqCst);
                if max_payload > 0 && body.len() > max_payload {
                    // The others would take this node for dead: say why, loudly.
                    tracing::error!(
                        bytes = body.len(),
                        max_payload,
                        "cluster: this node's heartbeat (all its endpoints) does not fit the NATS server's max_payload"
                    );
                }
                self.publish(
                    Subject::from(self.heartbeat_subject()),
                    BytesMut::from(&body[..]),
                )
                .await;
            }
            Err(e) => tracing::error!("cluster: cannot encode a heartbeat: {e}"),
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
            let mut all: Vec<(u64, Arc<str>, u64)> = pool
                .backends
                .iter()
                .map(|(key, since, _)| (*since, self.me.clone(), *key))
                .collect();
            for (name, node) in lock(&self.nodes).iter() {
                if let Some(remote) = node.endpoints.get(path) {
                    all.extend(
                        remote
                            .backends
                            .iter()
                            .map(|(k, s, _)| (*s, name.clone(), *k)),
                    );
                }
            }
            let max = self.limits.max_backends(path).max(1);
            if all.len() <= max {
                continue;
            }
            all.sort();
            let over = all.len() - max;
            for (_, node, key) in all.into_iter().take(over) {
                if node == self.me {
                    endpoint.close_backend(
                        key,
                        mux::CloseReason::new(
                            mux::close::SERVICE_RESTART,
                            "replaced by a new backend",
                        ),
                    );
                }
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
