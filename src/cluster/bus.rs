//! The bus: what this node publishes (sealed, through one ordered outbox for code that cannot
//! wait) and the dispatch of what arrives on its own subject, after the seal, the replay window
//! and the sender are checked.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::Subject;
use bytes::BytesMut;
use futures_util::StreamExt;

use super::wire::{self, Op};
use super::{lock, seal, Cluster};
use crate::config::is_subject_token;
use crate::mux;

/// A node name from a message, as it may be logged: only a name a node could have.
pub(super) fn safe_name(name: &str) -> &str {
    if name.len() <= 64 && is_subject_token(name) {
        name
    } else {
        "(not a node name)"
    }
}

impl Cluster {
    pub(super) fn subject_of(&self, node: &str) -> Subject {
        Subject::from(format!("{}.node.{node}", self.prefix))
    }

    pub(super) fn heartbeat_subject(&self) -> String {
        format!("{}.hb", self.prefix)
    }

    /// Seals and publishes one message; false when it could not be handed to the NATS client.
    pub(super) async fn publish(&self, subject: Subject, message: BytesMut) -> bool {
        self.seal_and_publish(subject, message, None).await
    }

    /// As [`Cluster::publish`] to node `to`, asking the NATS server to say at once when nobody
    /// subscribes to the subject (a reply subject and a header make it answer "no responders"
    /// to this node's probe subject): a dead node is learned from the first message sent to it.
    pub(super) async fn publish_probed(
        &self,
        subject: Subject,
        message: BytesMut,
        to: &str,
    ) -> bool {
        self.seal_and_publish(subject, message, Some(to)).await
    }

    async fn seal_and_publish(
        &self,
        subject: Subject,
        message: BytesMut,
        probe: Option<&str>,
    ) -> bool {
        if !self.usable() {
            return false;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let payload = self.sealer.seal(&subject, message, epoch, seq);
        let published = match probe {
            None => self.nats.publish(subject, payload).await,
            Some(to) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Duplex-Probe", "1");
                let reply = Subject::from(format!("{}.{to}", self.probe_prefix()));
                self.nats
                    .publish_with_reply_and_headers(subject, reply, headers, payload)
                    .await
            }
        };
        match published {
            Ok(()) => {
                self.sent.inc();
                true
            }
            Err(e) => {
                tracing::debug!("cluster: publish failed: {e}");
                false
            }
        }
    }

    /// Where the NATS server answers this node's probes: `<prefix>.node.<me>.nr.<node probed>`.
    pub(super) fn probe_prefix(&self) -> String {
        format!("{}.node.{}.nr", self.prefix, self.me)
    }

    /// An answer on the probe subject: "no responders" for node `to` means nobody subscribes
    /// to its subject any more (it died): it is forgotten now, not after `node_timeout`.
    pub(super) fn on_probe(&self, subject: &str, status: Option<async_nats::StatusCode>) {
        if status != Some(async_nats::StatusCode::NO_RESPONDERS) {
            return;
        }
        let Some(node) = subject.rsplit('.').next() else {
            return;
        };
        if !lock(&self.nodes).contains_key(node) {
            return;
        }
        tracing::warn!(node = %safe_name(node), "cluster: node has no subscription (no responders): taken for dead");
        self.node_gone(node, "gateway node unavailable");
        // Not remembered as forgotten: the answer cannot be signed, so a node wrongly taken for
        // dead is heard again from its next heartbeat.
        lock(&self.forgotten).remove(node);
    }

    /// Hands a message to the outbox, for code that cannot wait: one task publishes them in
    /// order (no task per message). The outbox holds at most [`Cluster::outbox_budget`] bytes:
    /// false when the message does not fit (the caller puts out whoever sent too much).
    pub(super) fn post(&self, subject: Subject, message: BytesMut) -> bool {
        let size = message.len();
        let budget = self.outbox_budget();
        let reserved =
            self.outbox_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                    (queued + size <= budget).then_some(queued + size)
                });
        if reserved.is_err() {
            return false;
        }
        if self.outbox.unbounded_send((subject, message)).is_err() {
            self.outbox_bytes.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Hands a small control message (a session's end or close) to the outbox, whatever it
    /// holds: dropping one would leave a call hanging.
    pub(super) fn post_control(&self, subject: Subject, message: BytesMut) {
        self.outbox_bytes
            .fetch_add(message.len(), Ordering::Relaxed);
        if let Err(e) = self.outbox.unbounded_send((subject, message)) {
            let (_, message) = e.into_inner();
            self.outbox_bytes
                .fetch_sub(message.len(), Ordering::Relaxed);
        }
    }

    /// The most bytes the outbox holds: as much as one backend's queue (16 x `max_message_bytes`).
    pub(super) fn outbox_budget(&self) -> usize {
        self.registry.limits().backend_queue_bytes
    }

    /// Publishes what [`Cluster::post`] queued, in order, until the process ends.
    pub(super) async fn send_outbox(
        self: Arc<Self>,
        mut rx: futures_channel::mpsc::UnboundedReceiver<(Subject, BytesMut)>,
    ) {
        while let Some((subject, message)) = rx.next().await {
            let size = message.len();
            self.publish(subject, message).await;
            self.outbox_bytes.fetch_sub(size, Ordering::Relaxed);
        }
    }

    /// Counts a message this node would not take, and why.
    pub(super) fn reject(&self, why: seal::Rejected, from: &str) {
        self.rejected[why as usize].inc();
        tracing::debug!(reason = why.as_str(), from = %safe_name(from), "cluster: a message refused");
    }

    /// A message on this node's own subject: taken only once, and only from a node this one
    /// hears (or that is departing).
    pub(super) fn on_direct(&self, subject: &str, payload: &[u8]) {
        self.received.inc();
        let opened = match self.sealer.open(subject, payload) {
            Ok(opened) => opened,
            Err(why) => return self.reject(why, ""),
        };
        let Some(envelope) = wire::decode(opened.message) else {
            return self.reject(seal::Rejected::Invalid, "");
        };
        if !is_subject_token(envelope.from) {
            return self.reject(seal::Rejected::Invalid, "");
        }
        if !self.usable() {
            return;
        }
        let fresh = lock(&self.windows)
            .get_mut(envelope.from)
            .map(|w| w.check(opened.epoch, opened.seq));
        match fresh {
            None => return self.reject(seal::Rejected::UnknownNode, envelope.from),
            Some(seal::Fresh::Replay) => return self.reject(seal::Rejected::Replay, envelope.from),
            Some(seal::Fresh::NewEpoch) => {
                // Its link started afresh before its heartbeat said so: the sessions across the
                // old link end, and its messages are taken from the new one on.
                let name: Arc<str> = Arc::from(envelope.from);
                self.restarted(&name, opened.epoch, opened.seq);
            }
            Some(seal::Fresh::Yes) => {}
        }
        match envelope.op {
            Op::ToClient | Op::Ended { .. } => self.to_relayed_client(&envelope),
            Op::Open { .. } | Op::ToBackend | Op::Close => self.to_served(&envelope),
            Op::CallClient { key, path } => {
                let Ok(call) = crate::duplex::Message::parse(envelope.body) else {
                    return;
                };
                // Only calls, and only from a node this one hears.
                if call.kind() != crate::duplex::Kind::Request
                    || !lock(&self.nodes).contains_key(envelope.from)
                {
                    return;
                }
                self.call_from(envelope.from, path, key, call);
            }
            Op::AnswerBackend { key, path } => {
                // Only answers (with an id), and only from a node this one hears.
                let answer = crate::duplex::Message::parse(envelope.body)
                    .ok()
                    .filter(|m| m.kind() == crate::duplex::Kind::Reply && m.id().is_some());
                if answer.is_none() || !lock(&self.nodes).contains_key(envelope.from) {
                    return;
                }
                if let Some(answer) = answer {
                    self.answer_from(envelope.from, path, key, &answer);
                }
            }
            Op::TableAsk => self.send_table(envelope.from),
            Op::Audit => self.on_audit(envelope.from, envelope.body),
            Op::AuditReply => self.on_audit_reply(envelope.from, envelope.body),
            Op::TablePage {
                version,
                index,
                count,
            } => self.on_table_page(envelope.from, version, index, count, envelope.body),
            Op::CloseClient { path } => {
                let Ok(route) = std::str::from_utf8(envelope.body) else {
                    return;
                };
                if let Some(endpoint) = self.registry.lookup(path) {
                    endpoint.close_client(route, mux::CloseReason::too_fast());
                }
            }
        }
    }
}
