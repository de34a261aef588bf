//! The request classifier: query strings, headers and paths from the network, as the gateway
//! reads them (credentials, endpoint and method of a call, path and escape checks).
#![no_main]

use duplex::address::{check_escapes, check_path, split_call_path, Credentials};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let path = parts.next().unwrap_or("");
    let query = parts.next();
    let authorization = parts.next();
    let secret = parts.next();
    let creds = Credentials::parse(query, |name| match name {
        "authorization" => authorization,
        "x-duplex-secret" => secret,
        _ => None,
    });
    if let Some(token) = &creds.token {
        assert!(!token.is_empty());
    }
    if let Some((endpoint, method)) = split_call_path(path) {
        assert!(!method.is_empty() && !method.contains('/'));
        assert!(endpoint.starts_with('/'));
        assert!(path.len() == endpoint.len() + method.len() + 1 || endpoint == "/");
        let _ = check_path(endpoint);
    }
    if check_path(path).is_ok() {
        assert!(path.starts_with('/'));
    }
    if check_escapes(path).is_ok() {
        assert!(!path.to_ascii_lowercase().contains("%2f"));
    }
});
