//! The checks across entries of the file (duplicates, references, limits against each
//! other), and the conversion to the model ([`crate::config::Config`]).

use std::collections::HashMap;
use std::path::PathBuf;

use crate::auth::Token;
use crate::config::{
    ClusterConfig, ClusterKey, Config, Cors, EndpointConfig, Limits, Listener, NatsTls, Serves,
    TlsFiles,
};

use super::*;

/// An error that spans entries, with what to look for in the text to point at its place.
pub(in crate::config) struct Invalid {
    pub(in crate::config) message: String,
    /// The top-level section the error is in.
    section: &'static str,
    /// Text to find in that section (the section key itself when None) ...
    needle: Option<String>,
    /// ... and which occurrence of it (0-based).
    nth: usize,
}

impl Invalid {
    pub(super) fn at(
        message: impl Into<String>,
        section: &'static str,
        needle: Option<&str>,
        nth: usize,
    ) -> Self {
        Invalid {
            message: message.into(),
            section,
            needle: needle.map(str::to_string),
            nth,
        }
    }

    /// The 1-based line and column of the place in `text`, if it can be found.
    pub(in crate::config) fn locate(&self, text: &str) -> Option<(usize, usize)> {
        // The section starts at a line beginning with its key and ends at the next top-level key.
        let mut offset = 0;
        let mut start = None;
        let mut end = text.len();
        for line in text.split_inclusive('\n') {
            let top_level = line
                .chars()
                .next()
                .is_some_and(|c| !c.is_whitespace() && c != '#');
            if start.is_some() && top_level {
                end = offset;
                break;
            }
            if start.is_none() && line.starts_with(&format!("{}:", self.section)) {
                start = Some(offset);
            }
            offset += line.len();
        }
        let start = start?;
        let at = match &self.needle {
            None => start,
            Some(needle) => {
                let found: Vec<usize> = text[start..end]
                    .match_indices(needle.as_str())
                    .map(|(i, _)| start + i)
                    .collect();
                *found.get(self.nth).or(found.last())?
            }
        };
        let line = text[..at].matches('\n').count() + 1;
        let column = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
        Some((line, column))
    }
}

impl FileConfig {
    /// Checks across entries, and converts to the model.
    pub(in crate::config) fn validate(self) -> Result<Config, Invalid> {
        if self.listen.is_empty() {
            return Err(Invalid::at(
                "`listen` needs at least one address",
                "listen",
                None,
                0,
            ));
        }
        let mut listeners: Vec<Listener> = Vec::new();
        for (i, l) in self.listen.into_iter().enumerate() {
            if listeners.iter().any(|o| o.address == l.address.0) {
                let addr = l.address.0.to_string();
                return Err(Invalid::at(
                    format!("listen[{i}]: {addr} is listed twice"),
                    "listen",
                    Some(&addr),
                    1,
                ));
            }
            let tls = l.tls.map(|t| TlsFiles {
                cert: PathBuf::from(t.cert.0),
                key: PathBuf::from(t.key.0),
            });
            let serves = match l.serves {
                None => Serves::default(),
                Some(roles) if roles.is_empty() => {
                    let addr = l.address.0.to_string();
                    return Err(Invalid::at(
                        format!("listen[{i}]: `serves` needs `clients`, `backends` or both"),
                        "listen",
                        Some(&addr),
                        0,
                    ));
                }
                Some(roles) => Serves {
                    clients: roles.contains(&Role::Clients),
                    backends: roles.contains(&Role::Backends),
                },
            };
            listeners.push(Listener {
                address: l.address.0,
                tls,
                serves,
            });
        }
        let metrics = self.metrics.map(|m| m.address.0);
        if let Some(m) = metrics {
            if listeners.iter().any(|l| l.address == m) {
                return Err(Invalid::at(
                    format!("metrics.address {m} is also a gateway listener address"),
                    "metrics",
                    Some(&m.to_string()),
                    0,
                ));
            }
        }

        let mut tokens: Vec<Token> = Vec::new();
        for (i, t) in self.tokens.into_iter().enumerate() {
            let name = t.name.0;
            if name.is_empty() {
                return Err(Invalid::at(
                    format!("tokens[{i}]: `name` must not be empty"),
                    "tokens",
                    Some("name:"),
                    i,
                ));
            }
            if tokens.iter().any(|o| o.name == name) {
                return Err(Invalid::at(
                    format!("tokens[{i}]: the name `{name}` is used twice"),
                    "tokens",
                    Some(&name),
                    1,
                ));
            }
            if let Some(other) = tokens.iter().find(|o| o.digest.matches(&t.token.0)) {
                return Err(Invalid::at(
                    format!(
                        "tokens[{i}] (`{name}`): same token value as `{}`",
                        other.name
                    ),
                    "tokens",
                    Some("token:"),
                    i,
                ));
            }
            if t.endpoints.is_empty() {
                return Err(Invalid::at(
                    format!("tokens[{i}] (`{name}`): `endpoints` needs at least one path"),
                    "tokens",
                    Some("endpoints:"),
                    i,
                ));
            }
            tokens.push(Token {
                name,
                digest: t.token.0,
                scopes: t.endpoints.into_iter().map(|s| s.0).collect(),
            });
        }

        let mut endpoints = HashMap::new();
        for (i, e) in self.endpoints.into_iter().enumerate() {
            let path = e.path.0;
            if endpoints.contains_key(&path) {
                return Err(Invalid::at(
                    format!("endpoints[{i}]: `{path}` is listed twice"),
                    "endpoints",
                    Some(&path),
                    1,
                ));
            }
            let (jwt, no_secret) = match e.auth {
                None => (None, false),
                Some(auth) => {
                    let no_secret = auth.secret == Some(false);
                    let jwt = match auth.jwt {
                        Some(jwt) => Some(std::sync::Arc::new(
                            crate::identity::JwtAuth::load(&jwt.settings()).map_err(|why| {
                                Invalid::at(
                                    format!("endpoints[{i}] (`{path}`): auth.jwt: {why}"),
                                    "endpoints",
                                    Some("jwt:"),
                                    0,
                                )
                            })?,
                        )),
                        None => None,
                    };
                    if no_secret && jwt.is_none() {
                        return Err(Invalid::at(
                            format!("endpoints[{i}] (`{path}`): `auth.secret: false` needs `auth.jwt`: an endpoint is guarded by a secret, a token, or both"),
                            "endpoints",
                            Some("secret: false"),
                            0,
                        ));
                    }
                    if no_secret && e.secret.is_some() {
                        return Err(Invalid::at(
                            format!("endpoints[{i}] (`{path}`): a fixed `secret` and `auth.secret: false` contradict each other"),
                            "endpoints",
                            Some("secret: false"),
                            0,
                        ));
                    }
                    (jwt, no_secret)
                }
            };
            endpoints.insert(
                path,
                EndpointConfig {
                    short_secret: e
                        .secret
                        .as_ref()
                        .is_some_and(|s| s.1 < crate::auth::SHORT_SECRET_BYTES),
                    secret: if no_secret {
                        Some(crate::auth::NO_SECRET)
                    } else {
                        e.secret.map(|s| s.0)
                    },
                    no_secret,
                    jwt,
                    max_clients: e.max_clients.map(|c| c.0),
                    max_backends: e.max_backends.map(|c| c.0),
                    calls_per_second: e.calls_per_second.map(|r| r.0),
                },
            );
        }

        let d = Limits::default();
        let l = self.limits;
        let limits = Limits {
            max_message_bytes: l.max_message_bytes.map_or(d.max_message_bytes, |c| c.0),
            max_http_body_bytes: l.max_http_body_bytes.map_or(d.max_http_body_bytes, |c| c.0),
            max_clients_per_endpoint: l
                .max_clients_per_endpoint
                .map_or(d.max_clients_per_endpoint, |c| c.0),
            max_pending_calls_per_client: l
                .max_pending_calls_per_client
                .map_or(d.max_pending_calls_per_client, |c| c.0),
            handshake_timeout: l.handshake_timeout.map_or(d.handshake_timeout, |x| x.0),
            call_timeout: match l.call_timeout {
                None => d.call_timeout,
                Some(Dur(z)) if z.is_zero() => None,
                Some(Dur(t)) => Some(t),
            },
            backend_grace: l.backend_grace.map_or(d.backend_grace, |x| x.0),
            ping_interval: l.ping_interval.map_or(d.ping_interval, |x| x.0),
            request_header_timeout: l
                .request_header_timeout
                .map_or(d.request_header_timeout, |x| x.0),
            http_idle_timeout: l.http_idle_timeout.map_or(d.http_idle_timeout, |x| x.0),
            max_backends_per_endpoint: l
                .max_backends_per_endpoint
                .map_or(d.max_backends_per_endpoint, |c| c.0),
            drain_timeout: l.drain_timeout.map_or(d.drain_timeout, |x| x.0),
            max_connections_per_ip: l.max_connections_per_ip.map(|c| c.0),
            requests_per_ip_per_second: l.requests_per_ip_per_second.map(|r| r.0),
            auth_failures_per_ip_per_minute: l.auth_failures_per_ip_per_minute.map(|r| r.0),
            max_queued_bytes: l.max_queued_bytes.map_or(d.max_queued_bytes, |c| c.0),
            max_methods_per_endpoint: l
                .max_methods_per_endpoint
                .map_or(d.max_methods_per_endpoint, |c| c.0),
        };

        if self.admin.is_some() && metrics.is_none() {
            return Err(Invalid::at(
                "`admin` is served on the metrics listener: set `metrics.address` too",
                "admin",
                None,
                0,
            ));
        }
        let log = self.log.unwrap_or_default();
        let otlp_endpoint = match self.tracing {
            None => None,
            Some(t) => {
                let url = t.otlp_endpoint.0;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(Invalid::at(
                        format!("`tracing.otlp_endpoint` `{url}` is not an http:// URL (OTLP over HTTP, e.g. http://127.0.0.1:4318)"),
                        "tracing",
                        None,
                        0,
                    ));
                }
                Some(url)
            }
        };
        Ok(Config {
            otlp_endpoint,
            admin_token: self.admin.map(|a| a.token.0),
            log: crate::config::LogSettings {
                access: log.access,
                json: log.format == Some(LogFormat::Json),
            },
            listeners,
            metrics,
            tls_required: self.tls.required,
            trusted_proxies: self.tls.trusted_proxies.into_iter().map(|c| c.0).collect(),
            tokens,
            endpoints,
            limits,
            cors: self.cors.map(|c| Cors {
                origins: c.allowed_origins.into_iter().map(|o| o.0).collect(),
            }),
            cluster: match self.cluster {
                None => None,
                Some(c) => {
                    if c.nats.is_empty() {
                        return Err(Invalid::at(
                            "`cluster.nats` needs at least one NATS server URL",
                            "cluster",
                            None,
                            0,
                        ));
                    }
                    let auth = c.auth.map(FileNatsAuth::into_model).transpose()?;
                    let tls = match c.tls {
                        None => None,
                        Some(t) => {
                            if t.cert.is_some() != t.key.is_some() {
                                return Err(Invalid::at(
                                    "`cluster.tls` needs `cert` and `key` together (a client certificate and its key)",
                                    "cluster",
                                    Some("tls"),
                                    0,
                                ));
                            }
                            Some(NatsTls {
                                ca: t.ca.map(|p| PathBuf::from(p.0)),
                                client: t.cert.zip(t.key).map(|(cert, key)| TlsFiles {
                                    cert: PathBuf::from(cert.0),
                                    key: PathBuf::from(key.0),
                                }),
                            })
                        }
                    };
                    Some(ClusterConfig {
                        auth,
                        tls,
                        key: c.key.map(|k| ClusterKey::new(k.0.into_bytes())),
                        nats: c.nats.into_iter().map(|u| u.0).collect(),
                        node: c.node.map(|n| n.0),
                        subject_prefix: c
                            .subject_prefix
                            .map_or_else(|| "duplex_gateway".to_string(), |p| p.0),
                        node_timeout: c
                            .node_timeout
                            .map_or(std::time::Duration::from_secs(5), |t| t.0),
                    })
                }
            },
        })
    }
}

impl FileJwt {
    /// The settings, before their files are read.
    fn settings(self) -> crate::identity::JwtSettings {
        crate::identity::JwtSettings {
            keys: self.keys.into_iter().map(|k| PathBuf::from(k.0)).collect(),
            hs256_secret: self.hs256_secret.map(|s| s.0),
            jwks_file: self.jwks_file.map(|f| PathBuf::from(f.0)),
            issuer: self.issuer.map(|s| s.0),
            audience: self.audience.map(|s| s.0),
            leeway: self.leeway.map_or(crate::identity::DEFAULT_LEEWAY, |d| d.0),
            claims_to_backend: self.claims_to_backend.map_or_else(
                || vec!["sub".to_string()],
                |c| c.into_iter().map(|s| s.0).collect(),
            ),
        }
    }
}
