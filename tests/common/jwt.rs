//! Signed client tokens for tests: the key pairs under `tests/keys/` (made for these tests
//! only) and tokens minted with them.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The folder of the test keys (`<name>.key` private, `<name>.pub` public).
pub const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");

/// The path of public key `name` (`rsa`, `rsa2`, `ec256`, `ec384`, `ed25519`).
pub fn public_key(name: &str) -> String {
    format!("{KEYS}/{name}.pub")
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Claims for `sub` valid for `seconds` more.
pub fn claims(sub: &str, seconds: u64) -> Value {
    json!({"sub": sub, "exp": now() + seconds, "role": "admin", "secret_note": "not for the backend"})
}

/// `claims` signed with private key `key` as `alg` (with `kid` in the header if given).
pub fn sign_with(alg: Algorithm, key: &str, kid: Option<&str>, claims: &Value) -> String {
    let pem = std::fs::read(format!("{KEYS}/{key}.key")).expect("test key");
    let key = match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_secret(&pem),
    }
    .expect("encoding key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, &key).expect("sign")
}

/// `claims` signed RS256 with the `rsa` test key.
pub fn sign(claims: &Value) -> String {
    sign_with(Algorithm::RS256, "rsa", None, claims)
}

/// `claims` signed HS256 with `secret`.
pub fn sign_hs256(secret: &[u8], claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret).expect("secret"),
    )
    .expect("sign")
}

/// A token with `alg: none` and no signature.
pub fn unsigned(claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

/// A JWK set holding the public half of test key `key` (EC P-256 as ES256) under `kid`.
pub fn jwks(key: &str, kid: &str) -> String {
    let pem = std::fs::read(format!("{KEYS}/{key}.key")).expect("test key");
    let encoding = EncodingKey::from_ec_pem(&pem).expect("ec key");
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::ES256).expect("jwk");
    jwk.common.key_id = Some(kid.to_string());
    json!({ "keys": [jwk] }).to_string()
}
