//! Credentials: publish tokens, client secrets, and the TLS / trusted-proxy check.
//!
//! Tokens and secrets are kept only as SHA-256 digests and compared in constant time, so neither
//! their values nor their lengths leak through timing, and a memory dump holds no plain token.

use std::net::IpAddr;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 digest of a credential. Compared only with [`Digest::matches`] (constant time):
/// there is deliberately no `==`.
#[derive(Clone, Copy)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `value`.
    pub fn of(value: &[u8]) -> Digest {
        Digest(Sha256::digest(value).into())
    }

    /// A digest given as 64 hex digits (the `sha256:<hex>` token form).
    pub fn from_hex(hex_digits: &str) -> Option<Digest> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut out).ok()?;
        Some(Digest(out))
    }

    /// The digest as 64 hex digits (what the cluster announces instead of a secret).
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// Constant-time comparison.
    pub fn matches(&self, other: &Digest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credential material, not even its digest.
        f.write_str("Digest(..)")
    }
}

/// The secret of an endpoint with `auth.secret: false` (clients need none): a fixed value no
/// presented secret is hashed to, so every node of a cluster announces the same one.
pub const NO_SECRET: Digest = Digest([0x5a; 32]);

/// A publish token from the config.
#[derive(Debug, Clone)]
pub struct Token {
    /// Shown in logs and metrics instead of the token.
    pub name: String,
    /// The token's digest.
    pub digest: Digest,
    /// The paths it may publish.
    pub scopes: Vec<PathScope>,
}

impl Token {
    /// Whether this token may publish `path`.
    pub fn allows(&self, path: &str) -> bool {
        self.scopes.iter().any(|scope| scope.matches(path))
    }
}

/// Finds the configured token equal to `presented`. Every token is compared, so the time taken does
/// not depend on which one matched.
pub fn find_token<'a>(tokens: &'a [Token], presented: &str) -> Option<&'a Token> {
    token_with(tokens, &Digest::of(presented.as_bytes()))
}

/// The configured token with this digest (every token is compared, in constant time).
pub fn token_with<'a>(tokens: &'a [Token], digest: &Digest) -> Option<&'a Token> {
    let mut found = None;
    for token in tokens {
        if token.digest.matches(digest) && found.is_none() {
            found = Some(token);
        }
    }
    found
}

/// The one rule for publishing: whether the token with this digest is configured and may
/// publish `path`. A publish is checked with it when it arrives, again once its handshake is
/// done, and on every reload for each backend that is up.
pub fn may_publish(tokens: &[Token], digest: &Digest, path: &str) -> bool {
    token_with(tokens, digest).is_some_and(|t| t.allows(path))
}

/// An endpoint pattern of a token: an exact path, or a prefix ending in `/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathScope {
    /// Exactly this path.
    Exact(String),
    /// Every path below this prefix (kept with its trailing `/`).
    Below(String),
}

impl PathScope {
    /// Parses `/exact` or `/prefix/*`.
    pub fn parse(pattern: &str) -> Result<PathScope, InvalidPath> {
        if let Some(prefix) = pattern.strip_suffix("/*") {
            let prefix = format!("{prefix}/");
            check_path(&prefix)?;
            Ok(PathScope::Below(prefix))
        } else {
            check_path(pattern)?;
            if pattern.contains('*') {
                return Err(InvalidPath(format!(
                    "`{pattern}`: `*` is only allowed as a final `/*` segment"
                )));
            }
            Ok(PathScope::Exact(pattern.to_string()))
        }
    }

    /// Whether `path` is covered.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathScope::Exact(exact) => path == exact,
            PathScope::Below(prefix) => path.len() > prefix.len() && path.starts_with(prefix),
        }
    }
}

pub use duplex::address::{check_escapes, check_path, InvalidPath};

/// Client secrets shorter than this are warned about (`--check`, the publish log).
pub const SHORT_SECRET_BYTES: usize = 16;

/// The longest endpoint path the gateway takes, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// The longest method name (the last segment of an HTTP call's path), in bytes.
pub const MAX_METHOD_BYTES: usize = 256;
/// The most bytes of a path a log line carries.
pub const LOGGED_PATH_BYTES: usize = 256;

/// Checks the lengths of a request's path: an endpoint path of at most [`MAX_PATH_BYTES`], and
/// for a `call` (`<endpoint>/<method>`) a method of at most [`MAX_METHOD_BYTES`].
pub fn check_lengths(path: &str, call: bool) -> Result<(), InvalidPath> {
    let (endpoint, method) = match path.rsplit_once('/').filter(|_| call) {
        Some((endpoint, method)) => (endpoint, method),
        None => (path, ""),
    };
    if endpoint.len() > MAX_PATH_BYTES {
        return Err(InvalidPath(format!(
            "an endpoint path has at most {MAX_PATH_BYTES} bytes (this one has {})",
            endpoint.len()
        )));
    }
    if method.len() > MAX_METHOD_BYTES {
        return Err(InvalidPath(format!(
            "a method name has at most {MAX_METHOD_BYTES} bytes (this one has {})",
            method.len()
        )));
    }
    Ok(())
}

/// A path as a log line may carry it: at most [`LOGGED_PATH_BYTES`] bytes (cut at a character
/// boundary, with `...` when cut).
pub fn logged(path: &str) -> std::borrow::Cow<'_, str> {
    if path.len() <= LOGGED_PATH_BYTES {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut end = LOGGED_PATH_BYTES;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}...", &path[..end]))
}

/// Whether a plain-HTTP request counts as HTTPS: it comes from a trusted proxy that says so in the
/// first value of `X-Forwarded-Proto` (any case).
pub fn forwarded_https(
    trusted: &[ipnet::IpNet],
    peer: Option<IpAddr>,
    forwarded_proto: Option<&str>,
) -> bool {
    let Some(peer) = peer else { return false };
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    if !trusted.iter().any(|net| net.contains(&peer)) {
        return false;
    }
    forwarded_proto
        .and_then(|value| value.split(',').next())
        .is_some_and(|first| first.trim().eq_ignore_ascii_case("https"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, value: &str, scopes: &[&str]) -> Token {
        Token {
            name: name.into(),
            digest: Digest::of(value.as_bytes()),
            scopes: scopes
                .iter()
                .map(|s| PathScope::parse(s).expect("scope"))
                .collect(),
        }
    }

    #[test]
    fn tokens_are_found_by_value_and_scoped() {
        let tokens = vec![token("a", "ta", &["/ci"]), token("b", "tb", &["/team/*"])];
        assert_eq!(
            find_token(&tokens, "tb").map(|t| t.name.as_str()),
            Some("b")
        );
        assert!(find_token(&tokens, "tc").is_none());
        assert!(find_token(&tokens, "").is_none());
        let b = find_token(&tokens, "tb").expect("b");
        assert!(b.allows("/team/x") && b.allows("/team/x/y"));
        assert!(!b.allows("/team") && !b.allows("/team/") && !b.allows("/teams/x"));
        let a = find_token(&tokens, "ta").expect("a");
        assert!(a.allows("/ci") && !a.allows("/ci/x"));
    }

    /// Compiles only while `Digest` has no `PartialEq`: were there one, the two impls below
    /// would both apply and the call would be ambiguous. Comparisons must stay constant-time.
    #[test]
    fn digests_have_no_variable_time_equality() {
        trait AmbiguousIfEq<A> {
            fn check() {}
        }
        impl<T: ?Sized> AmbiguousIfEq<()> for T {}
        #[allow(dead_code)]
        struct IsEq;
        impl<T: ?Sized + PartialEq> AmbiguousIfEq<IsEq> for T {}
        <Digest as AmbiguousIfEq<_>>::check();
        assert!(Digest::of(b"a").matches(&Digest::of(b"a")));
    }

    #[test]
    fn sha256_digests_match_plain_tokens() {
        let hex_digits = hex::encode(Sha256::digest(b"secret-token"));
        let d = Digest::from_hex(&hex_digits).expect("hex");
        assert!(d.matches(&Digest::of(b"secret-token")));
        assert!(Digest::from_hex("abc").is_none());
        assert!(Digest::from_hex(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn scopes_and_paths_are_validated() {
        assert_eq!(PathScope::parse("/*"), Ok(PathScope::Below("/".into())));
        assert!(PathScope::parse("/*")
            .expect("root")
            .matches("/anything/below"));
        for bad in ["ci", "/a/*/b", "/a*", "/a/../b", "/a//b", "/a b", "/a?x"] {
            assert!(PathScope::parse(bad).is_err(), "{bad}");
        }
        assert!(check_path("/").is_ok());
        assert!(check_path("/team/a/search").is_ok());
        assert!(check_path("/./x").is_err());
    }

    #[test]
    fn forwarded_proto_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let proxy: Option<IpAddr> = Some("10.1.2.3".parse().expect("ip"));
        let other: Option<IpAddr> = Some("192.0.2.1".parse().expect("ip"));
        assert!(forwarded_https(&trusted, proxy, Some("https")));
        assert!(forwarded_https(&trusted, proxy, Some("HTTPS, http")));
        assert!(!forwarded_https(&trusted, proxy, Some("http, https")));
        assert!(!forwarded_https(&trusted, proxy, None));
        assert!(!forwarded_https(&trusted, other, Some("https")));
        let mapped: Option<IpAddr> = Some("::ffff:10.0.0.1".parse().expect("ip"));
        assert!(forwarded_https(&trusted, mapped, Some("https")));
    }
}
