//! `ext` rewriting: the route the gateway adds to every frame a backend sees, and the client's
//! own `ext` put back on what comes back to it.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::duplex::{code, Message, RpcError};

/// `{"route":"<key>"}` as raw JSON. Route keys are hex digits, so no escaping is needed.
pub(super) fn route_ext(route: &str) -> Box<RawValue> {
    RawValue::from_string(format!(r#"{{"route":"{route}"}}"#))
        .unwrap_or_else(|_| unreachable!("route keys are hex"))
}

/// Puts the client's own `ext` back on a reply: the gateway's `route` goes; every key the client
/// sent comes back as the client sent it (its own `route` included); keys the backend added stay.
/// A reply the gateway makes itself (no `ext`) gets exactly the client's `ext`.
pub(super) fn restore_ext(reply: &mut Message, route: &str, client_ext: Option<&RawValue>) {
    let Some(client_ext) = client_ext else {
        match reply.ext_raw().map(RawValue::get) {
            None => {}
            // The common case, a backend copying back exactly the ext we sent: no parsing.
            Some(raw)
                if raw
                    .strip_prefix(r#"{"route":""#)
                    .and_then(|r| r.strip_suffix(r#""}"#))
                    == Some(route) =>
            {
                reply.set_ext(None);
            }
            Some(_) => {
                let mut ext = reply.ext().unwrap_or_default();
                ext.remove("route");
                reply.set_ext(if ext.is_empty() { None } else { Some(&ext) });
            }
        }
        return;
    };
    // The common case again: the backend copied back exactly the `ext` it was sent (the route
    // spliced in front of the client's keys): the client's own goes back as it was.
    let copied_back = reply.ext_raw().map(RawValue::get).is_some_and(|raw| {
        raw.strip_prefix(r#"{"route":""#)
            .and_then(|r| r.strip_prefix(route))
            .and_then(|r| r.strip_prefix("\","))
            .is_some_and(|rest| Some(rest) == client_ext.get().strip_prefix('{'))
    });
    if copied_back {
        reply.set_raw("ext", client_ext.to_owned());
        return;
    }
    let mut ext = reply.ext().unwrap_or_default();
    ext.remove("route");
    if let Ok(own) = serde_json::from_str::<Map<String, Value>>(client_ext.get()) {
        ext.extend(own);
    }
    reply.set_ext(Some(&ext));
}

/// Puts `route` into `ext` (what a backend sees of every frame of a client): `route_ext` is
/// the route's `ext` made once. An `ext` with no `route` key and no escape in it (the common
/// case: a trace context, a client's own keys) gets the route spliced in front of its keys,
/// without decoding it; any other is decoded and the route replaces the client's.
pub(super) fn with_route(msg: &mut Message, route: &str, route_ext: &RawValue) {
    let Some(raw) = msg.ext_raw() else {
        msg.set_raw("ext", route_ext.to_owned());
        return;
    };
    let text = raw.get();
    // A parsed message's `ext` is an object (or null, handled above); with no backslash no
    // key can be an escaped `route`.
    if let Some(body) = text
        .strip_prefix('{')
        .filter(|_| !text.contains('\\') && !text.contains("\"route\""))
    {
        let body = body.trim_start();
        let spliced = if body.starts_with('}') {
            Ok(route_ext.to_owned())
        } else {
            RawValue::from_string(format!(r#"{{"route":"{route}",{body}"#))
        };
        if let Ok(spliced) = spliced {
            msg.set_raw("ext", spliced);
            return;
        }
    }
    let mut ext = msg.ext().unwrap_or_default();
    ext.insert("route".into(), Value::String(route.to_string()));
    msg.set_ext(Some(&ext));
}

/// `-32001` for backend call `backend_id` to the client `route` (gone, or never reached), with
/// the route in `ext` as the backend sent it.
pub(crate) fn client_gone_frame(backend_id: u64, route: &str) -> String {
    let mut reply = Message::error_reply(
        Some(backend_id),
        &RpcError::new(code::CLIENT_NOT_CONNECTED, "client not connected"),
    );
    reply.set_raw("ext", route_ext(route));
    reply.to_json()
}

/// An error reply the gateway makes for `msg`, with its id and `ext`.
pub(crate) fn local_error(msg: &Message, error_code: i64, text: &str) -> Message {
    let mut reply = Message::error_reply(msg.id(), &RpcError::new(error_code, text));
    if let Some(raw) = msg.ext_raw() {
        reply.set_raw("ext", raw.to_owned());
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(ext: Value) -> Message {
        let text = json!({"type":"rep","id":1,"payload":0,"ext":ext}).to_string();
        Message::parse(text.as_bytes()).expect("reply")
    }

    #[test]
    fn the_route_goes_and_the_clients_own_keys_come_back_as_sent() {
        let mut m = reply(json!({"route":"ab","added":1}));
        let own = RawValue::from_string(r#"{"route":"mine","k":"v"}"#.into()).expect("raw");
        restore_ext(&mut m, "ab", Some(&own));
        assert_eq!(
            m.ext(),
            json!({"added":1,"route":"mine","k":"v"})
                .as_object()
                .cloned()
        );
        let mut exact = reply(json!({"route":"ab"}));
        restore_ext(&mut exact, "ab", None);
        assert!(
            exact.ext_raw().is_none(),
            "nothing of the gateway's is left"
        );
    }

    #[test]
    fn a_frame_to_a_backend_carries_the_route_with_the_clients_keys() {
        let ext = route_ext("ab");
        let mut m = reply(json!({"k":1}));
        with_route(&mut m, "ab", &ext);
        assert_eq!(m.ext(), json!({"k":1,"route":"ab"}).as_object().cloned());
        let mut bare = Message::parse(br#"{"type":"req","method":"m","id":2}"#).expect("req");
        with_route(&mut bare, "ab", &ext);
        assert_eq!(bare.ext_raw().map(RawValue::get), Some(r#"{"route":"ab"}"#));
        let mut empty = reply(json!({}));
        with_route(&mut empty, "ab", &ext);
        assert_eq!(
            empty.ext_raw().map(RawValue::get),
            Some(r#"{"route":"ab"}"#)
        );
        // A client's own route, plain or escaped, never reaches the backend.
        for forged in [
            r#"{"type":"req","method":"m","id":3,"ext":{"route":"theirs","k":1}}"#,
            r#"{"type":"req","method":"m","id":3,"ext":{"rou\u0074e":"theirs","k":1}}"#,
        ] {
            let mut m = Message::parse(forged.as_bytes()).expect("req");
            with_route(&mut m, "ab", &ext);
            let seen: serde_json::Map<String, Value> =
                serde_json::from_str(m.ext_raw().expect("ext").get()).expect("object");
            assert_eq!(seen["route"], "ab", "{forged}");
            assert_eq!(seen["k"], 1);
        }
    }

    #[test]
    fn the_gateways_own_errors_keep_id_and_ext() {
        let req =
            Message::parse(br#"{"type":"req","method":"m","id":4,"ext":{"k":1}}"#).expect("req");
        let e = local_error(&req, code::TOO_MANY_PENDING_CALLS, "busy");
        assert_eq!(e.id(), Some(4));
        assert_eq!(e.error().map(|e| e.code), Some(-32003));
        assert_eq!(e.ext(), json!({"k":1}).as_object().cloned());
        let gone = client_gone_frame(9, "ab");
        assert!(gone.contains(r#""id":9"#) && gone.contains(r#""route":"ab""#));
    }
}
