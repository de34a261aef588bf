//! W3C trace context: the `traceparent` a call carries to its backend in `ext.traceparent`,
//! with a span id of its own for the gateway's hop.
//!
//! An HTTP call's `traceparent` header (or, without a valid one, a new trace) becomes the
//! parent of the gateway's span; a WebSocket request that carries `ext.traceparent` is
//! re-parented the same way. Either way the backend sees the gateway's span as its parent.

use std::fmt::Write as _;

use serde_json::Value;

use crate::duplex::Message;

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace, 16 bytes (never all zero).
    pub trace_id: [u8; 16],
    /// The span that is the parent, 8 bytes (never all zero).
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (lower-case hex, as the W3C format asks); None for
    /// anything else, all-zero ids included.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let text = text.trim();
        let mut parts = text.split('-');
        let (Some("00"), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !(lower_hex(trace) && lower_hex(span) && lower_hex(flags)) {
            return None;
        }
        let mut parsed = TraceParent {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
        };
        hex::decode_to_slice(trace, &mut parsed.trace_id).ok()?;
        hex::decode_to_slice(span, &mut parsed.span_id).ok()?;
        let mut f = [0u8; 1];
        hex::decode_to_slice(flags, &mut f).ok()?;
        parsed.flags = f[0];
        if parsed.trace_id == [0; 16] || parsed.span_id == [0; 8] {
            return None;
        }
        Some(parsed)
    }

    /// The gateway's hop under `parent` (same trace, same flags, a new span id); a new sampled
    /// trace when there is no parent.
    pub fn child_of(parent: Option<TraceParent>) -> TraceParent {
        let span_id = nonzero(rand::random::<[u8; 8]>());
        match parent {
            Some(p) => TraceParent { span_id, ..p },
            None => TraceParent {
                trace_id: nonzero(rand::random::<[u8; 16]>()),
                span_id,
                flags: 1,
            },
        }
    }

    /// The trace id as 32 hex digits.
    pub fn trace_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The span id as 16 hex digits.
    pub fn span_hex(&self) -> String {
        hex::encode(self.span_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = String::with_capacity(55);
        text.push_str("00-");
        text.push_str(&self.trace_hex());
        text.push('-');
        text.push_str(&self.span_hex());
        let _ = write!(text, "-{:02x}", self.flags);
        f.write_str(&text)
    }
}

/// Bytes with at least one bit set (an all-zero id is invalid).
fn nonzero<const N: usize>(mut bytes: [u8; N]) -> [u8; N] {
    if bytes.iter().all(|b| *b == 0) {
        bytes[N - 1] = 1;
    }
    bytes
}

/// Re-parents a client's request: when its `ext.traceparent` is valid, it is replaced by the
/// gateway's hop under it. Returns the hop and the client's span it is a child of (None: the
/// request carries no valid one). A request without `traceparent` in its `ext` costs one
/// substring search.
pub fn reparent(msg: &mut Message) -> Option<(TraceParent, [u8; 8])> {
    if !may_carry(msg) {
        return None;
    }
    let mut ext = msg.ext()?;
    let parent = ext
        .get("traceparent")
        .and_then(Value::as_str)
        .and_then(TraceParent::parse)?;
    let hop = TraceParent::child_of(Some(parent));
    ext.insert("traceparent".into(), Value::String(hop.to_string()));
    msg.set_ext(Some(&ext));
    Some((hop, parent.span_id))
}

/// Whether a request's `ext` may hold a `traceparent` (a substring search, no decoding).
pub fn may_carry(msg: &Message) -> bool {
    msg.ext_raw()
        .is_some_and(|raw| raw.get().contains("\"traceparent\""))
}

/// Sets `ext.traceparent` of a request the gateway makes (an HTTP call), keeping its other keys.
pub fn set(msg: &mut Message, hop: &TraceParent) {
    let mut ext = msg.ext().unwrap_or_default();
    ext.insert("traceparent".into(), Value::String(hop.to_string()));
    msg.set_ext(Some(&ext));
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let parent = TraceParent::parse(PARENT).expect("valid");
        let child = TraceParent::child_of(Some(parent));
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.flags, 1);
        assert_ne!(child.span_id, parent.span_id);
        let text = child.to_string();
        assert_eq!(text.len(), 55);
        assert_eq!(TraceParent::parse(&text), Some(child));
        let fresh = TraceParent::child_of(None);
        assert_ne!(fresh.trace_id, [0; 16]);
    }

    #[test]
    fn invalid_trace_parents_are_refused() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_websocket_request_is_reparented_only_when_it_carries_one() {
        let mut plain =
            Message::parse(br#"{"type":"req","method":"m","id":1,"ext":{"k":1}}"#).expect("msg");
        assert!(reparent(&mut plain).is_none());
        assert_eq!(plain.ext_raw().map(|r| r.get()), Some(r#"{"k":1}"#));
        let text = format!(
            r#"{{"type":"req","method":"m","id":1,"ext":{{"traceparent":"{PARENT}","k":1}}}}"#
        );
        let mut traced = Message::parse(text.as_bytes()).expect("msg");
        let (hop, parent) = reparent(&mut traced).expect("re-parented");
        assert_eq!(hex::encode(parent), "00f067aa0ba902b7");
        let ext = traced.ext().expect("ext");
        assert_eq!(ext["traceparent"], Value::String(hop.to_string()));
        assert_eq!(ext["k"], 1);
        assert!(hop
            .to_string()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    }
}
