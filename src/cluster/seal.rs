//! Signing and freshness of cluster messages: what lets a node trust what it reads on the bus.
//!
//! Every message a node publishes ends with a trailer:
//!
//! ```text
//! <message> <epoch: u64 BE> <seq: u64 BE> [<tag: 32 bytes>]
//! ```
//!
//! `epoch` is the sender's link epoch (it grows: a time in nanoseconds, taken again whenever the
//! sender's link starts afresh) and `seq` counts every message the sender published in that
//! epoch. With `cluster.key`, `tag` is HMAC-SHA256 with the key over the subject, a zero byte,
//! and everything before the tag, so a message cannot be forged, altered, or moved to another
//! subject. A receiver accepts a sender's message once: a [`Window`] per sender remembers the
//! newest epoch and which of the last [`WINDOW`] sequence numbers it has seen (as IPsec's
//! anti-replay window does), so a captured message sent again is dropped as a replay.

use bytes::{BufMut, Bytes, BytesMut};
use ring::hmac;

/// Bytes of the trailer without a tag.
const COUNTERS: usize = 16;
/// Bytes of the tag.
const TAG: usize = 32;
/// The most trailer bytes a message carries (what the envelope allowance must leave room for).
pub const TRAILER_BYTES: usize = COUNTERS + TAG;

/// Why a message was not accepted: the `reason` of
/// `duplex_gateway_cluster_rejected_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Missing or wrong tag (or no trailer at all).
    Signature,
    /// Not a message of ours, or values no node could send.
    Invalid,
    /// From a node this one has not heard in heartbeats.
    UnknownNode,
    /// Seen before, or older than what the sender has sent since.
    Replay,
}

impl Rejected {
    /// Every reason, for the series made at start-up.
    pub const ALL: [Rejected; 4] = [
        Rejected::Signature,
        Rejected::Invalid,
        Rejected::UnknownNode,
        Rejected::Replay,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Signature => "signature",
            Rejected::Invalid => "invalid",
            Rejected::UnknownNode => "unknown_node",
            Rejected::Replay => "replay",
        }
    }
}

/// Seals and opens messages with the cluster's key (or none).
pub struct Sealer {
    key: Option<hmac::Key>,
}

impl Sealer {
    /// A sealer with `key` (None: messages carry counters but no tag).
    pub fn new(key: Option<&[u8]>) -> Sealer {
        Sealer {
            key: key.map(|k| hmac::Key::new(hmac::HMAC_SHA256, k)),
        }
    }

    /// Whether messages are signed.
    pub fn signs(&self) -> bool {
        self.key.is_some()
    }

    /// Appends the trailer to `message`, to be published on `subject`.
    pub fn seal(&self, subject: &str, mut message: BytesMut, epoch: u64, seq: u64) -> Bytes {
        message.reserve(TRAILER_BYTES);
        message.put_u64(epoch);
        message.put_u64(seq);
        if let Some(key) = &self.key {
            let mut ctx = hmac::Context::with_key(key);
            ctx.update(subject.as_bytes());
            ctx.update(&[0]);
            ctx.update(&message);
            message.put_slice(ctx.sign().as_ref());
        }
        message.freeze()
    }

    /// Checks a message received on `subject`: its tag (with a key), and returns the message
    /// without its trailer, with the sender's epoch and sequence number.
    pub fn open<'a>(&self, subject: &str, payload: &'a [u8]) -> Result<Opened<'a>, Rejected> {
        let tag_len = if self.key.is_some() { TAG } else { 0 };
        let Some(signed_len) = payload.len().checked_sub(tag_len) else {
            return Err(Rejected::Signature);
        };
        let (signed, tag) = payload.split_at(signed_len);
        if let Some(key) = &self.key {
            use subtle::ConstantTimeEq as _;
            let mut ctx = hmac::Context::with_key(key);
            ctx.update(subject.as_bytes());
            ctx.update(&[0]);
            ctx.update(signed);
            if !bool::from(ctx.sign().as_ref().ct_eq(tag)) {
                return Err(Rejected::Signature);
            }
        }
        let Some(message_len) = signed.len().checked_sub(COUNTERS) else {
            return Err(if self.key.is_some() {
                Rejected::Signature
            } else {
                Rejected::Invalid
            });
        };
        let (message, counters) = signed.split_at(message_len);
        let mut epoch = [0u8; 8];
        let mut seq = [0u8; 8];
        epoch.copy_from_slice(&counters[..8]);
        seq.copy_from_slice(&counters[8..]);
        Ok(Opened {
            message,
            epoch: u64::from_be_bytes(epoch),
            seq: u64::from_be_bytes(seq),
        })
    }
}

/// A message whose trailer checked out.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened<'a> {
    /// The message without its trailer.
    pub message: &'a [u8],
    /// The sender's link epoch.
    pub epoch: u64,
    /// The sender's sequence number in that epoch.
    pub seq: u64,
}

/// How many sequence numbers behind the newest a message may arrive and still be taken (the
/// sender's tasks may hand messages to NATS a little out of the order they were numbered in).
pub const WINDOW: u64 = 4096;

/// What a receiver remembers of one sender to take each of its messages once.
#[derive(Debug, Clone)]
pub struct Window {
    epoch: u64,
    highest: u64,
    /// Which sequence numbers of the last [`WINDOW`] were seen: a bitmap indexed by
    /// `seq % WINDOW`.
    seen: Box<[u64; (WINDOW / 64) as usize]>,
}

/// What a [`Window`] says of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fresh {
    /// New, in the epoch the window knows: take it.
    Yes,
    /// From a newer epoch than the window knows: the sender's link started afresh.
    NewEpoch,
    /// Seen before, or too old: drop it.
    Replay,
}

impl Window {
    /// A window that has seen `seq` of `epoch`.
    pub fn new(epoch: u64, seq: u64) -> Window {
        let mut window = Window {
            epoch,
            highest: seq,
            seen: Box::new([0; (WINDOW / 64) as usize]),
        };
        window.mark(seq);
        window
    }

    /// The sender's epoch as known.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The highest sequence number seen of that epoch.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Whether a message numbered `seq` in `epoch` is new; marks it seen when it is.
    pub fn check(&mut self, epoch: u64, seq: u64) -> Fresh {
        if epoch < self.epoch {
            return Fresh::Replay;
        }
        if epoch > self.epoch {
            return Fresh::NewEpoch;
        }
        if seq > self.highest {
            // Sequence numbers skipped over are not seen yet; those that fall out of the window
            // are forgotten.
            let ahead = seq - self.highest;
            if ahead >= WINDOW {
                self.seen.fill(0);
            } else {
                for s in self.highest + 1..seq {
                    self.clear(s);
                }
            }
            self.highest = seq;
            self.mark(seq);
            return Fresh::Yes;
        }
        if self.highest - seq >= WINDOW || self.is_marked(seq) {
            return Fresh::Replay;
        }
        self.mark(seq);
        Fresh::Yes
    }

    fn slot(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn mark(&mut self, seq: u64) {
        let (word, bit) = Self::slot(seq);
        self.seen[word] |= bit;
    }

    fn clear(&mut self, seq: u64) {
        let (word, bit) = Self::slot(seq);
        self.seen[word] &= !bit;
    }

    fn is_marked(&self, seq: u64) -> bool {
        let (word, bit) = Self::slot(seq);
        self.seen[word] & bit != 0
    }
}

/// A new link epoch: the time in nanoseconds, and always more than `previous`.
pub fn next_epoch(previous: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    now.max(previous.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(sealer: &Sealer, subject: &str, body: &[u8], epoch: u64, seq: u64) -> Bytes {
        sealer.seal(subject, BytesMut::from(body), epoch, seq)
    }

    #[test]
    fn a_signed_message_opens_with_the_same_key_and_subject_only() {
        let a = Sealer::new(Some(b"0123456789abcdef0123456789abcdef"));
        let msg = sealed(&a, "p.node.n1", b"hello", 7, 9);
        let opened = a.open("p.node.n1", &msg).expect("opens");
        assert_eq!(
            opened,
            Opened {
                message: b"hello",
                epoch: 7,
                seq: 9
            }
        );
        assert_eq!(a.open("p.node.n2", &msg), Err(Rejected::Signature));
        let b = Sealer::new(Some(b"another key, also 32 bytes long!"));
        assert_eq!(b.open("p.node.n1", &msg), Err(Rejected::Signature));
        for i in 0..msg.len() {
            let mut altered = msg.to_vec();
            altered[i] ^= 1;
            assert_eq!(
                a.open("p.node.n1", &altered),
                Err(Rejected::Signature),
                "byte {i}"
            );
        }
        assert_eq!(a.open("p.node.n1", b"hello"), Err(Rejected::Signature));
        let unsigned = sealed(&Sealer::new(None), "p.node.n1", b"hello", 7, 9);
        assert_eq!(a.open("p.node.n1", &unsigned), Err(Rejected::Signature));
    }

    #[test]
    fn without_a_key_the_counters_still_travel() {
        let s = Sealer::new(None);
        assert!(!s.signs());
        let msg = sealed(&s, "x", b"{}", 1, 2);
        assert_eq!(msg.len(), 2 + COUNTERS);
        let opened = s.open("x", &msg).expect("opens");
        assert_eq!(
            (opened.message, opened.epoch, opened.seq),
            (&b"{}"[..], 1, 2)
        );
        assert_eq!(s.open("x", b"short"), Err(Rejected::Invalid));
    }

    #[test]
    fn a_window_takes_each_message_once_even_out_of_order() {
        let mut w = Window::new(10, 5);
        assert_eq!(w.check(10, 5), Fresh::Replay);
        assert_eq!(w.check(10, 8), Fresh::Yes);
        assert_eq!(w.check(10, 7), Fresh::Yes, "late but new");
        assert_eq!(w.check(10, 7), Fresh::Replay);
        assert_eq!(w.check(10, 6), Fresh::Yes);
        assert_eq!(w.check(9, 100), Fresh::Replay, "an older epoch");
        assert_eq!(w.check(11, 1), Fresh::NewEpoch);
        assert_eq!(w.check(10, 8 + WINDOW), Fresh::Yes);
        assert_eq!(w.check(10, 8), Fresh::Replay, "fell out of the window");
        assert_eq!(w.check(10, 9 + WINDOW), Fresh::Yes);
        // After a jump, numbers skipped inside the window are still new once.
        assert_eq!(w.check(10, 20 + WINDOW), Fresh::Yes);
        assert_eq!(w.check(10, 15 + WINDOW), Fresh::Yes);
        assert_eq!(w.check(10, 15 + WINDOW), Fresh::Replay);
    }

    #[test]
    fn epochs_always_grow() {
        let a = next_epoch(0);
        assert!(a > 0);
        assert!(next_epoch(a) > a);
        assert_eq!(next_epoch(u64::MAX - 1), u64::MAX);
    }
}
