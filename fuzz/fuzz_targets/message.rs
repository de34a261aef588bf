//! The message parser: any bytes either parse or give a ParseError; a parsed message survives a
//! round trip with its id, kind and flags, and rewriting id and ext keeps it valid.
#![no_main]

use duplex::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Message::parse(data) {
        Ok(mut msg) => {
            let text = msg.to_json();
            let again = Message::parse(text.as_bytes()).expect("a written message parses");
            assert_eq!(again.id(), msg.id());
            assert_eq!(again.kind(), msg.kind());
            assert_eq!(again.more(), msg.more());
            assert_eq!(again.is_error(), msg.is_error());
            let _ = (msg.method(), msg.payload(), msg.error(), msg.ext());
            msg.set_id(Some(u64::MAX));
            let mut ext = msg.ext().unwrap_or_default();
            ext.insert("route".into(), serde_json::Value::String("00ff".into()));
            msg.set_ext(Some(&ext));
            let rewritten = Message::parse(msg.to_json().as_bytes()).expect("rewritten parses");
            assert_eq!(rewritten.id(), Some(u64::MAX));
        }
        Err(e) => {
            assert!(e.code == -32700 || e.code == -32600);
            if let Some(reply) = e.reply() {
                Message::parse(reply.to_json().as_bytes()).expect("an error reply parses");
            }
        }
    }
});
