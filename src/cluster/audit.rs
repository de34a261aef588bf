//! Audits of relayed sessions: core NATS delivers at most once, so every tick a client's node
//! tells each serving node how many frames each session sent there, and the serving node answers
//! how many it sent back. Frames from one node to another keep their order, so every frame
//! counted before an audit arrives before it: a shortfall either way, or a session the other
//! node no longer has, is a loss, and the session ends (its calls fail with `-32000`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::Subject;

use super::wire::{Envelope, Op};
use super::{lock, Cluster};
use crate::mux::{close, CloseReason};

impl Cluster {
    /// Asks each node this node has sessions with how many frames of each it sent back, saying
    /// how many each client sent (once a tick): core NATS may drop a frame, and a call whose
    /// frame was lost would otherwise wait for ever. The audit is published as a probe, so a
    /// node that died is also learned within a tick ("no responders"), not `node_timeout` later.
    pub(super) async fn audit_sessions(&self) {
        if !self.usable() {
            return;
        }
        // Counted before the audit is published: every frame counted went out before it.
        let mut lines: HashMap<Arc<str>, (Subject, Vec<String>)> = HashMap::new();
        for (id, relay) in lock(&self.sessions).iter() {
            let sent = relay.sent.load(Ordering::SeqCst);
            if sent == 0 {
                continue;
            }
            lines
                .entry(relay.node.clone())
                .or_insert_with(|| (relay.subject.clone(), Vec::new()))
                .1
                .push(format!("{id:032x} {sent}"));
        }
        for (node, (subject, lines)) in lines {
            for body in audit_bodies(lines, self.page_bytes()) {
                let audit = Envelope {
                    op: Op::Audit,
                    session: 0,
                    from: &self.me,
                    body: body.as_bytes(),
                };
                self.publish_probed(subject.clone(), audit.encode(), &node)
                    .await;
            }
        }
    }

    /// What a serving node says of the sessions audited: a session it no longer has, or one
    /// that sent more frames than came here, lost frames on the way: it ends (its calls fail
    /// with `-32000`, the client is placed again).
    pub(super) fn on_audit_reply(&self, from: &str, body: &[u8]) {
        let mut lost = Vec::new();
        {
            let mut sessions = lock(&self.sessions);
            for (id, count) in audit_lines(body) {
                let Some(relay) = sessions.get(&id).filter(|r| *r.node == *from) else {
                    continue;
                };
                let gone = match count {
                    None => true,
                    Some(sent) => sent > relay.received,
                };
                if gone {
                    if let Some(relay) = sessions.remove(&id) {
                        lost.push((id, relay));
                    }
                }
            }
        }
        for (id, relay) in lost {
            tracing::info!(node = %super::bus::safe_name(from), "cluster: a session lost frames on the way: it ends");
            relay.end(
                id,
                CloseReason::new(close::TRY_AGAIN_LATER, "frames lost on the way"),
            );
            self.close_remote(&relay.subject, id);
        }
    }

    /// An audit from a client's node: for each of its sessions here, how many frames it sent.
    /// A session this node does not have, or one that received fewer frames than were sent, lost
    /// frames on the way (it ends); for the others, how many frames went back.
    pub(super) fn on_audit(&self, from: &str, body: &[u8]) {
        let mut lines = Vec::new();
        let mut lost = Vec::new();
        {
            let mut served = lock(&self.served);
            for (id, count) in audit_lines(body) {
                let Some(sent) = count else { continue };
                match served.get(&id).filter(|e| *e.origin == *from) {
                    Some(entry) if entry.received >= sent => {
                        lines.push(format!("{id:032x} {}", entry.sent.load(Ordering::SeqCst)));
                    }
                    Some(_) => {
                        lost.extend(served.remove(&id).map(|entry| (id, entry)));
                        lines.push(format!("{id:032x} -"));
                    }
                    None => lines.push(format!("{id:032x} -")),
                }
            }
        }
        let reply_to = self.subject_of(from);
        for (id, entry) in lost {
            drop(entry);
            let reason = CloseReason::new(close::TRY_AGAIN_LATER, "frames lost on the way");
            self.end_served(&reply_to, id, &reason);
        }
        for body in audit_bodies(lines, self.page_bytes()) {
            let reply = Envelope {
                op: Op::AuditReply,
                session: 0,
                from: &self.me,
                body: body.as_bytes(),
            };
            self.post_control(reply_to.clone(), reply.encode());
        }
    }
}

/// Audit lines in bodies of at most `budget` bytes each.
pub(super) fn audit_bodies(lines: Vec<String>, budget: usize) -> Vec<String> {
    let mut bodies = vec![String::new()];
    for line in lines {
        if let Some(body) = bodies.last_mut().filter(|b| b.len() + line.len() < budget) {
            body.push_str(&line);
            body.push('\n');
        } else {
            bodies.push(format!("{line}\n"));
        }
    }
    bodies.retain(|b| !b.is_empty());
    bodies
}

/// The lines of an audit or of its reply: a session and a count (`-`: none), at most 100,000;
/// lines that are not such are skipped.
pub(super) fn audit_lines(body: &[u8]) -> Vec<(u128, Option<u64>)> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Vec::new();
    };
    text.lines()
        .take(100_000)
        .filter_map(|line| {
            let (id, count) = line.split_once(' ')?;
            if id.len() != 32 {
                return None;
            }
            let id = u128::from_str_radix(id, 16).ok()?;
            let count = match count {
                "-" => None,
                n => Some(n.parse().ok()?),
            };
            Some((id, count))
        })
        .collect()
}
