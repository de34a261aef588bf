//! What nodes send each other over NATS: one header line, then a body.
//!
//! ```text
//! <op> <session> <from>[ <argument>]\n<body>
//! ```
//!
//! `op` is one letter, `session` 32 hex digits, `from` the sending node's name (a subject token:
//! no spaces); the argument is the rest of the line (a path, or a close code and reason). The
//! body is a Duplex frame as JSON, or empty. Heartbeats are JSON of their own (see
//! [`Heartbeat`]). Every message then ends with the trailer of [`super::seal`] (counters and,
//! with `cluster.key`, a signature).

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

/// The most bytes the header line and the trailer of a frame may take: what a frame needs on
/// top of `limits.max_message_bytes` to fit in the NATS server's `max_payload` (a path of up to
/// [`MAX_PATH_BYTES`], a node name, a secret digest and the signature).
pub const ENVELOPE_BYTES: usize = 2048;

/// The longest endpoint path the cluster carries (longer ones are never announced nor relayed).
pub const MAX_PATH_BYTES: usize = 1024;

/// One message between nodes about a client session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    /// Client node -> backend node: a client (WebSocket when `websocket`, else one HTTP call)
    /// joins `path`; the body, if any, is its first frame.
    Open {
        /// A WebSocket client (else an HTTP call).
        websocket: bool,
        /// The SHA-256 of the secret the client was admitted with (64 hex digits): the serving
        /// node checks it against its own.
        secret: &'a str,
        /// The endpoint path.
        path: &'a str,
    },
    /// Client node -> backend node: a frame from the client.
    ToBackend,
    /// Client node -> backend node: the client left.
    Close,
    /// Backend node -> client node: a frame for the client.
    ToClient,
    /// Backend node -> client node: the session ended (the backend node closed the client).
    Ended {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: &'a str,
        /// The session was refused at its open: nothing sent in it reached a backend, so the
        /// client's node may send it again elsewhere (or once a backend is back). Sent as `N`
        /// instead of `E`.
        refused: bool,
    },
    /// A backend's node -> the node whose route a call names: backend `key` of `path` calls a
    /// client there (the body is the call, with its `ext.route`).
    CallClient {
        /// The calling backend's key on its node.
        key: u64,
        /// The endpoint path.
        path: &'a str,
    },
    /// The client's node -> the backend's node: the client's answer to backend `key` of `path`.
    AnswerBackend {
        /// The backend's key on its node.
        key: u64,
        /// The endpoint path.
        path: &'a str,
    },
    /// The backend's node -> the client's node: the client (its route is the body) sends
    /// answers faster than the backend reads them: close it (1008).
    CloseClient {
        /// The endpoint path.
        path: &'a str,
    },
    /// A client's node -> a serving node: for each session listed in the body (a line
    /// `<session> <frames sent>` each), how many frames it sent there.
    Audit,
    /// The serving node -> the client's node: for each session audited, how many frames it
    /// sent back (`<session> <count>`), or `-` when it has no such session.
    AuditReply,
    /// A node whose view of another's endpoint table differs from that node's heartbeats ->
    /// that node: send me your table.
    TableAsk,
    /// A node -> the node that asked: page `index` of `count` of its endpoint table at
    /// `version` (the body is a JSON array of [`Announced`]).
    TablePage {
        /// The table's version.
        version: u64,
        /// This page's number, from 0.
        index: u32,
        /// How many pages the table has.
        count: u32,
    },
}

/// A decoded message.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// What it is.
    pub op: Op<'a>,
    /// The session it is about.
    pub session: u128,
    /// The node that sent it.
    pub from: &'a str,
    /// The frame, or empty.
    pub body: &'a [u8],
}

impl Envelope<'_> {
    /// The message as bytes (with room for the trailer).
    pub fn encode(&self) -> BytesMut {
        let (letter, arg): (u8, String) = match &self.op {
            Op::Open {
                websocket,
                secret,
                path,
            } => (b'O', format!("{} {secret} {path}", u8::from(*websocket))),
            Op::ToBackend => (b'B', String::new()),
            Op::Close => (b'C', String::new()),
            Op::ToClient => (b'F', String::new()),
            Op::Ended {
                code,
                reason,
                refused,
            } => (
                if *refused { b'N' } else { b'E' },
                format!("{code} {}", one_line(reason)),
            ),
            Op::CallClient { key, path } => (b'K', format!("{key} {path}")),
            Op::AnswerBackend { key, path } => (b'A', format!("{key} {path}")),
            Op::CloseClient { path } => (b'X', path.to_string()),
            Op::TableAsk => (b'T', String::new()),
            Op::Audit => (b'U', String::new()),
            Op::AuditReply => (b'R', String::new()),
            Op::TablePage {
                version,
                index,
                count,
            } => (b'P', format!("{version} {index} {count}")),
        };
        let mut out = BytesMut::with_capacity(
            40 + self.from.len() + arg.len() + self.body.len() + super::seal::TRAILER_BYTES,
        );
        out.put_u8(letter);
        out.put_u8(b' ');
        out.put_slice(format!("{:032x}", self.session).as_bytes());
        out.put_u8(b' ');
        out.put_slice(self.from.as_bytes());
        if !arg.is_empty() {
            out.put_u8(b' ');
            out.put_slice(arg.as_bytes());
        }
        out.put_u8(b'\n');
        out.put_slice(self.body);
        out
    }
}

/// Decodes a message; None if it is not one of ours.
pub fn decode(bytes: &[u8]) -> Option<Envelope<'_>> {
    let newline = bytes.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..newline]).ok()?;
    let body = &bytes[newline + 1..];
    let mut parts = header.splitn(4, ' ');
    let letter = parts.next()?;
    let session = parts.next()?;
    if session.len() != 32 {
        return None;
    }
    let session = u128::from_str_radix(session, 16).ok()?;
    let from = parts.next()?;
    let arg = parts.next().unwrap_or("");
    let op = match letter {
        "O" => {
            let (websocket, rest) = arg.split_once(' ')?;
            let (secret, path) = rest.split_once(' ')?;
            if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            Op::Open {
                websocket: websocket == "1",
                secret,
                path,
            }
        }
        "X" => Op::CloseClient { path: arg },
        "T" => Op::TableAsk,
        "U" => Op::Audit,
        "R" => Op::AuditReply,
        "P" => {
            let mut numbers = arg.split(' ');
            let version = numbers.next()?.parse().ok()?;
            let index = numbers.next()?.parse().ok()?;
            let count = numbers.next()?.parse().ok()?;
            Op::TablePage {
                version,
                index,
                count,
            }
        }
        "B" => Op::ToBackend,
        "C" => Op::Close,
        "F" => Op::ToClient,
        "E" | "N" => {
            let (code, reason) = arg.split_once(' ').unwrap_or((arg, ""));
            Op::Ended {
                code: code.parse().ok()?,
                reason,
                refused: letter == "N",
            }
        }
        "K" | "A" => {
            let (key, path) = arg.split_once(' ')?;
            let key = key.parse().ok()?;
            if letter == "K" {
                Op::CallClient { key, path }
            } else {
                Op::AnswerBackend { key, path }
            }
        }
        _ => return None,
    };
    Some(Envelope {
        op,
        session,
        from,
        body,
    })
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// What a node announces on the heartbeat subject: itself, and the state of its endpoint table
/// (its version, its size and a digest), never the whole table: a change goes as a delta from
/// one version to the next, and a node whose view differs asks for the table in pages
/// ([`Op::TableAsk`]). Only digests of secrets, never a secret or a token.
///
/// A heartbeat of version 0 without `from` carries the whole table in `endpoints` (a node with
/// no endpoint has exactly that).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node's name.
    pub node: String,
    /// The node stops: send it nothing new.
    #[serde(default)]
    pub leaving: bool,
    /// Changes whenever the node's link to NATS starts afresh: what was sent to it before may
    /// be lost, so its peers end every session across it.
    #[serde(default)]
    pub epoch: u64,
    /// When it was sent (Unix ms): a heartbeat older than `cluster.node_timeout` is a replay.
    #[serde(default)]
    pub sent: u64,
    /// The version of its endpoint table (grows by one with every delta).
    #[serde(default)]
    pub version: u64,
    /// How many endpoints the table holds.
    #[serde(default)]
    pub count: u64,
    /// The XOR of the [`entry_digest`] of every endpoint of the table.
    #[serde(default)]
    pub digest: u64,
    /// With a delta: the version it applies to (`version` is the one it makes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// The delta's endpoints, new or changed (with live backends, or in their grace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Announced>,
    /// The delta's endpoints gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

/// One endpoint of a node, as announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announced {
    /// The endpoint path.
    pub path: String,
    /// SHA-256 of its client secret, in hex.
    pub secret: String,
    /// Its live backends, the longest-connected first: `[key, joined (Unix ms), draining]`.
    pub backends: Vec<(u64, u64, bool)>,
}

/// An endpoint's share of a table's digest: the first 64 bits of the SHA-256 of what is
/// announced of it. The announcing node and every node that hears it compute the same.
pub fn entry_digest(path: &str, secret_hex: &str, backends: &[(u64, u64, bool)]) -> u64 {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    hash.update(path.as_bytes());
    hash.update([0]);
    hash.update(secret_hex.as_bytes());
    for (key, joined, draining) in backends {
        hash.update(key.to_be_bytes());
        hash.update(joined.to_be_bytes());
        hash.update([u8::from(*draining)]);
    }
    let out = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

impl Announced {
    /// Its share of a table's digest.
    pub fn digest(&self) -> u64 {
        entry_digest(&self.path, &self.secret, &self.backends)
    }

    /// About how many bytes it takes in a JSON message.
    pub fn approx_len(&self) -> usize {
        self.path.len() + self.secret.len() + 40 + self.backends.len() * 48
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_survives_a_round_trip() {
        let secret = "ab".repeat(32);
        let ops = [
            Op::Open {
                websocket: true,
                secret: &secret,
                path: "/team/a b",
            },
            Op::Open {
                websocket: false,
                secret: &secret,
                path: "/x",
            },
            Op::CloseClient { path: "/p" },
            Op::ToBackend,
            Op::Close,
            Op::ToClient,
            Op::Ended {
                code: 1008,
                reason: "secret changed by a reload",
                refused: false,
            },
            Op::Ended {
                code: 1001,
                reason: "gateway node stopping",
                refused: true,
            },
            Op::CallClient { key: 7, path: "/p" },
            Op::AnswerBackend { key: 7, path: "/p" },
            Op::TableAsk,
            Op::Audit,
            Op::AuditReply,
            Op::TablePage {
                version: 42,
                index: 3,
                count: 9,
            },
        ];
        for op in ops {
            let envelope = Envelope {
                op: op.clone(),
                session: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
                from: "gw-1",
                body: br#"{"type":"req","id":1}"#,
            };
            let bytes = envelope.encode();
            assert_eq!(decode(&bytes), Some(envelope), "{op:?}");
        }
    }

    #[test]
    fn a_reason_with_a_newline_stays_on_the_header_line() {
        let envelope = Envelope {
            op: Op::Ended {
                code: 1013,
                reason: "a\nb",
                refused: false,
            },
            session: 1,
            from: "n",
            body: b"",
        };
        let bytes = envelope.encode();
        let decoded = decode(&bytes).expect("decodes");
        assert_eq!(
            decoded.op,
            Op::Ended {
                code: 1013,
                reason: "a b",
                refused: false,
            }
        );
        assert!(decoded.body.is_empty());
    }

    #[test]
    fn garbage_is_not_a_message() {
        for bytes in [
            &b""[..],
            b"no newline",
            b"O 12 n 1 /p\n",
            b"Z 00000000000000000000000000000001 n\n",
            b"E 00000000000000000000000000000001 n notanumber\n",
            b"O 00000000000000000000000000000001 n 1 nothex /p\n",
            b"\xff\xfe\n",
        ] {
            assert!(decode(bytes).is_none(), "{bytes:?}");
        }
    }

    #[test]
    fn the_header_of_a_frame_fits_in_the_envelope_allowance() {
        let node = "n".repeat(64);
        let path = format!("/{}", "p".repeat(MAX_PATH_BYTES - 1));
        let secret = "0".repeat(64);
        for op in [
            Op::Ended {
                code: 1013,
                reason: &"r".repeat(123),
                refused: true,
            },
            Op::Open {
                websocket: true,
                secret: &secret,
                path: &path,
            },
            Op::CallClient {
                key: u64::MAX,
                path: &path,
            },
        ] {
            let envelope = Envelope {
                op,
                session: u128::MAX,
                from: &node,
                body: b"",
            };
            let sealed = super::super::seal::Sealer::new(Some(&[7; 32])).seal(
                "a.subject",
                envelope.encode(),
                u64::MAX,
                u64::MAX,
            );
            assert!(sealed.len() <= ENVELOPE_BYTES);
        }
    }
}
