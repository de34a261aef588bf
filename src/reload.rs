//! SIGHUP: read the config again, decide what the new one revokes (a pure function of the old
//! config, the new one and what is connected), swap it in, then close exactly what it revokes.
//!
//! An invalid file (or a TLS certificate that does not load) changes nothing: the error is logged
//! with its line and counted. Every connection the new config still allows stays up.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use crate::app::{mux_limits, App};
use crate::auth::Digest;
use crate::config::Config;
use crate::metrics::metrics;
use crate::mux::{close, CloseReason};

/// What is connected at one endpoint, as far as a reload cares.
#[derive(Debug, Clone)]
pub struct Live {
    /// The endpoint path.
    pub path: String,
    /// The digests of the tokens its live backends published with.
    pub backend_tokens: Vec<Digest>,
}

/// What a new config makes the gateway do to live connections.
#[derive(Debug, Clone)]
pub enum Action {
    /// Close the backends of `path` whose token is gone or may no longer publish `path` (1008).
    CloseBackend {
        /// The endpoint.
        path: String,
    },
    /// Close the longest-connected backends of `path` over the new pool size (1012).
    ShrinkPool {
        /// The endpoint.
        path: String,
        /// The new pool size.
        size: usize,
    },
    /// Close the clients of `path` with 1008: the endpoint's fixed secret changed. New clients
    /// must present `secret` (None: the secret stays the one the backend published with).
    CloseClients {
        /// The endpoint.
        path: String,
        /// The new fixed secret.
        secret: Option<Digest>,
    },
    /// Close the clients of `path` with 1008: the endpoint now takes signed tokens, and they
    /// came in without one. (Clients with tokens check theirs against new keys themselves.)
    CloseUnsigned {
        /// The endpoint.
        path: String,
    },
}

/// Compares plans (in tests); secrets are compared in constant time like everywhere else.
impl PartialEq for Action {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Action::CloseBackend { path: a }, Action::CloseBackend { path: b }) => a == b,
            (Action::CloseUnsigned { path: a }, Action::CloseUnsigned { path: b }) => a == b,
            (Action::ShrinkPool { path: a, size: x }, Action::ShrinkPool { path: b, size: y }) => {
                a == b && x == y
            }
            (
                Action::CloseClients {
                    path: a,
                    secret: sa,
                },
                Action::CloseClients {
                    path: b,
                    secret: sb,
                },
            ) => {
                a == b
                    && match (sa, sb) {
                        (Some(x), Some(y)) => x.matches(y),
                        (None, None) => true,
                        _ => false,
                    }
            }
            _ => false,
        }
    }
}

/// Decides what `new` revokes among the `live` endpoints. Pure: no I/O, no clock.
pub fn plan(old: &Config, new: &Config, live: &[Live]) -> Vec<Action> {
    let mut actions = Vec::new();
    for endpoint in live {
        let allowed = endpoint
            .backend_tokens
            .iter()
            .filter(|token| crate::auth::may_publish(&new.tokens, token, &endpoint.path))
            .count();
        if allowed < endpoint.backend_tokens.len() {
            actions.push(Action::CloseBackend {
                path: endpoint.path.clone(),
            });
        }
        let size = new.max_backends(&endpoint.path);
        if allowed > size {
            actions.push(Action::ShrinkPool {
                path: endpoint.path.clone(),
                size,
            });
        }
        let old_secret = old.endpoint(&endpoint.path).secret;
        let new_secret = new.endpoint(&endpoint.path).secret;
        let same = match (old_secret, new_secret) {
            (None, None) => true,
            (Some(a), Some(b)) => a.matches(&b),
            _ => false,
        };
        if !same {
            actions.push(Action::CloseClients {
                path: endpoint.path.clone(),
                secret: new_secret,
            });
        } else if old.endpoint(&endpoint.path).jwt.is_none()
            && new.endpoint(&endpoint.path).jwt.is_some()
        {
            actions.push(Action::CloseUnsigned {
                path: endpoint.path.clone(),
            });
        }
    }
    actions
}

/// Changes a reload cannot apply (they need a restart), as warnings.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    let addresses = |c: &Config| {
        let mut a: Vec<_> = c
            .listeners
            .iter()
            .map(|l| (l.address, l.tls.is_some()))
            .collect();
        a.sort();
        a
    };
    if addresses(old) != addresses(new) {
        warnings.push(
            "listener addresses changed: they apply after a restart (the old ones stay)".into(),
        );
    }
    if old.metrics != new.metrics {
        warnings.push("metrics.address changed: it applies after a restart".into());
    }
    if old.cluster != new.cluster {
        warnings.push("the cluster section changed: it applies after a restart".into());
    }
    warnings
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is not valid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A certificate of the new config could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Reloads the config of `app` from its source. Returns what went wrong, having changed nothing.
pub fn reload(app: &App) -> Result<(), ReloadError> {
    let new = app.source.load()?;
    let keys = crate::tls::load_all(&new)?;
    let old = app.config.load_full();
    for warning in restart_needed(&old, &new) {
        tracing::warn!("reload: {warning}");
    }
    for warning in new.warnings() {
        tracing::warn!("reload: {warning}");
    }
    // No publish registers from the snapshot below until the revocations are applied (see
    // `App::publish_lock`).
    let lock = app
        .publish_lock
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let live: Vec<Live> = app
        .registry
        .endpoints()
        .iter()
        .map(|e| Live {
            path: e.path().to_string(),
            backend_tokens: e.backend_tokens(),
        })
        .collect();
    let actions = plan(&old, &new, &live);

    // Swap first: from here on every request is checked against the new config.
    app.registry.set_limits(mux_limits(&new.limits));
    app.edge.apply(&new);
    if let Some(cluster) = app.cluster.get() {
        cluster.set_max_message_bytes(new.limits.max_message_bytes);
    }
    app.config.store(Arc::new(new));
    for (addr, key) in keys {
        if let Some((_, resolver)) = app.certs.iter().find(|(a, _)| *a == addr) {
            resolver.replace(key);
        }
    }
    for action in actions {
        match action {
            Action::CloseBackend { path } => {
                if let Some(endpoint) = app.registry.lookup(&path) {
                    let tokens = app.config.load();
                    let closed = endpoint.close_backends(
                        CloseReason::new(close::POLICY, "publish token revoked by a config reload"),
                        |token| !crate::auth::may_publish(&tokens.tokens, token, &path),
                    );
                    for token in closed {
                        tracing::info!(endpoint = %crate::auth::logged(&path), token = %token, "reload: backend closed, its token no longer allows this path");
                    }
                }
            }
            Action::ShrinkPool { path, size } => {
                if let Some(endpoint) = app.registry.lookup(&path) {
                    let closed = endpoint.shrink_pool(size);
                    tracing::info!(endpoint = %crate::auth::logged(&path), closed, size, "reload: pool made smaller, longest-connected backends closed");
                }
            }
            Action::CloseClients { path, secret } => {
                if let Some(endpoint) = app.registry.lookup(&path) {
                    // A fixed secret removed admits no one any more: until a backend publishes
                    // with a secret of its own, the endpoint's is one nobody knows.
                    let secret = secret.unwrap_or_else(|| Digest::of(&rand::random::<[u8; 32]>()));
                    let n = endpoint.close_clients(
                        Some(secret),
                        CloseReason::new(
                            close::POLICY,
                            "endpoint secret changed by a config reload",
                        ),
                    );
                    tracing::info!(endpoint = %crate::auth::logged(&path), clients = n, "reload: clients closed, the endpoint's secret changed");
                }
            }
            Action::CloseUnsigned { path } => {
                if let Some(endpoint) = app.registry.lookup(&path) {
                    let n = endpoint.close_clients(
                        None,
                        CloseReason::new(
                            close::POLICY,
                            "signed tokens required by a config reload",
                        ),
                    );
                    tracing::info!(endpoint = %crate::auth::logged(&path), clients = n, "reload: clients closed, the endpoint now takes signed tokens");
                }
            }
        }
    }
    // Clients with signed tokens check theirs against the new keys.
    app.reloads.send_replace(());
    // Held until here: a backend publishing meanwhile with a token the new config allows must
    // not be the one an action closes.
    drop(lock);
    Ok(())
}

/// Records a successful config load in the metrics.
pub fn record_success() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    metrics().last_reload_success.set(now);
}

/// Waits for SIGHUP and reloads.
pub struct Reloader {
    /// The gateway to reload.
    pub app: Arc<App>,
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP, reload is off: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    let m = metrics();
                    match reload(&self.app) {
                        Ok(()) => {
                            m.reloads.with_label_values(&["success"]).inc();
                            record_success();
                            tracing::info!("reload: new config in force");
                        }
                        Err(e) => {
                            m.reloads.with_label_values(&["failure"]).inc();
                            tracing::error!("reload failed, nothing changed: {e}");
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const A: &str = "token-a-0123456789";
    const B: &str = "token-b-0123456789";

    fn config(tokens: &str, endpoints: &str) -> Config {
        let text = format!(
            "listen: [{{address: 127.0.0.1:1}}]\ntokens: {tokens}\nendpoints: {endpoints}\n"
        );
        parse(&text, "t", &|_| None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn live(path: &str, token: Option<&str>) -> Live {
        Live {
            path: path.into(),
            backend_tokens: token
                .map(|t| Digest::of(t.as_bytes()))
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn plan_closes_exactly_what_the_new_config_revokes() {
        let base = config(
            &format!("[{{name: a, token: {A}, endpoints: ['/a', '/team/*']}}, {{name: b, token: {B}, endpoints: ['/b']}}]"),
            "[{path: /a, secret: s1}]",
        );
        let close_backend = |p: &str| Action::CloseBackend { path: p.into() };
        let cases: Vec<(&str, Config, Vec<Live>, Vec<Action>)> = vec![
            (
                "nothing changed",
                base.clone(),
                vec![live("/a", Some(A)), live("/b", Some(B))],
                vec![],
            ),
            (
                "a token added: nobody is closed",
                config(
                    &format!("[{{name: a, token: {A}, endpoints: ['/a', '/team/*']}}, {{name: b, token: {B}, endpoints: ['/b']}}, {{name: c, token: token-c-0123456789, endpoints: ['/*']}}]"),
                    "[{path: /a, secret: s1}]",
                ),
                vec![live("/a", Some(A)), live("/b", Some(B)), live("/team/x", Some(A))],
                vec![],
            ),
            (
                "token b removed: only b's backend",
                config(
                    &format!("[{{name: a, token: {A}, endpoints: ['/a', '/team/*']}}]"),
                    "[{path: /a, secret: s1}]",
                ),
                vec![live("/a", Some(A)), live("/b", Some(B))],
                vec![close_backend("/b")],
            ),
            (
                "token a loses /team/*: only the backend below it",
                config(
                    &format!("[{{name: a, token: {A}, endpoints: ['/a']}}, {{name: b, token: {B}, endpoints: ['/b']}}]"),
                    "[{path: /a, secret: s1}]",
                ),
                vec![live("/a", Some(A)), live("/team/x", Some(A)), live("/b", Some(B))],
                vec![close_backend("/team/x")],
            ),
            (
                "token b's value rotated under the same name",
                config(
                    &format!("[{{name: a, token: {A}, endpoints: ['/a', '/team/*']}}, {{name: b, token: token-b2-012345678, endpoints: ['/b']}}]"),
                    "[{path: /a, secret: s1}]",
                ),
                vec![live("/b", Some(B))],
                vec![close_backend("/b")],
            ),
            (
                "token renamed, same value: the backend stays",
                config(
                    &format!("[{{name: renamed, token: {A}, endpoints: ['/a', '/team/*']}}, {{name: b, token: {B}, endpoints: ['/b']}}]"),
                    "[{path: /a, secret: s1}]",
                ),
                vec![live("/a", Some(A))],
                vec![],
            ),
            (
                "fixed secret changed: the endpoint's clients",
                config(
                    &format!("[{{name: a, token: {A}, endpoints: ['/a', '/team/*']}}, {{name: b, token: {B}, endpoints: ['/b']}}]"),
                    "[{path: /a, secret: s2}]",
                ),
                vec![live("/a", Some(A)), live("/b", Some(B))],
                vec![Action::CloseClients {
                    path: "/a".into(),
                    secret: Some(Digest::of(b"s2")),
                }],
            ),
            (
                "fixed secret removed: clients closed, secret kept",
                config(
                    &format!("[{{name: a, token: {A}, endpoints: ['/a', '/team/*']}}, {{name: b, token: {B}, endpoints: ['/b']}}]"),
                    "[]",
                ),
                vec![live("/a", Some(A))],
                vec![Action::CloseClients {
                    path: "/a".into(),
                    secret: None,
                }],
            ),
            (
                "an endpoint in its grace (no backend) keeps its clients",
                config("[]", "[{path: /a, secret: s1}]"),
                vec![live("/a", None)],
                vec![],
            ),
            (
                "everything revoked at once",
                config("[]", "[{path: /a, secret: s3}]"),
                vec![live("/a", Some(A)), live("/b", Some(B))],
                vec![
                    close_backend("/a"),
                    Action::CloseClients {
                        path: "/a".into(),
                        secret: Some(Digest::of(b"s3")),
                    },
                    close_backend("/b"),
                ],
            ),
        ];
        for (name, new, live, want) in cases {
            assert_eq!(plan(&base, &new, &live), want, "{name}");
        }
    }

    #[test]
    fn listener_changes_need_a_restart() {
        let a = config("[]", "[]");
        let mut b = a.clone();
        assert!(restart_needed(&a, &b).is_empty());
        b.listeners[0].address = "127.0.0.1:2".parse().expect("addr");
        assert_eq!(restart_needed(&a, &b).len(), 1);
        let mut c = a.clone();
        c.metrics = Some("127.0.0.1:3".parse().expect("addr"));
        assert_eq!(restart_needed(&a, &c).len(), 1);
        let mut d = a.clone();
        d.cluster = Some(crate::config::ClusterConfig {
            nats: vec!["nats://127.0.0.1:4222".into()],
            auth: None,
            tls: None,
            key: None,
            node: Some("gw-1".into()),
            subject_prefix: "duplex_gateway".into(),
            node_timeout: std::time::Duration::from_secs(5),
        });
        let warnings = restart_needed(&a, &d);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("cluster"), "{warnings:?}");
    }
}
