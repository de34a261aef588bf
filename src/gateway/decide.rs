//! The status table: what to do with a request, from the request alone, the config and the
//! endpoints. Pure: it changes nothing, so every row is tested without a socket.

use std::borrow::Cow;
use std::sync::Arc;

use pingora::http::RequestHeader;

use crate::auth::{self, Digest};
use crate::cluster::Cluster;
use crate::config::{Config, Serves};
use crate::edge::Limited;
use crate::identity::{Identity, JwtError};
use crate::metrics::Rejection;
use crate::mux::Registry;
use crate::refusal::Refusal;
use crate::target::{self, Target};
pub use duplex::address::split_call_path;
pub use duplex::address::Credentials;

/// Reads the credentials of a request from its query string and headers.
pub fn credentials(req: &RequestHeader) -> Credentials {
    Credentials::parse(req.uri.query(), |name| {
        req.headers.get(name).and_then(|v| v.to_str().ok())
    })
}

/// What [`decide`] needs to know about a request.
#[derive(Debug)]
pub struct Facts<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a http::Method,
    /// The path, as sent (not decoded).
    pub path: &'a str,
    /// Token, secret and `async` from the query string and headers.
    pub creds: &'a Credentials,
    /// The request came over TLS, or from a trusted proxy that says it did.
    pub https: bool,
    /// The request asks for a WebSocket upgrade.
    pub upgrade: bool,
    /// The gateway is stopping.
    pub stopping: bool,
    /// The `Origin` header (browsers send it).
    pub origin: Option<&'a str>,
    /// `OPTIONS` with `Origin` and `Access-Control-Request-Method`: a browser's CORS preflight.
    pub preflight: bool,
    /// Whom the listener the request came in on serves.
    pub serves: Serves,
    /// The client's address or connection is over one of its limits ([`crate::edge`]).
    pub limited: Option<Limited>,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision {
    /// Answer with an error; an HTTP call's refusal counts in its endpoint's series.
    Refuse(Refusal, Option<Target>),
    /// A CORS preflight from an allowed origin: 204 with the CORS headers.
    Preflight {
        /// `Access-Control-Allow-Origin`.
        allow_origin: String,
    },
    /// A backend publishing `path`: upgrade, handshake, register.
    Publish {
        /// The publishing token's name and digest.
        token: (String, Digest),
        /// The secret clients must present from now on.
        secret: Digest,
    },
    /// A client of `endpoint`: join, upgrade, handshake.
    Connect {
        /// The endpoint.
        endpoint: Target,
        /// The digest of the secret the client presented (checked).
        secret: Digest,
        /// Who the client is, when the endpoint takes signed tokens (checked).
        identity: Option<Arc<Identity>>,
    },
    /// An HTTP call of `method` on `endpoint`.
    Call {
        /// The endpoint.
        endpoint: Target,
        /// The method segment of the path.
        method: String,
        /// The digest of the secret the caller presented (checked).
        secret: Digest,
        /// Who the caller is, when the endpoint takes signed tokens (checked).
        identity: Option<Arc<Identity>>,
    },
}

fn refusal(
    status: u16,
    reason: Option<Rejection>,
    message: impl Into<Cow<'static, str>>,
) -> Decision {
    Decision::Refuse(Refusal::new(status, reason, message), None)
}

/// The status table: every check that needs only the request, the config and the endpoints, in
/// the order of `docs/http-api.md` (a gateway that is stopping answers 503 before anything
/// else). Pure: it changes nothing.
pub fn decide(
    req: &Facts<'_>,
    config: &Config,
    registry: &Registry,
    cluster: Option<&Arc<Cluster>>,
) -> Decision {
    if req.stopping {
        return refusal(
            503,
            Some(Rejection::Stopping),
            "the gateway is shutting down",
        );
    }
    if config.tls_required && !req.https {
        return refusal(
            403,
            Some(Rejection::TlsRequired),
            "TLS required: use https:// or wss://",
        );
    }
    // Browsers: with `cors` set, a preflight from an allowed origin is answered, and a request
    // from any other origin is refused; requests without `Origin` are not browsers'.
    if let (Some(cors), Some(origin)) = (&config.cors, req.origin) {
        match cors.allow(origin) {
            Some(allow_origin) if req.preflight => return Decision::Preflight { allow_origin },
            Some(_) => {}
            None => {
                return refusal(
                    403,
                    Some(Rejection::Origin),
                    "this origin may not call the gateway",
                )
            }
        }
    }
    // A refused address costs the gateway nothing more.
    if let Some(limited) = req.limited {
        return Decision::Refuse(Refusal::limited(limited), None);
    }
    let is_get = *req.method == http::Method::GET;
    if !is_get && *req.method != http::Method::POST {
        return Decision::Refuse(
            Refusal::new(
                405,
                None,
                "only GET (WebSocket) and POST (calls) are served",
            )
            .with_headers(&[("allow", "GET, POST")]),
            None,
        );
    }
    if let Err(why) = auth::check_escapes(req.path) {
        return refusal(400, Some(Rejection::BadPath), why.0);
    }
    if let Err(why) = auth::check_lengths(req.path, !is_get) {
        return refusal(400, Some(Rejection::BadPath), why.0);
    }
    // Listener roles come before the credentials: a listener that does not serve backends
    // never looks at a token, and one that does not serve clients has no endpoints for them.
    let publish = is_get && req.creds.token.is_some() && !client_token_in_header(req, config);
    if publish && !req.serves.backends {
        return refusal(
            403,
            Some(Rejection::Listener),
            "this listener does not take publishes",
        );
    }
    if !publish && !req.serves.clients {
        return refusal(
            404,
            Some(Rejection::NotFound),
            "no backend is published at this path",
        );
    }
    if !is_get {
        return decide_call(req, config, registry, cluster);
    }
    match &req.creds.token {
        Some(token) if publish => decide_publish(req, token, config, registry, cluster),
        _ => decide_connect(req, config, registry, cluster),
    }
}

/// Whether the `Authorization: Bearer` value of a `GET` is a client's signed token rather than
/// a publish token: on an endpoint that takes tokens, a value shaped like a JWT (three
/// base64url parts) is one. (`?token=` is always a publish.)
fn client_token_in_header(req: &Facts<'_>, config: &Config) -> bool {
    req.creds.token_from_header
        && req.creds.token.as_deref().is_some_and(looks_like_jwt)
        && config
            .endpoints
            .get(req.path)
            .is_some_and(|e| e.jwt.is_some())
}

/// Three dot-separated parts of base64url characters, the first one not empty.
fn looks_like_jwt(value: &str) -> bool {
    let base64url = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='))
    };
    let mut parts = value.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(claims), Some(signature), None) => {
            !header.is_empty() && base64url(header) && base64url(claims) && base64url(signature)
        }
        _ => false,
    }
}

/// A client's signed token: `?access_token=`, or `Authorization: Bearer`.
fn client_token(creds: &Credentials) -> Option<&str> {
    creds
        .access_token
        .as_deref()
        .or(creds.token.as_deref().filter(|_| creds.token_from_header))
}

/// The checks an endpoint's own settings add to a client or a call: its signed token (when it
/// takes them: 401 `jwt`), then the secret to present (none with `auth.secret: false`).
fn client_auth(
    req: &Facts<'_>,
    config: &Config,
    path: &str,
) -> Result<(Option<Digest>, Option<Arc<Identity>>), Refusal> {
    let Some(settings) = config.endpoints.get(path) else {
        return Ok((secret_digest(req.creds), None));
    };
    let identity = match &settings.jwt {
        None => None,
        Some(jwt) => {
            let verified = client_token(req.creds)
                .ok_or(JwtError::Missing)
                .and_then(|token| jwt.verify(token));
            match verified {
                Ok(identity) => Some(identity),
                Err(why) => {
                    return Err(Refusal::new(401, Some(Rejection::Jwt), why.to_string())
                        .with_headers(&[("www-authenticate", "Bearer")]))
                }
            }
        }
    };
    let secret = if settings.no_secret {
        Some(auth::NO_SECRET)
    } else {
        secret_digest(req.creds)
    };
    Ok((secret, identity))
}

fn secret_digest(creds: &Credentials) -> Option<Digest> {
    creds.secret.as_ref().map(|s| Digest::of(s.as_bytes()))
}

fn upgrade_required() -> Decision {
    Decision::Refuse(
        Refusal::new(
            426,
            None,
            "a WebSocket upgrade over HTTP/1.1 is required (POST <endpoint>/<method> for plain HTTP calls)",
        )
        .with_headers(&[("upgrade", "websocket")]),
        None,
    )
}

/// `GET <path>?token=T&secret=S`: 401, 403, 400 (path, secret), 409, then 426.
fn decide_publish(
    req: &Facts<'_>,
    presented: &str,
    config: &Config,
    registry: &Registry,
    cluster: Option<&Arc<Cluster>>,
) -> Decision {
    let Some(token) = auth::find_token(&config.tokens, presented) else {
        return refusal(401, Some(Rejection::BadToken), "unknown publish token");
    };
    let named = |status, reason, message: Cow<'static, str>| {
        Decision::Refuse(
            Refusal::new(status, Some(reason), message).with_token(&token.name),
            None,
        )
    };
    if !token.allows(req.path) {
        return named(
            403,
            Rejection::TokenScope,
            "this token may not publish this path".into(),
        );
    }
    if let Err(why) = auth::check_path(req.path) {
        return named(
            400,
            Rejection::BadPath,
            format!("invalid endpoint path: {why}").into(),
        );
    }
    let settings = config.endpoint(req.path);
    let fixed = settings.secret;
    // With `auth.secret: false` clients present none: what a backend names is ignored.
    let given = req.creds.secret.as_ref().filter(|_| !settings.no_secret);
    let secret = match (given, fixed) {
        (Some(given), Some(fixed)) => {
            if !fixed.matches(&Digest::of(given.as_bytes())) {
                return named(
                    401,
                    Rejection::BadSecret,
                    "the secret differs from this endpoint's configured secret".into(),
                );
            }
            fixed
        }
        (None, Some(fixed)) => fixed,
        (Some(given), None) => Digest::of(given.as_bytes()),
        (None, None) => {
            return named(
                400,
                Rejection::NoSecret,
                "a publish needs a client secret: ?secret= or X-Duplex-Secret".into(),
            );
        }
    };
    // A pool shares one secret: a publish naming another one than its live backends' is
    // refused, unless the config fixes the secret (then the checks above decided).
    let max_backends = config.max_backends(req.path);
    if fixed.is_none()
        && (registry
            .lookup(req.path)
            .is_some_and(|e| e.secret_conflicts(&secret, max_backends))
            || cluster.is_some_and(|c| c.secret_conflicts(req.path, &secret, max_backends)))
    {
        return named(
            409,
            Rejection::SecretConflict,
            "the endpoint's live backends use another secret".into(),
        );
    }
    if !req.upgrade {
        return upgrade_required();
    }
    Decision::Publish {
        token: (token.name.clone(), token.digest),
        secret,
    }
}

/// `GET <path>?secret=S`: 426, 404, 401 (`jwt`, then `bad_secret`).
fn decide_connect(
    req: &Facts<'_>,
    config: &Config,
    registry: &Registry,
    cluster: Option<&Arc<Cluster>>,
) -> Decision {
    if !req.upgrade {
        return upgrade_required();
    }
    let checked = client_auth(req, config, req.path);
    let presented = checked.as_ref().ok().and_then(|(secret, _)| *secret);
    let Some((endpoint, secret)) = target::find(req.path, presented, registry, cluster) else {
        return refusal(
            404,
            Some(Rejection::NotFound),
            "no backend is published at this path",
        );
    };
    let identity = match checked {
        Ok((_, identity)) => identity,
        Err(refusal) => return Decision::Refuse(refusal, None),
    };
    match secret {
        Some(secret) => Decision::Connect {
            endpoint,
            secret,
            identity,
        },
        None => refusal(401, Some(Rejection::BadSecret), "missing or wrong secret"),
    }
}

/// `POST <endpoint>/<method>`: 404, 401 (`jwt`, then `bad_secret`; the body's 413 and 400
/// come when it is read).
fn decide_call(
    req: &Facts<'_>,
    config: &Config,
    registry: &Registry,
    cluster: Option<&Arc<Cluster>>,
) -> Decision {
    let Some((path, method)) = split_call_path(req.path) else {
        return refusal(
            404,
            Some(Rejection::NotFound),
            "POST <endpoint>/<method> calls a method",
        );
    };
    let checked = client_auth(req, config, path);
    let presented = checked.as_ref().ok().and_then(|(secret, _)| *secret);
    let Some((endpoint, secret)) = target::find(path, presented, registry, cluster) else {
        return refusal(
            404,
            Some(Rejection::NotFound),
            "no backend is published at this endpoint",
        );
    };
    let identity = match checked {
        Ok((_, identity)) => identity,
        Err(refusal) => {
            return Decision::Refuse(refusal, endpoint.local().cloned().map(Target::Local))
        }
    };
    match secret {
        Some(secret) => Decision::Call {
            endpoint,
            method: method.to_string(),
            secret,
            identity,
        },
        None => Decision::Refuse(
            Refusal::new(401, Some(Rejection::BadSecret), "missing or wrong secret"),
            endpoint.local().cloned().map(Target::Local),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mux;

    #[test]
    fn only_a_three_part_base64url_bearer_is_a_client_token() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz."), "alg none has no signature");
        for not in [
            "main-token-0123456789",
            ".a.b",
            "a.b",
            "a.b.c.d",
            "a b.c.d",
            "a.b.c+",
        ] {
            assert!(!looks_like_jwt(not), "{not}");
        }
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", uri.as_bytes(), None).expect("request");
        for (k, v) in headers {
            req.insert_header(k.to_string(), *v).expect("header");
        }
        req
    }

    #[test]
    fn credentials_come_from_query_or_headers() {
        let c = credentials(&request("/a?token=t%2B1&secret=s&async=true", &[]));
        assert_eq!(c.token.as_deref(), Some("t+1"));
        assert_eq!(c.secret.as_deref(), Some("s"));
        assert!(c.is_async);
        let c = credentials(&request(
            "/a",
            &[("authorization", "Bearer tok"), ("x-duplex-secret", "sec")],
        ));
        assert_eq!(c.token.as_deref(), Some("tok"));
        assert_eq!(c.secret.as_deref(), Some("sec"));
        assert!(!c.is_async);
    }

    #[test]
    fn debug_output_never_shows_a_credential() {
        let c = credentials(&request("/a?token=TOKEN-VALUE&secret=SECRET-VALUE", &[]));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("TOKEN-VALUE") && !shown.contains("SECRET-VALUE"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn the_query_wins_and_empty_values_count_as_missing() {
        let c = credentials(&request(
            "/a?secret=q&secret=second",
            &[("x-duplex-secret", "h")],
        ));
        assert_eq!(c.secret.as_deref(), Some("q"));
        let c = credentials(&request(
            "/a?token=&secret=",
            &[("authorization", "Basic x")],
        ));
        assert!(c.token.is_none() && c.secret.is_none() && !c.is_async);
        // An empty query value does not hide the header.
        let c = credentials(&request(
            "/a?token=&secret=",
            &[("authorization", "Bearer tok"), ("x-duplex-secret", "h")],
        ));
        assert_eq!(c.token.as_deref(), Some("tok"));
        assert_eq!(c.secret.as_deref(), Some("h"));
    }

    const MAIN: &str = "main-token-0123456789";
    const TEAM: &str = "team-token-0123456789";

    fn config(extra: &str) -> Config {
        let text = format!(
            "listen: [{{address: 127.0.0.1:1}}]\ntokens:\n  - {{name: main, token: {MAIN}, endpoints: ['/*']}}\n  - {{name: team, token: {TEAM}, endpoints: ['/team/*']}}\nendpoints:\n  - {{path: /fixed, secret: fixed-secret}}\n{extra}"
        );
        crate::config::parse(&text, "test", &|_| None).expect("config")
    }

    /// What a decision comes to, for the table: the status (or the hand-off) and the reason.
    fn outcome(d: &Decision) -> (String, Option<&'static str>) {
        match d {
            Decision::Refuse(r, _) => (r.status.to_string(), r.reason.map(Rejection::as_str)),
            Decision::Publish { .. } => ("publish".into(), None),
            Decision::Preflight { .. } => ("204".into(), None),
            Decision::Connect { .. } => ("connect".into(), None),
            Decision::Call { .. } => ("call".into(), None),
        }
    }

    /// One row of the status table: a request, the config, and what it comes to.
    struct Case<'a> {
        name: &'a str,
        method: &'a http::Method,
        path: &'a str,
        query: String,
        https: bool,
        upgrade: bool,
        stopping: bool,
        config: &'a Config,
        /// The status, or the hand-off (`publish`, `connect`, `call`).
        expect: &'a str,
        reason: Option<&'a str>,
    }

    /// A registry with a live endpoint at `/live` (secret `s`), and its backend to keep it up.
    fn live_endpoint() -> (Arc<Registry>, mux::BackendConn) {
        let registry = Registry::new(mux::Limits::default());
        let backend = registry
            .publish(
                "/live",
                Digest::of(b"s"),
                ("main", Digest::of(MAIN.as_bytes())),
                1,
                false,
            )
            .expect("publish");
        (registry, backend)
    }

    #[test]
    fn the_status_table_in_order() {
        // A live endpoint at /live (secret "s"), kept up for the whole table.
        let (registry, _backend) = live_endpoint();
        let plain = config("");
        let pool = config("limits: {max_backends_per_endpoint: 2}");
        let tls = config("tls: {required: true}");
        let get = http::Method::GET;
        let post = http::Method::POST;
        let put = http::Method::PUT;
        let creds = |q: &str| Credentials::parse(Some(q), |_| None);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            Case { name: "stopping wins", method: &get, path: "/live", query: "secret=s".to_string(), https: true, upgrade: true, stopping: true, config: &plain, expect: "503", reason: Some("stopping") },
            Case { name: "plain HTTP when TLS is required", method: &get, path: "/live", query: "secret=s".to_string(), https: false, upgrade: true, stopping: false, config: &tls, expect: "403", reason: Some("tls_required") },
            Case { name: "over TLS it goes on", method: &get, path: "/live", query: "secret=s".to_string(), https: true, upgrade: true, stopping: false, config: &tls, expect: "connect", reason: None },
            Case { name: "PUT", method: &put, path: "/live/m", query: "".to_string(), https: false, upgrade: false, stopping: false, config: &plain, expect: "405", reason: None },
            Case { name: "TLS before method", method: &put, path: "/live/m", query: "".to_string(), https: false, upgrade: false, stopping: false, config: &tls, expect: "403", reason: Some("tls_required") },
            Case { name: "escaped dot-dot", method: &post, path: "/live/%2e%2e/m", query: "secret=s".to_string(), https: false, upgrade: false, stopping: false, config: &plain, expect: "400", reason: Some("bad_path") },
            Case { name: "escaped slash, publish", method: &get, path: "/a%2fb", query: format!("token={MAIN}&secret=s"), https: false, upgrade: true, stopping: false, config: &plain, expect: "400", reason: Some("bad_path") },
            Case { name: "unknown token", method: &get, path: "/x", query: "token=nope-0123456789abc&secret=s".to_string(), https: false, upgrade: true, stopping: false, config: &plain, expect: "401", reason: Some("bad_token") },
            Case { name: "token out of scope", method: &get, path: "/x", query: format!("token={TEAM}&secret=s"), https: false, upgrade: true, stopping: false, config: &plain, expect: "403", reason: Some("token_scope") },
            Case { name: "invalid publish path", method: &get, path: "/a/../b", query: format!("token={MAIN}&secret=s"), https: false, upgrade: true, stopping: false, config: &plain, expect: "400", reason: Some("bad_path") },
            Case { name: "publish without secret", method: &get, path: "/x", query: format!("token={MAIN}"), https: false, upgrade: true, stopping: false, config: &plain, expect: "400", reason: Some("no_secret") },
            Case { name: "publish with a fixed secret, none given", method: &get, path: "/fixed", query: format!("token={MAIN}"), https: false, upgrade: true, stopping: false, config: &plain, expect: "publish", reason: None },
            Case { name: "publish naming another secret than the fixed one", method: &get, path: "/fixed", query: format!("token={MAIN}&secret=other"), https: false, upgrade: true, stopping: false, config: &plain, expect: "401", reason: Some("bad_secret") },
            Case { name: "another secret than the pool's", method: &get, path: "/live", query: format!("token={MAIN}&secret=other"), https: false, upgrade: true, stopping: false, config: &pool, expect: "409", reason: Some("secret_conflict") },
            Case { name: "another secret, replacing the one backend", method: &get, path: "/live", query: format!("token={MAIN}&secret=other"), https: false, upgrade: true, stopping: false, config: &plain, expect: "publish", reason: None },
            Case { name: "the pool's secret", method: &get, path: "/live", query: format!("token={MAIN}&secret=s"), https: false, upgrade: true, stopping: false, config: &plain, expect: "publish", reason: None },
            Case { name: "publish without upgrade", method: &get, path: "/x", query: format!("token={MAIN}&secret=s"), https: false, upgrade: false, stopping: false, config: &plain, expect: "426", reason: None },
            Case { name: "publish", method: &get, path: "/team/a", query: format!("token={TEAM}&secret=s"), https: false, upgrade: true, stopping: false, config: &plain, expect: "publish", reason: None },
            Case { name: "client without upgrade", method: &get, path: "/live", query: "secret=s".to_string(), https: false, upgrade: false, stopping: false, config: &plain, expect: "426", reason: None },
            Case { name: "client of nothing", method: &get, path: "/none", query: "secret=s".to_string(), https: false, upgrade: true, stopping: false, config: &plain, expect: "404", reason: Some("not_found") },
            Case { name: "client with a wrong secret", method: &get, path: "/live", query: "secret=wrong".to_string(), https: false, upgrade: true, stopping: false, config: &plain, expect: "401", reason: Some("bad_secret") },
            Case { name: "client without secret", method: &get, path: "/live", query: "".to_string(), https: false, upgrade: true, stopping: false, config: &plain, expect: "401", reason: Some("bad_secret") },
            Case { name: "client", method: &get, path: "/live", query: "secret=s".to_string(), https: false, upgrade: true, stopping: false, config: &plain, expect: "connect", reason: None },
            Case { name: "call without method", method: &post, path: "/live/", query: "secret=s".to_string(), https: false, upgrade: false, stopping: false, config: &plain, expect: "404", reason: Some("not_found") },
            Case { name: "call of nothing", method: &post, path: "/none/m", query: "secret=s".to_string(), https: false, upgrade: false, stopping: false, config: &plain, expect: "404", reason: Some("not_found") },
            Case { name: "call with a wrong secret", method: &post, path: "/live/m", query: "secret=wrong".to_string(), https: false, upgrade: false, stopping: false, config: &plain, expect: "401", reason: Some("bad_secret") },
            Case { name: "call", method: &post, path: "/live/echo", query: "secret=s".to_string(), https: false, upgrade: false, stopping: false, config: &plain, expect: "call", reason: None },
        ];
        for Case {
            name,
            method,
            path,
            query,
            https,
            upgrade,
            stopping,
            config,
            expect: status,
            reason,
        } in cases
        {
            let creds = creds(&query);
            let facts = Facts {
                method,
                path,
                creds: &creds,
                https,
                upgrade,
                stopping,
                origin: None,
                preflight: false,
                serves: Serves::default(),
                limited: None,
            };
            let got = outcome(&decide(&facts, config, &registry, None));
            assert_eq!(got, (status.to_string(), reason), "{name}");
        }
    }

    /// A row of the listener-role table.
    struct RoleCase<'a> {
        name: &'a str,
        method: &'a http::Method,
        path: &'a str,
        query: String,
        serves: Serves,
        expect: &'a str,
        reason: Option<&'a str>,
    }

    #[test]
    fn listener_roles_and_lengths_come_before_the_credentials() {
        let (registry, _backend) = live_endpoint();
        let plain = config("");
        let (get, post) = (http::Method::GET, http::Method::POST);
        let clients = Serves {
            clients: true,
            backends: false,
        };
        let backends = Serves {
            clients: false,
            backends: true,
        };
        let long_path = format!("/{}", "p".repeat(auth::MAX_PATH_BYTES));
        let long_call = format!("/live/{}", "m".repeat(auth::MAX_METHOD_BYTES + 1));
        let just_fits = format!("/live/{}", "m".repeat(auth::MAX_METHOD_BYTES));
        #[rustfmt::skip]
        let cases: Vec<RoleCase> = vec![
            RoleCase { name: "publish on a clients-only listener", method: &get, path: "/x", query: format!("token={MAIN}&secret=s"), serves: clients, expect: "403", reason: Some("listener") },
            RoleCase { name: "a bad token on a clients-only listener", method: &get, path: "/x", query: "token=nope-0123456789abc&secret=s".into(), serves: clients, expect: "403", reason: Some("listener") },
            RoleCase { name: "publish on a backends-only listener", method: &get, path: "/team/a", query: format!("token={TEAM}&secret=s"), serves: backends, expect: "publish", reason: None },
            RoleCase { name: "client on a backends-only listener", method: &get, path: "/live", query: "secret=s".into(), serves: backends, expect: "404", reason: Some("not_found") },
            RoleCase { name: "call on a backends-only listener", method: &post, path: "/live/echo", query: "secret=s".into(), serves: backends, expect: "404", reason: Some("not_found") },
            RoleCase { name: "client on a clients-only listener", method: &get, path: "/live", query: "secret=s".into(), serves: clients, expect: "connect", reason: None },
            RoleCase { name: "a path over 1,024 bytes", method: &get, path: &long_path, query: format!("token={MAIN}&secret=s"), serves: Serves::default(), expect: "400", reason: Some("bad_path") },
            RoleCase { name: "a client path over 1,024 bytes", method: &get, path: &long_path, query: "secret=s".into(), serves: Serves::default(), expect: "400", reason: Some("bad_path") },
            RoleCase { name: "a method over 256 bytes", method: &post, path: &long_call, query: "secret=s".into(), serves: Serves::default(), expect: "400", reason: Some("bad_path") },
            RoleCase { name: "a method of 256 bytes", method: &post, path: &just_fits, query: "secret=s".into(), serves: Serves::default(), expect: "call", reason: None },
        ];
        for RoleCase {
            name,
            method,
            path,
            query,
            serves,
            expect: status,
            reason,
        } in cases
        {
            let creds = Credentials::parse(Some(&query), |_| None);
            let facts = Facts {
                method,
                path,
                creds: &creds,
                https: false,
                upgrade: true,
                stopping: false,
                origin: None,
                preflight: false,
                serves,
                limited: None,
            };
            let got = outcome(&decide(&facts, &plain, &registry, None));
            assert_eq!(got, (status.to_string(), reason), "{name}");
        }
    }

    /// A row of the browser-origin table.
    struct OriginCase<'a> {
        name: &'a str,
        method: &'a http::Method,
        origin: Option<&'a str>,
        preflight: bool,
        config: &'a Config,
        expect: &'a str,
        reason: Option<&'a str>,
    }

    #[test]
    fn browsers_are_checked_by_origin_when_cors_is_set() {
        let (registry, _backend) = live_endpoint();
        let plain = config("");
        let cors = config("cors: {allowed_origins: ['https://app.example.com']}");
        let any = config("cors: {allowed_origins: ['*']}");
        let tls =
            config("cors: {allowed_origins: ['https://app.example.com']}\ntls: {required: true}");
        let creds = Credentials::parse(Some("secret=s"), |_| None);
        let (post, options) = (http::Method::POST, http::Method::OPTIONS);
        let app = Some("https://app.example.com");
        let evil = Some("https://evil.example");
        #[rustfmt::skip]
        let cases: Vec<OriginCase> = vec![
            OriginCase { name: "no cors: OPTIONS is 405", method: &options, origin: app, preflight: true, config: &plain, expect: "405", reason: None },
            OriginCase { name: "no cors: any origin calls", method: &post, origin: evil, preflight: false, config: &plain, expect: "call", reason: None },
            OriginCase { name: "preflight from an allowed origin", method: &options, origin: app, preflight: true, config: &cors, expect: "204", reason: None },
            OriginCase { name: "the origin in another case", method: &options, origin: Some("HTTPS://APP.example.com"), preflight: true, config: &cors, expect: "204", reason: None },
            OriginCase { name: "preflight from another origin", method: &options, origin: evil, preflight: true, config: &cors, expect: "403", reason: Some("origin") },
            OriginCase { name: "call from another origin", method: &post, origin: evil, preflight: false, config: &cors, expect: "403", reason: Some("origin") },
            OriginCase { name: "call from the allowed origin", method: &post, origin: app, preflight: false, config: &cors, expect: "call", reason: None },
            OriginCase { name: "call without Origin", method: &post, origin: None, preflight: false, config: &cors, expect: "call", reason: None },
            OriginCase { name: "OPTIONS that is not a preflight", method: &options, origin: app, preflight: false, config: &cors, expect: "405", reason: None },
            OriginCase { name: "any origin", method: &options, origin: evil, preflight: true, config: &any, expect: "204", reason: None },
            OriginCase { name: "TLS first", method: &options, origin: app, preflight: true, config: &tls, expect: "403", reason: Some("tls_required") },
        ];
        for OriginCase {
            name,
            method,
            origin,
            preflight,
            config,
            expect: status,
            reason,
        } in cases
        {
            let facts = Facts {
                method,
                path: "/live/echo",
                creds: &creds,
                https: false,
                upgrade: false,
                stopping: false,
                origin,
                preflight,
                serves: Serves::default(),
                limited: None,
            };
            let got = outcome(&decide(&facts, config, &registry, None));
            assert_eq!(got, (status.to_string(), reason), "{name}");
        }
    }
}
