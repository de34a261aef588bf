//! duplex-gateway publishes private Duplex RPC services on the web.
//!
//! A backend behind a firewall dials out to the gateway over WebSocket and publishes an endpoint;
//! public clients reach it through the gateway as Duplex peers over WebSocket, or with plain HTTP
//! POST calls. All traffic of all clients of an endpoint is multiplexed over the backend's single
//! connection. The gateway is built on Cloudflare's Pingora.
//!
//! # Layout
//!
//! - [`config`]: the [`Config`] model the gateway runs on and where it comes from; its `file`
//!   module is the YAML file format (sections; `values`: scalars and `${ENV}`; `convert`: checks
//!   across entries and the conversion to the model).
//! - [`app`]: the shared state: the config in force, the endpoints, certificates, requests in
//!   progress.
//! - [`auth`]: tokens, secrets (SHA-256 digests, constant-time comparison), path scopes, the one
//!   rule for "may this token publish this path", the trusted-proxy check.
//! - [`identity`]: signed client tokens (JWT): an endpoint's keys, the checks a token passes,
//!   and the identity its backend sees in `ext.auth`.
//! - [`gateway`]: the Pingora `ProxyHttp` implementation: [`gateway::decide`], the status table
//!   as a pure function, then the hand-off to [`ws`] or [`http_api`]; a publish's last check of
//!   its credentials; HTTP calls counted once, in `logging`.
//! - [`refusal`]: the one [`refusal::Refusal`] type (status, reason, message, headers) every
//!   refusal is answered, counted and logged with, and responses written whole.
//! - [`target`]: where a client's endpoint is served (this node, or other nodes of a cluster),
//!   and the [`target::Client`] handle a client joins it with.
//! - [`accept`]: a connection as it is accepted: counted per address, its socket moved to the
//!   runtime that serves it, wrapped in its deadlines.
//! - [`timeouts`]: the request-header and keep-alive idle deadlines of every HTTP connection.
//! - [`edge`]: what one client address or one endpoint may take (connections, request rates,
//!   failed authentications, calls per endpoint), and the watchdog that holds TLS and HTTP/2
//!   connections to the header deadline.
//! - [`ws`]: the upgrade answer, then (on the socket taken out of Pingora's session, in a task of
//!   its own: `stream`) WebSocket framing (`frames`), the Duplex handshake, pings, and the loop
//!   between the socket and the multiplexer; the rates a client is held to (`limited`) and its
//!   signed token while connected (`signed`: `ext.auth`, `$refresh`, the close at expiry).
//! - [`http_api`]: `POST <endpoint>/<method>`: body, sync, streamed (NDJSON) and async calls.
//! - [`mux`]: endpoints and their pools (balancing, failover, drain, grace), the call tables
//!   (id rewriting, routes), the backend and client sides of a connection, and byte-bounded
//!   queues; one file per concept under `mux/endpoint/` (`state`, `pool`, `client`, `backend`,
//!   `guests`, `ext`, `series`). Knows nothing about Pingora, nor of the cluster: a backend of
//!   another node is a guest with an [`mux::Outlet`] (`tests/mux_alone.rs` builds it alone).
//! - [`duplex`]: the protocol (messages, handshake, error codes, addressing) and a Rust peer: the
//!   workspace's `duplex` crate, which builds without Pingora.
//! - [`cluster`]: several nodes joined by NATS, as a layer on the multiplexer: `link` (logging
//!   in to NATS), `bus` (publishing and dispatch), `seal` (signed, numbered messages), `wire`,
//!   `directory` (the other nodes and their endpoints), `tables` (endpoint tables as deltas and
//!   pages), `pools` (announcements, pools across nodes), `client` and `served` (clients relayed
//!   out and in), `audit` (lost frames), `calls` (backend-to-client calls across nodes).
//! - [`trace`]: W3C trace context: the `traceparent` each call carries to its backend, with the
//!   gateway's own span.
//! - [`metrics`]: every Prometheus metric, defined once.
//! - [`access`]: the access log's lines (and each WebSocket call's line and span).
//! - [`otlp`]: one span per call over OTLP/HTTP.
//! - [`admin`]: the metrics listener, and the admin API on it (listing, draining, closing).
//! - [`reload`]: SIGHUP: the pure decision of what a new config revokes, and applying it.
//! - [`tls`]: certificates, checked before listeners start and swapped on reload.
//! - [`server`]: assembles the Pingora server (listeners, metrics, reload, shutdown).
//!
//! [`Config`]: config::Config

pub mod accept;
pub mod access;
pub mod admin;
pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod edge;
/// The protocol and the Rust peer: the `duplex` crate of this workspace, re-exported.
pub use duplex;
pub mod gateway;
pub mod http_api;
pub mod identity;
pub mod metrics;
pub mod mux;
pub mod otlp;
pub mod refusal;
pub mod reload;
pub mod server;
pub mod target;
pub mod timeouts;
pub mod tls;
pub mod trace;
pub mod ws;
