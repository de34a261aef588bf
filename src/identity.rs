//! Signed client tokens (JWT): the keys of an endpoint's `auth.jwt`, the checks a token must
//! pass, and the identity a backend sees in `ext.auth`.
//!
//! The signature and the time and audience claims are checked by the `jsonwebtoken` crate;
//! this module picks the keys a token may be checked with (an algorithm the keys do not name is
//! refused before any key is tried, so a public key can never be used as an HMAC secret) and
//! names the check that failed. A token is never logged, nor put in an answer: only the name of
//! the check it failed.
//!
//! A token that passed is remembered (by its SHA-256 digest, up to [`CACHE_TOKENS`] per
//! endpoint) until its `exp`: an HTTP client calling again with the same token costs a digest
//! and a look-up instead of a signature check (tens of microseconds for RSA). The memory is the
//! checker's, which a reload replaces with the new keys.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::duplex::Message;

/// What `auth.jwt` names, before its files are read.
#[derive(Clone, Default)]
pub struct JwtSettings {
    /// PEM public keys (RSA, EC P-256/P-384, Ed25519).
    pub keys: Vec<PathBuf>,
    /// A shared HMAC secret (HS256).
    pub hs256_secret: Option<String>,
    /// A JWK set, keys chosen by `kid`.
    pub jwks_file: Option<PathBuf>,
    /// `iss` must equal it.
    pub issuer: Option<String>,
    /// `aud` must contain it.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Claims passed to the backend in `ext.auth` (`sub` always is).
    pub claims_to_backend: Vec<String>,
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The HMAC secret is key material: shown as present or not, never its value.
        f.debug_struct("JwtSettings")
            .field("keys", &self.keys)
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("claims_to_backend", &self.claims_to_backend)
            .finish()
    }
}

/// The longest `auth.jwt.leeway` (a day: clocks further apart than that are broken).
pub const MAX_LEEWAY: Duration = Duration::from_secs(24 * 3600);

/// The leeway on `exp` and `nbf` unless `auth.jwt.leeway` says otherwise.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// One key a token may be checked with.
struct Key {
    /// Its `kid` (keys of a JWK set); PEM keys and the HMAC secret have none.
    kid: Option<String>,
    key: DecodingKey,
    /// The algorithms it verifies.
    algorithms: Vec<Algorithm>,
}

/// The longest a connection's token deadline is set ahead.
const MAX_REMAINING: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The most tokens one endpoint's checker remembers as verified.
pub const CACHE_TOKENS: usize = 4096;

/// An endpoint's token checker: its keys and the claims it requires. Built once per config
/// load (start and SIGHUP), shared by every request of the endpoint.
pub struct JwtAuth {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    claims_to_backend: Vec<String>,
    /// Tokens that passed every check, by the SHA-256 of the token.
    verified: Mutex<lru::LruCache<[u8; 32], Arc<Identity>>>,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never key material (an HMAC secret is one).
        f.debug_struct("JwtAuth")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// Why a token is refused. Its message names the check, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// No token in `Authorization: Bearer` nor `access_token`.
    #[error("missing token: send it in `Authorization: Bearer <jwt>` or `?access_token=`")]
    Missing,
    /// Not three base64url parts with a JSON header and claims.
    #[error("malformed token")]
    Malformed,
    /// `alg: none`.
    #[error("token algorithm `none` is never accepted")]
    AlgNone,
    /// An algorithm none of the keys verifies.
    #[error("token algorithm {0} is not allowed by this endpoint's keys")]
    AlgNotAllowed(String),
    /// A `kid` the JWK set does not have.
    #[error("unknown token key id (kid)")]
    UnknownKid,
    /// No key verifies the signature.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` (plus the leeway) is past.
    #[error("token expired (exp)")]
    Expired,
    /// `nbf` (less the leeway) is to come.
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    /// `iss` differs from `auth.jwt.issuer`.
    #[error("wrong token issuer (iss)")]
    WrongIssuer,
    /// `aud` does not contain `auth.jwt.audience`.
    #[error("wrong token audience (aud)")]
    WrongAudience,
    /// A claim the gateway needs is absent.
    #[error("token has no `{0}` claim")]
    MissingClaim(String),
    /// A claim of the wrong type (`exp` not a number, `sub` not a string, ...).
    #[error("token claim `{0}` is not valid")]
    BadClaim(String),
}

/// A caller's verified token: who it is, until when, and what its backend is told.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The `sub` claim.
    pub sub: String,
    /// The `exp` claim (seconds since the Unix epoch).
    pub exp: u64,
    /// `ext.auth`: `{"sub": ..., <claims_to_backend>...}`.
    auth: Value,
    /// `{"auth": ...}`, the whole `ext` of a frame that had none.
    ext_alone: Box<RawValue>,
}

impl Identity {
    /// Sets `ext.auth` on a frame the client sends (its own `auth` replaced). An `ext` that
    /// does not decode (nested deeper than the decoder goes) is replaced whole: whatever `auth`
    /// it hides must never reach the backend.
    pub fn stamp(&self, msg: &mut Message) {
        match msg.ext_raw().map(|_| msg.ext()) {
            Some(Some(mut ext)) => {
                ext.insert("auth".into(), self.auth.clone());
                msg.set_ext(Some(&ext));
            }
            None | Some(None) => msg.set_raw("ext", self.ext_alone.clone()),
        }
    }

    /// The `ext.auth` object.
    pub fn auth(&self) -> &Value {
        &self.auth
    }

    /// `{"auth": ...}`: the `ext` a stamped frame that had none carries.
    pub fn ext_alone(&self) -> &RawValue {
        &self.ext_alone
    }

    /// How long from now until the token expires, its leeway included (zero if it has), at
    /// most ten years (a deadline that far is as good as none, and `Instant` arithmetic stays
    /// in range).
    pub fn remaining(&self, leeway: Duration) -> Duration {
        let end = Duration::from_secs(self.exp).saturating_add(leeway);
        end.saturating_sub(unix_now()).min(MAX_REMAINING)
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl JwtAuth {
    /// Reads the keys `settings` names. The error says which file or value is wrong.
    pub fn load(settings: &JwtSettings) -> Result<JwtAuth, String> {
        let mut keys = Vec::new();
        for path in &settings.keys {
            keys.push(pem_key(path)?);
        }
        if let Some(secret) = &settings.hs256_secret {
            if secret.len() < 32 {
                return Err(format!(
                    "`hs256_secret` has {} bytes: use at least 32 (a random value, not a password)",
                    secret.len()
                ));
            }
            keys.push(Key {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| format!("`hs256_secret`: {e}"))?,
                algorithms: vec![Algorithm::HS256],
            });
        }
        if let Some(path) = &settings.jwks_file {
            keys.extend(jwks_keys(path)?);
        }
        if keys.is_empty() {
            return Err(
                "`auth.jwt` needs `keys`, `hs256_secret` or `jwks_file` (with at least one key)"
                    .into(),
            );
        }
        if settings.leeway > MAX_LEEWAY {
            return Err("`leeway` is at most 24h".into());
        }
        Ok(JwtAuth {
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway: settings.leeway,
            claims_to_backend: settings.claims_to_backend.clone(),
            verified: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(CACHE_TOKENS).unwrap_or(NonZeroUsize::MIN),
            )),
        })
    }

    /// The clock skew allowed on `exp` and `nbf`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Checks `token`: its algorithm against the keys, its signature, `exp`, `nbf`, `iss` and
    /// `aud`; a `sub` string and an `exp` number are required. A token that passed before is
    /// only checked for its expiry (the rest cannot have changed: same token, same keys).
    pub fn verify(&self, token: &str) -> Result<Arc<Identity>, JwtError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let remembered = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&digest)
            .cloned();
        if let Some(identity) = remembered {
            if identity.remaining(self.leeway).is_zero() {
                return Err(JwtError::Expired);
            }
            return Ok(identity);
        }
        let identity = Arc::new(self.check(token)?);
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(digest, identity.clone());
        Ok(identity)
    }

    /// Every check of `verify`, with no memory.
    fn check(&self, token: &str) -> Result<Identity, JwtError> {
        let alg = header_alg(token)?;
        if alg.is_empty() || alg.eq_ignore_ascii_case("none") {
            return Err(JwtError::AlgNone);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                JwtError::AlgNotAllowed(printable(&alg))
            }
            ErrorKind::Json(_) if !is_known_alg(&alg) => JwtError::AlgNotAllowed(printable(&alg)),
            _ => JwtError::Malformed,
        })?;
        let allowed: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.algorithms.contains(&header.alg))
            .collect();
        if allowed.is_empty() {
            return Err(JwtError::AlgNotAllowed(format!("{:?}", header.alg)));
        }
        // A `kid` picks the key of a JWK set; keys without one (PEM, the HMAC secret) are
        // tried for any token.
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => allowed
                .into_iter()
                .filter(|k| k.kid.as_deref().is_none_or(|own| own == kid))
                .collect(),
            None => allowed,
        };
        if candidates.is_empty() {
            return Err(JwtError::UnknownKid);
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let mut last = JwtError::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return self.identity(data.claims),
                Err(e) => {
                    last = refusal(e.kind());
                    if last != JwtError::BadSignature {
                        // The signature held: the claims decided.
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn identity(&self, claims: Map<String, Value>) -> Result<Identity, JwtError> {
        let Some(Value::String(sub)) = claims.get("sub") else {
            return Err(JwtError::BadClaim("sub".into()));
        };
        let exp = claims
            .get("exp")
            .and_then(Value::as_f64)
            .filter(|e| *e >= 0.0)
            .ok_or_else(|| JwtError::BadClaim("exp".into()))? as u64;
        let mut auth = Map::new();
        auth.insert("sub".into(), Value::String(sub.clone()));
        for name in &self.claims_to_backend {
            if let Some(value) = claims.get(name) {
                auth.insert(name.clone(), value.clone());
            }
        }
        let auth = Value::Object(auth);
        let ext_alone = RawValue::from_string(serde_json::json!({ "auth": auth }).to_string())
            .map_err(|_| JwtError::Malformed)?;
        Ok(Identity {
            sub: sub.clone(),
            exp,
            auth,
            ext_alone,
        })
    }
}

/// What a `jsonwebtoken` error means to the caller.
fn refusal(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => JwtError::MissingClaim(claim.clone()),
        ErrorKind::InvalidClaimFormat(claim) => JwtError::BadClaim(claim.clone()),
        ErrorKind::InvalidAlgorithm => JwtError::AlgNotAllowed("of this token".into()),
        // A key of another family, an ECDSA signature of the wrong size: not signed by a key here.
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => {
            JwtError::BadSignature
        }
        _ => JwtError::Malformed,
    }
}

/// The `alg` of a token's header, read without trusting anything else in it.
fn header_alg(token: &str) -> Result<String, JwtError> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed)?;
    let header: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    match header.get("alg") {
        Some(Value::String(alg)) => Ok(alg.clone()),
        Some(Value::Null) | None => Ok(String::new()),
        Some(_) => Err(JwtError::Malformed),
    }
}

fn is_known_alg(alg: &str) -> bool {
    alg.parse::<Algorithm>().is_ok()
}

/// An algorithm name from a token, safe to put in an answer: at most 16 ASCII letters and digits.
fn printable(alg: &str) -> String {
    alg.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect()
}

/// A PEM public key: RSA (RS256/384/512), EC (ES256/384) or Ed25519 (EdDSA).
fn pem_key(path: &Path) -> Result<Key, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read JWT key {}: {e}", path.display()))?;
    let key = |key: DecodingKey, algorithms: &[Algorithm]| Key {
        kid: None,
        key,
        algorithms: algorithms.to_vec(),
    };
    if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        return Ok(key(
            k,
            &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
        ));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        return Ok(key(k, &[Algorithm::ES256, Algorithm::ES384]));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        return Ok(key(k, &[Algorithm::EdDSA]));
    }
    Err(format!(
        "JWT key {}: not a PEM public key (RSA, EC P-256/P-384 or Ed25519)",
        path.display()
    ))
}

/// The keys of a JWK set file. Each needs a `kid`; symmetric keys are refused (use
/// `hs256_secret`).
fn jwks_keys(path: &Path) -> Result<Vec<Key>, String> {
    let text =
        std::fs::read(path).map_err(|e| format!("cannot read JWK set {}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| format!("JWK set {}: not a JWK set: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let at = format!("JWK set {} key {i}", path.display());
        let Some(kid) = jwk.common.key_id.clone() else {
            return Err(format!("{at}: has no `kid`"));
        };
        let family: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => {
                vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512]
            }
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => return Err(format!("{at}: unsupported curve")),
            },
            AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
            AlgorithmParameters::OctetKey(_) => {
                return Err(format!(
                    "{at}: symmetric keys are not taken from a JWK set (use `hs256_secret`)"
                ))
            }
            _ => return Err(format!("{at}: unsupported key type")),
        };
        // A key that names its algorithm verifies that one only.
        let algorithms = match jwk.common.key_algorithm {
            Some(named) => {
                let named = named
                    .to_string()
                    .parse::<Algorithm>()
                    .map_err(|_| format!("{at}: unsupported `alg`"))?;
                if !family.contains(&named) {
                    return Err(format!("{at}: `alg` does not fit the key type"));
                }
                vec![named]
            }
            None => family,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{at}: {e}"))?;
        keys.push(Key {
            kid: Some(kid),
            key,
            algorithms,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";

    fn now() -> u64 {
        unix_now().as_secs()
    }

    fn settings(keys: &[&str]) -> JwtSettings {
        JwtSettings {
            keys: keys
                .iter()
                .map(|k| PathBuf::from(format!("{KEYS}/{k}.pub")))
                .collect(),
            leeway: Duration::from_secs(5),
            claims_to_backend: vec!["role".into()],
            ..JwtSettings::default()
        }
    }

    fn sign(alg: Algorithm, key: &str, claims: &Value) -> String {
        let pem = std::fs::read(format!("{KEYS}/{key}.key")).expect("test key");
        let key = match alg.family() {
            jsonwebtoken::AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(&pem),
            jsonwebtoken::AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
            jsonwebtoken::AlgorithmFamily::Ed => EncodingKey::from_ed_pem(&pem),
            jsonwebtoken::AlgorithmFamily::Hmac => EncodingKey::from_secret(&pem),
        }
        .expect("encoding key");
        encode(&Header::new(alg), claims, &key).expect("sign")
    }

    fn claims() -> Value {
        json!({"sub": "alice", "role": "admin", "other": 1, "exp": now() + 60})
    }

    #[test]
    fn every_key_type_verifies_its_algorithms() {
        for (alg, key) in [
            (Algorithm::RS256, "rsa"),
            (Algorithm::RS384, "rsa"),
            (Algorithm::RS512, "rsa"),
            (Algorithm::ES256, "ec256"),
            (Algorithm::ES384, "ec384"),
            (Algorithm::EdDSA, "ed25519"),
        ] {
            let auth = JwtAuth::load(&settings(&[key])).expect("load");
            let id = auth
                .verify(&sign(alg, key, &claims()))
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(id.sub, "alice");
            assert_eq!(id.auth(), &json!({"sub": "alice", "role": "admin"}));
        }
    }

    #[test]
    fn each_check_names_itself() {
        let auth = JwtAuth::load(&JwtSettings {
            issuer: Some("https://issuer".into()),
            audience: Some("app".into()),
            ..settings(&["rsa"])
        })
        .expect("load");
        let base =
            json!({"sub": "a", "iss": "https://issuer", "aud": ["x", "app"], "exp": now() + 60});
        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            sign(Algorithm::RS256, "rsa", &c)
        };
        assert!(auth.verify(&sign(Algorithm::RS256, "rsa", &base)).is_ok());
        let cases = [
            (with("exp", json!(now() - 10)), JwtError::Expired),
            (with("nbf", json!(now() + 60)), JwtError::NotYetValid),
            (with("iss", json!("https://other")), JwtError::WrongIssuer),
            (with("aud", json!("other")), JwtError::WrongAudience),
            (with("sub", json!(5)), JwtError::MissingClaim("sub".into())),
            (
                sign(Algorithm::RS256, "rsa2", &base),
                JwtError::BadSignature,
            ),
            ("a.b".into(), JwtError::Malformed),
        ];
        for (token, expected) in cases {
            assert_eq!(auth.verify(&token).err(), Some(expected));
        }
        // Within the leeway an expired token still passes.
        assert!(auth.verify(&with("exp", json!(now() - 2))).is_ok());
    }

    #[test]
    fn alg_none_and_algorithms_the_keys_do_not_name_are_refused() {
        use base64::Engine as _;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let auth = JwtAuth::load(&settings(&["rsa"])).expect("load");
        let none = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims()));
        assert_eq!(auth.verify(&none).err(), Some(JwtError::AlgNone));
        // The public key used as an HMAC secret: the classic confusion.
        let pem = std::fs::read(format!("{KEYS}/rsa.pub")).expect("pub");
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(&pem).expect("key"),
        )
        .expect("sign");
        assert_eq!(
            auth.verify(&forged).err(),
            Some(JwtError::AlgNotAllowed("HS256".into()))
        );
        let es = sign(Algorithm::ES256, "ec256", &claims());
        assert!(matches!(auth.verify(&es), Err(JwtError::AlgNotAllowed(_))));
    }

    #[test]
    fn an_hmac_secret_verifies_hs256_only() {
        let auth = JwtAuth::load(&JwtSettings {
            hs256_secret: Some(SECRET.into()),
            ..JwtSettings::default()
        })
        .expect("load");
        let good = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(SECRET.as_bytes()).expect("key"),
        )
        .expect("sign");
        assert!(auth.verify(&good).is_ok());
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &claims(),
            &EncodingKey::from_secret(SECRET.as_bytes()).expect("key"),
        )
        .expect("sign");
        assert!(matches!(
            auth.verify(&hs512),
            Err(JwtError::AlgNotAllowed(_))
        ));
        assert!(JwtAuth::load(&JwtSettings {
            hs256_secret: Some("short".into()),
            ..JwtSettings::default()
        })
        .is_err());
    }

    #[test]
    fn stamping_replaces_the_clients_own_auth() {
        let auth = JwtAuth::load(&settings(&["ed25519"])).expect("load");
        let id = auth
            .verify(&sign(Algorithm::EdDSA, "ed25519", &claims()))
            .expect("verify");
        let mut bare = Message::parse(br#"{"type":"req","method":"m","id":1}"#).expect("msg");
        id.stamp(&mut bare);
        assert_eq!(
            bare.ext(),
            json!({"auth": {"sub": "alice", "role": "admin"}})
                .as_object()
                .cloned()
        );
        let mut forged = Message::parse(
            br#"{"type":"req","method":"m","id":1,"ext":{"auth":{"sub":"root"},"k":1}}"#,
        )
        .expect("msg");
        id.stamp(&mut forged);
        assert_eq!(
            forged.ext(),
            json!({"auth": {"sub": "alice", "role": "admin"}, "k": 1})
                .as_object()
                .cloned()
        );
        assert!(id.remaining(Duration::ZERO) > Duration::from_secs(50));
        // An ext nested deeper than the decoder goes, hiding an `auth`: replaced whole.
        let deep = format!(
            r#"{{"type":"req","method":"m","id":1,"ext":{{"auth":{{"sub":"root"}},"p":{}1{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let mut hidden = Message::parse(deep.as_bytes()).expect("msg");
        id.stamp(&mut hidden);
        assert_eq!(
            hidden.ext(),
            json!({"auth": {"sub": "alice", "role": "admin"}})
                .as_object()
                .cloned()
        );
        // A token that never expires still gives a deadline in range.
        let mut forever = id.as_ref().clone();
        forever.exp = u64::MAX;
        assert_eq!(forever.remaining(Duration::MAX), MAX_REMAINING);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn a_remembered_token_still_expires() {
        let auth = JwtAuth::load(&JwtSettings {
            hs256_secret: Some("an-hs256-secret-of-at-least-32-bytes!!".into()),
            ..JwtSettings::default()
        })
        .expect("load");
        let exp = unix_now().as_secs() + 1;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "a", "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(b"an-hs256-secret-of-at-least-32-bytes!!")
                .expect("key"),
        )
        .expect("sign");
        let first = auth.verify(&token).expect("first");
        let again = auth.verify(&token).expect("again");
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second check is remembered"
        );
        while unix_now().as_secs() <= exp {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(auth.verify(&token).err(), Some(JwtError::Expired));
    }
}
