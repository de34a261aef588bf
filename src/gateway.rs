//! The Pingora `ProxyHttp` front: every request is decided here and served inside
//! `request_filter`; nothing is proxied upstream.
//!
//! ```text
//!  request ──> decide(facts, config, registry) ──┬─ Refuse ───> the status table's answer
//!              (pure: the status table of         ├─ Publish ──> 101 ──> ws::serve_backend ──> mux
//!               docs/http-api.md, in order)       ├─ Connect ──> join (503) ──> 101 ──> ws::serve_client ──> mux
//!                                                 └─ Call ─────> http_api::serve (413, 400, ...) ──> mux
//! ```
//!
//! [`decide`] holds every check that needs only the request line, the headers, the config and
//! the endpoints, in the order of the status table; it is tested by a table of cases. What
//! follows it (joining an endpoint, reading a body, the upgrade) happens in the hand-off.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorType};

use crate::app::{ws_settings, App, Counted};
use crate::auth::{self, Digest};
use crate::cluster::{Client, Cluster, ClusterClient};
use crate::config::{Config, Serves};
use crate::edge::{self, Limited};
use crate::http_api::{self, refuse, refuse_join, split_call_path};
use crate::metrics::{metrics, Rejection};
use crate::mux::{self, Endpoint, Registry};
use crate::timeouts::{self, Phase};
use crate::ws::{self, WsStream};
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

/// The answer of the status table for a request that goes no further.
#[derive(Debug)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// The `reason` it is counted under, if any.
    pub reason: Option<Rejection>,
    /// The publishing token's name, when known (for the log line).
    pub token: Option<String>,
    /// What went wrong, for the error body.
    pub message: Cow<'static, str>,
    /// Extra response headers.
    pub headers: &'static [(&'static str, &'static str)],
    /// The endpoint whose HTTP call this was (its metrics count the answer).
    pub endpoint: Option<Arc<Endpoint>>,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision {
    /// Answer with an error.
    Refuse(Refusal),
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
    },
    /// An HTTP call of `method` on `endpoint`.
    Call {
        /// The endpoint.
        endpoint: Target,
        /// The method segment of the path.
        method: String,
        /// The digest of the secret the caller presented (checked).
        secret: Digest,
    },
}

/// Where a client's endpoint is served.
#[derive(Debug, Clone)]
pub enum Target {
    /// This node's endpoint (a single node).
    Local(Arc<Endpoint>),
    /// In a cluster: this node's endpoint (if it has one) or other nodes'.
    Cluster {
        /// The endpoint path.
        path: String,
        /// This node's endpoint at the path, if any.
        local: Option<Arc<Endpoint>>,
        /// The cluster.
        cluster: Arc<Cluster>,
    },
}

impl Target {
    /// The endpoint path.
    pub fn path(&self) -> &str {
        match self {
            Target::Local(e) => e.path(),
            Target::Cluster { path, .. } => path,
        }
    }

    /// This node's endpoint at the path, if any.
    pub fn local(&self) -> Option<&Arc<Endpoint>> {
        match self {
            Target::Local(e) => Some(e),
            Target::Cluster { local, .. } => local.as_ref(),
        }
    }

    /// Joins a client (WebSocket when `websocket`, else an HTTP call) that presented `secret`.
    pub fn join(
        &self,
        websocket: bool,
        max_clients: usize,
        secret: Digest,
    ) -> Result<Client, mux::JoinError> {
        match self {
            Target::Local(e) => e.join(websocket, max_clients, &secret).map(Client::Local),
            Target::Cluster {
                path,
                local,
                cluster,
            } => ClusterClient::join(
                cluster,
                local.as_ref(),
                path,
                websocket,
                max_clients,
                secret,
            )
            .map(|c| Client::Cluster(Box::new(c))),
        }
    }
}

/// Finds the endpoint at `path`: this node's, or (in a cluster) one another node announces.
/// Returns it with whether `secret` is its client secret (constant time).
fn find(
    path: &str,
    secret: Option<&str>,
    registry: &Registry,
    cluster: Option<&Arc<Cluster>>,
) -> Option<(Target, Option<Digest>)> {
    let local = registry.lookup(path);
    let digest = secret.map(|s| Digest::of(s.as_bytes()));
    let Some(cluster) = cluster else {
        let endpoint = local?;
        let ok = digest.filter(|d| endpoint.secret_matches(d));
        return Some((Target::Local(endpoint), ok));
    };
    if local.is_none() && !cluster.knows(path) {
        return None;
    }
    let ok = digest.filter(|d| {
        local.as_ref().is_some_and(|e| e.secret_matches(d)) || cluster.secret_matches(path, d)
    });
    Some((
        Target::Cluster {
            path: path.to_string(),
            local,
            cluster: cluster.clone(),
        },
        ok,
    ))
}

fn refusal(
    status: u16,
    reason: Option<Rejection>,
    message: impl Into<Cow<'static, str>>,
) -> Decision {
    Decision::Refuse(Refusal {
        status,
        reason,
        token: None,
        message: message.into(),
        headers: &[],
        endpoint: None,
    })
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
        return refusal(429, Some(limited.reason), limited.message());
    }
    let is_get = *req.method == http::Method::GET;
    if !is_get && *req.method != http::Method::POST {
        return Decision::Refuse(Refusal {
            headers: &[("allow", "GET, POST")],
            ..refused(
                405,
                None,
                "only GET (WebSocket) and POST (calls) are served",
            )
        });
    }
    if let Err(why) = auth::check_escapes(req.path) {
        return refusal(400, Some(Rejection::BadPath), why);
    }
    if let Err(why) = auth::check_lengths(req.path, !is_get) {
        return refusal(400, Some(Rejection::BadPath), why);
    }
    // Listener roles come before the credentials: a listener that does not serve backends
    // never looks at a token, and one that does not serve clients has no endpoints for them.
    let publish = is_get && req.creds.token.is_some();
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
        return decide_call(req, registry, cluster);
    }
    match &req.creds.token {
        Some(token) => decide_publish(req, token, config, registry, cluster),
        None => decide_connect(req, registry, cluster),
    }
}

fn refused(status: u16, reason: Option<Rejection>, message: &'static str) -> Refusal {
    Refusal {
        status,
        reason,
        token: None,
        message: Cow::Borrowed(message),
        headers: &[],
        endpoint: None,
    }
}

fn upgrade_required() -> Decision {
    Decision::Refuse(Refusal {
        headers: &[("upgrade", "websocket")],
        ..refused(
            426,
            None,
            "a WebSocket upgrade over HTTP/1.1 is required (POST <endpoint>/<method> for plain HTTP calls)",
        )
    })
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
        Decision::Refuse(Refusal {
            token: Some(token.name.clone()),
            message,
            ..refused(status, Some(reason), "")
        })
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
    let fixed = config.endpoint(req.path).secret;
    let secret = match (&req.creds.secret, fixed) {
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

/// `GET <path>?secret=S`: 426, 404, 401.
fn decide_connect(
    req: &Facts<'_>,
    registry: &Registry,
    cluster: Option<&Arc<Cluster>>,
) -> Decision {
    if !req.upgrade {
        return upgrade_required();
    }
    let Some((endpoint, secret)) = find(req.path, req.creds.secret.as_deref(), registry, cluster)
    else {
        return refusal(
            404,
            Some(Rejection::NotFound),
            "no backend is published at this path",
        );
    };
    match secret {
        Some(secret) => Decision::Connect { endpoint, secret },
        None => refusal(401, Some(Rejection::BadSecret), "missing or wrong secret"),
    }
}

/// `POST <endpoint>/<method>`: 404, 401 (the body's 413 and 400 come when it is read).
fn decide_call(req: &Facts<'_>, registry: &Registry, cluster: Option<&Arc<Cluster>>) -> Decision {
    let Some((path, method)) = split_call_path(req.path) else {
        return refusal(
            404,
            Some(Rejection::NotFound),
            "POST <endpoint>/<method> calls a method",
        );
    };
    let Some((endpoint, secret)) = find(path, req.creds.secret.as_deref(), registry, cluster)
    else {
        return refusal(
            404,
            Some(Rejection::NotFound),
            "no backend is published at this endpoint",
        );
    };
    match secret {
        Some(secret) => Decision::Call {
            endpoint,
            method: method.to_string(),
            secret,
        },
        None => Decision::Refuse(Refusal {
            endpoint: endpoint.local().cloned(),
            ..refused(401, Some(Rejection::BadSecret), "missing or wrong secret")
        }),
    }
}

/// The Pingora proxy: decides every request and serves it in `request_filter`.
pub struct Gateway {
    app: Arc<App>,
}

impl Gateway {
    /// A proxy serving `app`.
    pub fn new(app: Arc<App>) -> Gateway {
        Gateway { app }
    }

    async fn serve(&self, session: &mut Session) -> pingora::Result<()> {
        let started = Instant::now();
        let config = self.app.config.load_full();
        let stopping = self.app.active.draining.load(Ordering::SeqCst);
        let creds = credentials(session.req_header());
        let header = |name: &str| {
            session
                .req_header()
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
        };
        let origin = header("origin");
        let preflight = session.req_header().method == http::Method::OPTIONS
            && origin.is_some()
            && header("access-control-request-method").is_some();
        // An allowed browser origin sees every answer (errors included).
        let allow_origin = config
            .cors
            .as_ref()
            .zip(origin)
            .and_then(|(cors, origin)| cors.allow(origin));
        let serves = session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map_or_else(Serves::default, |local| config.serves(*local));
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| edge::client_ip(&config.trusted_proxies, a.ip(), header("x-forwarded-for")));
        let edge = &self.app.edge;
        let tls = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some();
        // A TLS connection's first request ends the watchdog's watch (its socket's cookie names
        // it; asked of the kernel for TLS connections only).
        if let (true, Some(watchdog)) = (tls, edge::WATCHDOG.get()) {
            if let Some(cookie) = session
                .digest()
                .and_then(|d| d.socket_digest.as_ref())
                .and_then(|d| d.socket_cookie().ok())
            {
                watchdog.arrived(cookie);
            }
        }
        let limited = client_ip.and_then(|ip| edge.request(ip).err());
        let retry_after = limited.map(|l| l.retry_after_secs().to_string());
        let decision = {
            let req = session.req_header();
            let facts = Facts {
                method: &req.method,
                path: req.uri.path(),
                creds: &creds,
                https: is_https(session, &config),
                upgrade: ws::is_upgrade(req),
                stopping,
                origin,
                preflight,
                serves,
                limited,
            };
            decide(&facts, &config, &self.app.registry, self.app.cluster.get())
        };
        let cors: Vec<(&str, &str)> = match &allow_origin {
            Some(value) => vec![("access-control-allow-origin", value), ("vary", "Origin")],
            None => Vec::new(),
        };
        match decision {
            Decision::Preflight { allow_origin } => {
                let headers = [
                    ("access-control-allow-origin", allow_origin.as_str()),
                    ("access-control-allow-methods", "POST"),
                    (
                        "access-control-allow-headers",
                        "content-type, x-duplex-secret",
                    ),
                    ("access-control-max-age", "600"),
                    ("vary", "Origin"),
                ];
                http_api::respond_empty(session, 204, &headers).await
            }
            Decision::Refuse(refusal) => {
                if stopping {
                    session.set_keepalive(None);
                }
                if matches!(refusal.status, 401 | 403) {
                    if let Some(ip) = client_ip {
                        edge.auth_failed(ip);
                    }
                }
                let retry_after = retry_after
                    .as_deref()
                    .filter(|_| refusal.status == 429)
                    .map(|secs| ("retry-after", secs));
                let headers: Vec<(&str, &str)> = refusal
                    .headers
                    .iter()
                    .copied()
                    .chain(retry_after)
                    .chain(cors.iter().copied())
                    .collect();
                refuse(
                    session,
                    refusal.status,
                    refusal.reason,
                    refusal.token.as_deref(),
                    &refusal.message,
                    &headers,
                )
                .await?;
                if let Some(endpoint) = refusal.endpoint {
                    endpoint.count_http_call("401", started.elapsed().as_secs_f64());
                }
                Ok(())
            }
            Decision::Call {
                endpoint,
                method,
                secret,
            } => {
                if let Some(Err(limited)) = edge.endpoint(endpoint.path()).map(|b| b.take()) {
                    return refuse_limited(session, limited, &cors).await;
                }
                let _counted = Counted::new(&self.app.active.http);
                // Each path's future is boxed on its own, so a request only allocates (and
                // moves) the state of the path it takes.
                let call = http_api::Call {
                    endpoint: &endpoint,
                    method: &method,
                    secret,
                    is_async: creds.is_async,
                    started,
                    headers: &cors,
                };
                Box::pin(http_api::serve(session, &config, call)).await
            }
            Decision::Publish { token, secret } => {
                if creds
                    .secret
                    .as_ref()
                    .is_some_and(|s| s.len() < auth::SHORT_SECRET_BYTES)
                {
                    tracing::warn!(
                        endpoint = %auth::logged(session.req_header().uri.path()),
                        token = %token.0,
                        "publish with a client secret of fewer than {} bytes: easy to guess",
                        auth::SHORT_SECRET_BYTES
                    );
                }
                Box::pin(self.publish(session, &config, token, secret)).await
            }
            Decision::Connect { endpoint, secret } => {
                let limits = ws::CallLimits {
                    edge: edge.clone(),
                    ip: client_ip,
                    endpoint: edge.endpoint(endpoint.path()),
                };
                Box::pin(self.connect(session, &config, endpoint, secret, &cors, limits)).await
            }
        }
    }

    /// A backend publishing the request's path: upgrade, then (in a task of its own) the
    /// handshake, a last check of its credentials, and the registration.
    async fn publish(
        &self,
        session: &mut Session,
        config: &Config,
        token: (String, Digest),
        secret: Digest,
    ) -> pingora::Result<()> {
        let path = session.req_header().uri.path().to_string();
        let settings = ws_settings(&config.limits);
        let counted = Counted::new(&self.app.active.websockets);
        let Some(ws) = WsStream::upgrade(session, &settings, ws::BACKEND_READ_CHUNK).await else {
            return Ok(());
        };
        let app = self.app.clone();
        let (token_name, token_digest) = token;
        tokio::spawn(async move {
            let _counted = counted;
            let settings = || ws_settings(&app.config.load().limits);
            ws::serve_backend(ws, settings, || {
                // The gateway began to stop during the handshake: the drain has already
                // closed the backends it knew of.
                if app.active.draining.load(Ordering::SeqCst) {
                    return Err(mux::CloseReason::new(
                        mux::close::GOING_AWAY,
                        "gateway shutting down",
                    ));
                }
                // The handshake took time: a reload may have revoked the token meanwhile.
                let _lock = app
                    .publish_lock
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let now = app.config.load();
                let allowed = auth::may_publish(&now.tokens, &token_digest, &path);
                let secret_ok = now
                    .endpoint(&path)
                    .secret
                    .is_none_or(|fixed| fixed.matches(&secret));
                if !allowed || !secret_ok {
                    tracing::info!(endpoint = %crate::auth::logged(&path), token = %token_name, "publish refused: credentials revoked by a reload");
                    return Err(mux::CloseReason::new(
                        mux::close::POLICY,
                        "credentials revoked by a config reload",
                    ));
                }
                let fixed = now.endpoint(&path).secret.is_some();
                // In a cluster the pool spans every node: the nodes settle it from their
                // heartbeats (the longest-connected backends anywhere are closed).
                let max_backends = now.max_backends(&path);
                match app.registry.publish(
                    &path,
                    secret,
                    (&token_name, token_digest),
                    max_backends,
                    fixed,
                ) {
                    Ok(conn) => {
                        tracing::info!(endpoint = %crate::auth::logged(&path), token = %token_name, "backend published");
                        Ok(conn)
                    }
                    Err(mux::PublishError::SecretConflict) => {
                        metrics().reject(Rejection::SecretConflict);
                        tracing::info!(endpoint = %crate::auth::logged(&path), token = %token_name, "publish refused: another backend joined with another secret meanwhile");
                        Err(mux::CloseReason::new(
                            mux::close::POLICY,
                            "the endpoint's live backends use another secret",
                        ))
                    }
                }
            })
            .await;
            tracing::info!(endpoint = %crate::auth::logged(&path), token = %token_name, "backend disconnected");
        });
        Ok(())
    }

    /// A client of `endpoint`: join (503 when it is full), upgrade, then serve it in a task of
    /// its own.
    async fn connect(
        &self,
        session: &mut Session,
        config: &Config,
        endpoint: Target,
        secret: Digest,
        headers: &[(&str, &str)],
        limits: ws::CallLimits,
    ) -> pingora::Result<()> {
        let conn = match endpoint.join(true, config.max_clients(endpoint.path()), secret) {
            Ok(conn) => conn,
            Err(e) => return refuse_join(session, e, headers).await,
        };
        let counted = Counted::new(&self.app.active.websockets);
        let settings = ws_settings(&config.limits);
        let Some(ws) = WsStream::upgrade(session, &settings, ws::CLIENT_READ_CHUNK).await else {
            return Ok(());
        };
        let app = self.app.clone();
        tokio::spawn(async move {
            let _counted = counted;
            let conn = ws::LimitedClient::new(conn, limits);
            ws::serve_client(ws, conn, || ws_settings(&app.config.load().limits)).await;
        });
        Ok(())
    }
}

/// 429 for a request over a limit, with `Retry-After`.
async fn refuse_limited(
    session: &mut Session,
    limited: Limited,
    cors: &[(&str, &str)],
) -> pingora::Result<()> {
    let secs = limited.retry_after_secs().to_string();
    let headers: Vec<(&str, &str)> = std::iter::once(("retry-after", secs.as_str()))
        .chain(cors.iter().copied())
        .collect();
    refuse(
        session,
        429,
        Some(limited.reason),
        None,
        limited.message(),
        &headers,
    )
    .await
}

/// Whether the request came over TLS, or from a trusted proxy that terminated TLS.
fn is_https(session: &Session, config: &Config) -> bool {
    let tls = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .is_some();
    if tls {
        return true;
    }
    let peer: Option<IpAddr> = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let proto = session
        .req_header()
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok());
    auth::forwarded_https(&config.trusted_proxies, peer, proto)
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    /// No modules: the default adds a (disabled) compression module that would still run on
    /// every request. The gateway's answers are small JSON, written here.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        // Every request is answered in request_filter.
        Err(Error::explain(ErrorType::InternalError, "no upstream"))
    }

    /// What Pingora's own log lines say about a request: the method and the path, never the
    /// query string (it may carry `token=` or `secret=`) nor any header.
    fn request_summary(&self, session: &Session, _ctx: &Self::CTX) -> String {
        let req = session.req_header();
        format!("{} {:?}", req.method, auth::logged(req.uri.path()))
    }

    /// Errors returned from `request_filter` (the peer hung up mid-body or mid-stream, a write
    /// timed out) are the peer's doing, not the gateway's: one debug line, by path only, instead
    /// of Pingora's error line.
    fn suppress_error_log(&self, session: &Session, _ctx: &Self::CTX, error: &Error) -> bool {
        tracing::debug!(
            error = ?error.etype(),
            source = ?error.esource(),
            path = ?auth::logged(session.req_header().uri.path()),
            "request ended early"
        );
        true
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<bool> {
        // The headers are in: no deadline while the request is served; then the connection's
        // idle time counts (see `timeouts`). An upgraded connection has left the session.
        timeouts::enter(session.downstream_session.stream(), Phase::Busy);
        let served = self.serve(session).await;
        timeouts::enter(session.downstream_session.stream(), Phase::Idle);
        served?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Decision::Refuse(r) => (r.status.to_string(), r.reason.map(Rejection::as_str)),
            Decision::Publish { .. } => ("publish".into(), None),
            Decision::Preflight { .. } => ("204".into(), None),
            Decision::Connect { .. } => ("connect".into(), None),
            Decision::Call { .. } => ("call".into(), None),
        }
    }

    /// (case, method, path, query, https, upgrade, stopping, config, expected, reason)
    type Case<'a> = (
        &'a str,
        &'a http::Method,
        &'a str,
        String,
        bool,
        bool,
        bool,
        &'a Config,
        &'a str,
        Option<&'a str>,
    );

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
            ("stopping wins", &get, "/live", "secret=s".to_string(), true, true, true, &plain, "503", Some("stopping")),
            ("plain HTTP when TLS is required", &get, "/live", "secret=s".to_string(), false, true, false, &tls, "403", Some("tls_required")),
            ("over TLS it goes on", &get, "/live", "secret=s".to_string(), true, true, false, &tls, "connect", None),
            ("PUT", &put, "/live/m", "".to_string(), false, false, false, &plain, "405", None),
            ("TLS before method", &put, "/live/m", "".to_string(), false, false, false, &tls, "403", Some("tls_required")),
            ("escaped dot-dot", &post, "/live/%2e%2e/m", "secret=s".to_string(), false, false, false, &plain, "400", Some("bad_path")),
            ("escaped slash, publish", &get, "/a%2fb", format!("token={MAIN}&secret=s"), false, true, false, &plain, "400", Some("bad_path")),
            ("unknown token", &get, "/x", "token=nope-0123456789abc&secret=s".to_string(), false, true, false, &plain, "401", Some("bad_token")),
            ("token out of scope", &get, "/x", format!("token={TEAM}&secret=s"), false, true, false, &plain, "403", Some("token_scope")),
            ("invalid publish path", &get, "/a/../b", format!("token={MAIN}&secret=s"), false, true, false, &plain, "400", Some("bad_path")),
            ("publish without secret", &get, "/x", format!("token={MAIN}"), false, true, false, &plain, "400", Some("no_secret")),
            ("publish with a fixed secret, none given", &get, "/fixed", format!("token={MAIN}"), false, true, false, &plain, "publish", None),
            ("publish naming another secret than the fixed one", &get, "/fixed", format!("token={MAIN}&secret=other"), false, true, false, &plain, "401", Some("bad_secret")),
            ("another secret than the pool's", &get, "/live", format!("token={MAIN}&secret=other"), false, true, false, &pool, "409", Some("secret_conflict")),
            ("another secret, replacing the one backend", &get, "/live", format!("token={MAIN}&secret=other"), false, true, false, &plain, "publish", None),
            ("the pool's secret", &get, "/live", format!("token={MAIN}&secret=s"), false, true, false, &plain, "publish", None),
            ("publish without upgrade", &get, "/x", format!("token={MAIN}&secret=s"), false, false, false, &plain, "426", None),
            ("publish", &get, "/team/a", format!("token={TEAM}&secret=s"), false, true, false, &plain, "publish", None),
            ("client without upgrade", &get, "/live", "secret=s".to_string(), false, false, false, &plain, "426", None),
            ("client of nothing", &get, "/none", "secret=s".to_string(), false, true, false, &plain, "404", Some("not_found")),
            ("client with a wrong secret", &get, "/live", "secret=wrong".to_string(), false, true, false, &plain, "401", Some("bad_secret")),
            ("client without secret", &get, "/live", "".to_string(), false, true, false, &plain, "401", Some("bad_secret")),
            ("client", &get, "/live", "secret=s".to_string(), false, true, false, &plain, "connect", None),
            ("call without method", &post, "/live/", "secret=s".to_string(), false, false, false, &plain, "404", Some("not_found")),
            ("call of nothing", &post, "/none/m", "secret=s".to_string(), false, false, false, &plain, "404", Some("not_found")),
            ("call with a wrong secret", &post, "/live/m", "secret=wrong".to_string(), false, false, false, &plain, "401", Some("bad_secret")),
            ("call", &post, "/live/echo", "secret=s".to_string(), false, false, false, &plain, "call", None),
        ];
        for (name, method, path, query, https, upgrade, stopping, config, status, reason) in cases {
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

    /// (case, method, path, query, listener roles, expected, reason)
    type RoleCase<'a> = (
        &'a str,
        &'a http::Method,
        &'a str,
        String,
        Serves,
        &'a str,
        Option<&'a str>,
    );

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
            ("publish on a clients-only listener", &get, "/x", format!("token={MAIN}&secret=s"), clients, "403", Some("listener")),
            ("a bad token on a clients-only listener", &get, "/x", "token=nope-0123456789abc&secret=s".into(), clients, "403", Some("listener")),
            ("publish on a backends-only listener", &get, "/team/a", format!("token={TEAM}&secret=s"), backends, "publish", None),
            ("client on a backends-only listener", &get, "/live", "secret=s".into(), backends, "404", Some("not_found")),
            ("call on a backends-only listener", &post, "/live/echo", "secret=s".into(), backends, "404", Some("not_found")),
            ("client on a clients-only listener", &get, "/live", "secret=s".into(), clients, "connect", None),
            ("a path over 1,024 bytes", &get, &long_path, format!("token={MAIN}&secret=s"), Serves::default(), "400", Some("bad_path")),
            ("a client path over 1,024 bytes", &get, &long_path, "secret=s".into(), Serves::default(), "400", Some("bad_path")),
            ("a method over 256 bytes", &post, &long_call, "secret=s".into(), Serves::default(), "400", Some("bad_path")),
            ("a method of 256 bytes", &post, &just_fits, "secret=s".into(), Serves::default(), "call", None),
        ];
        for (name, method, path, query, serves, status, reason) in cases {
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

    /// (case, method, origin, preflight, config, expected, reason)
    type OriginCase<'a> = (
        &'a str,
        &'a http::Method,
        Option<&'a str>,
        bool,
        &'a Config,
        &'a str,
        Option<&'a str>,
    );

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
            ("no cors: OPTIONS is 405", &options, app, true, &plain, "405", None),
            ("no cors: any origin calls", &post, evil, false, &plain, "call", None),
            ("preflight from an allowed origin", &options, app, true, &cors, "204", None),
            ("the origin in another case", &options, Some("HTTPS://APP.example.com"), true, &cors, "204", None),
            ("preflight from another origin", &options, evil, true, &cors, "403", Some("origin")),
            ("call from another origin", &post, evil, false, &cors, "403", Some("origin")),
            ("call from the allowed origin", &post, app, false, &cors, "call", None),
            ("call without Origin", &post, None, false, &cors, "call", None),
            ("OPTIONS that is not a preflight", &options, app, false, &cors, "405", None),
            ("any origin", &options, evil, true, &any, "204", None),
            ("TLS first", &options, app, true, &tls, "403", Some("tls_required")),
        ];
        for (name, method, origin, preflight, config, status, reason) in cases {
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
