//! Endpoint tables across nodes: this node's table as it announces it (a version, deltas that
//! each fit a message, pages for a node that asks) and its views of the others' (deltas applied
//! in order, a table fetched in pages when a view does not agree with a heartbeat).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::directory::{check_endpoints, Node, Remote, MAX_ANNOUNCED_ENDPOINTS};
use super::wire::{self, Announced, Envelope, Heartbeat, Op};
use super::{lock, seal, unix_ms, Cluster};

/// This node's endpoint table as last announced.
#[derive(Default)]
pub(super) struct Table {
    entries: HashMap<String, Announced>,
    version: u64,
    digest: u64,
}

impl Table {
    /// Its state, as a heartbeat without a delta says it.
    pub(super) fn state(&self) -> Heartbeat {
        Heartbeat {
            version: self.version,
            count: self.entries.len() as u64,
            digest: self.digest,
            ..Heartbeat::default()
        }
    }

    /// Moves the table to `current`: the changes, as deltas of at most `budget` bytes of
    /// endpoints each, one version each. Nothing when nothing changed.
    pub(super) fn advance(
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
    pub(super) fn pages(&self, budget: usize) -> (u64, Vec<Vec<Announced>>) {
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

/// A table being received in pages.
pub(super) struct Fetch {
    pub(super) version: u64,
    pub(super) pages: Vec<Option<Vec<wire::Announced>>>,
    /// Deltas heard meanwhile, applied once the table is in.
    pub(super) pending: Vec<Heartbeat>,
    pub(super) asked: Instant,
}

/// How many deltas a node keeps while it fetches a table (more: it asks again).
pub(super) const MAX_PENDING_DELTAS: usize = 256;

/// The most pages a table may have.
pub(super) const MAX_PAGES: u32 = 100_000;

impl Node {
    /// Applies a delta that follows this view's version.
    pub(super) fn apply(&mut self, delta: Heartbeat) {
        for gone in &delta.removed {
            if let Some(remote) = self.endpoints.remove(gone) {
                self.digest ^= remote.digest;
            }
        }
        for a in delta.endpoints {
            let Some(remote) = Remote::from_announced(&a) else {
                continue;
            };
            self.digest ^= remote.digest;
            if let Some(before) = self.endpoints.insert(a.path, remote) {
                self.digest ^= before.digest;
            }
        }
        self.version = delta.version;
    }

    /// Whether this view is the table a heartbeat describes: (version, count, digest).
    pub(super) fn agrees(&self, (version, count, digest): (u64, u64, u64)) -> bool {
        self.synced
            && self.version == version
            && self.digest == digest
            && self.endpoints.len() as u64 == count
    }
}

impl Cluster {
    /// This node's endpoints as it announces them.
    pub(super) fn current_table(&self) -> HashMap<String, Announced> {
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

    /// Page `index` of `count` of node `from`'s table at `version`: kept until the table is
    /// whole, then it replaces this node's view (and the deltas heard meanwhile follow).
    pub(super) fn on_table_page(
        &self,
        from: &str,
        version: u64,
        index: u32,
        count: u32,
        body: &[u8],
    ) {
        if count == 0 || index >= count || count > MAX_PAGES {
            return self.reject(seal::Rejected::Invalid, from);
        }
        let Ok(entries) = serde_json::from_slice::<Vec<wire::Announced>>(body) else {
            return self.reject(seal::Rejected::Invalid, from);
        };
        let check = Heartbeat {
            node: from.to_string(),
            endpoints: entries,
            ..Heartbeat::default()
        };
        if check_endpoints(&check, self.node_timeout, unix_ms()).is_err() {
            return self.reject(seal::Rejected::Invalid, from);
        }
        let entries = check.endpoints;
        let mut nodes = lock(&self.nodes);
        let Some(node) = nodes.get_mut(from) else {
            return;
        };
        let fetch = match node.fetch.as_mut() {
            Some(f) if f.version > version => return,
            Some(f) if f.version == version && f.pages.len() == count as usize => f,
            _ => {
                let pending = node.fetch.take().map(|f| f.pending).unwrap_or_default();
                node.fetch.insert(Fetch {
                    version,
                    pages: vec![None; count as usize],
                    pending,
                    asked: Instant::now(),
                })
            }
        };
        fetch.pages[index as usize] = Some(entries);
        let total: usize = fetch.pages.iter().flatten().map(Vec::len).sum();
        if total > MAX_ANNOUNCED_ENDPOINTS {
            node.fetch = None;
            drop(nodes);
            return self.reject(seal::Rejected::Invalid, from);
        }
        if fetch.pages.iter().any(Option::is_none) {
            return;
        }
        let Some(fetch) = node.fetch.take() else {
            return;
        };
        node.endpoints = fetch
            .pages
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|a| Some((a.path.clone(), Remote::from_announced(&a)?)))
            .collect();
        node.digest = node.endpoints.values().fold(0, |d, r| d ^ r.digest);
        node.version = fetch.version;
        node.synced = true;
        let mut pending = fetch.pending;
        pending.sort_by_key(|d| d.from);
        for delta in pending {
            if delta.from == Some(node.version) {
                node.apply(delta);
            }
        }
        // Every endpoint of the fetched table (those this node serves too are settled).
        let fetched: Vec<String> = node.endpoints.keys().cloned().collect();
        drop(nodes);
        self.enforce_pool_sizes(fetched.iter().map(String::as_str));
        self.directory_changed();
    }
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
}
