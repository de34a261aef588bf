//! The handshake parser: never panics, and only the one handshake is accepted.
#![no_main]

use duplex::handshake;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match handshake::check(data) {
        Ok(()) => assert_eq!(
            std::str::from_utf8(data).map(str::trim),
            Ok(handshake::HANDSHAKE)
        ),
        Err(reason) => assert!(reason.len() < 512),
    }
});
