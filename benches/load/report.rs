//! What a run reports: one typed record per scenario, the ratios, and the machine; printed as
//! JSON with `--json FILE`.

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::*;

/// One closed-loop load.
#[derive(Serialize)]
pub(crate) struct Rpc {
    pub(crate) clients: usize,
    pub(crate) seconds: f64,
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    pub(crate) calls_per_sec: f64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    #[serde(rename = "p99.9_us")]
    pub(crate) p999_us: u64,
    /// CPU time (user + system) per call of each watched process, in microseconds.
    pub(crate) cpu_us_per_call: BTreeMap<&'static str, f64>,
}

impl RpcResult {
    /// The record of this load, run by `clients` clients.
    pub(crate) fn summary(&self, clients: usize) -> Rpc {
        Rpc {
            clients,
            seconds: round(self.seconds, 2),
            calls: self.calls,
            errors: self.errors,
            calls_per_sec: round(self.rate(), 0),
            p50_us: self.hist.value_at_quantile(0.50),
            p99_us: self.hist.value_at_quantile(0.99),
            p999_us: self.hist.value_at_quantile(0.999),
            cpu_us_per_call: self
                .cpu
                .iter()
                .map(|(name, us)| (*name, round(*us, 1)))
                .collect(),
        }
    }
}

/// `rolling_deploy`: the load on the pool while each backend in turn is replaced.
#[derive(Serialize)]
pub(crate) struct Rolling {
    #[serde(flatten)]
    pub(crate) load: Rpc,
    pub(crate) failed_calls: u64,
    pub(crate) throughput_vs_pool_rpc: f64,
}

/// `reload`: the loads while the gateway reloads every 100 ms, and without.
#[derive(Serialize)]
pub(crate) struct Reload {
    pub(crate) ws: Rpc,
    pub(crate) ws_no_reload: Rpc,
    pub(crate) http: Rpc,
    pub(crate) http_no_reload: Rpc,
    pub(crate) failed_calls: u64,
}

/// `latency`: one client, sequential calls; what the gateway adds over direct.
#[derive(Serialize)]
pub(crate) struct Latency {
    pub(crate) ws_p50_us: i64,
    pub(crate) ws_direct_p50_us: i64,
    pub(crate) ws_added_p50_us: i64,
    pub(crate) http_p50_us: i64,
    pub(crate) http_direct_p50_us: i64,
    pub(crate) http_added_p50_us: i64,
}

/// `cluster_latency`: what crossing two nodes adds over one.
#[derive(Serialize)]
pub(crate) struct ClusterLatency {
    pub(crate) ws_p50_us: i64,
    pub(crate) ws_added_p50_us: i64,
    pub(crate) ws_added_p99_us: i64,
    pub(crate) http_p50_us: i64,
    pub(crate) http_added_p50_us: i64,
    pub(crate) http_added_p99_us: i64,
}

/// `stream`: one reply stream, as fast as it goes.
#[derive(Serialize)]
pub(crate) struct Stream {
    pub(crate) frames: u64,
    pub(crate) seconds: f64,
    pub(crate) frames_per_sec: f64,
}

/// `idle`: many idle WebSocket clients, and what each costs the gateway.
#[derive(Serialize)]
pub(crate) struct Idle {
    pub(crate) clients: usize,
    pub(crate) answered: usize,
    pub(crate) connect_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rss_after_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bytes_per_client: Option<u64>,
}

/// `abuse`: a load while one address attacks, against the same load calm.
#[derive(Serialize)]
pub(crate) struct Abuse {
    pub(crate) calm: Rpc,
    pub(crate) attacked: Rpc,
    pub(crate) throughput_ratio: f64,
    pub(crate) fds_before: usize,
    pub(crate) max_fds_attacked: usize,
    pub(crate) fds_bound: usize,
    pub(crate) rss_kib_before: u64,
    pub(crate) max_rss_kib_attacked: u64,
    pub(crate) rss_ratio: f64,
}

/// `cluster_endpoints`: many endpoints over several nodes.
#[derive(Serialize)]
pub(crate) struct ClusterEndpoints {
    pub(crate) nodes: usize,
    pub(crate) endpoints: usize,
    /// Endpoints that answered on every node (of `endpoints`).
    pub(crate) answered_on_every_node: usize,
    /// From the publishers' start until every endpoint answered on every node.
    pub(crate) all_answer_after_seconds: f64,
    /// What the NATS server carried per node once idle (in and out).
    pub(crate) idle_nats_bytes_per_sec_per_node: Option<f64>,
    /// Every node heard every other one at the end (none was taken for dead).
    pub(crate) every_node_hears_all: bool,
    /// The fewest nodes any node counted in its cluster (itself included) while the endpoints
    /// were published and checked: `nodes` when none was ever taken for dead.
    pub(crate) fewest_nodes_heard: usize,
    /// Endpoints published one at a time once the table is full: from each publish (its
    /// handshake answered) until it answered on every other node, in ms.
    pub(crate) new_endpoint_everywhere_ms: Spread,
}

/// A few measurements of one thing.
#[derive(Serialize)]
pub(crate) struct Spread {
    pub(crate) samples: usize,
    pub(crate) p50: f64,
    pub(crate) max: f64,
}

impl Spread {
    pub(crate) fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        Spread {
            samples: values.len(),
            p50: values.get(values.len() / 2).copied().unwrap_or(0.0),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

/// `cluster_idle`: WebSocket clients held over several nodes, against the same per node on one
/// gateway alone.
#[derive(Serialize)]
pub(crate) struct ClusterIdle {
    pub(crate) nodes: usize,
    pub(crate) clients: usize,
    /// Clients that answered a call at the end.
    pub(crate) answered: usize,
    pub(crate) connect_seconds: f64,
    /// The nodes' RSS growth per client, the clients connected and idle.
    pub(crate) bytes_per_client_idle: u64,
    /// The same once every client has made its call (the relayed ones then hold a session on
    /// the backend's node).
    pub(crate) bytes_per_client_after_call: u64,
    /// One gateway alone with one node's share of clients, run beside it.
    pub(crate) single_node_clients: usize,
    pub(crate) single_node_answered: usize,
    pub(crate) single_node_bytes_per_client: u64,
    pub(crate) single_node_bytes_per_client_after_call: u64,
}

/// The ratios, in the order they were taken.
#[derive(Default, Clone)]
pub(crate) struct Ratios(Vec<(&'static str, f64)>);

impl Ratios {
    /// `a / b`, rounded to three digits.
    pub(crate) fn add(&mut self, name: &'static str, a: f64, b: f64) {
        self.0.push((name, round(a / b, 3)));
    }
}

impl Serialize for Ratios {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// Where the run ran.
#[derive(Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) target: &'static str,
}

/// The signed-token loads against the secret ones.
#[derive(Serialize)]
pub(crate) struct Identity {
    /// `ws_rpc` on the endpoint with signed tokens (one check per connection).
    pub(crate) ws_jwt: Rpc,
    /// `ws_rpc` with the secret, run beside it.
    pub(crate) ws_secret: Rpc,
    /// `http_rpc` with a token per call (one check per call).
    pub(crate) http_jwt: Rpc,
    /// `http_rpc` with the secret, run beside it.
    pub(crate) http_secret: Rpc,
    /// A new RS256 token's check (signature and claims), in microseconds, in this process.
    pub(crate) verify_us: f64,
    /// The check of a token seen before (its digest, a look-up, its expiry).
    pub(crate) remembered_us: f64,
}

/// One reconnect storm: how long until every client was back, and the peak rate.
#[derive(Serialize)]
pub(crate) struct StormRun {
    pub(crate) back_s: Option<f64>,
    pub(crate) back: usize,
    pub(crate) peak_joins_per_s: f64,
    pub(crate) peak_attempts_per_s: f64,
}

/// The storm with jitter and without, run one after the other.
#[derive(Serialize)]
pub(crate) struct StormPair {
    pub(crate) clients: usize,
    pub(crate) jitter: StormRun,
    pub(crate) no_jitter: StormRun,
}

/// The loads with the access log (JSON) and spans on, against the default config.
#[derive(Serialize)]
pub(crate) struct Observed {
    pub(crate) ws_all_on: Rpc,
    pub(crate) ws_default: Rpc,
    pub(crate) http_all_on: Rpc,
    pub(crate) http_default: Rpc,
}

/// A whole run.
#[derive(Serialize)]
pub(crate) struct Report {
    pub(crate) ws_rpc: Rpc,
    pub(crate) ws_rpc_direct: Rpc,
    pub(crate) http_rpc: Rpc,
    pub(crate) http_direct: Rpc,
    pub(crate) http_floor: Rpc,
    pub(crate) http_nginx: Option<Rpc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pool_rpc: Option<Rpc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rolling_deploy: Option<Rolling>,
    pub(crate) latency: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_ws_rpc: Option<Rpc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_http_rpc: Option<Rpc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_one_node_ws: Option<Rpc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_one_node_http: Option<Rpc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_ws_rpc_signed: Option<Rpc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_ws_rpc_unsigned: Option<Rpc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_latency: Option<ClusterLatency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) abuse: Option<Abuse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_endpoints: Option<ClusterEndpoints>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster_idle: Option<ClusterIdle>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) identity: Option<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) observability: Option<Observed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reconnect_storm: Option<StormPair>,
    pub(crate) connect: Rpc,
    pub(crate) connect_direct: Rpc,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reload: Option<Reload>,
    pub(crate) stream: Stream,
    pub(crate) idle: Idle,
    pub(crate) ratios: Ratios,
    pub(crate) machine: Machine,
    pub(crate) total_seconds: f64,
}
