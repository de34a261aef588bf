//! Configuration: the model the gateway runs on ([`Config`]), where it comes from ([`Source`]:
//! a file, or the built-in default) and [`parse`], which reads the YAML through the file format
//! of [`file`] (serde, `${ENV}` substitution, values checked with their line and column) and
//! converts it.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub(crate) mod file;

pub use file::values::BadValue;
use file::values::{referenced_vars, ENV};
use file::FileConfig;
pub use file::{parse_duration, MAX_DURATION};

use crate::auth::{Digest, Token};

/// The built-in default configuration (a copy of `conf/gateway.yaml`).
pub const BUILTIN_YAML: &str = include_str!("../../conf/gateway.yaml");

/// The environment variable the built-in config takes its token from.
pub const BUILTIN_TOKEN_VAR: &str = "DUPLEX_GATEWAY_TOKEN";

/// A configuration error, with the place in the file when known.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The file (or `built-in config`).
    pub origin: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(
                f,
                "{}: line {line}, column {column}: {}",
                self.origin, self.message
            ),
            _ => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// One listening socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Address to bind.
    pub address: SocketAddr,
    /// Certificate and key files, for a TLS listener.
    pub tls: Option<TlsFiles>,
    /// Whom it serves (`listen[].serves`).
    pub serves: Serves,
}

/// Whom a listener serves: clients (connections and HTTP calls), backends (publishes), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serves {
    /// Client connections and HTTP calls.
    pub clients: bool,
    /// Publishes.
    pub backends: bool,
}

impl Default for Serves {
    fn default() -> Self {
        Serves {
            clients: true,
            backends: true,
        }
    }
}

/// A PEM certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// Settings of one endpoint.
#[derive(Debug, Clone, Default)]
pub struct EndpointConfig {
    /// The fixed client secret (else the publisher sets it).
    pub secret: Option<Digest>,
    /// Clients allowed at once (else `limits.max_clients_per_endpoint`).
    pub max_clients: Option<usize>,
    /// Live backends in its pool (else `limits.max_backends_per_endpoint`).
    pub max_backends: Option<usize>,
    /// Calls per second the whole endpoint takes on this node (None: no limit).
    pub calls_per_second: Option<u32>,
    /// The fixed secret has fewer than [`crate::auth::SHORT_SECRET_BYTES`] bytes.
    pub short_secret: bool,
    /// Clients present a signed token (`auth.jwt`), checked with these keys.
    pub jwt: Option<Arc<crate::identity::JwtAuth>>,
    /// `auth.secret: false`: clients need no secret (then `secret` is
    /// [`crate::auth::NO_SECRET`], whatever a backend publishes with).
    pub no_secret: bool,
}

/// The limits section.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest WebSocket message.
    pub max_message_bytes: usize,
    /// Largest HTTP request body.
    pub max_http_body_bytes: usize,
    /// Clients per endpoint unless the endpoint says otherwise.
    pub max_clients_per_endpoint: usize,
    /// Open calls per client.
    pub max_pending_calls_per_client: usize,
    /// Time to send the Duplex handshake.
    pub handshake_timeout: Duration,
    /// Time an HTTP call waits for its reply; None waits forever.
    pub call_timeout: Option<Duration>,
    /// Time clients wait for a backend that left.
    pub backend_grace: Duration,
    /// WebSocket ping period.
    pub ping_interval: Duration,
    /// Time a connection has to send a request's complete headers (the first request, or the
    /// next one on a keep-alive connection, counted from its first byte).
    pub request_header_timeout: Duration,
    /// Time a keep-alive HTTP connection may wait for its next request.
    pub http_idle_timeout: Duration,
    /// Live backends per endpoint unless the endpoint says otherwise.
    pub max_backends_per_endpoint: usize,
    /// The longest a backend's drain waits for its calls to end.
    pub drain_timeout: Duration,
    /// Open connections from one client address (None: no limit).
    pub max_connections_per_ip: Option<usize>,
    /// HTTP calls, WebSocket upgrades and WebSocket calls of one address per second (a token
    /// bucket with a burst of one second's worth; None: no limit).
    pub requests_per_ip_per_second: Option<u32>,
    /// Answers of 401/403 to one address in a minute before its requests get 429 (None: no
    /// limit).
    pub auth_failures_per_ip_per_minute: Option<u32>,
    /// Bytes held for peers, all connections together: over it, new calls are refused.
    pub max_queued_bytes: usize,
    /// Method names with series of their own per endpoint (`duplex_gateway_calls_total`);
    /// calls of others count as `method="other"`.
    pub max_methods_per_endpoint: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1 << 20,
            max_http_body_bytes: 1 << 20,
            max_clients_per_endpoint: 10_000,
            max_pending_calls_per_client: 1024,
            handshake_timeout: Duration::from_secs(10),
            call_timeout: Some(Duration::from_secs(60)),
            backend_grace: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            request_header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            max_backends_per_endpoint: 1,
            drain_timeout: Duration::from_secs(30),
            max_connections_per_ip: None,
            requests_per_ip_per_second: None,
            auth_failures_per_ip_per_minute: None,
            max_queued_bytes: 1 << 30,
            max_methods_per_endpoint: 64,
        }
    }
}

/// The configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listening sockets.
    pub listeners: Vec<Listener>,
    /// Where `/metrics` and `/healthz` are served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Plain HTTP gets 403 unless from a trusted proxy that says HTTPS.
    pub tls_required: bool,
    /// Proxies whose `X-Forwarded-Proto` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Publish tokens.
    pub tokens: Vec<Token>,
    /// Per-endpoint settings by path.
    pub endpoints: HashMap<String, EndpointConfig>,
    /// Limits.
    pub limits: Limits,
    /// Browser origins allowed to call (None: no CORS headers and no `Origin` check).
    pub cors: Option<Cors>,
    /// The cluster this node joins over NATS (None: a single node; NATS is never touched).
    pub cluster: Option<ClusterConfig>,
    /// The admin API's token (None: no admin API).
    pub admin_token: Option<Digest>,
    /// The access log and the format of log lines.
    pub log: LogSettings,
    /// Where spans go over OTLP/HTTP (None: no spans).
    pub otlp_endpoint: Option<String>,
}

/// The `log` section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogSettings {
    /// One line per finished call and refused request.
    pub access: bool,
    /// Every log line is one JSON object (else text).
    pub json: bool,
}

/// The `cluster` section: several gateway nodes joined by NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS server URLs (the client tries them in turn), as written: a `user:password@` in
    /// one is taken as credentials (see `cluster::link`).
    pub nats: Vec<String>,
    /// How this node authenticates to NATS (`cluster.auth`).
    pub auth: Option<NatsAuth>,
    /// TLS to NATS (`cluster.tls`; `tls://` URLs ask for TLS too).
    pub tls: Option<NatsTls>,
    /// The key every cluster message is signed with (`cluster.key`); None: unsigned.
    pub key: Option<ClusterKey>,
    /// This node's name (None: the host name and a random suffix, chosen at start-up).
    pub node: Option<String>,
    /// Every subject of the cluster starts with it.
    pub subject_prefix: String,
    /// A node not heard from for this long is taken for dead.
    pub node_timeout: Duration,
}

/// How a node authenticates to NATS: one of the four forms of `cluster.auth`. Its `Debug`
/// never shows a password or token.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// `user` and `password`.
    UserPassword {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// `token`.
    Token(String),
    /// `nkey_seed_file`: a file holding an NKey seed (`SU...`).
    NkeySeedFile(PathBuf),
    /// `credentials_file`: a NATS `.creds` file (a user JWT and its NKey seed).
    CredentialsFile(PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::NkeySeedFile(p) => write!(f, "NkeySeedFile({})", p.display()),
            NatsAuth::CredentialsFile(p) => write!(f, "CredentialsFile({})", p.display()),
        }
    }
}

/// `cluster.tls`: the CA to verify the NATS servers with, and a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM certificates of the CA (else the system's roots).
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (mTLS).
    pub client: Option<TlsFiles>,
}

/// The cluster's shared signing key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Vec<u8>);

impl ClusterKey {
    /// A key from its bytes (the config checks that there are at least 32).
    pub fn new(bytes: Vec<u8>) -> Self {
        ClusterKey(bytes)
    }

    /// The key's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(***)")
    }
}

/// Whether `s` can be one token of a NATS subject as the cluster uses them: 1 or more ASCII
/// letters, digits, `-` or `_`.
pub fn is_subject_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Which browser origins may call the gateway (`cors.allowed_origins`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// Origins as `scheme://host[:port]` in lower case, or `*` for any.
    pub origins: Vec<String>,
}

impl Cors {
    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed:
    /// `*` when any origin is, else the origin itself.
    pub fn allow(&self, origin: &str) -> Option<String> {
        if self.origins.iter().any(|o| o == "*") {
            return Some("*".to_string());
        }
        let origin = origin.trim().to_ascii_lowercase();
        self.origins.contains(&origin).then_some(origin)
    }
}

impl Config {
    /// What is allowed but unwise in this config, one line each (`--check` prints them, the
    /// start-up logs them).
    pub fn warnings(&self) -> Vec<String> {
        let mut paths: Vec<&String> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.short_secret)
            .map(|(path, _)| path)
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|path| {
                format!(
                    "endpoints[{path}].secret has fewer than {} bytes: easy to guess",
                    crate::auth::SHORT_SECRET_BYTES
                )
            })
            .collect()
    }

    /// Whom the listener at `local` (the address a connection came in on) serves: the
    /// listener with that exact address, else one on its port bound to every address.
    pub fn serves(&self, local: SocketAddr) -> Serves {
        self.listeners
            .iter()
            .find(|l| l.address == local)
            .or_else(|| {
                self.listeners
                    .iter()
                    .find(|l| l.address.port() == local.port() && l.address.ip().is_unspecified())
            })
            .map_or_else(Serves::default, |l| l.serves)
    }

    /// Settings of the endpoint at `path` (defaults if it has none).
    pub fn endpoint(&self, path: &str) -> EndpointConfig {
        self.endpoints.get(path).cloned().unwrap_or_default()
    }

    /// Live backends allowed in the pool of `path`.
    pub fn max_backends(&self, path: &str) -> usize {
        self.endpoints
            .get(path)
            .and_then(|e| e.max_backends)
            .unwrap_or(self.limits.max_backends_per_endpoint)
    }

    /// Clients allowed at once on `path`.
    pub fn max_clients(&self, path: &str) -> usize {
        self.endpoints
            .get(path)
            .and_then(|e| e.max_clients)
            .unwrap_or(self.limits.max_clients_per_endpoint)
    }
}

/// Reads and validates a config file; `generated_token` stands in for an unset
/// `DUPLEX_GATEWAY_TOKEN`.
pub fn load_file(path: &Path, generated_token: &str) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = read_file(path)?;
    parse(&text, &origin, &|name| {
        env_or_generated(name, generated_token)
    })
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        origin: path.display().to_string(),
        line: None,
        column: None,
        message: format!("cannot read: {e}"),
    })
}

/// Reads the built-in config; `generated_token` stands in for an unset `DUPLEX_GATEWAY_TOKEN`.
pub fn load_builtin(generated_token: &str) -> Result<Config, ConfigError> {
    parse(BUILTIN_YAML, "built-in config", &|name| {
        env_or_generated(name, generated_token)
    })
}

/// An environment variable; `DUPLEX_GATEWAY_TOKEN`, when unset, is `generated_token` (in every
/// config, so `--config conf/gateway.yaml` behaves as the built-in copy of the same file does).
fn env_or_generated(name: &str, generated_token: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .or_else(|| (name == BUILTIN_TOKEN_VAR).then(|| generated_token.to_string()))
}

/// Where the config comes from, so a reload reads the same place. The token that stands in for
/// an unset `DUPLEX_GATEWAY_TOKEN` is kept, so a reload does not change it.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file given with `--config`.
    File {
        /// The file.
        path: PathBuf,
        /// The generated token.
        generated_token: String,
    },
    /// The built-in default.
    Builtin {
        /// The generated token.
        generated_token: String,
    },
}

impl Source {
    /// Reads and validates the config.
    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            Source::File {
                path,
                generated_token,
            } => load_file(path, generated_token),
            Source::Builtin { generated_token } => load_builtin(generated_token),
        }
    }

    /// The generated token, when the config uses it (it names `${DUPLEX_GATEWAY_TOKEN}` and
    /// the variable is unset): the gateway then prints it once at start-up.
    pub fn generated_token_in_use(&self) -> Option<&str> {
        if std::env::var_os(BUILTIN_TOKEN_VAR).is_some() {
            return None;
        }
        let (text, token) = match self {
            Source::File {
                path,
                generated_token,
            } => (read_file(path).ok()?, generated_token),
            Source::Builtin { generated_token } => (BUILTIN_YAML.to_string(), generated_token),
        };
        referenced_vars(&text)
            .iter()
            .any(|v| v == BUILTIN_TOKEN_VAR)
            .then_some(token.as_str())
    }
}

type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Parses config text. `env` looks up `${NAME}` variables.
pub fn parse(text: &str, origin: &str, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
    // Look up every variable the text names first: the deserializers below read this copy.
    let vars: HashMap<String, Option<String>> = referenced_vars(text)
        .into_iter()
        .map(|name| {
            let value = env(&name);
            (name, value)
        })
        .collect();
    ENV.with(|cell| *cell.borrow_mut() = vars);
    let parsed: Result<FileConfig, serde_yaml::Error> = serde_yaml::from_str(text);
    ENV.with(|cell| cell.borrow_mut().clear());
    let file = parsed.map_err(|e| {
        let location = e.location();
        let message = e.to_string();
        // serde_yaml appends " at line L column C"; the location is shown in front instead.
        let message = match message.rfind(" at line ") {
            Some(i) if location.is_some() => message[..i].to_string(),
            _ => message,
        };
        ConfigError {
            origin: origin.to_string(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            message,
        }
    })?;
    file.validate().map_err(|invalid| {
        let place = invalid.locate(text);
        ConfigError {
            origin: origin.to_string(),
            line: place.map(|p| p.0),
            column: place.map(|p| p.1),
            message: invalid.message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";

    fn env(name: &str) -> Option<String> {
        match name {
            "CI_TOKEN" => Some(TOKEN.into()),
            "CHAT_SECRET" => Some("chat-secret".into()),
            _ => None,
        }
    }

    fn parse_ok(text: &str) -> Config {
        parse(text, "test.yaml", &env).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text, "test.yaml", &env) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        }
    }

    const FULL: &str = r#"
listen:
  - address: 127.0.0.1:8080
  - address: 0.0.0.0:8443
    tls: { cert: /etc/c.pem, key: /etc/k.pem }
metrics:
  address: 127.0.0.1:9100
tls:
  required: true
  trusted_proxies: [10.0.0.0/8, 127.0.0.2]
tokens:
  - name: ci
    token: ${CI_TOKEN}
    endpoints: [/ci, /team/*]
  - name: hashed
    token: "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    endpoints: [/h]
endpoints:
  - path: /chat
    secret: ${CHAT_SECRET}
    max_clients: 500
limits:
  max_message_bytes: 2048
  max_http_body_bytes: 4096
  max_clients_per_endpoint: 7
  max_pending_calls_per_client: 3
  handshake_timeout: 250ms
  call_timeout: 0
  backend_grace: 2m
  ping_interval: 1h
  request_header_timeout: 3s
  http_idle_timeout: 45s
"#;

    #[test]
    fn the_whole_schema_is_read() {
        let c = parse_ok(FULL);
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(
            c.listeners[1].tls,
            Some(TlsFiles {
                cert: "/etc/c.pem".into(),
                key: "/etc/k.pem".into()
            })
        );
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().expect("addr")));
        assert!(c.tls_required);
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(crate::auth::find_token(&c.tokens, TOKEN)
            .is_some_and(|t| t.name == "ci" && t.allows("/team/x") && !t.allows("/other")));
        assert!(crate::auth::find_token(&c.tokens, "password").is_some_and(|t| t.name == "hashed"));
        let chat = c.endpoint("/chat");
        assert!(chat
            .secret
            .is_some_and(|s| s.matches(&Digest::of(b"chat-secret"))));
        assert_eq!(c.max_clients("/chat"), 500);
        assert_eq!(c.max_clients("/other"), 7);
        assert_eq!(c.limits.max_message_bytes, 2048);
        assert_eq!(c.limits.max_http_body_bytes, 4096);
        assert_eq!(c.limits.max_pending_calls_per_client, 3);
        assert_eq!(c.limits.handshake_timeout, Duration::from_millis(250));
        assert_eq!(c.limits.call_timeout, None);
        assert_eq!(c.limits.backend_grace, Duration::from_secs(120));
        assert_eq!(c.limits.ping_interval, Duration::from_secs(3600));
        assert_eq!(c.limits.request_header_timeout, Duration::from_secs(3));
        assert_eq!(c.limits.http_idle_timeout, Duration::from_secs(45));
    }

    #[test]
    fn defaults_apply() {
        let c = parse_ok("listen: [{address: 127.0.0.1:1}]");
        assert_eq!(c.limits, Limits::default());
        assert!(!c.tls_required);
        assert!(c.metrics.is_none());
        assert!(c.tokens.is_empty());
    }

    #[test]
    fn the_builtin_config_loads() {
        let c = load_builtin("generated-token-0123456789").expect("builtin");
        assert_eq!(
            c.listeners[0].address,
            "127.0.0.1:8080".parse().expect("addr")
        );
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().expect("addr")));
        assert!(!c.tls_required);
        assert_eq!(c.tokens.len(), 1);
    }

    #[test]
    fn the_production_example_is_valid() {
        let text = include_str!("../../conf/production.yaml");
        let c = parse(text, "production.yaml", &|name| match name {
            "CI_PUBLISH_TOKEN" => Some("ci-token-0123456789".into()),
            "SEARCH_TOKEN_SHA256" => Some("ab".repeat(32)),
            "CHAT_SECRET" => Some("chat".into()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.tls_required);
        assert_eq!(c.tokens.len(), 2);
        assert!(c.listeners[0].tls.is_some());
    }

    #[test]
    fn unknown_keys_are_reported_with_line_and_column() {
        let e = parse_err("listen:\n  - address: 127.0.0.1:1\n    adress: x\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("adress"), "{e}");
        let e = parse_err("listen: [{address: 127.0.0.1:1}]\nlimitz: {}\n");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("limitz"), "{e}");
        assert!(e.to_string().starts_with("test.yaml: line 2"), "{e}");
    }

    #[test]
    fn bad_values_are_reported_with_their_line() {
        let base = "listen: [{address: 127.0.0.1:1}]\n";
        let cases = [
            ("limits: {call_timeout: 10}", "needs a unit"),
            ("limits: {call_timeout: 10x}", "not a duration"),
            ("limits: {max_message_bytes: 0}", "at least 1"),
            ("limits: {max_message_bytes: -5}", "invalid"),
            ("tls: {trusted_proxies: [10.0.0.0/99]}", "CIDR"),
            ("tls: {required: maybe}", "invalid"),
            (
                "tokens: [{name: a, token: short, endpoints: [/a]}]",
                "at least 16",
            ),
            (
                "tokens: [{name: a, token: 'sha256:12', endpoints: [/a]}]",
                "64 hex",
            ),
            (
                "tokens: [{name: a, token: 0123456789abcdef0, endpoints: [a]}]",
                "starts with `/`",
            ),
            (
                "tokens: [{name: a, token: '${NOPE}', endpoints: [/a]}]",
                "NOPE is not set",
            ),
            ("endpoints: [{path: '/a/../b'}]", "segments"),
            ("endpoints: [{path: /a, secret: ''}]", "must not be empty"),
            ("metrics: {address: nowhere}", "not an address"),
        ];
        for (extra, word) in cases {
            let e = parse_err(&format!("{base}{extra}\n"));
            assert!(e.to_string().contains(word), "{extra}: {e}");
            assert_eq!(e.line, Some(2), "{extra}: {e}");
        }
    }

    #[test]
    fn cross_entry_errors_name_the_entry() {
        let cases = [
            ("listen: []", "at least one"),
            (
                "listen: [{address: 127.0.0.1:1}, {address: 127.0.0.1:1}]",
                "twice",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\nmetrics: {address: 127.0.0.1:1}",
                "also a gateway listener",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\ntokens: [{name: a, token: 0123456789abcdef0, endpoints: [/a]}, {name: a, token: 0123456789abcdef1, endpoints: [/a]}]",
                "used twice",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\ntokens: [{name: a, token: 0123456789abcdef0, endpoints: [/a]}, {name: b, token: 0123456789abcdef0, endpoints: [/a]}]",
                "same token value",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\ntokens: [{name: a, token: 0123456789abcdef0, endpoints: []}]",
                "at least one path",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\nendpoints: [{path: /a}, {path: /a}]",
                "listed twice",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\nlimits: {handshake_timeout: 0}",
                "0 is not allowed",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\nlimits: {ping_interval: 0}",
                "0 is not allowed",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\nlimits: {backend_grace: 9999999999999999h}",
                "out of range",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\nlimits: {call_timeout: 99999999999999999999999s}",
                "out of range",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\nlimits: {request_header_timeout: 8d}",
                "not a duration",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\nlimits: {http_idle_timeout: 169h}",
                "out of range",
            ),
            (
                "listen: [{address: 127.0.0.1:1}]\nlimits: {request_header_timeout: 0}",
                "0 is not allowed",
            ),
        ];
        for (text, word) in cases {
            let e = parse_err(text);
            assert!(e.to_string().contains(word), "{text}: {e}");
            assert!(e.line.is_some(), "{text}: {e}");
        }
        // The second of two entries is the one pointed at.
        let e = parse_err(
            "listen:\n  - address: 127.0.0.1:1\nendpoints:\n  - path: /a\n  - path: /a\n",
        );
        assert_eq!((e.line, e.column), (Some(5), Some(11)), "{e}");
        let e = parse_err("listen:\n  - address: 127.0.0.1:1\nlimits:\n  handshake_timeout: 0\n");
        assert_eq!(e.line, Some(4), "{e}");
    }

    #[test]
    fn missing_listen_and_bad_yaml_are_errors() {
        assert!(parse_err("metrics: {address: 127.0.0.1:1}")
            .to_string()
            .contains("listen"));
        let e = parse_err("listen: [\n");
        assert!(e.line.is_some(), "{e}");
        assert!(parse_err("").to_string().contains("listen") || parse_err("").line.is_none());
    }

    #[test]
    fn substitution_handles_several_and_malformed_references() {
        let c = parse_ok(
            "listen: [{address: 127.0.0.1:1}]\ntokens: [{name: 'x-${CHAT_SECRET}', token: '${CI_TOKEN}${CI_TOKEN}', endpoints: [/a]}]",
        );
        assert_eq!(c.tokens[0].name, "x-chat-secret");
        assert!(crate::auth::find_token(&c.tokens, &format!("{TOKEN}{TOKEN}")).is_some());
        let e = parse_err(
            "listen: [{address: 127.0.0.1:1}]\ntokens: [{name: '${BAD NAME}', token: 0123456789abcdef0, endpoints: [/a]}]",
        );
        assert!(e.to_string().contains("not a valid variable name"), "{e}");
        let e = parse_err(
            "listen: [{address: 127.0.0.1:1}]\ntokens: [{name: '${OPEN', token: 0123456789abcdef0, endpoints: [/a]}]",
        );
        assert!(e.to_string().contains("unterminated"), "{e}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_duration("168h"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "s", "10", "1.5s", "-1s", "10 s", "10d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        // Values that would overflow an Instant later are refused now.
        for big in [
            "169h",
            "10081m",
            "604801s",
            "9999999999999999h",
            "99999999999999999999ms",
        ] {
            let e = parse_duration(big).expect_err(big).0;
            assert!(e.contains("out of range"), "{big}: {e}");
        }
    }

    #[test]
    fn zero_is_allowed_only_where_it_means_something() {
        let c = parse_ok(
            "listen: [{address: 127.0.0.1:1}]\nlimits: {call_timeout: 0, backend_grace: 0}",
        );
        assert_eq!(c.limits.call_timeout, None);
        assert_eq!(c.limits.backend_grace, Duration::ZERO);
        let e = parse_err("listen:\n  - address: 127.0.0.1:1\nlimits:\n  ping_interval: 0\n");
        assert_eq!((e.line, e.column.is_some()), (Some(4), true), "{e}");
    }

    #[test]
    fn the_cluster_section_is_read_with_its_defaults() {
        let c = parse_ok("listen: [{address: 127.0.0.1:1}]");
        assert!(c.cluster.is_none(), "no section, no cluster");
        let c = parse_ok(
            "listen: [{address: 127.0.0.1:1}]\ncluster: {nats: [nats://127.0.0.1:4222, 'tls://n2:4222']}",
        );
        let cluster = c.cluster.expect("cluster");
        assert_eq!(cluster.nats.len(), 2);
        assert_eq!(cluster.node, None);
        assert_eq!(cluster.subject_prefix, "duplex_gateway");
        assert_eq!(cluster.node_timeout, Duration::from_secs(5));
        let c = parse_ok(
            "listen: [{address: 127.0.0.1:1}]\ncluster:\n  nats: [n1:4222]\n  node: gw-1\n  subject_prefix: prod.gw\n  node_timeout: 750ms\n",
        );
        let cluster = c.cluster.expect("cluster");
        assert_eq!(cluster.node.as_deref(), Some("gw-1"));
        assert_eq!(cluster.subject_prefix, "prod.gw");
        assert_eq!(cluster.node_timeout, Duration::from_millis(750));
    }

    #[test]
    fn cluster_auth_takes_one_form_the_key_32_bytes_and_a_client_certificate_its_key() {
        let base = "listen: [{address: 127.0.0.1:1}]\ncluster:\n  nats: [nats://127.0.0.1:4222]\n";
        let c = parse_ok(&format!(
            "{base}  auth: {{user: gw, password: pw}}\n  tls: {{ca: /ca.pem}}\n  key: {}\n",
            "k".repeat(32)
        ));
        let cluster = c.cluster.expect("cluster");
        assert_eq!(
            cluster.auth,
            Some(NatsAuth::UserPassword {
                user: "gw".into(),
                password: "pw".into()
            })
        );
        assert_eq!(format!("{:?}", cluster.auth), "Some(UserPassword(gw, ***))");
        assert_eq!(format!("{:?}", cluster.key), "Some(ClusterKey(***))");
        assert_eq!(
            cluster.tls.and_then(|t| t.ca),
            Some(PathBuf::from("/ca.pem"))
        );
        for (text, wanted) in [
            (
                "  auth: {token: t, user: u, password: p}\n",
                "one form only",
            ),
            ("  auth: {user: u}\n", "both"),
            ("  auth: {}\n", "needs one of"),
            ("  key: short\n", "at least 32 bytes"),
            ("  tls: {cert: /c.pem}\n", "together"),
            ("  auth: {bogus: 1}\n", "bogus"),
        ] {
            let e = parse_err(&format!("{base}{text}"));
            assert!(e.message.contains(wanted), "{text}: {e}");
            if wanted == "at least 32 bytes" {
                assert!(!e.message.contains("short"), "the key is echoed: {e}");
            }
        }
    }

    #[test]
    fn cluster_names_that_are_not_subject_tokens_are_errors_with_their_line() {
        let base = "listen: [{address: 127.0.0.1:1}]\ncluster:\n  nats: [nats://127.0.0.1:4222]\n";
        for (bad, line) in [
            ("  node: gw.1\n", 4),
            ("  node: 'gw 1'\n", 4),
            ("  node: ''\n", 4),
            ("  subject_prefix: 'a..b'\n", 4),
            ("  subject_prefix: 'a.*'\n", 4),
            ("  subject_prefix: 'a.>'\n", 4),
            ("  node_timeout: 0s\n", 4),
        ] {
            let e = parse_err(&format!("{base}{bad}"));
            assert_eq!(e.line, Some(line), "{bad}: {e}");
        }
        // A zero where it is not allowed is marked at the value, not at its section.
        let e = parse_err(
            "listen: [{address: 127.0.0.1:1}]\nlimits:\n  max_message_bytes: 5\n  ping_interval: 0s\n",
        );
        assert_eq!((e.line, e.column), (Some(4), Some(18)), "{e}");
        let e = parse_err("listen: [{address: 127.0.0.1:1}]\ncluster: {nats: []}\n");
        assert!(e.message.contains("cluster.nats"), "{e}");
        let e = parse_err("listen: [{address: 127.0.0.1:1}]\ncluster: {node: a}\n");
        assert!(e.message.contains("nats"), "{e}");
    }
}
