//! The directory: the other nodes this one hears and the endpoints each announces, kept from
//! their heartbeats (each checked whole before it is believed), and the questions the front asks
//! of it (does any node serve this path, with which secret, which node takes a new client).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use tokio::time::Instant;

use super::tables::{Fetch, MAX_PENDING_DELTAS};
use super::wire::{self, Heartbeat};
use super::{lock, seal, served, unix_ms, Cluster};
use crate::auth::Digest;
use crate::config::is_subject_token;
use crate::mux;

/// What this node knows of another.
pub(super) struct Node {
    pub(super) last_seen: Instant,
    pub(super) epoch: u64,
    /// Its tag (see `tag_of`): the start of its route keys.
    pub(super) tag: String,
    pub(super) subject: Subject,
    pub(super) endpoints: HashMap<String, Remote>,
    /// The version of its table this view is at, and the XOR of its entries' digests.
    pub(super) version: u64,
    pub(super) digest: u64,
    /// The view follows the node's deltas (else it waits for the table it asked for).
    pub(super) synced: bool,
    /// The table being fetched, and when it was last asked for.
    pub(super) fetch: Option<Fetch>,
}

/// An endpoint's pool on another node, as its heartbeats announce it.
#[derive(Debug, Clone)]
pub struct RemotePool {
    /// The node.
    pub node: String,
    /// The endpoint path.
    pub path: String,
    /// Its backends there: (id, joined in Unix ms, draining).
    pub backends: Vec<(u64, u64, bool)>,
}

/// An endpoint of another node.
pub(super) struct Remote {
    pub(super) secret: Digest,
    /// (key, joined in Unix ms, draining)
    pub(super) backends: Vec<(u64, u64, bool)>,
    /// Its share of the node's table digest.
    pub(super) digest: u64,
}

impl Remote {
    pub(super) fn from_announced(a: &wire::Announced) -> Option<Remote> {
        Some(Remote {
            secret: Digest::from_hex(&a.secret)?,
            backends: a.backends.clone(),
            digest: a.digest(),
        })
    }

    pub(super) fn serving(&self) -> usize {
        self.backends.iter().filter(|b| !b.2).count()
    }
}

/// How long a node that said it leaves may still finish what runs there (its HTTP calls get
/// 10 s, its WebSockets 2 s more) before it is forgotten for good.
pub(super) const DEPARTURE: Duration = Duration::from_secs(13);

/// How many forgotten nodes' last epochs are remembered (to refuse their old messages).
pub(super) const MAX_FORGOTTEN: usize = 1024;

/// The most backends one heartbeat may announce for one endpoint.
pub const MAX_ANNOUNCED_BACKENDS: usize = 1024;

/// The most endpoints one heartbeat may announce.
pub const MAX_ANNOUNCED_ENDPOINTS: usize = 100_000;

/// Hex digits of a node's tag.
pub(super) const TAG_HEX: usize = 16;

/// A node's tag: the first 64 bits of the SHA-256 of its name, in hex. Every route key a node
/// makes starts with it, so a backend's node can tell which node holds a client's route. No
/// name can be chosen to collide with another node's tag (that would take about 2^64 hashes),
/// and a node whose tag is already taken is not heard at all.
pub(super) fn tag_of(node: &str) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(node.as_bytes())[..TAG_HEX / 2])
}

/// Checks what a heartbeat says before anything of it is believed: a node name, a time of
/// sending within `node_timeout` of `now` (older: a replay), and endpoints a node could have.
pub(super) fn check_heartbeat(
    beat: &Heartbeat,
    epoch: u64,
    node_timeout: Duration,
    now: u64,
) -> Result<(), seal::Rejected> {
    use seal::Rejected::{Invalid, Replay};
    let window = u64::try_from(node_timeout.as_millis()).unwrap_or(u64::MAX);
    if beat.node.len() > 64 || !is_subject_token(&beat.node) || epoch == 0 || beat.epoch != epoch {
        return Err(Invalid);
    }
    if beat.sent > now.saturating_add(window) {
        return Err(Invalid);
    }
    if beat.sent.saturating_add(window) < now {
        return Err(Replay);
    }
    let counts_ok = beat.count <= MAX_ANNOUNCED_ENDPOINTS as u64
        && beat.removed.len() <= MAX_ANNOUNCED_ENDPOINTS
        && beat.from.is_none_or(|from| from < beat.version)
        && beat
            .removed
            .iter()
            .all(|path| path.len() <= wire::MAX_PATH_BYTES);
    if !counts_ok {
        return Err(Invalid);
    }
    check_endpoints(beat, node_timeout, now)
}

/// Checks the endpoints a heartbeat or a table page announces: at most
/// [`MAX_ANNOUNCED_ENDPOINTS`], each a valid path with at most [`MAX_ANNOUNCED_BACKENDS`]
/// backends none of which joined in the future, and a secret digest.
pub(super) fn check_endpoints(
    beat: &Heartbeat,
    node_timeout: Duration,
    now: u64,
) -> Result<(), seal::Rejected> {
    use seal::Rejected::Invalid;
    let window = u64::try_from(node_timeout.as_millis()).unwrap_or(u64::MAX);
    if beat.endpoints.len() > MAX_ANNOUNCED_ENDPOINTS {
        return Err(Invalid);
    }
    let latest_join = now.saturating_add(window);
    for endpoint in &beat.endpoints {
        let path_ok = endpoint.path.len() <= wire::MAX_PATH_BYTES
            && crate::auth::check_path(&endpoint.path).is_ok();
        let backends_ok = endpoint.backends.len() <= MAX_ANNOUNCED_BACKENDS
            && endpoint
                .backends
                .iter()
                .all(|(_, joined, _)| *joined <= latest_join);
        if !path_ok || !backends_ok || Digest::from_hex(&endpoint.secret).is_none() {
            return Err(Invalid);
        }
    }
    Ok(())
}

impl Cluster {
    /// What this node knows of the others changed: counted, and waiting clients look again.
    pub(super) fn directory_changed(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub(super) fn on_heartbeat(&self, subject: &str, payload: &[u8]) {
        self.received.inc();
        let opened = match self.sealer.open(subject, payload) {
            Ok(opened) => opened,
            Err(why) => return self.reject(why, ""),
        };
        let Ok(beat) = serde_json::from_slice::<Heartbeat>(opened.message) else {
            return self.reject(seal::Rejected::Invalid, "");
        };
        if *beat.node == *self.me {
            return;
        }
        if let Err(why) = check_heartbeat(&beat, opened.epoch, self.node_timeout, unix_ms()) {
            return self.reject(why, &beat.node);
        }
        let name: Arc<str> = Arc::from(beat.node.as_str());
        // Each heartbeat once, and none of an older link of the node.
        let fresh = match lock(&self.windows).get_mut(&name) {
            Some(window) => window.check(opened.epoch, opened.seq),
            None => seal::Fresh::NewEpoch,
        };
        match fresh {
            seal::Fresh::Replay => return self.reject(seal::Rejected::Replay, &name),
            seal::Fresh::NewEpoch => {
                // A node forgotten: nothing it sent before is taken again. A newer message of
                // the same link is the node itself, silent for a while (a stall, a network
                // hiccup) and heard again: it rejoins (its table fetched afresh).
                let forgotten = lock(&self.forgotten).get(&name).copied();
                if let Some((epoch, highest)) = forgotten {
                    let old = opened.epoch < epoch
                        || (opened.epoch == epoch && (opened.seq <= highest || beat.leaving));
                    if old {
                        return self.reject(seal::Rejected::Replay, &name);
                    }
                    if opened.epoch == epoch {
                        tracing::warn!(node = %name, "cluster: node heard again after it was taken for dead");
                    }
                    lock(&self.forgotten).remove(&name);
                }
            }
            seal::Fresh::Yes => {}
        }
        if fresh == seal::Fresh::NewEpoch {
            let tag = tag_of(&name);
            let taken = tag == tag_of(&self.me)
                || lock(&self.nodes)
                    .iter()
                    .any(|(other, node)| node.tag == tag && *other != name);
            if taken {
                // Two names, one tag: routes would be ambiguous, so the newcomer is not heard.
                return self.reject(seal::Rejected::Invalid, &name);
            }
            let known = lock(&self.windows).contains_key(&name);
            if known {
                // Its link started afresh (or it is a new process of the same name): whatever
                // crossed the old one may be lost, and the old one's sessions end.
                tracing::info!(node = %name, "cluster: node reconnected: its sessions end");
                self.node_gone(&name, "gateway node reconnected");
            }
            lock(&self.windows).insert(name.clone(), seal::Window::new(opened.epoch, opened.seq));
        }
        if beat.leaving {
            // No new client goes there; what runs there may finish (it drains), then it is
            // forgotten for good. Its endpoints are in their grace here meanwhile.
            let left = lock(&self.nodes).remove(&name);
            if let Some(node) = left {
                self.begin_graces(&node);
                tracing::info!(node = %name, "cluster: node leaves");
                self.update_gauges();
                self.directory_changed();
            }
            lock(&self.departing)
                .entry(name)
                .or_insert_with(|| Instant::now() + DEPARTURE);
            return;
        }
        lock(&self.departing).remove(&name);
        let mut nodes = lock(&self.nodes);
        let new = !nodes.contains_key(&name);
        let subject = self.subject_of(&name);
        let node = nodes.entry(name.clone()).or_insert_with(|| Node {
            last_seen: Instant::now(),
            epoch: opened.epoch,
            tag: tag_of(&name),
            subject,
            endpoints: HashMap::new(),
            version: 0,
            digest: 0,
            synced: true,
            fetch: None,
        });
        node.last_seen = Instant::now();
        node.epoch = opened.epoch;
        let state = (beat.version, beat.count, beat.digest);
        // The endpoints this heartbeat brings (a delta's, or a whole small table): their pools
        // are settled below.
        let brought: Vec<String> = beat.endpoints.iter().map(|a| a.path.clone()).collect();
        if beat.version == 0 && beat.from.is_none() {
            // The whole table in one message (a node with no endpoint says so this way).
            node.endpoints = beat
                .endpoints
                .iter()
                .filter_map(|a| Some((a.path.clone(), Remote::from_announced(a)?)))
                .collect();
            node.digest = node.endpoints.values().fold(0, |d, r| d ^ r.digest);
            node.version = 0;
            node.synced = true;
            node.fetch = None;
        } else if let Some(from) = beat.from {
            if node.synced && node.version == from {
                node.apply(beat);
            } else if let Some(fetch) = node.fetch.as_mut().filter(|f| from >= f.version) {
                // Bounded in deltas and in endpoints: more, and the table is asked for again.
                let held: usize = fetch
                    .pending
                    .iter()
                    .map(|d| d.endpoints.len() + d.removed.len())
                    .sum();
                let size = beat.endpoints.len() + beat.removed.len();
                if fetch.pending.len() < MAX_PENDING_DELTAS
                    && held + size <= MAX_ANNOUNCED_ENDPOINTS
                {
                    fetch.pending.push(beat);
                } else {
                    node.fetch = None;
                }
            } else {
                node.synced = false;
            }
        }
        // A view that does not agree with what the node says of its table asks for the table
        // (again after a second, if it did not come).
        let ask = if node.agrees(state) {
            false
        } else {
            node.synced = false;
            let asked_lately = node
                .fetch
                .as_ref()
                .is_some_and(|f| f.asked.elapsed() < Duration::from_secs(1));
            if !asked_lately {
                node.fetch = Some(Fetch {
                    version: state.0,
                    pages: Vec::new(),
                    pending: Vec::new(),
                    asked: Instant::now(),
                });
            }
            !asked_lately
        };
        let subject = node.subject.clone();
        drop(nodes);
        if ask {
            let message = wire::Envelope {
                op: wire::Op::TableAsk,
                session: 0,
                from: &self.me,
                body: b"",
            };
            self.post_control(subject, message.encode());
        }
        self.enforce_pool_sizes(brought.iter().map(String::as_str));
        if new {
            tracing::info!(node = %name, "cluster: node joined");
            // Tell the newcomer what we hold now rather than at our next beat.
            self.announce_soon.notify_one();
            self.update_gauges();
        }
        self.directory_changed();
    }

    pub(super) fn expire_silent_nodes(&self) {
        let now = Instant::now();
        lock(&self.graces).retain(|_, (_, until)| now < *until);
        if !self.usable() {
            return;
        }
        let departed: Vec<Arc<str>> = {
            let mut departing = lock(&self.departing);
            let over: Vec<Arc<str>> = departing
                .iter()
                .filter(|(_, until)| **until <= now)
                .map(|(name, _)| name.clone())
                .collect();
            for name in &over {
                departing.remove(name);
            }
            over
        };
        for node in departed {
            self.node_gone(&node, "gateway node stopped");
        }
        let silent: Vec<Arc<str>> = lock(&self.nodes)
            .iter()
            .filter(|(_, n)| now.duration_since(n.last_seen) > self.node_timeout)
            .map(|(name, _)| name.clone())
            .collect();
        for node in silent {
            tracing::warn!(node = %node, "cluster: node not heard from: taken for dead");
            self.node_gone(&node, "gateway node unavailable");
        }
    }

    /// The endpoints `node` announced begin their grace here (it left, died or restarts): for
    /// `limits.backend_grace` a client of one waits for a backend to come back anywhere, as on
    /// one node, instead of being told the path is unknown.
    fn begin_graces(&self, node: &Node) {
        let until = Instant::now() + self.registry.limits().backend_grace;
        let mut graces = lock(&self.graces);
        for (path, remote) in &node.endpoints {
            graces.insert(path.clone(), (remote.secret, until));
        }
    }

    /// Whether `path` is in its grace here, and with which secret.
    fn in_grace(&self, path: &str) -> Option<Digest> {
        lock(&self.graces)
            .get(path)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(secret, _)| *secret)
    }

    /// Forgets `node`: sessions relayed to it end (their calls fail), sessions it relayed here
    /// are closed (backend calls to those clients get `-32001`).
    pub(super) fn node_gone(&self, node: &str, why: &str) {
        if let Some(gone) = lock(&self.nodes).remove(node) {
            self.begin_graces(&gone);
        }
        lock(&self.departing).remove(node);
        if let Some((name, window)) = lock(&self.windows).remove_entry(node) {
            let mut forgotten = lock(&self.forgotten);
            if forgotten.len() >= MAX_FORGOTTEN {
                // Bounded: the oldest epochs are the least likely to be replayed usefully
                // (their heartbeats are past `node_timeout` anyway).
                if let Some(oldest) = forgotten
                    .iter()
                    .min_by_key(|(_, e)| **e)
                    .map(|(n, _)| n.clone())
                {
                    forgotten.remove(&oldest);
                }
            }
            forgotten.insert(name, (window.epoch(), window.highest()));
        }
        // Its backends' calls to this node's clients are forgotten; this node's backends' calls
        // to its clients fail with -32001.
        self.forget_guests(Duration::ZERO, |(_, n, _)| &**n == node);
        self.fail_relayed_calls(|n| n == node);
        let ended: Vec<(u128, super::client::Relay)> = lock(&self.sessions)
            .extract_if(|_, r| &*r.node == node)
            .collect();
        for (id, relay) in ended {
            relay.end(id, mux::CloseReason::new(mux::close::TRY_AGAIN_LATER, why));
        }
        let dropped: Vec<(u128, served::Entry)> = lock(&self.served)
            .extract_if(|_, e| &*e.origin == node)
            .collect();
        drop(dropped);
        self.update_gauges();
        self.directory_changed();
    }

    /// `node`'s link started afresh (epoch `epoch`, first seen message `seq`): the sessions
    /// across its old link end; what it holds stays known until its next heartbeat.
    pub(super) fn restarted(&self, node: &Arc<str>, epoch: u64, seq: u64) {
        let held = lock(&self.nodes).remove(node);
        let departing = lock(&self.departing).get(node).copied();
        self.node_gone(node, "gateway node reconnected");
        lock(&self.forgotten).remove(node);
        lock(&self.windows).insert(node.clone(), seal::Window::new(epoch, seq));
        if let Some(mut held) = held {
            held.epoch = epoch;
            lock(&self.nodes).insert(node.clone(), held);
        }
        if let Some(until) = departing {
            lock(&self.departing).insert(node.clone(), until);
        }
        self.update_gauges();
        self.directory_changed();
    }

    /// Which node a new relayed client of `path` goes to: one whose endpoint serves and wants
    /// `secret`, spread by backends in turn. None when no other node serves it.
    pub(super) fn pick(&self, path: &str, secret: &Digest) -> Option<(Arc<str>, Subject)> {
        if !self.usable() {
            return None;
        }
        let nodes = lock(&self.nodes);
        let candidates: Vec<(&Arc<str>, &Node, usize)> = nodes
            .iter()
            .filter_map(|(name, node)| {
                let remote = node.endpoints.get(path)?;
                let serving = remote.serving();
                (serving > 0 && remote.secret.matches(secret)).then_some((name, node, serving))
            })
            .collect();
        let total: usize = candidates.iter().map(|c| c.2).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = self.turn.fetch_add(1, Ordering::Relaxed) % total;
        for (name, node, serving) in candidates {
            if ticket < serving {
                return Some((name.clone(), node.subject.clone()));
            }
            ticket -= serving;
        }
        None
    }

    /// Whether `node` still has a serving backend of `path`.
    pub(super) fn node_serves(&self, node: &str, path: &str) -> bool {
        self.usable()
            && lock(&self.nodes)
                .get(node)
                .and_then(|n| n.endpoints.get(path))
                .is_some_and(|r| r.serving() > 0)
    }

    /// Whether another node serves `path`.
    pub fn serves_elsewhere(&self, path: &str) -> bool {
        self.usable()
            && lock(&self.nodes)
                .values()
                .any(|n| n.endpoints.get(path).is_some_and(|r| r.serving() > 0))
    }

    /// The pools other nodes announce, sorted by node and path.
    pub fn remote_pools(&self) -> Vec<RemotePool> {
        let mut pools: Vec<RemotePool> = lock(&self.nodes)
            .iter()
            .flat_map(|(name, node)| {
                node.endpoints.iter().map(move |(path, remote)| RemotePool {
                    node: name.to_string(),
                    path: path.clone(),
                    backends: remote.backends.clone(),
                })
            })
            .collect();
        pools.sort_by(|a, b| (&a.node, &a.path).cmp(&(&b.node, &b.path)));
        pools
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.me
    }

    /// Whether another node announces `path` (serving, or in its grace), or did when the link
    /// was lost.
    pub fn knows(&self, path: &str) -> bool {
        lock(&self.nodes)
            .values()
            .any(|n| n.endpoints.contains_key(path))
            || self.in_grace(path).is_some()
    }

    /// Whether `secret` is the secret another node announces for `path` (constant time).
    pub fn secret_matches(&self, path: &str, secret: &Digest) -> bool {
        let announced = lock(&self.nodes).values().any(|n| {
            n.endpoints
                .get(path)
                .is_some_and(|r| r.secret.matches(secret))
        });
        announced || self.in_grace(path).is_some_and(|s| s.matches(secret))
    }

    /// Whether a publish of `path` with `secret` would join backends on other nodes that use
    /// another secret (the pool shares one; a pool of one is replaced instead).
    pub fn secret_conflicts(&self, path: &str, secret: &Digest, max_backends: usize) -> bool {
        max_backends > 1
            && self.usable()
            && lock(&self.nodes).values().any(|n| {
                n.endpoints
                    .get(path)
                    .is_some_and(|r| !r.backends.is_empty() && !r.secret.matches(secret))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::bus::safe_name;
    use crate::cluster::is_refusal;
    use crate::cluster::wire::Announced;

    fn beat(node: &str, sent: u64, endpoints: Vec<Announced>) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            leaving: false,
            epoch: 9,
            sent,
            count: endpoints.len() as u64,
            endpoints,
            ..Heartbeat::default()
        }
    }

    fn endpoint(path: &str, backends: Vec<(u64, u64, bool)>) -> Announced {
        Announced {
            path: path.into(),
            secret: "ab".repeat(32),
            backends,
        }
    }

    #[test]
    fn a_heartbeat_is_believed_only_with_values_a_node_could_send() {
        use seal::Rejected::{Invalid, Replay};
        let now = 1_000_000_000;
        let timeout = Duration::from_secs(5);
        let check = |b: &Heartbeat| check_heartbeat(b, 9, timeout, now);
        let good = beat(
            "gw-1",
            now,
            vec![endpoint("/p", vec![(1, now - 10, false)])],
        );
        assert_eq!(check(&good), Ok(()));
        let cases: Vec<(&str, Heartbeat, seal::Rejected)> = vec![
            ("not a name", beat("a b", now, vec![]), Invalid),
            (
                "a name too long",
                beat(&"n".repeat(65), now, vec![]),
                Invalid,
            ),
            ("sent long ago", beat("gw-1", now - 6_000, vec![]), Replay),
            (
                "sent in the future",
                beat("gw-1", now + 6_000, vec![]),
                Invalid,
            ),
            (
                "a join far in the future",
                beat(
                    "gw-1",
                    now,
                    vec![endpoint("/p", vec![(1, now + 6_000, false)])],
                ),
                Invalid,
            ),
            (
                "too many backends",
                beat(
                    "gw-1",
                    now,
                    vec![endpoint(
                        "/p",
                        vec![(1, now, false); MAX_ANNOUNCED_BACKENDS + 1],
                    )],
                ),
                Invalid,
            ),
            (
                "a path too long",
                beat(
                    "gw-1",
                    now,
                    vec![endpoint(
                        &format!("/{}", "p".repeat(wire::MAX_PATH_BYTES)),
                        vec![],
                    )],
                ),
                Invalid,
            ),
            (
                "a path the gateway refuses",
                beat("gw-1", now, vec![endpoint("no-slash", vec![])]),
                Invalid,
            ),
            (
                "a secret that is no digest",
                beat(
                    "gw-1",
                    now,
                    vec![Announced {
                        secret: "zz".into(),
                        ..endpoint("/p", vec![])
                    }],
                ),
                Invalid,
            ),
        ];
        for (what, b, want) in cases {
            assert_eq!(check(&b), Err(want), "{what}");
        }
        // The epoch in the body must be the one in the trailer.
        assert_eq!(check_heartbeat(&good, 8, timeout, now), Err(Invalid));
    }

    #[test]
    fn tags_are_64_bits_of_the_name_and_refusals_are_recognised() {
        assert_eq!(tag_of("gw-1").len(), TAG_HEX);
        assert_ne!(tag_of("gw-1"), tag_of("gw-2"));
        assert!(is_refusal("authorization violation"));
        assert!(is_refusal("failed signing nonce"));
        assert!(!is_refusal("IO error"));
        assert_eq!(safe_name("gw-1"), "gw-1");
        assert_eq!(safe_name("a\nb"), "(not a node name)");
    }
}
