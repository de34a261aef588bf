//! The configuration file as serde reads it: the YAML format with `${ENV}` substitution, every
//! value checked as it is read (so errors carry their line and column), then the checks across
//! entries and the conversion to the model ([`super::Config`]).
//!
//! This file holds the sections as serde sees them; `values.rs` the scalar values (and `${ENV}`);
//! `convert.rs` the checks across entries and the conversion to the model.

use std::path::PathBuf;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::NatsAuth;

#[macro_use]
pub(super) mod values;
mod convert;
pub(in crate::config) use convert::Invalid;
use values::*;
pub use values::{parse_duration, MAX_DURATION};

// ---- The file format -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    listen: Vec<FileListener>,
    #[serde(default)]
    metrics: Option<FileMetrics>,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    tokens: Vec<FileToken>,
    #[serde(default)]
    endpoints: Vec<FileEndpoint>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    cors: Option<FileCors>,
    #[serde(default)]
    cluster: Option<FileCluster>,
    #[serde(default)]
    admin: Option<FileAdmin>,
    #[serde(default)]
    log: Option<FileLog>,
    #[serde(default)]
    tracing: Option<FileTracing>,
}

/// `tracing`: spans over OTLP/HTTP.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTracing {
    otlp_endpoint: EnvString,
}

/// `admin`: the admin API on the metrics listener.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    token: TokenValue,
}

/// `log`: the access log and the format of every line.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLog {
    #[serde(default)]
    access: bool,
    #[serde(default)]
    format: Option<LogFormat>,
}

/// `log.format`.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Text,
    Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    nats: Vec<NatsUrl>,
    #[serde(default)]
    node: Option<NodeName>,
    #[serde(default)]
    subject_prefix: Option<SubjectPrefix>,
    #[serde(default)]
    node_timeout: Option<PositiveDur>,
    #[serde(default)]
    auth: Option<FileNatsAuth>,
    #[serde(default)]
    tls: Option<FileNatsTls>,
    #[serde(default)]
    key: Option<ClusterKeyText>,
}

/// `cluster.auth`: how this node proves itself to NATS (at most one form).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNatsAuth {
    #[serde(default)]
    user: Option<EnvString>,
    #[serde(default)]
    password: Option<EnvString>,
    #[serde(default)]
    token: Option<EnvString>,
    #[serde(default)]
    nkey_seed_file: Option<EnvString>,
    #[serde(default)]
    credentials_file: Option<EnvString>,
}

impl FileNatsAuth {
    fn into_model(self) -> Result<NatsAuth, Invalid> {
        let forms = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed_file.is_some(),
            self.credentials_file.is_some(),
        ];
        let invalid = |message: &str| Invalid::at(message, "cluster", Some("auth"), 0);
        match forms.iter().filter(|f| **f).count() {
            0 => {
                return Err(invalid(
                    "`cluster.auth` needs one of user + password, token, nkey_seed_file or credentials_file",
                ))
            }
            1 => {}
            _ => {
                return Err(invalid(
                    "`cluster.auth` takes one form only: user + password, token, nkey_seed_file or credentials_file",
                ))
            }
        }
        if let Some(token) = self.token {
            return Ok(NatsAuth::Token(token.0));
        }
        if let Some(file) = self.nkey_seed_file {
            return Ok(NatsAuth::NkeySeedFile(PathBuf::from(file.0)));
        }
        if let Some(file) = self.credentials_file {
            return Ok(NatsAuth::CredentialsFile(PathBuf::from(file.0)));
        }
        match (self.user, self.password) {
            (Some(user), Some(password)) if !user.0.is_empty() => Ok(NatsAuth::UserPassword {
                user: user.0,
                password: password.0,
            }),
            _ => Err(invalid(
                "`cluster.auth` needs both `user` (not empty) and `password`",
            )),
        }
    }
}

/// `cluster.tls`: TLS to the NATS servers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNatsTls {
    #[serde(default)]
    ca: Option<EnvString>,
    #[serde(default)]
    cert: Option<EnvString>,
    #[serde(default)]
    key: Option<EnvString>,
}

/// `cluster.key`: the key every cluster message is signed with, at least 32 bytes.
struct ClusterKeyText(String);
from_env_string!(ClusterKeyText, |s| {
    if s.len() < 32 {
        return Err(format!(
            "`cluster.key` must have at least 32 bytes (it has {}): for instance 64 hex digits from `openssl rand -hex 32`",
            s.len()
        ));
    }
    Ok(ClusterKeyText(s.to_string()))
});

/// A NATS server: `nats://host:port`, `tls://host:port`, or `host:port`.
struct NatsUrl(String);
from_env_string!(NatsUrl, |s| {
    let rest = s
        .strip_prefix("nats://")
        .or_else(|| s.strip_prefix("tls://"))
        .or_else(|| s.strip_prefix("ws://"))
        .or_else(|| s.strip_prefix("wss://"))
        .unwrap_or(s);
    // The host part, after any `user:password@`.
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    if host.is_empty() || s.contains(char::is_whitespace) {
        return Err("a NATS server URL looks like nats://127.0.0.1:4222".into());
    }
    Ok(NatsUrl(s.to_string()))
});

/// A node name: letters, digits, `-` and `_` (it is a NATS subject token).
struct NodeName(String);
from_env_string!(NodeName, |s| {
    if crate::config::is_subject_token(s) && s.len() <= 64 {
        Ok(NodeName(s.to_string()))
    } else {
        Err(format!(
            "`{s}` is not a node name: 1 to 64 letters, digits, `-` or `_`"
        ))
    }
});

/// Subject tokens joined by dots: `duplex_gateway`, `prod.gateway`.
struct SubjectPrefix(String);
from_env_string!(SubjectPrefix, |s| {
    if s.split('.').all(crate::config::is_subject_token) {
        Ok(SubjectPrefix(s.to_string()))
    } else {
        Err(format!(
            "`{s}` is not a subject prefix: tokens of letters, digits, `-` or `_`, joined by dots"
        ))
    }
});

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCors {
    allowed_origins: Vec<Origin>,
}

/// `scheme://host[:port]`, or `*`: what a browser sends in `Origin`.
struct Origin(String);
from_env_string!(Origin, |s| {
    if s == "*" {
        return Ok(Origin(s.to_string()));
    }
    let valid = s.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' '])
    });
    if valid {
        Ok(Origin(s.to_ascii_lowercase()))
    } else {
        Err(format!(
            "`{s}` is not an origin like https://app.example.com (scheme, host, optional port; no path) or \"*\""
        ))
    }
});

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    address: Addr,
    #[serde(default)]
    tls: Option<FileCert>,
    #[serde(default)]
    serves: Option<Vec<Role>>,
}

/// What a listener serves: `clients` or `backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Clients,
    Backends,
}
from_env_string!(Role, |s| match s {
    "clients" => Ok(Role::Clients),
    "backends" => Ok(Role::Backends),
    _ => Err(format!("`{s}` is not a role: `clients` or `backends`")),
});

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCert {
    cert: EnvString,
    key: EnvString,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    address: Addr,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTls {
    #[serde(default)]
    required: bool,
    #[serde(default)]
    trusted_proxies: Vec<Cidr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToken {
    name: EnvString,
    token: TokenValue,
    endpoints: Vec<Scope>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    path: EndpointPath,
    #[serde(default)]
    secret: Option<Secret>,
    #[serde(default)]
    max_clients: Option<Count>,
    #[serde(default)]
    max_backends: Option<Count>,
    #[serde(default)]
    calls_per_second: Option<Rate>,
    #[serde(default)]
    auth: Option<FileAuth>,
}

/// `endpoints[].auth`: signed client tokens, and whether the secret is required as well.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    #[serde(default)]
    jwt: Option<FileJwt>,
    #[serde(default)]
    secret: Option<bool>,
}

/// `endpoints[].auth.jwt`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJwt {
    #[serde(default)]
    keys: Vec<EnvString>,
    #[serde(default)]
    hs256_secret: Option<EnvString>,
    #[serde(default)]
    jwks_file: Option<EnvString>,
    #[serde(default)]
    issuer: Option<EnvString>,
    #[serde(default)]
    audience: Option<EnvString>,
    #[serde(default)]
    leeway: Option<Dur>,
    #[serde(default)]
    claims_to_backend: Option<Vec<EnvString>>,
}

/// A rate: a count of at least 1 that fits 32 bits.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rate(u32);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n == 0 {
            return Err(de::Error::custom("must be at least 1"));
        }
        u32::try_from(n)
            .map(Rate)
            .map_err(|_| de::Error::custom("too large (at most 4294967295)"))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_message_bytes: Option<Count>,
    max_http_body_bytes: Option<Count>,
    max_clients_per_endpoint: Option<Count>,
    max_pending_calls_per_client: Option<Count>,
    handshake_timeout: Option<PositiveDur>,
    call_timeout: Option<Dur>,
    backend_grace: Option<Dur>,
    ping_interval: Option<PositiveDur>,
    request_header_timeout: Option<PositiveDur>,
    http_idle_timeout: Option<PositiveDur>,
    max_backends_per_endpoint: Option<Count>,
    drain_timeout: Option<PositiveDur>,
    max_connections_per_ip: Option<Count>,
    requests_per_ip_per_second: Option<Rate>,
    auth_failures_per_ip_per_minute: Option<Rate>,
    max_queued_bytes: Option<Count>,
    max_methods_per_endpoint: Option<Count>,
}
