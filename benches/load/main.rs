//! The load tool: measures the gateway against the physical limit, side by side, in one run.
//!
//! ```text
//! cargo bench --bench load                      # full run (about 3 minutes after the build)
//! cargo bench --bench load -- --quick --json out.json
//! cargo bench --bench load -- --url ws://host:8080 --token T   # another running Duplex gateway
//! ```
//!
//! Scenarios (see BENCHMARKS.md): `ws_rpc`, `ws_rpc_direct`, `http_rpc`, `http_direct`,
//! `http_nginx` (when nginx is installed), `http_floor` (Pingora alone: a `ProxyHttp` that echoes
//! each POST's body from `request_filter`, the ceiling of any gateway built on it), `stream`, `idle`, `pool_rpc` (the same WebSocket load
//! on an endpoint served by a pool of 4 backends, each a process of its own) and
//! `rolling_deploy` (WebSocket and HTTP load on that pool while each backend in turn drains,
//! exits and is replaced: failed calls and the throughput dip), `reload` (`ws_rpc` and `http_rpc`
//! while the gateway gets SIGHUP every 100 ms, alternating two valid configs), `connect` (new
//! WebSocket clients per second: connect, handshake, one call, close) and `latency` (one client,
//! sequential calls: the p50 the gateway adds over direct), `cluster_ws_rpc` and
//! `cluster_http_rpc` (the `ws_rpc` and `http_rpc` loads with the client on one gateway node and
//! the backend on another, joined by a real nats-server; skipped when nats-server is not
//! installed), `cluster_ws_rpc_signed` (the same WebSocket load through two nodes that sign every
//! message with `cluster.key`, beside the unsigned pair), `cluster_endpoints` (100,000 endpoints
//! over 6 nodes: when each answers on every node, idle NATS traffic, a new endpoint's time to
//! answer everywhere), `cluster_idle` (100,000 WebSocket clients over 6 nodes, each answering a
//! call at the end, memory per client against one gateway alone; `--only-cluster-scale` runs
//! just these two), and their ratios.
//!
//! Every server runs in a process of its own: the gateway (the release binary), and this binary
//! started again with `--role ...` for the echo backend, the direct Duplex server and the direct
//! HTTP server. This process only generates load.
//!
//! The loads a ratio compares run side by side: `ws_rpc` with `ws_rpc_direct`; `http_rpc` with
//! `http_direct`, `http_floor` and `http_nginx`; `connect` with `connect_direct`; each `reload` load with the
//! same load without reloads; each cluster load with the same load on one node. Each runs half its time in turn, then the other half in reverse
//! order (A B B A), so what the shared machine gives the run (other tenants) weighs on both
//! alike. The main loads also report each process's CPU time per call (from `/proc`), which is
//! what a ratio comes from when the two cores are busy.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use duplex::{Call, Peer, PeerBuilder};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

mod measure;
#[path = "../../tests/common/process.rs"]
#[allow(dead_code)]
mod process;
mod procs;
mod report;
mod roles;
mod scenarios;

use measure::*;
use procs::*;
use roles::*;
use scenarios::*;

const TOKEN: &str = "bench-token-0123456789";
const SECRET: &str = "bench-secret-0123456789";
const ENDPOINT: &str = "/bench";
/// The endpoint served by a pool of backends.
const POOL: &str = "/pool";
/// The endpoint whose clients present signed tokens (JWT, RS256) instead of the secret.
const SIGNED: &str = "/signed";
/// Its size.
const POOL_SIZE: usize = 4;
/// `cluster_idle`'s nodes.
const CLUSTER_IDLE_NODES: usize = 6;

/// What to run.
#[derive(Clone)]
struct Options {
    clients: usize,
    seconds: f64,
    idle: usize,
    stream_frames: u64,
    json: Option<String>,
    url: Option<String>,
    token: String,
    /// `cluster_endpoints`: endpoints published on each of its nodes.
    endpoints_per_node: usize,
    /// `cluster_endpoints`: how many nodes.
    endpoint_nodes: usize,
    /// `cluster_idle`: WebSocket clients over [`CLUSTER_IDLE_NODES`] nodes.
    cluster_clients: usize,
    /// Only `cluster_endpoints` and `cluster_idle` (`--only-cluster-scale`).
    only_cluster_scale: bool,
    /// `reconnect_storm`: clients that reconnect after the gateway's restart.
    storm_clients: usize,
    /// `reconnect_storm`: JavaScript clients (Node) beside them.
    storm_js_clients: usize,
    /// Only compare this build with another (`--compare-binary PATH`): `ws_rpc` and `http_rpc`
    /// on both, side by side.
    compare: Option<String>,
    /// Only the signed-token loads (`--only-identity`).
    only_identity: bool,
    /// Only `reconnect_storm` (`--only-storm`).
    only_storm: bool,
}

impl Options {
    fn parse(args: &[String]) -> Options {
        let quick = args.iter().any(|a| a == "--quick");
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let num =
            |name: &str, default: f64| value(name).and_then(|v| v.parse().ok()).unwrap_or(default);
        Options {
            clients: num("--clients", if quick { 16.0 } else { 64.0 }) as usize,
            seconds: num("--seconds", if quick { 3.0 } else { 10.0 }),
            idle: num("--idle", if quick { 1000.0 } else { 10_000.0 }) as usize,
            stream_frames: num("--stream-frames", if quick { 20_000.0 } else { 100_000.0 }) as u64,
            json: value("--json"),
            url: value("--url").map(|u| u.trim_end_matches('/').to_string()),
            token: value("--token").unwrap_or_else(|| TOKEN.to_string()),
            endpoints_per_node: num("--endpoints-per-node", if quick { 500.0 } else { 16_667.0 })
                as usize,
            endpoint_nodes: num("--endpoint-nodes", if quick { 4.0 } else { 6.0 }) as usize,
            cluster_clients: num("--cluster-clients", if quick { 3_000.0 } else { 100_000.0 })
                as usize,
            only_cluster_scale: args.iter().any(|a| a == "--only-cluster-scale"),
            storm_clients: num("--storm-clients", if quick { 2_000.0 } else { 10_000.0 }) as usize,
            storm_js_clients: num("--storm-js-clients", if quick { 200.0 } else { 1_000.0 })
                as usize,
            compare: value("--compare-binary"),
            only_identity: args.iter().any(|a| a == "--only-identity"),
            only_storm: args.iter().any(|a| a == "--only-storm"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    if let Some(i) = args.iter().position(|a| a == "--role") {
        let role = args.get(i + 1).cloned().unwrap_or_default();
        let arg = args.get(i + 2).cloned().unwrap_or_default();
        return run_role(&role, &arg);
    }
    let options = Options::parse(&args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(options));
}

// ---- Servers (separate processes) ----------------------------------------------------------

// ---- Measurements ---------------------------------------------------------------------------

type CallFuture = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

// ---- abuse ----------------------------------------------------------------------------------

async fn bench(o: Options) {
    let dir = tempfile::tempdir().expect("temp dir");
    if let Some(other) = &o.compare {
        return compare_builds(&o, dir.path(), std::path::Path::new(other)).await;
    }
    if o.only_cluster_scale {
        let (endpoints, idle) = cluster_scale(&o, dir.path()).await;
        write_json(
            &o,
            &json!({"cluster_endpoints": endpoints, "cluster_idle": idle}),
        );
        return;
    }
    if o.only_storm {
        let storm = storm_pair(&o, dir.path()).await;
        let mut ratios = report::Ratios::default();
        storm_ratio(&mut ratios, &storm);
        println!("ratios         {}", to_json(&ratios));
        return;
    }
    let started = Instant::now();
    println!(
        "duplex-gateway load: {} clients, {} s per scenario, {} idle, {} stream frames",
        o.clients, o.seconds, o.idle, o.stream_frames
    );

    // The gateway: ours, or the one given with --url.
    let ours = match &o.url {
        Some(_) => None,
        None => Some(start_gateway(dir.path()).await),
    };
    let base = match (&o.url, &ours) {
        (Some(url), _) => url.clone(),
        (None, Some(g)) => g.url.clone(),
        (None, None) => unreachable!("one of the two"),
    };
    let gateway_pid = ours.as_ref().map(|g| g.pid);
    let metrics_port = ours.as_ref().map(|g| g.metrics);
    let http_base = base.replacen("ws://", "http://", 1);
    let gw_port: u16 = http_base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("gateway URL with a port");
    let backend = spawn_role(
        "echo-backend",
        &format!("{base}{ENDPOINT}?token={}&secret={SECRET}", o.token),
    );
    let client_url = format!("{base}{ENDPOINT}?secret={SECRET}");
    wait_for_echo(&client_url, "the echo backend did not publish").await;
    if let (true, Some(pid)) = (o.only_identity, gateway_pid) {
        let i = identity_scenario(&o, &base, gw_port, pid).await;
        let mut ratios = report::Ratios::default();
        i.add_ratios(&mut ratios);
        println!("ratios         {}", to_json(&ratios));
        return;
    }
    // Where the CPU time of a call through the gateway goes.
    let through_gateway: Vec<(&str, u32, bool)> = gateway_pid
        .map(|pid| ("gateway", pid, false))
        .into_iter()
        .chain([("echo backend", backend.id(), false)])
        .collect();

    // The direct servers, and nginx: up from the start, so each comparison runs side by side.
    let ws_port = free_port();
    let ws_server = spawn_role("ws-server", &ws_port.to_string());
    let http_port = free_port();
    let http_server = spawn_role("http-server", &http_port.to_string());
    let floor_port = free_port();
    let floor_server = spawn_role("pingora-floor", &floor_port.to_string());
    wait_port(ws_port).await;
    wait_port(http_port).await;
    wait_port(floor_port).await;
    let nginx_proc = start_nginx(dir.path(), http_port).await;
    let direct_url = format!("ws://127.0.0.1:{ws_port}/");
    let call_path = format!("{ENDPOINT}/echo?secret={SECRET}");
    let clients = o.clients;

    // ws_rpc / ws_rpc_direct
    let direct_server = [("direct server", ws_server.id(), false)];
    let (ws_rpc, ws_direct) = side_by_side_pair(
        o.seconds,
        load(clients, &through_gateway, |_| ws_caller(client_url.clone())),
        load(clients, &direct_server, |_| ws_caller(direct_url.clone())),
    )
    .await;
    print_rpc("ws_rpc", &ws_rpc);
    print_rpc("ws_rpc_direct", &ws_direct);

    // http_rpc / http_direct / http_floor / http_nginx
    let hyper = ("hyper server", http_server.id(), false);
    let hyper_only = [hyper];
    let floor_only = [("pingora floor", floor_server.id(), false)];
    let nginx_watch = nginx_proc
        .as_ref()
        .map(|(proc, _)| [("nginx", proc.id(), true), hyper]);
    let mut http_loads: Vec<Load> = vec![
        load(clients, &through_gateway, |_| {
            http_caller(gw_port, call_path.clone())
        }),
        load(clients, &hyper_only, move |_| {
            http_caller(http_port, "/echo".to_string())
        }),
        load(clients, &floor_only, move |_| {
            http_caller(floor_port, "/echo".to_string())
        }),
    ];
    if let (Some((_, nginx_port)), Some(watch)) = (&nginx_proc, &nginx_watch) {
        let nginx_port = *nginx_port;
        http_loads.push(load(clients, watch, move |_| {
            http_caller(nginx_port, "/echo".to_string())
        }));
    }
    let mut http_results = side_by_side(o.seconds, http_loads).await.into_iter();
    let (Some(http_rpc), Some(http_direct), Some(http_floor)) = (
        http_results.next(),
        http_results.next(),
        http_results.next(),
    ) else {
        unreachable!("three loads at least")
    };
    let nginx = http_results.next();
    print_rpc("http_rpc", &http_rpc);
    print_rpc("http_direct", &http_direct);
    print_rpc("http_floor", &http_floor);
    match &nginx {
        Some(r) => print_rpc("http_nginx", r),
        None => println!("http_nginx     skipped: nginx is not installed"),
    }
    drop(nginx_proc);
    drop(floor_server);

    // identity: the same loads with signed client tokens instead of the secret, side by side.
    let identity = match gateway_pid {
        Some(pid) => Some(identity_scenario(&o, &base, gw_port, pid).await),
        None => None,
    };
    // observability: the access log and spans on, against the default config.
    let observed = match gateway_pid {
        Some(pid) => Some(observability_scenario(&o, dir.path(), (&base, gw_port, pid)).await),
        None => None,
    };

    // latency: one client, sequential calls; the p50 the gateway adds over direct.
    let short = o.seconds.min(5.0);
    let lat_ws = closed_loop(1, short, |_| ws_caller(client_url.clone())).await;
    let lat_ws_direct = closed_loop(1, short, |_| ws_caller(direct_url.clone())).await;
    let lat_http = closed_loop(1, short, |_| http_caller(gw_port, call_path.clone())).await;
    let lat_http_direct =
        closed_loop(1, short, |_| http_caller(http_port, "/echo".to_string())).await;
    let p50 = |r: &RpcResult| r.hist.value_at_quantile(0.5) as i64;
    let p99 = |r: &RpcResult| r.hist.value_at_quantile(0.99) as i64;
    let latency = report::Latency {
        ws_p50_us: p50(&lat_ws),
        ws_direct_p50_us: p50(&lat_ws_direct),
        ws_added_p50_us: p50(&lat_ws) - p50(&lat_ws_direct),
        http_p50_us: p50(&lat_http),
        http_direct_p50_us: p50(&lat_http_direct),
        http_added_p50_us: p50(&lat_http) - p50(&lat_http_direct),
    };
    println!("latency        {}", to_json(&latency));

    // connect: new WebSocket clients per second (connect, handshake, one call, close).
    let connecting = o.clients.min(16);
    let (connect, connect_direct) = side_by_side_pair(
        short,
        load(connecting, &[], |_| connect_caller(client_url.clone())),
        load(connecting, &[], |_| connect_caller(direct_url.clone())),
    )
    .await;
    print_rpc("connect", &connect);
    print_rpc("connect_direct", &connect_direct);
    drop(ws_server);
    drop(http_server);

    // reload: the ws_rpc and http_rpc loads while the gateway reloads every 100 ms.
    // Each against the same load without reloads, side by side.
    let reload = match &ours {
        Some(g) => {
            let (ws, ws_quiet, n) =
                reload_side_by_side(g, clients, o.seconds, |_| ws_caller(client_url.clone())).await;
            println!("               ({n} reloads during the load)");
            print_rpc("reload ws", &ws);
            print_rpc("ws, no reload", &ws_quiet);
            let (http, http_quiet, n) = reload_side_by_side(g, clients, o.seconds, |_| {
                http_caller(gw_port, call_path.clone())
            })
            .await;
            println!("               ({n} reloads during the load)");
            print_rpc("reload http", &http);
            print_rpc("http, no reload", &http_quiet);
            Some((ws, ws_quiet, http, http_quiet))
        }
        None => None,
    };

    // stream, idle
    let stream = stream_scenario(&client_url, o.stream_frames).await;
    println!("stream         {} frames/s", stream.frames_per_sec);
    let idle = idle_scenario(&client_url, o.idle, gateway_pid).await;
    println!(
        "idle           {} clients, {} answered, {} bytes of gateway RSS per client",
        idle.clients,
        idle.answered,
        idle.bytes_per_client
            .map_or_else(|| "?".to_string(), |b| b.to_string())
    );

    // pool_rpc, rolling_deploy: only on our gateway (the pool's size is in its config).
    let pools = match metrics_port {
        Some(metrics) => Some(pool_scenarios(&o, &base, gw_port, metrics).await),
        None => {
            println!("pool_rpc       skipped: needs the gateway this tool starts");
            None
        }
    };

    // abuse: only with gateways this tool starts.
    let abuse = match &ours {
        Some(_) => Some(abuse_scenario(&o, dir.path()).await),
        None => None,
    };

    // cluster_ws_rpc, cluster_http_rpc: only with gateways this tool starts.
    let cluster = match &ours {
        Some(_) => cluster_scenarios(&o, dir.path(), (&client_url, gw_port)).await,
        None => None,
    };
    // reconnect_storm: clients back after a gateway restart, with and without jitter.
    let storm = match &ours {
        Some(_) => Some(storm_pair(&o, dir.path()).await),
        None => None,
    };
    // cluster_endpoints: many endpoints over several nodes; cluster_idle: many clients over
    // six (only with gateways this tool starts).
    let (cluster_endpoints, cluster_idle) = match &ours {
        Some(_) => cluster_scale(&o, dir.path()).await,
        None => (None, None),
    };
    let cluster_latency = cluster.as_ref().map(|c| {
        let (lw, lh) = (&c.latency_ws, &c.latency_http);
        report::ClusterLatency {
            ws_p50_us: p50(lw),
            ws_added_p50_us: p50(lw) - p50(&lat_ws),
            ws_added_p99_us: p99(lw) - p99(&lat_ws),
            http_p50_us: p50(lh),
            http_added_p50_us: p50(lh) - p50(&lat_http),
            http_added_p99_us: p99(lh) - p99(&lat_http),
        }
    });
    if let Some(l) = &cluster_latency {
        println!("cluster latency {}", to_json(l));
    }

    let mut ratios = report::Ratios::default();
    ratios.add("ws_rpc / ws_rpc_direct", ws_rpc.rate(), ws_direct.rate());
    ratios.add(
        "ws_rpc p99 / direct p99",
        ws_rpc.hist.value_at_quantile(0.99) as f64,
        ws_direct.hist.value_at_quantile(0.99).max(1) as f64,
    );
    ratios.add(
        "http_rpc / http_direct",
        http_rpc.rate(),
        http_direct.rate(),
    );
    ratios.add("http_rpc / http_floor", http_rpc.rate(), http_floor.rate());
    if let Some(n) = &nginx {
        ratios.add("http_rpc / http_nginx", http_rpc.rate(), n.rate());
        ratios.add("http_floor / http_nginx", http_floor.rate(), n.rate());
    }
    ratios.add(
        "connect / connect_direct",
        connect.rate(),
        connect_direct.rate(),
    );
    if let Some((ws, ws_quiet, http, http_quiet)) = &reload {
        ratios.add("reload ws / no reload", ws.rate(), ws_quiet.rate());
        ratios.add("reload http / no reload", http.rate(), http_quiet.rate());
    }
    if let Some((pool_rpc, _, _)) = &pools {
        ratios.add("pool_rpc / ws_rpc", pool_rpc.rate(), ws_rpc.rate());
    }
    if let Some(c) = &cluster {
        // Against the same load on one node, run beside it.
        ratios.add(
            "cluster_ws_rpc / one node",
            c.ws.rate(),
            c.one_node_ws.rate(),
        );
        ratios.add(
            "cluster_http_rpc / one node",
            c.http.rate(),
            c.one_node_http.rate(),
        );
        ratios.add(
            "cluster_ws_rpc signed / unsigned",
            c.signed_ws.rate(),
            c.unsigned_ws.rate(),
        );
    }
    if let Some(a) = &abuse {
        ratios.add("abuse attacked / calm", a.throughput_ratio, 1.0);
    }
    if let Some(storm) = &storm {
        storm_ratio(&mut ratios, storm);
    }
    if let Some(r) = &observed {
        ratios.add("ws_rpc all on / default", r.ws_on.rate(), r.ws_off.rate());
        ratios.add(
            "http_rpc all on / default",
            r.http_on.rate(),
            r.http_off.rate(),
        );
    }
    if let Some(i) = &identity {
        i.add_ratios(&mut ratios);
    }
    println!("ratios         {}", to_json(&ratios));

    let clients = o.clients;
    let report = report::Report {
        ws_rpc: ws_rpc.summary(clients),
        ws_rpc_direct: ws_direct.summary(clients),
        http_rpc: http_rpc.summary(clients),
        http_direct: http_direct.summary(clients),
        http_floor: http_floor.summary(clients),
        http_nginx: nginx.as_ref().map(|n| n.summary(clients)),
        pool_rpc: pools.as_ref().map(|(p, _, _)| p.summary(clients)),
        rolling_deploy: pools.as_ref().map(|(_, rolling, dip)| report::Rolling {
            load: rolling.summary(clients),
            failed_calls: rolling.errors,
            throughput_vs_pool_rpc: round(*dip, 3),
        }),
        latency,
        cluster_ws_rpc: cluster.as_ref().map(|c| c.ws.summary(clients)),
        cluster_http_rpc: cluster.as_ref().map(|c| c.http.summary(clients)),
        cluster_one_node_ws: cluster.as_ref().map(|c| c.one_node_ws.summary(clients)),
        cluster_one_node_http: cluster.as_ref().map(|c| c.one_node_http.summary(clients)),
        cluster_ws_rpc_signed: cluster.as_ref().map(|c| c.signed_ws.summary(clients)),
        cluster_ws_rpc_unsigned: cluster.as_ref().map(|c| c.unsigned_ws.summary(clients)),
        cluster_latency,
        abuse,
        cluster_endpoints,
        cluster_idle,
        identity: identity.as_ref().map(|i| report::Identity {
            ws_jwt: i.ws_jwt.summary(clients),
            ws_secret: i.ws_secret.summary(clients),
            http_jwt: i.http_jwt.summary(clients),
            http_secret: i.http_secret.summary(clients),
            verify_us: i.verify_us,
            remembered_us: i.remembered_us,
        }),
        reconnect_storm: storm.as_ref().map(|(with, without)| report::StormPair {
            clients: with.clients,
            jitter: report::StormRun {
                back_s: with.back_s,
                back: with.back,
                peak_joins_per_s: with.peak_per_s,
                peak_attempts_per_s: with.peak_attempts_per_s,
            },
            no_jitter: report::StormRun {
                back_s: without.back_s,
                back: without.back,
                peak_joins_per_s: without.peak_per_s,
                peak_attempts_per_s: without.peak_attempts_per_s,
            },
        }),
        observability: observed.as_ref().map(|r| report::Observed {
            ws_all_on: r.ws_on.summary(clients),
            ws_default: r.ws_off.summary(clients),
            http_all_on: r.http_on.summary(clients),
            http_default: r.http_off.summary(clients),
        }),
        connect: connect.summary(connecting),
        connect_direct: connect_direct.summary(connecting),
        reload: reload
            .as_ref()
            .map(|(ws, ws_quiet, http, http_quiet)| report::Reload {
                ws: ws.summary(clients),
                ws_no_reload: ws_quiet.summary(clients),
                http: http.summary(clients),
                http_no_reload: http_quiet.summary(clients),
                failed_calls: ws.errors + http.errors,
            }),
        stream,
        idle,
        ratios,
        machine: report::Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            target: if o.url.is_some() {
                "external gateway"
            } else {
                "duplex-gateway (release)"
            },
        },
        total_seconds: round(started.elapsed().as_secs_f64(), 1),
    };
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    write_json(&o, &report);
}

/// `cluster_endpoints`, then `cluster_idle`, as the options size them.
async fn cluster_scale(
    o: &Options,
    dir: &std::path::Path,
) -> (
    Option<report::ClusterEndpoints>,
    Option<report::ClusterIdle>,
) {
    let endpoints =
        cluster_endpoints_scenario(o, dir, o.endpoint_nodes, o.endpoints_per_node).await;
    let idle = cluster_idle_scenario(dir, CLUSTER_IDLE_NODES, o.cluster_clients).await;
    (endpoints, idle)
}

/// Writes `value` to the `--json` file, if one was asked for.
fn write_json(o: &Options, value: &impl serde::Serialize) {
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(value).expect("json");
        std::fs::write(path, text).expect("write --json file");
        println!("wrote {path}");
    }
}

/// One line of JSON, for the console.
fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
