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
//! [`decide`] (in `decide.rs`) holds every check that needs only the request line, the headers,
//! the config and the endpoints, in the order of the status table; it is tested by a table of
//! cases. What follows it (joining an endpoint, reading a body, the upgrade) happens in the
//! hand-off; a publish's last check of its credentials is in `publish.rs`. An HTTP call's
//! answer is counted once, in `logging`, from what the request left in its [`RequestCtx`].

mod decide;
mod publish;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorType};

use crate::app::{ws_settings, App, Counted};
use crate::auth::{self, Digest};
use crate::config::{Config, Serves};
use crate::edge;
use crate::http_api;
use crate::identity::Identity;
use crate::refusal::{respond_empty, Refusal};
use crate::target::Target;
use crate::timeouts::{self, Phase};
use crate::ws::{self, WsStream};
pub use decide::{credentials, decide, split_call_path, Credentials, Decision, Facts};

/// The Pingora proxy: decides every request and serves it in `request_filter`.
pub struct Gateway {
    app: Arc<App>,
}

/// What one request leaves for `logging`.
pub struct RequestCtx {
    /// When its headers were in (`call_timeout` and the call duration count from here).
    started: Instant,
    /// An HTTP call (or its refusal) that counts in its endpoint's series, with its status.
    call: Option<(Target, u16)>,
    /// What the access line of a call or a refusal says (set only with `log.access`).
    access: Option<Box<Access>>,
}

/// The facts of a request's access line, gathered while it is served.
#[derive(Default)]
struct Access {
    endpoint: String,
    method: Option<String>,
    websocket: bool,
    status: u16,
    client_ip: Option<IpAddr>,
    backend: Option<String>,
    /// The gateway's hop of an HTTP call's trace, and the caller's span above it.
    trace: Option<(crate::trace::TraceParent, Option<[u8; 8]>)>,
}

impl Gateway {
    /// A proxy serving `app`.
    pub fn new(app: Arc<App>) -> Gateway {
        Gateway { app }
    }

    async fn serve(&self, session: &mut Session, ctx: &mut RequestCtx) -> pingora::Result<()> {
        let started = ctx.started;
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
        if config.log.access || crate::otlp::enabled() {
            let path = session.req_header().uri.path();
            let (endpoint, method) = match split_call_path(path) {
                Some((endpoint, method)) if session.req_header().method == http::Method::POST => {
                    (endpoint, Some(method.to_string()))
                }
                _ => (path, None),
            };
            ctx.access = Some(Box::new(Access {
                endpoint: auth::logged(endpoint).into_owned(),
                method: method.map(|m| auth::logged(&m).into_owned()),
                websocket: ws::is_upgrade(session.req_header()),
                client_ip,
                ..Access::default()
            }));
        }
        let cors: Vec<(&str, &str)> = match &allow_origin {
            Some(value) => vec![("access-control-allow-origin", value), ("vary", "Origin")],
            None => Vec::new(),
        };
        match decision {
            Decision::Preflight { allow_origin } => {
                // `Authorization` (a signed client token) is allowed to the pages that ask.
                let asks_authorization =
                    header("access-control-request-headers").is_some_and(|h| {
                        h.split(',')
                            .any(|name| name.trim().eq_ignore_ascii_case("authorization"))
                    });
                let allow_headers = if asks_authorization {
                    "content-type, x-duplex-secret, authorization"
                } else {
                    "content-type, x-duplex-secret"
                };
                let headers = [
                    ("access-control-allow-origin", allow_origin.as_str()),
                    ("access-control-allow-methods", "POST"),
                    ("access-control-allow-headers", allow_headers),
                    ("access-control-max-age", "600"),
                    ("vary", "Origin"),
                ];
                respond_empty(session, 204, &headers).await
            }
            Decision::Refuse(refusal, call) => {
                if stopping {
                    session.set_keepalive(None);
                }
                if let (true, Some(ip)) = (refusal.is_auth_failure(), client_ip) {
                    edge.auth_failed(ip);
                }
                let status = refusal.send(session, &cors).await?;
                ctx.call = call.map(|target| (target, status));
                if let Some(access) = &mut ctx.access {
                    access.status = status;
                }
                Ok(())
            }
            Decision::Call {
                endpoint,
                method,
                secret,
                identity,
            } => {
                if let Some(Err(limited)) = edge.endpoint(endpoint.path()).map(|b| b.take()) {
                    let status = Refusal::limited(limited).send(session, &cors).await?;
                    if let Some(access) = &mut ctx.access {
                        access.status = status;
                    }
                    return Ok(());
                }
                let _counted = Counted::new(&self.app.active.http);
                let parent = header("traceparent").and_then(crate::trace::TraceParent::parse);
                let trace = crate::trace::TraceParent::child_of(parent);
                let mut served_by = None;
                // Each path's future is boxed on its own, so a request only allocates (and
                // moves) the state of the path it takes.
                let call = http_api::Call {
                    endpoint: &endpoint,
                    method: &method,
                    secret,
                    identity: identity.as_deref(),
                    trace,
                    served_by: &mut served_by,
                    is_async: creds.is_async,
                    started,
                    headers: &cors,
                };
                let status = Box::pin(http_api::serve(session, &config, call)).await?;
                ctx.call = Some((endpoint, status));
                if let Some(access) = &mut ctx.access {
                    access.status = status;
                    access.backend = served_by;
                    access.trace = Some((trace, parent.map(|p| p.span_id)));
                }
                Ok(())
            }
            Decision::Publish { token, secret } => {
                let path = session.req_header().uri.path();
                let ignored = config.endpoints.get(path).is_some_and(|e| e.no_secret);
                if !ignored
                    && creds
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
                Box::pin(publish::publish(&self.app, session, &config, token, secret)).await
            }
            Decision::Connect {
                endpoint,
                secret,
                identity,
            } => {
                let limits = ws::CallLimits {
                    edge: edge.clone(),
                    ip: client_ip,
                    endpoint: edge.endpoint(endpoint.path()),
                };
                let signed = identity.map(|identity| self.signed(identity, &creds, &endpoint));
                let refused = Box::pin(
                    self.connect(session, &config, endpoint, secret, &cors, limits, signed),
                )
                .await?;
                if let (Some(status), Some(access)) = (refused, &mut ctx.access) {
                    access.status = status;
                }
                Ok(())
            }
        }
    }

    /// A WebSocket client's token, held while it is connected: checked again with the
    /// endpoint's keys after every reload.
    fn signed(
        &self,
        identity: Arc<Identity>,
        creds: &Credentials,
        endpoint: &Target,
    ) -> ws::Signed {
        let token = creds
            .access_token
            .clone()
            .or_else(|| creds.token.clone())
            .unwrap_or_default();
        let app = self.app.clone();
        let path = endpoint.path().to_string();
        let keys: ws::Keys = Box::new(move || {
            app.config
                .load()
                .endpoints
                .get(&path)
                .and_then(|e| e.jwt.clone())
        });
        ws::Signed::new(identity, token, keys, self.app.reloads.subscribe())
    }

    /// A client of `endpoint`: join (503 when it is full), upgrade, then serve it in a task of
    /// its own. Returns the status of a refusal to join.
    #[allow(clippy::too_many_arguments)]
    async fn connect(
        &self,
        session: &mut Session,
        config: &Config,
        endpoint: Target,
        secret: Digest,
        headers: &[(&str, &str)],
        limits: ws::CallLimits,
        signed: Option<ws::Signed>,
    ) -> pingora::Result<Option<u16>> {
        let conn = match endpoint.join(true, config.max_clients(endpoint.path()), secret) {
            Ok(conn) => conn,
            Err(e) => return Refusal::join(e).send(session, headers).await.map(Some),
        };
        let counted = Counted::new(&self.app.active.websockets);
        let settings = ws_settings(&config.limits);
        let spans = crate::otlp::enabled();
        let access = (config.log.access || spans).then(|| {
            crate::access::WsCalls::new(
                self.app.node_name(),
                endpoint.path(),
                limits.ip,
                config.log.access.then_some(config.log.json),
                spans,
            )
        });
        let Some(ws) = WsStream::upgrade(session, &settings, ws::CLIENT_READ_CHUNK).await else {
            return Ok(None);
        };
        let app = self.app.clone();
        tokio::spawn(async move {
            let _counted = counted;
            let mut conn = ws::LimitedClient::new(conn, limits, signed);
            if let Some(calls) = access {
                conn = conn.with_access_log(calls);
            }
            ws::serve_client(ws, conn, || ws_settings(&app.config.load().limits)).await;
        });
        Ok(None)
    }
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
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            started: Instant::now(),
            call: None,
            access: None,
        }
    }

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
        ctx: &mut Self::CTX,
    ) -> pingora::Result<bool> {
        // The headers are in: no deadline while the request is served; then the connection's
        // idle time counts (see `timeouts`). An upgraded connection has left the session.
        timeouts::enter(session.downstream_session.stream(), Phase::Busy);
        let served = self.serve(session, ctx).await;
        timeouts::enter(session.downstream_session.stream(), Phase::Idle);
        served?;
        Ok(true)
    }

    /// The request is over: an HTTP call counts in its endpoint's series, once; with
    /// `log.access`, a call or a refusal gets its access line.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        if let Some((target, status)) = ctx.call.take() {
            target.count_http_call(status, ctx.started.elapsed().as_secs_f64());
        }
        let Some(access) = ctx.access.take().filter(|a| a.status != 0) else {
            return;
        };
        let node = self.app.node_name();
        let elapsed = ctx.started.elapsed();
        if let (Some((hop, parent)), Some(method)) = (access.trace, &access.method) {
            let end = std::time::SystemTime::now();
            crate::otlp::export(crate::otlp::CallSpan {
                hop,
                parent,
                start: end.checked_sub(elapsed).unwrap_or(end),
                end,
                endpoint: &access.endpoint,
                method,
                transport: "http",
                status: Some(access.status),
                code: None,
                backend: access.backend.as_deref(),
                node: &node,
            });
        }
        let config = self.app.config.load();
        if !config.log.access {
            return;
        }
        let line = crate::access::Line {
            ts: crate::access::now(),
            node: &node,
            endpoint: &access.endpoint,
            method: access.method.as_deref(),
            transport: if access.websocket { "ws" } else { "http" },
            status: Some(access.status),
            code: None,
            duration_us: elapsed.as_micros() as u64,
            bytes_in: session.body_bytes_read() as u64,
            bytes_out: session.body_bytes_sent() as u64,
            client_ip: access.client_ip,
            backend: access.backend,
            trace_id: access.trace.map(|(hop, _)| hop.trace_hex()),
        };
        line.write(config.log.json);
    }
}
