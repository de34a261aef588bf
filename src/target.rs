//! Where a client's endpoint is served: this node's endpoint, or (in a cluster) this node's
//! and other nodes'. The status table finds it; WebSocket clients and HTTP calls join it and get
//! a [`Client`].

use std::sync::Arc;

use crate::auth::Digest;
use crate::cluster::{Cluster, ClusterClient};
use crate::duplex::Message;
use crate::mux::{self, ClientConn, CloseReason, Endpoint, Outcome, Registry};

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

    /// Counts one HTTP call answered with `status` after `seconds`: in this node's endpoint's
    /// series, or (served only by other nodes) in the cluster's series for the path.
    pub fn count_http_call(&self, status: u16, seconds: f64) {
        let label = crate::metrics::status_label(status);
        match self {
            Target::Cluster {
                local: None,
                cluster,
                path,
            } => cluster.count_http_call(path, label, seconds),
            _ => {
                if let Some(endpoint) = self.local() {
                    endpoint.count_http_call(label, seconds);
                }
            }
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
/// Returns it with `secret` (the digest of the one presented) when that is its client secret
/// (constant time).
pub fn find(
    path: &str,
    secret: Option<Digest>,
    registry: &Registry,
    cluster: Option<&Arc<Cluster>>,
) -> Option<(Target, Option<Digest>)> {
    let local = registry.lookup(path);
    let digest = secret;
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

/// A client of an endpoint: attached to this node's multiplexer, or relayed by the cluster.
pub enum Client {
    /// Without a cluster: this node's multiplexer.
    Local(ClientConn),
    /// With a cluster: wherever a backend serves.
    Cluster(Box<ClusterClient>),
}

impl Client {
    /// Sends one frame from the client; returns what the gateway answers itself, if anything.
    pub async fn send(&mut self, msg: Message) -> Outcome {
        match self {
            Client::Local(conn) => conn.send(msg).await,
            Client::Cluster(c) => c.send(msg).await,
        }
    }

    /// The next frame for the client; None once it is closed (see [`Client::close_reason`]).
    pub async fn recv(&mut self) -> Option<Message> {
        match self {
            Client::Local(conn) => conn.recv().await,
            Client::Cluster(c) => c.recv().await,
        }
    }

    /// A frame already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        match self {
            Client::Local(conn) => conn.try_recv(),
            Client::Cluster(c) => c.try_recv(),
        }
    }

    /// Counts a malformed frame from the client in its endpoint's metrics, and logs it.
    pub fn malformed(&self, error: &crate::duplex::ParseError) {
        let endpoint = match self {
            Client::Local(conn) => Some(conn.endpoint().clone()),
            Client::Cluster(c) => c.local_endpoint(),
        };
        if let Some(endpoint) = endpoint {
            tracing::debug!(endpoint = %crate::auth::logged(endpoint.path()), %error, "malformed frame from client");
            endpoint.dropped(crate::mux::Dropped::Malformed);
        }
    }

    /// The backend (its id in the pool) that took the client's latest call, when this node
    /// holds it.
    pub fn backend(&self) -> Option<String> {
        match self {
            Client::Local(conn) => conn.backend(),
            Client::Cluster(c) => c.local_backend(),
        }
    }

    /// Why the client was closed.
    pub fn close_reason(&self) -> CloseReason {
        match self {
            Client::Local(conn) => conn.close_reason(),
            Client::Cluster(c) => c.close_reason(),
        }
    }
}
