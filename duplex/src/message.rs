//! The Duplex message model (JSON codec).
//!
//! A [`Message`] keeps every field of the frame it was parsed from as raw JSON text, in order, so
//! fields the gateway does not know and numbers of any size pass through untouched (no float
//! round-trip, no re-formatting of payloads). Only the fields the protocol defines (`type`, `id`,
//! `more`, `method`, `error`, `ext`) are decoded and validated; `id` and `ext` can be replaced
//! before the message is written out again with [`Message::to_json`].

use std::borrow::Cow;
use std::fmt;
use std::sync::LazyLock;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::{to_raw_value, RawValue};
use serde_json::{Map, Value};

use super::error::{code, RpcError};

/// Whether a message is a request or a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `"type": "req"`: a call (or a frame of streamed input).
    Request,
    /// `"type": "rep"`: a reply (or a frame of a reply stream).
    Reply,
}

/// Why a frame could not be read as a Duplex message.
///
/// Carries what could still be read of the frame (its kind and id), so that the receiver can answer
/// the call it belongs to with an error reply.
#[derive(Debug, Clone)]
pub struct ParseError {
    /// `-32700` for text that is not JSON, `-32600` for JSON that is not a valid message.
    pub code: i64,
    /// What was wrong, for humans.
    pub message: String,
    /// The frame's kind, when it could be read.
    pub kind: Option<Kind>,
    /// The frame's call id, when it could be read.
    pub id: Option<u64>,
    /// The frame's raw `ext`, when it was an object (copied onto the error reply).
    pub ext: Option<Box<RawValue>>,
}

impl ParseError {
    fn invalid(message: impl Into<String>) -> Self {
        ParseError {
            code: code::INVALID_MESSAGE,
            message: message.into(),
            kind: None,
            id: None,
            ext: None,
        }
    }

    /// The error reply to send back for this frame: with the call's id when it was a request
    /// whose id could be read, without an id when even that was unreadable (as JSON-RPC answers
    /// with `id: null`). A malformed reply gets no answer: replies are never answered.
    pub fn reply(&self) -> Option<Message> {
        if self.kind == Some(Kind::Reply) {
            return None;
        }
        let id = if self.kind == Some(Kind::Request) {
            self.id
        } else {
            None
        };
        let mut reply = Message::error_reply(id, &RpcError::new(self.code, self.message.clone()));
        if let Some(ext) = &self.ext {
            reply.set_raw("ext", ext.clone());
        }
        Some(reply)
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ParseError {}

/// A field name: the protocol's own names are static (no allocation per message).
type Key = Cow<'static, str>;
/// A field value as raw JSON; constant values (`"req"`, `true`, ...) are static.
type Val = Cow<'static, RawValue>;

/// One Duplex message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Every field of the frame in its original order, values as raw JSON.
    fields: Vec<(Key, Val)>,
    kind: Kind,
    id: Option<u64>,
    more: bool,
    has_error: bool,
}

/// Field names the protocol defines.
const KNOWN: [&str; 7] = ["type", "method", "payload", "id", "more", "error", "ext"];

impl Message {
    /// Parses one frame. Text that is not JSON is a `-32700` error; JSON that breaks the message
    /// rules (not an object, unknown `type`, a negative or fractional `id`, a non-object `ext`, ...)
    /// is `-32600`.
    pub fn parse(text: &[u8]) -> Result<Message, ParseError> {
        let fields = match parse_fields(text) {
            Ok(fields) => fields,
            Err(FieldsError::NotObject) => {
                return Err(ParseError::invalid("a message must be a JSON object"))
            }
            Err(FieldsError::Json(e)) => {
                return Err(ParseError {
                    code: code::PARSE_ERROR,
                    message: format!("not JSON: {e}"),
                    kind: None,
                    id: None,
                    ext: None,
                })
            }
        };
        Self::from_fields(fields)
    }

    fn from_fields(fields: Vec<(Key, Val)>) -> Result<Message, ParseError> {
        // Duplicate protocol fields would make the meaning of the frame ambiguous.
        for (i, (key, _)) in fields.iter().enumerate() {
            if KNOWN.contains(&key.as_ref()) && fields[..i].iter().any(|(k, _)| k == key) {
                return Err(ParseError::invalid(format!("duplicate field `{key}`")));
            }
        }
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.get());
        let mut err = ParseError::invalid("");

        // Read what identifies the call first, so that errors below can still be answered.
        err.kind = match get("type") {
            Some(r#""req""#) => Some(Kind::Request),
            Some(r#""rep""#) => Some(Kind::Reply),
            // An escaped spelling of "req"/"rep" is still the same string.
            Some(raw) => match serde_json::from_str::<String>(raw).ok().as_deref() {
                Some("req") => Some(Kind::Request),
                Some("rep") => Some(Kind::Reply),
                _ => None,
            },
            None => None,
        };
        let id = match get("id") {
            None => Ok(None),
            Some(raw) => parse_id(raw),
        };
        if let Ok(id) = id {
            err.id = id;
        }
        let ext = get("ext").map(str::trim_start);
        if let Some(raw) = ext {
            if raw.starts_with('{') {
                err.ext = fields
                    .iter()
                    .find(|(k, _)| k == "ext")
                    .map(|(_, v)| v.clone().into_owned());
            }
        }

        let Some(kind) = err.kind else {
            err.message = match get("type") {
                None => "missing field `type`".into(),
                Some(_) => "`type` must be \"req\" or \"rep\"".into(),
            };
            return Err(err);
        };
        let id = match id {
            Ok(id) => id,
            Err(()) => {
                err.message = "`id` must be a positive integer, 0 or null".into();
                return Err(err);
            }
        };
        if let Some(raw) = ext {
            if !(raw.starts_with('{') || raw == "null") {
                err.message = "`ext` must be an object".into();
                return Err(err);
            }
        }
        let more = match get("more") {
            None | Some("null") | Some("false") => false,
            Some("true") => true,
            Some(_) => {
                err.message = "`more` must be a boolean".into();
                return Err(err);
            }
        };
        if kind == Kind::Request {
            match get("method") {
                Some(raw) if raw.starts_with('"') => {}
                Some(_) => {
                    err.message = "`method` must be a string".into();
                    return Err(err);
                }
                None => {
                    err.message = "a request needs a `method`".into();
                    return Err(err);
                }
            }
        }
        let has_error = match get("error") {
            None | Some("null") => false,
            Some(raw) => {
                if serde_json::from_str::<RpcError>(raw).is_err() {
                    err.message = "`error` must be {code: integer, message: string}".into();
                    return Err(err);
                }
                true
            }
        };
        Ok(Message {
            fields,
            kind,
            id,
            more,
            has_error,
        })
    }

    /// A request for `method` with `payload`. `id` None makes it fire-and-forget.
    pub fn request(method: &str, id: Option<u64>, payload: &Value, more: bool) -> Message {
        let mut msg = Message::empty(Kind::Request);
        msg.set_field("type", fixed(&REQ));
        msg.set_raw("method", raw_string(method));
        msg.set_raw("payload", to_raw(payload));
        msg.set_id(id);
        msg.set_more(more);
        msg
    }

    /// A request whose payload is already JSON text.
    pub fn request_raw(method: &str, id: Option<u64>, payload: Box<RawValue>) -> Message {
        let mut msg = Message::empty(Kind::Request);
        msg.set_field("type", fixed(&REQ));
        msg.set_raw("method", raw_string(method));
        msg.set_raw("payload", payload);
        msg.set_id(id);
        msg
    }

    /// A successful reply (or, with `more`, one frame of a reply stream).
    pub fn reply(id: Option<u64>, payload: &Value, more: bool) -> Message {
        let mut msg = Message::empty(Kind::Reply);
        msg.set_field("type", fixed(&REP));
        msg.set_raw("payload", to_raw(payload));
        msg.set_id(id);
        msg.set_more(more);
        msg
    }

    /// A reply that fails call `id` with `error`.
    pub fn error_reply(id: Option<u64>, error: &RpcError) -> Message {
        let mut msg = Message::empty(Kind::Reply);
        msg.set_field("type", fixed(&REP));
        msg.set_id(id);
        msg.set_raw("error", to_raw(error));
        msg.has_error = true;
        msg
    }

    fn empty(kind: Kind) -> Message {
        Message {
            fields: Vec::with_capacity(5),
            kind,
            id: None,
            more: false,
            has_error: false,
        }
    }

    /// Request or reply.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The call id; `None` for fire-and-forget (absent, null or 0).
    pub fn id(&self) -> Option<u64> {
        self.id
    }

    /// Whether more frames follow on this id.
    pub fn more(&self) -> bool {
        self.more
    }

    /// Whether this is a reply carrying `error`.
    pub fn is_error(&self) -> bool {
        self.has_error
    }

    /// Whether this frame ends its call: a reply without `more`, or any error reply.
    pub fn ends_call(&self) -> bool {
        self.kind == Kind::Reply && (!self.more || self.has_error)
    }

    /// The raw JSON of field `name`, if present.
    pub fn raw_field(&self, name: &str) -> Option<&RawValue> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    /// The method name of a request.
    pub fn method(&self) -> Option<String> {
        self.raw_field("method")
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// The payload, decoded (absent means null).
    pub fn payload(&self) -> Value {
        self.raw_field("payload")
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or(Value::Null)
    }

    /// The payload as raw JSON text (`null` when absent).
    pub fn payload_raw(&self) -> &str {
        self.raw_field("payload").map_or("null", RawValue::get)
    }

    /// The `error` of a reply, decoded.
    pub fn error(&self) -> Option<RpcError> {
        if !self.has_error {
            return None;
        }
        self.raw_field("error")
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// The `ext` object (None when absent or null).
    pub fn ext(&self) -> Option<Map<String, Value>> {
        self.raw_field("ext")
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// The raw `ext` field (None when absent or null).
    pub fn ext_raw(&self) -> Option<&RawValue> {
        self.raw_field("ext").filter(|raw| raw.get() != "null")
    }

    /// Replaces the call id (None removes it).
    pub fn set_id(&mut self, id: Option<u64>) {
        self.id = id;
        match id {
            Some(id) => self.set_raw("id", raw_number(id)),
            None => self.remove("id"),
        }
    }

    /// Sets or clears `more`.
    pub fn set_more(&mut self, more: bool) {
        self.more = more;
        if more {
            self.set_field("more", fixed(&TRUE));
        } else {
            self.remove("more");
        }
    }

    /// Replaces `ext` (None removes it).
    pub fn set_ext(&mut self, ext: Option<&Map<String, Value>>) {
        match ext {
            Some(ext) => self.set_raw("ext", to_raw(ext)),
            None => self.remove("ext"),
        }
    }

    /// Sets field `name` to raw JSON, keeping its position if it exists.
    pub fn set_raw(&mut self, name: &str, value: Box<RawValue>) {
        self.set_field(name, Cow::Owned(value));
    }

    fn set_field(&mut self, name: &str, value: Val) {
        match self.fields.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key(name), value)),
        }
    }

    fn remove(&mut self, name: &str) {
        self.fields.retain(|(k, _)| k != name);
    }

    /// About how many bytes [`Message::to_json`] writes (exact unless keys need escaping).
    pub fn approx_len(&self) -> usize {
        2 + self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
    }

    /// The message as one JSON object, fields in their original order.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(self.approx_len());
        out.push('{');
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_json_string(&mut out, key);
            out.push(':');
            out.push_str(value.get());
        }
        out.push('}');
        out
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json())
    }
}

/// `id`: absent, null or 0 mean "no id"; otherwise a positive integer that fits in 64 bits.
fn parse_id(raw: &str) -> Result<Option<u64>, ()> {
    if raw == "null" {
        return Ok(None);
    }
    if !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    match raw.parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(id) => Ok(Some(id)),
        Err(_) => Err(()),
    }
}

/// The constant field values, parsed once (every message built uses one or two).
static REQ: LazyLock<Option<&'static RawValue>> = LazyLock::new(|| literal(r#""req""#));
static REP: LazyLock<Option<&'static RawValue>> = LazyLock::new(|| literal(r#""rep""#));
static TRUE: LazyLock<Option<&'static RawValue>> = LazyLock::new(|| literal("true"));

fn literal(text: &'static str) -> Option<&'static RawValue> {
    serde_json::from_str(text).ok()
}

/// A constant field value (one of the statics above): borrowed, not allocated.
fn fixed(value: &LazyLock<Option<&'static RawValue>>) -> Val {
    match **value {
        Some(raw) => Cow::Borrowed(raw),
        None => Cow::Owned(raw_null()),
    }
}

/// A field name; the protocol's own names are not allocated.
fn key(name: &str) -> Key {
    match KNOWN.iter().find(|k| **k == name) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(name.to_string()),
    }
}

fn raw_null() -> Box<RawValue> {
    // `null` is always valid JSON; `to_raw_value` of a unit cannot fail.
    to_raw_value(&()).unwrap_or_else(|_| unreachable!("null serializes"))
}

fn raw_number(n: u64) -> Box<RawValue> {
    // Allocated at its exact length: this runs for every frame that changes hands.
    let text = itoa::Buffer::new().format(n).to_owned();
    RawValue::from_string(text).unwrap_or_else(|_| raw_null())
}

/// A JSON string, allocated at its exact length when it needs no escaping (method names do not).
fn raw_string(s: &str) -> Box<RawValue> {
    let mut text = String::with_capacity(s.len() + 2);
    write_json_string(&mut text, s);
    RawValue::from_string(text).unwrap_or_else(|_| raw_null())
}

fn to_raw<T: serde::Serialize + ?Sized>(value: &T) -> Box<RawValue> {
    // Serializing a `Value`, a string or a map with string keys cannot fail.
    to_raw_value(value).unwrap_or_else(|_| raw_null())
}

fn write_json_string(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        // Rare: keys with escapes or non-ASCII text.
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
    }
}

enum FieldsError {
    NotObject,
    Json(serde_json::Error),
}

/// Reads a JSON object into its fields without decoding the values.
fn parse_fields(text: &[u8]) -> Result<Vec<(Key, Val)>, FieldsError> {
    struct Fields(Vec<(Key, Val)>);
    struct FieldsVisitor;
    struct KeySeed;

    impl<'de> DeserializeSeed<'de> for KeySeed {
        type Value = Key;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for KeySeed {
        type Value = Key;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a field name")
        }

        fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
            Ok(key(name))
        }
    }

    impl<'de> Visitor<'de> for FieldsVisitor {
        type Value = Fields;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
            let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(6));
            while let Some(key) = map.next_key_seed(KeySeed)? {
                let value: Box<RawValue> = map.next_value()?;
                fields.push((key, Cow::Owned(value)));
            }
            Ok(Fields(fields))
        }
    }

    impl<'de> serde::Deserialize<'de> for Fields {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
            d.deserialize_map(FieldsVisitor)
        }
    }

    // Decide "not JSON" vs "not an object" by the first significant byte, so the error code is
    // right for both.
    let first = text.iter().find(|b| !b.is_ascii_whitespace()).copied();
    match serde_json::from_slice::<Fields>(text) {
        Ok(fields) => Ok(fields.0),
        Err(e) => {
            if first != Some(b'{') && serde_json::from_slice::<de::IgnoredAny>(text).is_ok() {
                Err(FieldsError::NotObject)
            } else {
                Err(FieldsError::Json(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<Message, ParseError> {
        Message::parse(text.as_bytes())
    }

    #[test]
    fn request_fields_are_read() {
        let m = parse(r#"{"type":"req","method":"echo","payload":[1,2],"id":7,"more":true}"#)
            .expect("valid");
        assert_eq!(m.kind(), Kind::Request);
        assert_eq!(m.method().as_deref(), Some("echo"));
        assert_eq!(m.payload(), json!([1, 2]));
        assert_eq!(m.id(), Some(7));
        assert!(m.more());
        assert!(!m.ends_call());
    }

    #[test]
    fn absent_null_and_zero_ids_mean_no_id() {
        for text in [
            r#"{"type":"req","method":"m"}"#,
            r#"{"type":"req","method":"m","id":null}"#,
            r#"{"type":"req","method":"m","id":0}"#,
        ] {
            assert_eq!(parse(text).expect(text).id(), None, "{text}");
        }
    }

    #[test]
    fn bad_ids_are_invalid_messages() {
        for id in [
            "-1",
            "1.5",
            "\"1\"",
            "1e3",
            "true",
            "99999999999999999999999",
        ] {
            let text = format!(r#"{{"type":"req","method":"m","id":{id}}}"#);
            let err = parse(&text).expect_err(&text);
            assert_eq!(err.code, code::INVALID_MESSAGE, "{text}");
            assert_eq!(err.kind, Some(Kind::Request));
        }
    }

    #[test]
    fn not_json_is_a_parse_error() {
        for text in ["{", "hello", "{\"type\":}", "\u{0}"] {
            assert_eq!(
                parse(text).expect_err(text).code,
                code::PARSE_ERROR,
                "{text}"
            );
        }
    }

    #[test]
    fn json_that_is_not_an_object_is_invalid() {
        for text in ["[1]", "1", "\"req\"", "null"] {
            assert_eq!(
                parse(text).expect_err(text).code,
                code::INVALID_MESSAGE,
                "{text}"
            );
        }
    }

    #[test]
    fn type_and_method_are_checked() {
        let cases = [
            r#"{"method":"m"}"#,
            r#"{"type":"call","method":"m"}"#,
            r#"{"type":1}"#,
            r#"{"type":"req"}"#,
            r#"{"type":"req","method":5}"#,
            r#"{"type":"req","method":"m","more":"yes"}"#,
            r#"{"type":"rep","error":"boom"}"#,
            r#"{"type":"rep","error":{"code":"x","message":"m"}}"#,
            r#"{"type":"req","type":"req","method":"m"}"#,
        ];
        for text in cases {
            assert_eq!(
                parse(text).expect_err(text).code,
                code::INVALID_MESSAGE,
                "{text}"
            );
        }
    }

    #[test]
    fn non_object_ext_is_refused_with_the_call_id() {
        let err = parse(r#"{"type":"req","method":"m","id":3,"ext":[1]}"#).expect_err("bad ext");
        assert_eq!(err.code, code::INVALID_MESSAGE);
        let reply = err.reply().expect("request with id gets a reply");
        assert_eq!(reply.id(), Some(3));
        assert_eq!(reply.error().map(|e| e.code), Some(code::INVALID_MESSAGE));
        // A null ext is the same as none.
        assert!(parse(r#"{"type":"req","method":"m","ext":null}"#)
            .expect("null ext")
            .ext()
            .is_none());
    }

    #[test]
    fn unknown_fields_and_big_numbers_survive_a_round_trip() {
        let text = r#"{"type":"req","method":"m","payload":{"n":123456789012345678901234567890,"f":1.10},"x-custom":{"a":[true,null]},"id":1}"#;
        let mut m = parse(text).expect("valid");
        assert_eq!(m.to_json(), text);
        m.set_id(Some(42));
        let out = m.to_json();
        assert!(out.contains("123456789012345678901234567890"), "{out}");
        assert!(out.contains(r#""f":1.10"#), "{out}");
        assert!(out.contains(r#""x-custom":{"a":[true,null]}"#), "{out}");
        assert!(out.contains(r#""id":42"#), "{out}");
        assert_eq!(parse(&out).expect("reparse").id(), Some(42));
    }

    #[test]
    fn ends_call_follows_more_and_error() {
        let rep = |t: &str| parse(t).expect(t).ends_call();
        assert!(rep(r#"{"type":"rep","id":1}"#));
        assert!(rep(r#"{"type":"rep","id":1,"more":false}"#));
        assert!(!rep(r#"{"type":"rep","id":1,"more":true}"#));
        assert!(rep(
            r#"{"type":"rep","id":1,"more":true,"error":{"code":1,"message":"x"}}"#
        ));
        assert!(!rep(r#"{"type":"req","method":"m","id":1}"#));
    }

    #[test]
    fn built_messages_parse_back() {
        let m = Message::request("sum", Some(9), &json!({"a": 1}), true);
        let back = parse(&m.to_json()).expect("valid");
        assert_eq!(back.method().as_deref(), Some("sum"));
        assert_eq!(back.id(), Some(9));
        assert!(back.more());
        let e = Message::error_reply(Some(2), &RpcError::new(-32601, "method not found"));
        let back = parse(&e.to_json()).expect("valid");
        assert!(back.is_error() && back.ends_call());
        assert_eq!(back.error().map(|e| e.code), Some(-32601));
    }

    #[test]
    fn ext_can_be_replaced_and_removed() {
        let mut m = parse(r#"{"type":"req","method":"m","ext":{"trace":"t1"}}"#).expect("valid");
        let mut ext = m.ext().expect("ext");
        ext.insert("route".into(), json!("r1"));
        m.set_ext(Some(&ext));
        assert_eq!(
            m.ext().expect("ext"),
            *json!({"trace":"t1","route":"r1"}).as_object().unwrap()
        );
        m.set_ext(None);
        assert!(m.ext_raw().is_none());
    }
}
