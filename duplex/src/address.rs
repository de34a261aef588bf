//! How an endpoint is addressed over HTTP and WebSocket: endpoint paths, the method segment of
//! an HTTP call, and the credentials a request carries (`token` and `secret` in the query
//! string, or `Authorization: Bearer` and `X-Duplex-Secret`). Shared by the gateway, which reads
//! them from every request, and by peers, which write them.

/// Credentials and options a request carries in its query string and headers. Its `Debug`
/// shows which credentials are present, never their values; there is no `==` (compare digests).
#[derive(Default, Clone)]
pub struct Credentials {
    /// Publish token (`token=` or `Authorization: Bearer`).
    pub token: Option<String>,
    /// Client secret (`secret=` or `X-Duplex-Secret`).
    pub secret: Option<String>,
    /// `token` came from `Authorization: Bearer`, not from the query string: on an endpoint
    /// that takes signed client tokens it may be the client's JWT.
    pub token_from_header: bool,
    /// A client's signed token from the query string (`access_token=`, for browsers).
    pub access_token: Option<String>,
    /// `async=true` on an HTTP call.
    pub is_async: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |present: bool| if present { "<redacted>" } else { "<none>" };
        f.debug_struct("Credentials")
            .field("token", &shown(self.token.is_some()))
            .field("secret", &shown(self.secret.is_some()))
            .field("access_token", &shown(self.access_token.is_some()))
            .field("is_async", &self.is_async)
            .finish()
    }
}

impl Credentials {
    /// Reads credentials from a query string (first occurrence wins) and headers (used when the
    /// query has none): `header(name)` gives a header's value. Empty values count as missing.
    pub fn parse<'h>(query: Option<&str>, header: impl Fn(&str) -> Option<&'h str>) -> Credentials {
        let mut creds = Credentials::default();
        if let Some(query) = query {
            for (key, value) in form_urlencoded::parse(query.as_bytes()) {
                match key.as_ref() {
                    "token" if creds.token.is_none() && !value.is_empty() => {
                        creds.token = Some(value.into_owned())
                    }
                    "secret" if creds.secret.is_none() && !value.is_empty() => {
                        creds.secret = Some(value.into_owned())
                    }
                    "access_token" if creds.access_token.is_none() && !value.is_empty() => {
                        creds.access_token = Some(value.into_owned())
                    }
                    "async" => creds.is_async = value == "true" || value == "1",
                    _ => {}
                }
            }
        }
        if creds.token.is_none() {
            creds.token_from_header = true;
            creds.token = header("authorization")
                .map(str::trim)
                .and_then(|v| {
                    let (scheme, rest) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
                })
                .map(str::to_string);
        }
        if creds.secret.is_none() {
            creds.secret = header("x-duplex-secret").map(|s| s.trim().to_string());
        }
        creds.token = creds.token.filter(|t| !t.is_empty());
        creds.token_from_header &= creds.token.is_some();
        creds.secret = creds.secret.filter(|s| !s.is_empty());
        creds
    }
}

/// Splits `/team/a/search` into the endpoint `/team/a` and the method `search`. None for a
/// path that is not absolute or has no method segment.
pub fn split_call_path(path: &str) -> Option<(&str, &str)> {
    if !path.starts_with('/') {
        return None;
    }
    let (endpoint, method) = path.rsplit_once('/')?;
    if method.is_empty() {
        return None;
    }
    Some((if endpoint.is_empty() { "/" } else { endpoint }, method))
}

/// Why a path is refused (the message says which rule it breaks).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPath(pub String);

/// Checks that `path` is a usable endpoint path: starts with `/`, no empty, `.` or `..` segments
/// (so a path means the same to every client library), printable ASCII only.
pub fn check_path(path: &str) -> Result<(), InvalidPath> {
    if !path.starts_with('/') {
        return Err(InvalidPath(format!(
            "`{path}`: an endpoint path starts with `/`"
        )));
    }
    if path
        .bytes()
        .any(|b| !(0x21..0x7f).contains(&b) || b == b'?' || b == b'#')
    {
        return Err(InvalidPath(format!(
            "`{}`: an endpoint path is printable ASCII without `?` or `#`",
            path.escape_debug()
        )));
    }
    if path == "/" {
        return Ok(());
    }
    let inner = path.strip_suffix('/').unwrap_or(path);
    for segment in inner[1..].split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(InvalidPath(format!(
                "`{path}`: empty, `.` and `..` segments are not allowed"
            )));
        }
    }
    Ok(())
}

/// Checks the raw path of a request for `%`-escapes that could make it mean something else
/// further on: an escaped `/`, `.`, `?`, `#` or `\\`, or an escaped control character. Paths are
/// taken as they are sent (never decoded), so `/a%2fb` and `/a/b` would be two endpoints, and
/// `%2e%2e` a `..` to whatever decodes it later: refused instead.
pub fn check_escapes(path: &str) -> Result<(), InvalidPath> {
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|hex_digits| std::str::from_utf8(hex_digits).ok())
            .and_then(|hex_digits| u8::from_str_radix(hex_digits, 16).ok());
        if let Some(b) = escaped {
            if matches!(b, b'/' | b'.' | b'?' | b'#' | b'\\') || b < 0x20 || b == 0x7f {
                return Err(InvalidPath(format!(
                    "the path has an escaped `{}`: separators and control characters must not be escaped",
                    if b.is_ascii_graphic() { (b as char).to_string() } else { format!("\\x{b:02x}") }
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_segment_is_the_method() {
        assert_eq!(
            split_call_path("/team/a/search"),
            Some(("/team/a", "search"))
        );
        assert_eq!(split_call_path("/chat/echo"), Some(("/chat", "echo")));
        assert_eq!(split_call_path("/echo"), Some(("/", "echo")));
        assert_eq!(split_call_path("/chat/"), None);
        assert_eq!(split_call_path(""), None);
        // Found by the fuzzer: a path that is not absolute has no endpoint.
        assert_eq!(split_call_path("*\u{fffd}/*"), None);
        assert_eq!(split_call_path("a/b"), None);
    }

    #[test]
    fn escaped_separators_and_controls_are_refused() {
        for bad in [
            "/a/%2e%2e/b",
            "/a%2Fb",
            "/a%2fb",
            "/a%3f",
            "/a%23",
            "/%00",
            "/a%0A",
            "/a%7f",
            "/a%5C",
        ] {
            assert!(check_escapes(bad).is_err(), "{bad}");
        }
        for good in [
            "/a",
            "/a%20b",
            "/caf%C3%A9",
            "/a%",
            "/a%2",
            "/100%zz",
            "/a/b.c",
        ] {
            assert!(check_escapes(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn credentials_come_from_the_query_first_then_headers() {
        let headers = |name: &str| match name {
            "authorization" => Some("Bearer from-header"),
            "x-duplex-secret" => Some(" header-secret "),
            _ => None,
        };
        let c = Credentials::parse(Some("token=t%2B1&secret=&async=1"), headers);
        assert_eq!(c.token.as_deref(), Some("t+1"));
        assert_eq!(c.secret.as_deref(), Some("header-secret"));
        assert!(c.is_async);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("t+1") && !shown.contains("header-secret"),
            "{shown}"
        );
    }
}
