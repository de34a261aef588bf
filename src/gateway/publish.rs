//! A backend publishing a path: the upgrade, then (in a task of its own) the handshake, a last
//! check of its credentials against the config in force, and its registration in the pool.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pingora::proxy::Session;

use crate::app::{ws_settings, App, Counted};
use crate::auth::{self, Digest};
use crate::config::Config;
use crate::metrics::{metrics, Rejection};
use crate::mux::{self, close, BackendConn, CloseReason};
use crate::ws::{self, WsStream};

/// Upgrades the request and serves the backend in a task of its own.
pub(super) async fn publish(
    app: &Arc<App>,
    session: &mut Session,
    config: &Config,
    token: (String, Digest),
    secret: Digest,
) -> pingora::Result<()> {
    let path = session.req_header().uri.path().to_string();
    let settings = ws_settings(&config.limits);
    let counted = Counted::new(&app.active.websockets);
    let Some(ws) = WsStream::upgrade(session, &settings, ws::BACKEND_READ_CHUNK).await else {
        return Ok(());
    };
    let app = app.clone();
    tokio::spawn(async move {
        let _counted = counted;
        let settings = || ws_settings(&app.config.load().limits);
        ws::serve_backend(ws, settings, || register(&app, &path, &token, secret)).await;
        tracing::info!(endpoint = %auth::logged(&path), token = %token.0, "backend disconnected");
    });
    Ok(())
}

/// After the handshake: the credentials are checked again against the config in force (the
/// handshake took time: a reload may have revoked them, or the gateway begun to stop), then the
/// backend joins the pool. Err: the close code and reason it is sent away with.
fn register(
    app: &App,
    path: &str,
    (token_name, token_digest): &(String, Digest),
    secret: Digest,
) -> Result<BackendConn, CloseReason> {
    // The gateway began to stop during the handshake: the drain has already closed the
    // backends it knew of.
    if app.active.draining.load(Ordering::SeqCst) {
        return Err(CloseReason::new(close::GOING_AWAY, "gateway shutting down"));
    }
    // Held while registering, so a reload cannot slip between the check and the join.
    let _lock = app
        .publish_lock
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = app.config.load();
    if !still_allowed(&now, token_digest, path, &secret) {
        tracing::info!(endpoint = %auth::logged(path), token = %token_name, "publish refused: credentials revoked by a reload");
        return Err(CloseReason::new(
            close::POLICY,
            "credentials revoked by a config reload",
        ));
    }
    let fixed = now.endpoint(path).secret.is_some();
    // In a cluster the pool spans every node: the nodes settle it from their heartbeats (the
    // longest-connected backends anywhere are closed).
    let max_backends = now.max_backends(path);
    match app.registry.publish(
        path,
        secret,
        (token_name, *token_digest),
        max_backends,
        fixed,
    ) {
        Ok(conn) => {
            tracing::info!(endpoint = %auth::logged(path), token = %token_name, "backend published");
            Ok(conn)
        }
        Err(mux::PublishError::SecretConflict) => {
            metrics().reject(Rejection::SecretConflict);
            tracing::info!(endpoint = %auth::logged(path), token = %token_name, "publish refused: another backend joined with another secret meanwhile");
            Err(CloseReason::new(
                close::POLICY,
                "the endpoint's live backends use another secret",
            ))
        }
    }
}

/// Whether `config` still lets the token `token` publish `path` with `secret` (a fixed secret
/// in the config must be the one presented).
fn still_allowed(config: &Config, token: &Digest, path: &str, secret: &Digest) -> bool {
    auth::may_publish(&config.tokens, token, path)
        && config
            .endpoint(path)
            .secret
            .is_none_or(|fixed| fixed.matches(secret))
}
