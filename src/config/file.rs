//! The configuration file as serde reads it: the YAML format with `${ENV}` substitution, every
//! value checked as it is read (so errors carry their line and column), then the checks across
//! entries and the conversion to the model ([`super::Config`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::{
    ClusterConfig, ClusterKey, Config, Cors, EndpointConfig, Limits, Listener, NatsAuth, NatsTls,
    Serves, TlsFiles,
};
use crate::auth::{check_path, Digest, PathScope, Token};

thread_local! {
    /// The variables the config being parsed on this thread names, with their values.
    pub(super) static ENV: RefCell<HashMap<String, Option<String>>> = RefCell::new(HashMap::new());
}

/// An error that spans entries, with what to look for in the text to point at its place.
pub(super) struct Invalid {
    pub(super) message: String,
    /// The top-level section the error is in.
    section: &'static str,
    /// Text to find in that section (the section key itself when None) ...
    needle: Option<String>,
    /// ... and which occurrence of it (0-based).
    nth: usize,
}

impl Invalid {
    fn at(
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
    pub(super) fn locate(&self, text: &str) -> Option<(usize, usize)> {
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

/// Every `${NAME}` in `text`.
pub(super) fn referenced_vars(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        rest = &rest[start + 2..];
        if let Some(end) = rest.find('}') {
            names.push(rest[..end].to_string());
            rest = &rest[end + 1..];
        }
    }
    names
}

/// Why a value of the file is refused (the message names the rule; serde adds where).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(pub String);

/// Replaces `${NAME}` in `value`; an unset or malformed reference is an error.
fn substitute(value: &str) -> Result<String, BadValue> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(BadValue(format!("unterminated `${{` in `{value}`")));
        };
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(BadValue(format!(
                "`${{{name}}}` is not a valid variable name"
            )));
        }
        let found = ENV.with(|cell| cell.borrow().get(name).cloned().flatten());
        match found {
            Some(v) => out.push_str(&v),
            None => return Err(BadValue(format!("environment variable {name} is not set"))),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads a string scalar, substitutes `${ENV}`, then parses it with the given function. Errors
/// are raised inside the visitor, so serde_yaml marks them with the scalar's line and column.
struct ParseVisitor<T>(fn(&str) -> Result<T, String>);

impl<T> Visitor<'_> for ParseVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        let text = substitute(v).map_err(E::custom)?;
        (self.0)(&text).map_err(E::custom)
    }
}

/// A string with `${ENV}` substituted.
#[derive(Debug, Clone, PartialEq)]
struct EnvString(String);

/// Implements `Deserialize` for a type parsed from an env-substituted string.
macro_rules! from_env_string {
    ($ty:ty, $parse:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(ParseVisitor::<$ty>($parse))
            }
        }
    };
}

from_env_string!(EnvString, |s| Ok(EnvString(s.to_string())));

#[derive(Debug, Clone, Copy, PartialEq)]
struct Addr(SocketAddr);
from_env_string!(Addr, |s| s
    .parse()
    .map(Addr)
    .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:8080")));

#[derive(Debug, Clone, PartialEq)]
struct Cidr(ipnet::IpNet);
from_env_string!(Cidr, |s| {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(Cidr)
        .map_err(|_| format!("`{s}` is not an address or CIDR like 10.0.0.0/8"))
});

#[derive(Debug, Clone, PartialEq)]
struct Scope(PathScope);
from_env_string!(Scope, |s| PathScope::parse(s)
    .map(Scope)
    .map_err(|e| e.to_string()));

#[derive(Debug, Clone, PartialEq)]
struct EndpointPath(String);
from_env_string!(EndpointPath, |s| check_path(s)
    .map(|()| EndpointPath(s.to_string()))
    .map_err(|e| e.to_string()));

#[derive(Debug, Clone)]
struct TokenValue(Digest);
from_env_string!(TokenValue, |s| {
    if let Some(hex_digits) = s.strip_prefix("sha256:") {
        return Digest::from_hex(hex_digits)
            .map(TokenValue)
            .ok_or_else(|| "`sha256:` must be followed by 64 hex digits".to_string());
    }
    if s.is_empty() {
        return Err("a token must not be empty".into());
    }
    if s.len() < 16 {
        return Err("a token must have at least 16 characters".into());
    }
    Ok(TokenValue(Digest::of(s.as_bytes())))
});

#[derive(Debug, Clone)]
struct Secret(Digest, usize);
from_env_string!(Secret, |s| {
    if s.is_empty() {
        return Err("a secret must not be empty".into());
    }
    Ok(Secret(Digest::of(s.as_bytes()), s.len()))
});

/// The longest duration any setting takes.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A duration between 1 ms and [`MAX_DURATION`], or `0`: `250ms`, `10s`, `5m`, `1h`. Whether 0
/// is allowed is the field's business ([`Dur::nonzero`]); every other value out of range is an
/// error raised while reading, so it carries its line and column.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dur(Duration);

/// A duration between 1 ms and [`MAX_DURATION`] (no 0).
#[derive(Debug, Clone, Copy, PartialEq)]
struct PositiveDur(Duration);

impl<'de> Deserialize<'de> for PositiveDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurVisitor { zero: false })
            .map(|Dur(t)| PositiveDur(t))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurVisitor { zero: true })
    }
}

/// Reads a duration. Every error is raised inside the visitor, so serde_yaml marks it with the
/// scalar's own line and column.
struct DurVisitor {
    /// Whether `0` is allowed.
    zero: bool,
}

impl DurVisitor {
    fn check<E: de::Error>(&self, t: Duration) -> Result<Dur, E> {
        if t.is_zero() && !self.zero {
            return Err(E::custom(
                "must be between 1ms and 7 days (0 is not allowed here)",
            ));
        }
        Ok(Dur(t))
    }
}

impl Visitor<'_> for DurVisitor {
    type Value = Dur;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration like 250ms, 10s, 5m or 1h")
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dur, E> {
        if n == 0 {
            return self.check(Duration::ZERO);
        }
        Err(E::custom(format!(
            "`{n}` needs a unit: {n}ms, {n}s, {n}m or {n}h"
        )))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::custom("a duration cannot be negative")),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
        let text = substitute(v).map_err(E::custom)?;
        let t = parse_duration(&text).map_err(E::custom)?;
        self.check(t)
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h` or `0`; anything from 1 ms to 7 days (or 0).
pub fn parse_duration(text: &str) -> Result<Duration, BadValue> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let not_a_duration = || {
        BadValue(format!(
            "`{text}` is not a duration like 250ms, 10s, 5m or 1h"
        ))
    };
    let out_of_range = || {
        BadValue(format!(
            "`{text}` is out of range: a duration is between 1ms and 7 days"
        ))
    };
    let n: u64 = match digits.parse() {
        Ok(n) => n,
        // All digits, but too many for a u64.
        Err(_) if !digits.is_empty() && ["ms", "s", "m", "h"].contains(&unit) => {
            return Err(out_of_range())
        }
        Err(_) => return Err(not_a_duration()),
    };
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(not_a_duration()),
    };
    match millis.map(Duration::from_millis) {
        Some(d) if !d.is_zero() && d <= MAX_DURATION => Ok(d),
        Some(d) if d.is_zero() => Ok(Duration::ZERO),
        _ => Err(out_of_range()),
    }
}

/// A count that must be at least 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n == 0 {
            return Err(de::Error::custom("must be at least 1"));
        }
        usize::try_from(n)
            .map(Count)
            .map_err(|_| de::Error::custom("too large"))
    }
}

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
}

impl FileConfig {
    /// Checks across entries, and converts to the model.
    pub(super) fn validate(self) -> Result<Config, Invalid> {
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
            endpoints.insert(
                path,
                EndpointConfig {
                    short_secret: e
                        .secret
                        .as_ref()
                        .is_some_and(|s| s.1 < crate::auth::SHORT_SECRET_BYTES),
                    secret: e.secret.map(|s| s.0),
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
        };

        Ok(Config {
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
