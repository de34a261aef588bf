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
    let mut ext = reply.ext().unwrap_or_default();
    ext.remove("route");
    if let Ok(own) = serde_json::from_str::<Map<String, Value>>(client_ext.get()) {
        ext.extend(own);
    }
    reply.set_ext(Some(&ext));
}

/// Puts `route` into `ext` (what a backend sees of every frame of a client): `ext_map` is the
/// frame's own `ext` when it had one, `route_ext` the route's `ext` made once.
pub(super) fn with_route(
    msg: &mut Message,
    route: &str,
    route_ext: &RawValue,
    ext_map: Option<Map<String, Value>>,
) {
    match ext_map {
        Some(mut ext) => {
            ext.insert("route".into(), Value::String(route.to_string()));
            msg.set_ext(Some(&ext));
        }
        None => msg.set_raw("ext", route_ext.to_owned()),
    }
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
        let own = m.ext();
        with_route(&mut m, "ab", &ext, own);
        assert_eq!(m.ext(), json!({"k":1,"route":"ab"}).as_object().cloned());
        let mut bare = Message::parse(br#"{"type":"req","method":"m","id":2}"#).expect("req");
        with_route(&mut bare, "ab", &ext, None);
        assert_eq!(bare.ext_raw().map(RawValue::get), Some(r#"{"route":"ab"}"#));
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
