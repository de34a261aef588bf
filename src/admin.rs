//! The metrics listener ([`MetricsApp`]: `/metrics`, `/healthz`) and the admin API on it, only
//! with `admin.token` set: list endpoints, pools and clients (every node's in a cluster); drain
//! or close one backend; close an endpoint's clients. Every admin route wants
//! `Authorization: Bearer <admin.token>` (compared in constant time) and answers JSON.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::app::App;
use crate::auth::Digest;
use crate::mux::{close, CloseReason, Endpoint};

/// An admin answer: status and JSON body.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer { status, body }
}

fn error(status: u16, message: &str) -> Answer {
    answer(
        status,
        json!({"error": {"code": status, "message": message}}),
    )
}

/// Answers `method path?query` with `authorization` (the header's value), or None when `path`
/// is not an admin path or the admin API is off (the metrics listener then answers 404).
pub fn serve(
    app: &App,
    method: &http::Method,
    path: &str,
    query: Option<&str>,
    authorization: Option<&str>,
) -> Option<Answer> {
    if path != "/admin" && !path.starts_with("/admin/") {
        return None;
    }
    let config = app.config.load();
    let token = config.admin_token?;
    let presented = authorization
        .map(str::trim)
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, value)| Digest::of(value.trim().as_bytes()));
    if !presented.is_some_and(|p| p.matches(&token)) {
        return Some(error(
            401,
            "the admin API wants Authorization: Bearer <admin.token>",
        ));
    }
    let params: Vec<(String, String)> = query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // A backend id is its pool's key on its node: an action names the node when it means
    // another one's (the listing gives both); this node acts on its own backends only.
    if let Some(node) = param("node") {
        if node != app.node_name() && method == http::Method::POST {
            return Some(error(
                404,
                "that backend is on another node: send the request to that node's admin API",
            ));
        }
    }
    Some(match (method.as_str(), path) {
        ("GET", "/admin/endpoints") => answer(200, endpoints(app)),
        ("POST", "/admin/drain") => with_backend(app, param("endpoint"), param("backend"), drain),
        ("POST", "/admin/close") => match param("clients") {
            Some("all") => close_clients(app, param("endpoint")),
            Some(_) => error(400, "clients=all is the only value"),
            None => with_backend(app, param("endpoint"), param("backend"), close_backend),
        },
        (_, "/admin/endpoints" | "/admin/drain" | "/admin/close") => error(
            405,
            "GET /admin/endpoints, POST /admin/drain, POST /admin/close",
        ),
        _ => error(404, "no such admin route"),
    })
}

/// Every endpoint of this node and (in a cluster) of the others, with their pools.
fn endpoints(app: &App) -> Value {
    let cluster = app.cluster.get();
    let node = app.node_name();
    let mut listed: Vec<Value> = app
        .registry
        .endpoints()
        .into_iter()
        .map(|e| {
            let stats = e.stats();
            let backends: Vec<Value> = e
                .backends()
                .into_iter()
                .map(|b| {
                    json!({
                        "id": b.id.to_string(),
                        "node": node,
                        "token": b.token,
                        "connected_since": b.since_ms,
                        "pending_calls": b.pending_calls,
                        "clients": b.clients,
                        "draining": b.draining,
                    })
                })
                .collect();
            json!({
                "path": e.path(),
                "clients": stats.clients,
                "pending_calls": stats.pending_calls,
                "backends": backends,
            })
        })
        .collect();
    if let Some(cluster) = cluster {
        for pool in cluster.remote_pools() {
            let (other, path) = (pool.node, pool.path);
            let entries = pool.backends.into_iter().map(|(id, since, draining)| {
                json!({
                    "id": id.to_string(),
                    "node": other,
                    "token": null,
                    "connected_since": since,
                    "pending_calls": null,
                    "clients": null,
                    "draining": draining,
                })
            });
            match listed.iter_mut().find(|e| e["path"] == path.as_str()) {
                Some(endpoint) => {
                    if let Some(list) = endpoint["backends"].as_array_mut() {
                        list.extend(entries);
                    }
                }
                None => listed.push(json!({
                    "path": path,
                    "clients": null,
                    "pending_calls": null,
                    "backends": entries.collect::<Vec<_>>(),
                })),
            }
        }
    }
    listed.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    json!({ "node": node, "endpoints": listed })
}

/// Runs `act` on backend `id` of `path` (this node's), or answers 400/404.
fn with_backend(
    app: &App,
    path: Option<&str>,
    id: Option<&str>,
    act: fn(&Arc<Endpoint>, u64) -> Option<Value>,
) -> Answer {
    let (Some(path), Some(id)) = (path, id) else {
        return error(400, "endpoint=<path>&backend=<id> are required");
    };
    let Some(endpoint) = app.registry.lookup(path) else {
        return error(404, "no such endpoint on this node");
    };
    let Some(id) = id.parse::<u64>().ok() else {
        return error(404, "no such backend at this endpoint on this node");
    };
    match act(&endpoint, id) {
        Some(summary) => answer(200, summary),
        None => error(404, "no such backend at this endpoint on this node"),
    }
}

fn drain(endpoint: &Arc<Endpoint>, id: u64) -> Option<Value> {
    let running = endpoint.drain_backend(id)?;
    tracing::info!(endpoint = %crate::auth::logged(endpoint.path()), backend = id, running, "admin: backend draining");
    Some(json!({
        "endpoint": endpoint.path(),
        "backend": id.to_string(),
        "draining": true,
        "pending_calls": running,
    }))
}

fn close_backend(endpoint: &Arc<Endpoint>, id: u64) -> Option<Value> {
    if !endpoint.close_backend_by_operator(id) {
        return None;
    }
    tracing::info!(endpoint = %crate::auth::logged(endpoint.path()), backend = id, "admin: backend closed");
    Some(json!({
        "endpoint": endpoint.path(),
        "backend": id.to_string(),
        "closed": true,
    }))
}

fn close_clients(app: &App, path: Option<&str>) -> Answer {
    let Some(path) = path else {
        return error(400, "endpoint=<path> is required");
    };
    let Some(endpoint) = app.registry.lookup(path) else {
        return error(404, "no such endpoint on this node");
    };
    let closed = endpoint.close_clients(
        None,
        CloseReason::new(close::POLICY, "closed by an operator"),
    );
    tracing::info!(endpoint = %crate::auth::logged(path), closed, "admin: clients closed");
    answer(200, json!({"endpoint": path, "closed_clients": closed}))
}

/// The metrics listener: `GET /metrics` (Prometheus text), `GET /healthz`, and the admin API.
pub struct MetricsApp {
    /// The gateway (for the admin API).
    pub app: Arc<App>,
}

#[async_trait::async_trait]
impl pingora::apps::http_app::ServeHttp for MetricsApp {
    async fn response(
        &self,
        session: &mut pingora::protocols::http::ServerSession,
    ) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path();
        let authorization = req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let (status, content_type, body) =
            match serve(&self.app, &req.method, path, req.uri.query(), authorization) {
                Some(admin) => (
                    admin.status,
                    "application/json",
                    admin.body.to_string().into_bytes(),
                ),
                None => match path {
                    "/metrics" => crate::metrics::render(),
                    "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
                    _ => (
                        404,
                        "text/plain",
                        b"not found: try /metrics or /healthz\n".to_vec(),
                    ),
                },
            };
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(body)
            .unwrap_or_else(|_| http::Response::new(Vec::new()))
    }
}
