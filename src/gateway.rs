//! The Pingora `ProxyHttp` front: every request is decided here and served inside
//! `request_filter`; nothing is proxied upstream.
//!
//! ```text
//!  request ──> TLS check (403) ──> method (405) ──┬─ GET + token ──> publish checks (401/403/400)
//!                                                 │                  └─> upgrade? (426) ──> ws::serve_backend ──> mux
//!                                                 ├─ GET ──────────> upgrade? (426) ──> endpoint (404) ──> secret (401)
//!                                                 │                  └─> room (503) ──> ws::serve_client ──> mux
//!                                                 └─ POST ─────────> http_api::serve ──> mux
//! ```
//!
//! The order of the checks is the status table of `docs/http-api.md`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorType};

use crate::auth::{self, Digest};
use crate::config::{Config, Limits, Source};
use crate::http_api::{self, refuse, refuse_join};
use crate::metrics::Rejection;
use crate::mux::{self, Endpoint, JoinError, Registry};
use crate::timeouts::{self, Phase};
use crate::tls::CertResolver;
use crate::ws::{self, WsSettings, WsStream};
pub use duplex::address::Credentials;
use rustls::sign::CertifiedKey;

/// Everything the gateway's request handling shares: the config in force and the endpoints.
pub struct App {
    /// The config in force; replaced as a whole on reload.
    pub config: ArcSwap<Config>,
    /// Where the config comes from (reload reads it again).
    pub source: Source,
    /// All endpoints.
    pub registry: Arc<Registry>,
    /// The certificate of each TLS listener, by address.
    pub certs: Vec<(SocketAddr, Arc<CertResolver>)>,
    /// Requests in progress, for the graceful stop.
    pub active: Active,
    /// Held by a reload while it swaps the config and decides what it revokes, and by a publish
    /// while it checks its token against the config in force and registers: so no backend slips
    /// in with a token the reload just revoked.
    pub publish_lock: std::sync::Mutex<()>,
}

/// Counts requests in progress, so a graceful stop can wait for them.
#[derive(Default)]
pub struct Active {
    /// Set when the gateway stops: new requests get 503.
    pub draining: AtomicBool,
    /// HTTP calls in progress.
    pub http: Arc<AtomicUsize>,
    /// WebSocket connections open (they outlive their request: see [`crate::ws`]).
    pub websockets: Arc<AtomicUsize>,
}

/// Counts one request or connection while it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Counted(counter.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl App {
    /// A gateway running on `config`, read from `source`, with the certificates `keys` of its
    /// TLS listeners (see [`crate::tls::load_all`]).
    pub fn new(config: Config, source: Source, keys: Vec<(SocketAddr, CertifiedKey)>) -> Arc<App> {
        let registry = Registry::new(mux_limits(&config.limits));
        Arc::new(App {
            config: ArcSwap::from_pointee(config),
            source,
            registry,
            certs: keys
                .into_iter()
                .map(|(addr, key)| (addr, CertResolver::new(key)))
                .collect(),
            active: Active::default(),
            publish_lock: std::sync::Mutex::new(()),
        })
    }
}

/// The multiplexer's share of the limits.
pub fn mux_limits(limits: &Limits) -> mux::Limits {
    mux::Limits {
        max_pending_calls_per_client: limits.max_pending_calls_per_client,
        backend_grace: limits.backend_grace,
        // A client may fall behind by 16 messages of the largest size before it counts as not
        // reading (16 MiB with the default limit).
        client_queue_bytes: queue_bytes(limits),
        // A backend's queue has the same bound: clients then wait for it to read.
        backend_queue_bytes: queue_bytes(limits),
    }
}

/// What the gateway holds for one peer that does not read: 16 messages of the largest size (16
/// MiB with the default limit), at least 64 KiB.
fn queue_bytes(limits: &Limits) -> usize {
    limits.max_message_bytes.saturating_mul(16).max(64 << 10)
}

/// WebSocket settings from the limits.
pub fn ws_settings(limits: &Limits) -> WsSettings {
    WsSettings {
        max_message_bytes: limits.max_message_bytes,
        handshake_timeout: limits.handshake_timeout,
        ping_interval: limits.ping_interval,
        write_timeout: std::time::Duration::from_secs(10),
    }
}

/// The digest of the client secret `creds` carry, if it is the one `endpoint` wants.
pub fn secret_for(creds: &Credentials, endpoint: &Endpoint) -> Option<Digest> {
    creds
        .secret
        .as_deref()
        .map(|s| Digest::of(s.as_bytes()))
        .filter(|d| endpoint.secret_matches(d))
}

/// Reads the credentials of a request from its query string and headers.
pub fn credentials(req: &RequestHeader) -> Credentials {
    Credentials::parse(req.uri.query(), |name| {
        req.headers.get(name).and_then(|v| v.to_str().ok())
    })
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
        let config = self.app.config.load_full();
        if self.app.active.draining.load(Ordering::SeqCst) {
            session.set_keepalive(None);
            return refuse(
                session,
                503,
                Some(Rejection::Stopping),
                None,
                "the gateway is shutting down",
                &[],
            )
            .await;
        }

        if config.tls_required && !is_https(session, &config) {
            return refuse(
                session,
                403,
                Some(Rejection::TlsRequired),
                None,
                "TLS required: use https:// or wss://",
                &[],
            )
            .await;
        }
        let method = session.req_header().method.clone();
        let is_get = method == http::Method::GET;
        if !is_get && method != http::Method::POST {
            return refuse(
                session,
                405,
                None,
                None,
                "only GET (WebSocket) and POST (calls) are served",
                &[("allow", "GET, POST")],
            )
            .await;
        }
        let path = session.req_header().uri.path().to_string();
        if let Err(why) = auth::check_escapes(&path) {
            return refuse(session, 400, Some(Rejection::BadPath), None, &why, &[]).await;
        }
        let creds = credentials(session.req_header());
        if !is_get {
            let _counted = Counted::new(&self.app.active.http);
            // Each path's future is boxed on its own, so a request only allocates (and moves)
            // the state of the path it takes.
            return Box::pin(http_api::serve(session, &self.app, &config, &path, &creds)).await;
        }
        match &creds.token {
            Some(token) => Box::pin(self.publish(session, &config, &path, token, &creds)).await,
            None => Box::pin(self.connect(session, &config, &path, &creds)).await,
        }
    }

    /// `GET <path>?token=T&secret=S` with an upgrade: a backend publishing `path`.
    async fn publish(
        &self,
        session: &mut Session,
        config: &Config,
        path: &str,
        token: &str,
        creds: &Credentials,
    ) -> pingora::Result<()> {
        let Some(token) = auth::find_token(&config.tokens, token) else {
            return refuse(
                session,
                401,
                Some(Rejection::BadToken),
                None,
                "unknown publish token",
                &[],
            )
            .await;
        };
        if !token.allows(path) {
            return refuse(
                session,
                403,
                Some(Rejection::TokenScope),
                Some(&token.name),
                "this token may not publish this path",
                &[],
            )
            .await;
        }
        if let Err(why) = auth::check_path(path) {
            return refuse(
                session,
                400,
                Some(Rejection::BadPath),
                Some(&token.name),
                &format!("invalid endpoint path: {why}"),
                &[],
            )
            .await;
        }
        let fixed = config.endpoint(path).secret;
        let secret = match (&creds.secret, fixed) {
            (Some(given), Some(fixed)) => {
                if !fixed.matches(&Digest::of(given.as_bytes())) {
                    return refuse(
                        session,
                        401,
                        Some(Rejection::BadSecret),
                        Some(&token.name),
                        "the secret differs from this endpoint's configured secret",
                        &[],
                    )
                    .await;
                }
                fixed
            }
            (None, Some(fixed)) => fixed,
            (Some(given), None) => Digest::of(given.as_bytes()),
            (None, None) => {
                return refuse(
                    session,
                    400,
                    Some(Rejection::NoSecret),
                    Some(&token.name),
                    "a publish needs a client secret: ?secret= or X-Duplex-Secret",
                    &[],
                )
                .await;
            }
        };
        if !ws::is_upgrade(session.req_header()) {
            return upgrade_required(session).await;
        }
        let settings = ws_settings(&config.limits);
        let counted = Counted::new(&self.app.active.websockets);
        let Some(ws) = WsStream::upgrade(session, &settings).await else {
            return Ok(());
        };
        let (app, path, token_name, token_digest) = (
            self.app.clone(),
            path.to_string(),
            token.name.clone(),
            token.digest,
        );
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
                let allowed = now
                    .tokens
                    .iter()
                    .any(|t| t.digest.matches(&token_digest) && t.allows(&path));
                let secret_ok = now
                    .endpoint(&path)
                    .secret
                    .is_none_or(|fixed| fixed.matches(&secret));
                if !allowed || !secret_ok {
                    tracing::info!(endpoint = %path, token = %token_name, "publish refused: credentials revoked by a reload");
                    return Err(mux::CloseReason::new(
                        mux::close::POLICY,
                        "credentials revoked by a config reload",
                    ));
                }
                tracing::info!(endpoint = %path, token = %token_name, "backend published");
                Ok(app
                    .registry
                    .publish(&path, secret, (&token_name, token_digest)))
            })
            .await;
            tracing::info!(endpoint = %path, token = %token_name, "backend disconnected");
        });
        Ok(())
    }

    /// `GET <path>?secret=S` with an upgrade: a client of the endpoint at `path`.
    async fn connect(
        &self,
        session: &mut Session,
        config: &Config,
        path: &str,
        creds: &Credentials,
    ) -> pingora::Result<()> {
        if !ws::is_upgrade(session.req_header()) {
            return upgrade_required(session).await;
        }
        let Some(endpoint) = self.app.registry.lookup(path) else {
            return refuse(
                session,
                404,
                Some(Rejection::NotFound),
                None,
                "no backend is published at this path",
                &[],
            )
            .await;
        };
        let Some(secret) = secret_for(creds, &endpoint) else {
            return refuse_join(session, JoinError::BadSecret).await;
        };
        let conn = match endpoint.join(true, config.max_clients(path), &secret) {
            Ok(conn) => conn,
            Err(e) => return refuse_join(session, e).await,
        };
        let counted = Counted::new(&self.app.active.websockets);
        let Some(ws) = WsStream::upgrade(session, &ws_settings(&config.limits)).await else {
            return Ok(());
        };
        let app = self.app.clone();
        tokio::spawn(async move {
            let _counted = counted;
            ws::serve_client(ws, conn, || ws_settings(&app.config.load().limits)).await;
        });
        Ok(())
    }
}

async fn upgrade_required(session: &mut Session) -> pingora::Result<()> {
    refuse(
        session,
        426,
        None,
        None,
        "a WebSocket upgrade is required (POST <endpoint>/<method> for plain HTTP calls)",
        &[("upgrade", "websocket")],
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
        format!("{} {:?}", req.method, req.uri.path())
    }

    /// Errors returned from `request_filter` (the peer hung up mid-body or mid-stream, a write
    /// timed out) are the peer's doing, not the gateway's: one debug line, by path only, instead
    /// of Pingora's error line.
    fn suppress_error_log(&self, session: &Session, _ctx: &Self::CTX, error: &Error) -> bool {
        tracing::debug!(
            error = ?error.etype(),
            source = ?error.esource(),
            path = ?session.req_header().uri.path(),
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
}
