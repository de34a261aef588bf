//! The scenarios beyond the side-by-side pairs of `main.rs`: stream, idle, pools and rolling
//! deploys, the cluster, abuse, signed client tokens.

use super::*;
use futures_util::StreamExt;

pub(crate) async fn stream_scenario(client_url: &str, frames: u64) -> report::Stream {
    let peer = Peer::builder().connect(client_url).await.expect("connect");
    let start = Instant::now();
    let mut replies = peer.call_stream("count", json!(frames)).expect("call");
    let mut got = 0u64;
    while let Some(item) = replies.next().await {
        if item.is_err() {
            break;
        }
        got += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    report::Stream {
        frames: got,
        seconds: round(secs, 3),
        frames_per_sec: round(got as f64 / secs, 0),
    }
}

pub(crate) async fn idle_scenario(
    client_url: &str,
    n: usize,
    gateway_pid: Option<u32>,
) -> report::Idle {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = gateway_pid.and_then(rss_kib);
    let mut peers = Vec::with_capacity(n);
    let start = Instant::now();
    for chunk in 0..n.div_ceil(200) {
        let batch =
            (chunk * 200..((chunk + 1) * 200).min(n)).map(|_| Peer::builder().connect(client_url));
        for p in futures_util::future::join_all(batch).await {
            peers.push(p.expect("idle client connects"));
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = gateway_pid.and_then(rss_kib);
    let calls = peers.iter().enumerate().map(|(i, p)| {
        let p = p.clone();
        async move { p.call("echo", json!(i)).await == Ok(json!(i)) }
    });
    let answered = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
    drop(peers);
    report::Idle {
        clients: n,
        answered,
        connect_seconds: round(connect_secs, 2),
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_client: before
            .zip(after)
            .map(|(b, a)| (a.saturating_sub(b) * 1024) / n.max(1) as u64),
    }
}

/// `pool_rpc`: the WebSocket load of `ws_rpc` on an endpoint served by a pool of backends, each a
/// process of its own. `rolling_deploy`: half WebSocket, half HTTP load on that pool while each
/// backend in turn drains, exits and is replaced. Returns both, and the deploy's throughput
/// against `pool_rpc`'s.
pub(crate) async fn pool_scenarios(
    o: &Options,
    base: &str,
    gw_port: u16,
    metrics: u16,
) -> (RpcResult, RpcResult, f64) {
    let publish_url = format!("{base}{POOL}?token={}&secret={SECRET}", o.token);
    let mut backends = Vec::new();
    for n in 1..=POOL_SIZE {
        backends.push(spawn_role("pool-backend", &publish_url));
        wait_pool(metrics, POOL, n).await;
    }
    let client_url = format!("{base}{POOL}?secret={SECRET}");
    let pool_rpc = closed_loop(o.clients, o.seconds, |_| ws_caller(client_url.clone())).await;
    print_rpc("pool_rpc", &pool_rpc);

    // The deploy: one backend every seconds / (size + 1), the load running throughout.
    let seconds = o.seconds;
    let step = Duration::from_secs_f64(seconds / (POOL_SIZE as f64 + 1.0));
    let deploy = tokio::spawn({
        let publish_url = publish_url.clone();
        async move {
            // Past the warm-up of the closed loop.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut backends = backends;
            for _ in 0..POOL_SIZE {
                tokio::time::sleep(step).await;
                let old = backends.remove(0);
                stop(old).await;
                backends.push(spawn_role("pool-backend", &publish_url));
                wait_pool(metrics, POOL, POOL_SIZE).await;
            }
            backends
        }
    });
    let call_path = format!("{POOL}/echo?secret={SECRET}");
    let half = (o.clients / 2).max(1);
    let rolling = closed_loop(o.clients, seconds, |i| {
        let (client_url, call_path) = (client_url.clone(), call_path.clone());
        async move {
            if i < half {
                ws_caller(client_url).await
            } else {
                http_caller(gw_port, call_path).await
            }
        }
    })
    .await;
    let backends = deploy.await.expect("deploy");
    drop(backends);
    let dip = rolling.rate() / pool_rpc.rate();
    println!(
        "rolling_deploy {:>10.0} calls/s   failed calls {}   throughput {:.2} x pool_rpc",
        rolling.rate(),
        rolling.errors,
        dip
    );
    (pool_rpc, rolling, dip)
}

/// Waits (20 s at most, else fails with `what`) until a client of `client_url` gets an echo.
pub(crate) async fn wait_for_echo(client_url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(p) = Peer::builder().connect(client_url).await {
            if p.call("echo", json!(1)).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the cluster scenarios measure: `cluster_ws_rpc` and `cluster_http_rpc`, the one-node
/// loads run side by side with them, and one client's sequential calls through the cluster.
pub(crate) struct ClusterResults {
    pub(crate) ws: RpcResult,
    pub(crate) http: RpcResult,
    pub(crate) one_node_ws: RpcResult,
    pub(crate) one_node_http: RpcResult,
    pub(crate) latency_ws: RpcResult,
    pub(crate) latency_http: RpcResult,
    /// `cluster_ws_rpc_signed`: the same load through a second pair of nodes that sign every
    /// message (`cluster.key`), side by side with the unsigned pair.
    pub(crate) signed_ws: RpcResult,
    pub(crate) unsigned_ws: RpcResult,
}

/// `cluster_ws_rpc`, `cluster_http_rpc`: the `ws_rpc` and `http_rpc` loads with the clients on
/// node A and the echo backend on node B, joined by a real nats-server, each side by side with
/// the same load on one node (`one_node`: the single gateway's client URL and port); then one
/// client's sequential calls the same way (for the latency the cluster adds). None without
/// nats-server.
pub(crate) async fn cluster_scenarios(
    o: &Options,
    dir: &std::path::Path,
    one_node: (&str, u16),
) -> Option<ClusterResults> {
    let Some((_nats, nats_port)) = start_nats(None).await else {
        println!("cluster_*      skipped: nats-server is not installed");
        return None;
    };
    let node = |name: &str| {
        format!(
            "  max_message_bytes: 1000000\ncluster:\n  nats: [nats://127.0.0.1:{nats_port}]\n  node: {name}\n"
        )
    };
    let a = start_gateway_with(dir, "node-a.yaml", &node("a")).await;
    let b = start_gateway_with(dir, "node-b.yaml", &node("b")).await;
    let _backend = spawn_role(
        "echo-backend",
        &format!("{}{ENDPOINT}?token={}&secret={SECRET}", b.url, o.token),
    );
    let client_url = format!("{}{ENDPOINT}?secret={SECRET}", a.url);
    wait_for_echo(&client_url, "node A never reached the backend on node B").await;
    let a_port = a.port;
    let call_path = format!("{ENDPOINT}/echo?secret={SECRET}");
    let (one_url, one_port) = one_node;
    let clients = o.clients;
    let (ws, one_node_ws) = side_by_side_pair(
        o.seconds,
        load(clients, &[], |_| ws_caller(client_url.clone())),
        load(clients, &[], |_| ws_caller(one_url.to_string())),
    )
    .await;
    print_rpc("cluster_ws_rpc", &ws);
    print_rpc("ws, one node", &one_node_ws);
    let (http, one_node_http) = side_by_side_pair(
        o.seconds,
        load(clients, &[], |_| http_caller(a_port, call_path.clone())),
        load(clients, &[], |_| http_caller(one_port, call_path.clone())),
    )
    .await;
    print_rpc("cluster_http_rpc", &http);
    print_rpc("http, one node", &one_node_http);
    // The cost of signing: a second pair of nodes, on their own subjects, with a cluster key.
    let signed_node = |name: &str| {
        format!(
            "  max_message_bytes: 1000000\ncluster:\n  nats: [nats://127.0.0.1:{nats_port}]\n  node: {name}\n  subject_prefix: signed\n  key: bench-cluster-key-0123456789abcdef0123\n"
        )
    };
    let c = start_gateway_with(dir, "node-c.yaml", &signed_node("c")).await;
    let d = start_gateway_with(dir, "node-d.yaml", &signed_node("d")).await;
    let _signed_backend = spawn_role(
        "echo-backend",
        &format!("{}{ENDPOINT}?token={}&secret={SECRET}", d.url, o.token),
    );
    let signed_url = format!("{}{ENDPOINT}?secret={SECRET}", c.url);
    wait_for_echo(&signed_url, "node C never reached the backend on node D").await;
    let (signed_ws, unsigned_ws) = side_by_side_pair(
        o.seconds,
        load(clients, &[], |_| ws_caller(signed_url.clone())),
        load(clients, &[], |_| ws_caller(client_url.clone())),
    )
    .await;
    print_rpc("cluster_ws_rpc_signed", &signed_ws);
    print_rpc("ws, unsigned", &unsigned_ws);
    let short = o.seconds.min(5.0);
    let latency_ws = closed_loop(1, short, |_| ws_caller(client_url.clone())).await;
    let latency_http = closed_loop(1, short, |_| http_caller(a_port, call_path.clone())).await;
    Some(ClusterResults {
        ws,
        http,
        one_node_ws,
        one_node_http,
        latency_ws,
        latency_http,
        signed_ws,
        unsigned_ws,
    })
}

/// `abuse`: the `ws_rpc` load from 127.0.0.1 (its 64 clients share that one address, so the
/// per-address rate is set far above what they make), side by side without and with an attacker
/// process on 127.0.0.2 (silent TLS and h2 connections, trickled headers, guessed secrets, as
/// fast as it can), against a gateway with the abuse controls on: the throughput kept, the
/// gateway's open descriptors at their highest under attack against the bound
/// (`max_connections_per_ip` + those of the run without attack), and its memory.
pub(crate) async fn abuse_scenario(o: &Options, dir: &std::path::Path) -> report::Abuse {
    const MAX_CONNECTIONS_PER_IP: usize = 256;
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate");
    let (cert, key) = (dir.join("abuse.pem"), dir.join("abuse.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("key");
    let tls_port = free_port();
    let g = start_gateway_listening(
        dir,
        "abuse.yaml",
        &format!(
            "  max_connections_per_ip: {MAX_CONNECTIONS_PER_IP}\n  requests_per_ip_per_second: 100000\n  auth_failures_per_ip_per_minute: 30\n  request_header_timeout: 2s\n"
        ),
        &format!(
            "  - address: 127.0.0.1:{tls_port}\n    tls: {{ cert: {}, key: {} }}\n",
            cert.display(),
            key.display()
        ),
        false,
    )
    .await;
    wait_port(tls_port).await;
    let (pid, url) = (g.pid, g.url.clone());
    let plain_port = g.port;
    let _backend = spawn_role(
        "echo-backend",
        &format!("{url}{ENDPOINT}?token={}&secret={SECRET}", o.token),
    );
    let client_url = format!("{url}{ENDPOINT}?secret={SECRET}");
    wait_for_echo(&client_url, "the abuse gateway never reached its backend").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid).unwrap_or(0);
    let fds_before = open_fds(pid).unwrap_or(0);
    let highest = Arc::new(std::sync::Mutex::new((0usize, 0u64)));
    let attack_arg = format!("{tls_port} {plain_port} {}", cert.display());
    let clients = o.clients;
    let (calm, attacked) = side_by_side_pair(
        o.seconds,
        load(clients, &[], |_| ws_caller(client_url.clone())),
        Box::new(|secs: f64| {
            let attack_arg = attack_arg.clone();
            let client_url = client_url.clone();
            let highest = highest.clone();
            Box::pin(async move {
                let attacker = spawn_role("attacker", &attack_arg);
                let sampling = tokio::spawn(async move {
                    loop {
                        let fds = open_fds(pid).unwrap_or(0);
                        let rss = rss_kib(pid).unwrap_or(0);
                        if let Ok(mut h) = highest.lock() {
                            h.0 = h.0.max(fds);
                            h.1 = h.1.max(rss);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
                let result = closed_loop(clients, secs, |_| ws_caller(client_url.clone())).await;
                sampling.abort();
                drop(attacker);
                // The attacker's connections go before the next load.
                tokio::time::sleep(Duration::from_millis(500)).await;
                result
            })
        }),
    )
    .await;
    print_rpc("abuse, calm", &calm);
    print_rpc("abuse, attacked", &attacked);
    let (max_fds, max_rss) = highest.lock().map(|h| *h).unwrap_or_default();
    let report = report::Abuse {
        calm: calm.summary(clients),
        attacked: attacked.summary(clients),
        throughput_ratio: round(attacked.rate() / calm.rate(), 3),
        fds_before,
        max_fds_attacked: max_fds,
        fds_bound: MAX_CONNECTIONS_PER_IP + fds_before,
        rss_kib_before: rss_before,
        max_rss_kib_attacked: max_rss,
        rss_ratio: round(max_rss as f64 / rss_before.max(1) as f64, 3),
    };
    println!(
        "abuse          throughput {} of calm, descriptors {} (bound {}), RSS {}x",
        report.throughput_ratio, max_fds, report.fds_bound, report.rss_ratio
    );
    report
}

/// The config lines of cluster node `name` on the NATS server at `nats_port`.
fn scale_node(nats_port: u16, name: &str, prefix: &str) -> String {
    format!(
        "  max_message_bytes: 1000000\n  backend_grace: 30s\ncluster:\n  nats: [nats://127.0.0.1:{nats_port}]\n  node: {name}\n  subject_prefix: {prefix}\n"
    )
}

/// Starts `n` cluster nodes named `<prefix>1`.. on the NATS server at `nats_port`.
async fn scale_nodes(
    dir: &std::path::Path,
    nats_port: u16,
    prefix: &str,
    n: usize,
) -> Vec<OurGateway> {
    let mut nodes = Vec::new();
    for i in 1..=n {
        let name = format!("{prefix}{i}");
        let config = scale_node(nats_port, &name, prefix);
        nodes.push(start_gateway_with(dir, &format!("node-{name}.yaml"), &config).await);
    }
    nodes
}

/// The fewest nodes any of `nodes` counts in its cluster (itself included); None when one
/// cannot be asked.
async fn fewest_heard(http: &reqwest::Client, metrics_ports: &[u16]) -> Option<usize> {
    let mut fewest = usize::MAX;
    for metrics in metrics_ports {
        let text = http
            .get(format!("http://127.0.0.1:{metrics}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let heard = text
            .lines()
            .find_map(|l| l.strip_prefix("duplex_gateway_cluster_nodes "))
            .and_then(|v| v.trim().parse::<f64>().ok())?;
        fewest = fewest.min(heard as usize);
    }
    Some(fewest)
}

/// Asks every node, every 200 ms until dropped, how many nodes it hears: the fewest any said.
fn watch_membership(
    nodes: &[OurGateway],
) -> (
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let fewest = Arc::new(std::sync::atomic::AtomicUsize::new(nodes.len()));
    let ports: Vec<u16> = nodes.iter().map(|gw| gw.metrics).collect();
    let seen = fewest.clone();
    let task = tokio::spawn(async move {
        let http = reqwest::Client::new();
        loop {
            if let Some(n) = fewest_heard(&http, &ports).await {
                seen.fetch_min(n, std::sync::atomic::Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (task, fewest)
}

/// Whether `path` answers an HTTP call on `gw`.
async fn answers(http: &reqwest::Client, gw: &OurGateway, path: &str) -> bool {
    http.post(format!(
        "http://127.0.0.1:{}{path}/echo?secret={SECRET}",
        gw.port
    ))
    .body("1")
    .send()
    .await
    .is_ok_and(|r| r.status().as_u16() == 200)
}

/// `cluster_endpoints`: `per_node` endpoints published on each of `n` nodes (one backend
/// connection each, held by a publisher process per node): the time until every endpoint
/// answers on every node, the nodes' NATS traffic once idle, and then, the table full, how long
/// a new endpoint takes to answer on every other node.
pub(crate) async fn cluster_endpoints_scenario(
    o: &Options,
    dir: &std::path::Path,
    n: usize,
    per_node: usize,
) -> Option<report::ClusterEndpoints> {
    let monitor = free_port();
    let Some((_nats, nats_port)) = start_nats(Some(monitor)).await else {
        println!("cluster_endpoints skipped: nats-server is not installed");
        return None;
    };
    let nodes = scale_nodes(dir, nats_port, "e", n).await;
    let names: Vec<String> = (1..=n).map(|i| format!("e{i}")).collect();
    // Every node hears all the others before anything is published (then the watch starts).
    let http = reqwest::Client::new();
    let ports: Vec<u16> = nodes.iter().map(|gw| gw.metrics).collect();
    let joined = Instant::now() + Duration::from_secs(30);
    while fewest_heard(&http, &ports).await != Some(n) && Instant::now() < joined {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let (watch, fewest) = watch_membership(&nodes);
    let _publishers: Vec<Proc> = nodes
        .iter()
        .zip(&names)
        .map(|(gw, name)| {
            spawn_role(
                "publisher",
                &format!("{} {name} {per_node} {} {SECRET}", gw.url, o.token),
            )
        })
        .collect();
    let paths: Vec<String> = names
        .iter()
        .flat_map(|name| (0..per_node).map(move |i| format!("/many/{name}/{i}")))
        .collect();
    // Every endpoint, on every node: calls until each answers (five minutes at most).
    let total = per_node * nodes.len();
    let mut missing = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    for gw in &nodes {
        let mut left: Vec<usize> = (0..paths.len()).collect();
        while !left.is_empty() && Instant::now() < deadline {
            let calls = left.iter().map(|i| {
                let (http, path) = (&http, &paths[*i]);
                async move { (*i, answers(http, gw, path).await) }
            });
            let results: Vec<(usize, bool)> = futures_util::stream::iter(calls)
                .buffer_unordered(128)
                .collect()
                .await;
            left = results
                .into_iter()
                .filter(|(_, ok)| !ok)
                .map(|(i, _)| i)
                .collect();
            if !left.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        missing.extend(left);
    }
    let answered = paths.len() - missing.len();
    let all_known = started.elapsed().as_secs_f64();
    // Idle: what the NATS server carries for the nodes over a few seconds.
    let varz = |http: reqwest::Client| async move {
        let v: Value = http
            .get(format!("http://127.0.0.1:{monitor}/varz"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(v["in_bytes"].as_u64()? + v["out_bytes"].as_u64()?)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = varz(http.clone()).await;
    let idle = Duration::from_secs(5);
    tokio::time::sleep(idle).await;
    let after = varz(http.clone()).await;
    let per_node_bytes = before.zip(after).map(|(b, a)| {
        round(
            a.saturating_sub(b) as f64 / idle.as_secs_f64() / nodes.len() as f64,
            0,
        )
    });
    // New endpoints, one at a time on each node in turn, the table full.
    let mut took = Vec::new();
    let mut held = Vec::new();
    for k in 0..(2 * n).max(12) {
        let home = &nodes[k % n];
        let path = format!("/many/new/{k}");
        let url = format!("{}{path}?token={}&secret={SECRET}", home.url, o.token);
        let Ok(peer) = echo_handlers().connect(&url).await else {
            continue;
        };
        let published = Instant::now();
        let until = published + Duration::from_secs(10);
        for gw in nodes.iter().filter(|gw| gw.port != home.port) {
            while !answers(&http, gw, &path).await && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        took.push(round(published.elapsed().as_secs_f64() * 1000.0, 1));
        held.push(peer);
    }
    watch.abort();
    let fewest_nodes_heard = fewest.load(std::sync::atomic::Ordering::SeqCst);
    let every_node_hears_all = fewest_heard(&http, &ports).await == Some(n);
    let report = report::ClusterEndpoints {
        nodes: nodes.len(),
        endpoints: total,
        answered_on_every_node: answered,
        all_answer_after_seconds: round(all_known, 2),
        idle_nats_bytes_per_sec_per_node: per_node_bytes,
        every_node_hears_all,
        fewest_nodes_heard,
        new_endpoint_everywhere_ms: report::Spread::of(took),
    };
    println!(
        "cluster_endpoints {} endpoints on {} nodes: {} answered everywhere after {:.1} s; idle NATS {} B/s per node; a new one answers everywhere after {} ms (p50), {} ms (max of {}); every node hears all: {} (the fewest any node heard meanwhile: {})",
        total,
        nodes.len(),
        answered,
        all_known,
        per_node_bytes.map_or("?".to_string(), |b| b.to_string()),
        report.new_endpoint_everywhere_ms.p50,
        report.new_endpoint_everywhere_ms.max,
        report.new_endpoint_everywhere_ms.samples,
        every_node_hears_all,
        fewest_nodes_heard,
    );
    Some(report)
}

/// Waits until `file` (written by an `idle-clients` process) starts with `word`; its number.
async fn idle_clients_say(file: &std::path::Path, word: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Some(n) = text.strip_prefix(word) {
                return n.trim().parse().unwrap_or(0);
            }
        }
        if Instant::now() > deadline {
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The summed RSS (KiB) of these gateways.
fn rss_of(gws: &[&OurGateway]) -> u64 {
    gws.iter().filter_map(|gw| rss_kib(gw.pid)).sum()
}

/// `cluster_idle`: `total` idle WebSocket clients spread over `n` nodes (the backend on the
/// first; an `idle-clients` process per node), each answering a call at the end; beside them,
/// one gateway alone with one node's share of clients. Memory per client of both.
pub(crate) async fn cluster_idle_scenario(
    dir: &std::path::Path,
    n: usize,
    total: usize,
) -> Option<report::ClusterIdle> {
    let Some((_nats, nats_port)) = start_nats(None).await else {
        println!("cluster_idle skipped: nats-server is not installed");
        return None;
    };
    let nodes = scale_nodes(dir, nats_port, "i", n).await;
    let alone = start_gateway_with(dir, "alone.yaml", "").await;
    let path = "/idle";
    let token = TOKEN;
    let _backends = [
        spawn_role(
            "echo-backend",
            &format!("{}{path}?token={token}&secret={SECRET}", nodes[0].url),
        ),
        spawn_role(
            "echo-backend",
            &format!("{}{path}?token={token}&secret={SECRET}", alone.url),
        ),
    ];
    for gw in nodes.iter().chain([&alone]) {
        let url = format!("{}{path}?secret={SECRET}", gw.url);
        wait_for_echo(&url, "cluster_idle: the backend is not reached").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cluster: Vec<&OurGateway> = nodes.iter().collect();
    let before = (rss_of(&cluster), rss_of(&[&alone]));
    let per_node = total.div_ceil(n);
    let started = Instant::now();
    let files: Vec<std::path::PathBuf> = (0..=n).map(|i| dir.join(format!("idle-{i}"))).collect();
    let _clients: Vec<Proc> = nodes
        .iter()
        .chain([&alone])
        .zip(&files)
        .map(|(gw, file)| {
            let url = format!("{}{path}?secret={SECRET}", gw.url);
            spawn_role(
                "idle-clients",
                &format!("{url} {per_node} {}", file.display()),
            )
        })
        .collect();
    let mut connected = 0;
    for file in &files[..n] {
        connected += idle_clients_say(file, "connected").await;
    }
    let alone_connected = idle_clients_say(&files[n], "connected").await;
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = (rss_of(&cluster), rss_of(&[&alone]));
    for file in &files {
        let _ = std::fs::write(format!("{}.go", file.display()), "");
    }
    let mut answered = 0;
    for file in &files[..n] {
        answered += idle_clients_say(file, "answered").await;
    }
    let alone_answered = idle_clients_say(&files[n], "answered").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let called = (rss_of(&cluster), rss_of(&[&alone]));
    let per_client = |after: u64, before: u64, clients: usize| {
        after.saturating_sub(before) * 1024 / clients.max(1) as u64
    };
    let report = report::ClusterIdle {
        nodes: n,
        clients: connected,
        answered,
        connect_seconds: round(connect_seconds, 1),
        bytes_per_client_idle: per_client(idle.0, before.0, connected),
        bytes_per_client_after_call: per_client(called.0, before.0, connected),
        single_node_clients: alone_connected,
        single_node_answered: alone_answered,
        single_node_bytes_per_client: per_client(idle.1, before.1, alone_connected),
        single_node_bytes_per_client_after_call: per_client(called.1, before.1, alone_connected),
    };
    println!(
        "cluster_idle   {} clients on {} nodes ({} answered, connected in {:.1} s): {} bytes per client idle, {} after a call; one gateway alone with {}: {} bytes per client idle, {} after a call",
        report.clients,
        n,
        report.answered,
        report.connect_seconds,
        report.bytes_per_client_idle,
        report.bytes_per_client_after_call,
        report.single_node_clients,
        report.single_node_bytes_per_client,
        report.single_node_bytes_per_client_after_call,
    );
    Some(report)
}

/// The test key pair the `/signed` endpoint checks tokens with (`key`: `key` or `pub`).
pub(crate) fn signing_key(kind: &str) -> String {
    format!("{}/tests/keys/rsa.{kind}", env!("CARGO_MANIFEST_DIR"))
}

/// A token `/signed` accepts, valid for a day.
fn bench_token() -> String {
    bench_token_for("bench")
}

/// A token for `sub` that `/signed` accepts, valid for a day.
fn bench_token_for(sub: &str) -> String {
    let pem = std::fs::read(signing_key("key")).expect("the test signing key");
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).expect("RSA key");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 86_400;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &key,
    )
    .expect("sign")
}

/// What `identity_scenario` measured.
pub(crate) struct IdentityRuns {
    pub(crate) ws_jwt: RpcResult,
    pub(crate) ws_secret: RpcResult,
    pub(crate) http_jwt: RpcResult,
    pub(crate) http_secret: RpcResult,
    pub(crate) verify_us: f64,
    pub(crate) remembered_us: f64,
}

impl IdentityRuns {
    /// Its ratios: each signed-token load against the secret one beside it.
    pub(crate) fn add_ratios(&self, ratios: &mut report::Ratios) {
        ratios.add(
            "ws_rpc jwt / secret",
            self.ws_jwt.rate(),
            self.ws_secret.rate(),
        );
        ratios.add(
            "http_rpc jwt / secret",
            self.http_jwt.rate(),
            self.http_secret.rate(),
        );
    }
}

/// `ws_rpc` and `http_rpc` on `/signed` (clients present an RS256 token, `ext.auth` stamped on
/// every call), each side by side with the same load presenting the secret on `/bench`. A
/// WebSocket client's token is checked once, at its upgrade; an HTTP call's on every call.
pub(crate) async fn identity_scenario(
    o: &Options,
    base: &str,
    gw_port: u16,
    gateway_pid: u32,
) -> IdentityRuns {
    let token = bench_token();
    let backend = spawn_role(
        "echo-backend",
        &format!("{base}{SIGNED}?token={}&secret=unused", o.token),
    );
    let signed_url = format!("{base}{SIGNED}?access_token={token}");
    wait_for_echo(&signed_url, "the signed endpoint's backend did not publish").await;
    let watch = [("gateway", gateway_pid, false)];
    let secret_url = format!("{base}{ENDPOINT}?secret={SECRET}");
    let (ws_jwt, ws_secret) = side_by_side_pair(
        o.seconds,
        load(o.clients, &watch, |_| ws_caller(signed_url.clone())),
        load(o.clients, &watch, |_| ws_caller(secret_url.clone())),
    )
    .await;
    print_rpc("ws_rpc jwt", &ws_jwt);
    print_rpc("ws_rpc secret", &ws_secret);
    let signed_call = format!("{SIGNED}/echo?access_token={token}");
    let secret_call = format!("{ENDPOINT}/echo?secret={SECRET}");
    let (http_jwt, http_secret) = side_by_side_pair(
        o.seconds,
        load(o.clients, &watch, |_| {
            http_caller(gw_port, signed_call.clone())
        }),
        load(o.clients, &watch, |_| {
            http_caller(gw_port, secret_call.clone())
        }),
    )
    .await;
    print_rpc("http_rpc jwt", &http_jwt);
    print_rpc("http_rpc secret", &http_secret);
    drop(backend);

    // In this process: a token's first check (signature and claims), and a check of a token
    // seen before (its digest and expiry), as an HTTP caller pays them.
    let checker = duplex_gateway::identity::JwtAuth::load(&duplex_gateway::identity::JwtSettings {
        keys: vec![signing_key("pub").into()],
        leeway: duplex_gateway::identity::DEFAULT_LEEWAY,
        claims_to_backend: vec!["sub".into()],
        ..Default::default()
    })
    .expect("the test key loads");
    let tokens: Vec<String> = (0..200)
        .map(|i| bench_token_for(&format!("user-{i}")))
        .collect();
    let per_token = |tokens: &[String]| {
        let started = Instant::now();
        for token in tokens {
            assert!(checker.verify(token).is_ok(), "the bench tokens verify");
        }
        round(
            started.elapsed().as_secs_f64() * 1e6 / tokens.len() as f64,
            1,
        )
    };
    let verify_us = per_token(&tokens);
    let remembered_us = per_token(&tokens);
    println!(
        "jwt check      {verify_us} µs per new RS256 token, {remembered_us} µs per token seen before"
    );
    IdentityRuns {
        ws_jwt,
        ws_secret,
        http_jwt,
        http_secret,
        verify_us,
        remembered_us,
    }
}

/// A collector that takes every OTLP/HTTP export and answers `{}` (what the gateway sends is not
/// looked at: only its cost to the gateway is measured). Returns its port.
async fn sink_collector() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the collector");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        use http_body_util::BodyExt as _;
                        let _ = req.into_body().collect().await?;
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"{}"),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// What `observability_scenario` measured.
pub(crate) struct ObservedRuns {
    pub(crate) ws_on: RpcResult,
    pub(crate) ws_off: RpcResult,
    pub(crate) http_on: RpcResult,
    pub(crate) http_off: RpcResult,
}

/// `ws_rpc` and `http_rpc` through a second gateway with everything on (the access log as JSON,
/// one span per call to an OTLP collector), each side by side with the same load on the gateway
/// of the other scenarios (default config: access log and spans off).
pub(crate) async fn observability_scenario(
    o: &Options,
    dir: &std::path::Path,
    default_gw: (&str, u16, u32),
) -> ObservedRuns {
    let (base, gw_port, gw_pid) = default_gw;
    let collector = sink_collector().await;
    let observed = start_gateway_listening(
        dir,
        "observed.yaml",
        &format!(
            "log:\n  access: true\n  format: json\ntracing:\n  otlp_endpoint: http://127.0.0.1:{collector}\n"
        ),
        "",
        false,
    )
    .await;
    let observed_port = observed.port;
    let backend = spawn_role(
        "echo-backend",
        &format!(
            "{}{ENDPOINT}?token={}&secret={SECRET}",
            observed.url, o.token
        ),
    );
    let on_url = format!("{}{ENDPOINT}?secret={SECRET}", observed.url);
    wait_for_echo(&on_url, "the observed gateway's backend did not publish").await;
    let off_url = format!("{base}{ENDPOINT}?secret={SECRET}");
    let watch_on = [("gateway", observed.pid, false)];
    let watch_off = [("gateway", gw_pid, false)];
    let (ws_on, ws_off) = side_by_side_pair(
        o.seconds,
        load(o.clients, &watch_on, |_| ws_caller(on_url.clone())),
        load(o.clients, &watch_off, |_| ws_caller(off_url.clone())),
    )
    .await;
    print_rpc("ws_rpc all on", &ws_on);
    print_rpc("ws_rpc default", &ws_off);
    let call = format!("{ENDPOINT}/echo?secret={SECRET}");
    let (http_on, http_off) = side_by_side_pair(
        o.seconds,
        load(o.clients, &watch_on, |_| {
            http_caller(observed_port, call.clone())
        }),
        load(o.clients, &watch_off, |_| {
            http_caller(gw_port, call.clone())
        }),
    )
    .await;
    print_rpc("http_rpc all on", &http_on);
    print_rpc("http_rpc default", &http_off);
    drop(backend);
    drop(observed);
    ObservedRuns {
        ws_on,
        ws_off,
        http_on,
        http_off,
    }
}

/// One `reconnect_storm` run.
pub(crate) struct Storm {
    /// Clients in the storm (Rust and JavaScript).
    pub(crate) clients: usize,
    /// From the gateway's restart until every client was back (None: not all within 60 s).
    pub(crate) back_s: Option<f64>,
    /// Clients back at the end.
    pub(crate) back: usize,
    /// The most clients that joined in one 100 ms window, per second.
    pub(crate) peak_per_s: f64,
    /// The most connection attempts the clients made in one 100 ms window, per second.
    pub(crate) peak_attempts_per_s: f64,
}

/// `clients` WebSocket clients of the Rust peer and `--storm-js-clients` of the JavaScript
/// package in Node (all reconnecting, with or without jitter) on a gateway of their own, which is
/// then killed and started again: how long until every client is back, and the highest rate at
/// which they came back (read from the gateway's client gauge every 100 ms) and tried to.
pub(crate) async fn reconnect_storm(
    o: &Options,
    dir: &std::path::Path,
    clients: usize,
    jitter: bool,
) -> Storm {
    let name = if jitter {
        "storm-jitter.yaml"
    } else {
        "storm-plain.yaml"
    };
    let mut gw = start_gateway_listening(dir, name, "  backend_grace: 30s\n", "", false).await;
    let backend = spawn_role(
        "echo-backend",
        &format!("{}/storm?token={}&secret={SECRET}", gw.url, o.token),
    );
    let url = format!("{}/storm?secret={SECRET}", gw.url);
    wait_for_echo(&url, "the storm's backend did not publish").await;
    // Up to 5,000 clients per process (each under the descriptor limit).
    let per_process = 5_000;
    let mut holders = Vec::new();
    let mut files = Vec::new();
    let mut left = clients;
    while left > 0 {
        let n = left.min(per_process);
        let file = dir.join(format!("{name}.attempts.{}", holders.len()));
        holders.push(spawn_role(
            "storm-clients",
            &format!("{url} {n} {} {}", u8::from(jitter), file.display()),
        ));
        files.push(file);
        left -= n;
    }
    // The JavaScript clients (Node, the package in clients/js, built), in a process of their own.
    let js = if o.storm_js_clients > 0 {
        let file = dir.join(format!("{name}.attempts.js"));
        let proc = spawn_js_storm(&url, o.storm_js_clients, jitter, &file);
        if proc.is_some() {
            files.push(file);
        }
        proc
    } else {
        None
    };
    let clients = clients + js.as_ref().map_or(0, |_| o.storm_js_clients);
    // Each process's running total; a file caught unreadable keeps its last value (a total that
    // vanished for one reading would come back as a burst of attempts that never happened).
    let mut totals = vec![0u64; files.len()];
    let mut attempts = || -> u64 {
        for (file, total) in files.iter().zip(totals.iter_mut()) {
            if let Some(n) = std::fs::read_to_string(file)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
            {
                *total = n.max(*total);
            }
        }
        totals.iter().sum()
    };
    let connected =
        |gw_metrics| async move { gauge(gw_metrics, "duplex_gateway_clients", "/storm").await };
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected(gw.metrics).await < clients {
        assert!(
            Instant::now() < deadline,
            "the storm's clients did not all connect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Settled: every client made its first attempt and is connected.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut tried = attempts();
    gw.restart().await;
    let restarted = Instant::now();
    let mut last = 0usize;
    let mut peak = 0usize;
    let mut peak_attempts = 0u64;
    let mut back_s = None;
    let mut back = 0;
    while restarted.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        back = connected(gw.metrics).await;
        peak = peak.max(back.saturating_sub(last));
        last = back;
        let now = attempts();
        peak_attempts = peak_attempts.max(now.saturating_sub(tried));
        tried = now;
        if back >= clients && back_s.is_none() {
            back_s = Some(round(restarted.elapsed().as_secs_f64(), 2));
        }
        // A little past the last join: attempts still in flight are counted.
        if back_s.is_some_and(|s| restarted.elapsed().as_secs_f64() > s + 0.5) {
            break;
        }
    }
    drop(holders);
    drop(js);
    drop(backend);
    drop(gw);
    Storm {
        clients,
        back_s,
        back,
        peak_per_s: (peak * 10) as f64,
        peak_attempts_per_s: (peak_attempts * 10) as f64,
    }
}

/// `--compare-binary PATH`: this build's gateway and another's, both on the default config
/// with an echo backend each, under the `ws_rpc` and `http_rpc` loads side by side: what a
/// change costs, measured in one run.
pub(crate) async fn compare_builds(o: &Options, dir: &std::path::Path, other: &std::path::Path) {
    let this = start_gateway_listening(dir, "this.yaml", "", "", true).await;
    let that = start_gateway_binary(dir, "that.yaml", "", "", true, other).await;
    let mut backends = Vec::new();
    for g in [&this, &that] {
        backends.push(spawn_role(
            "echo-backend",
            &format!("{}{ENDPOINT}?token={}&secret={SECRET}", g.url, o.token),
        ));
        wait_for_echo(
            &format!("{}{ENDPOINT}?secret={SECRET}", g.url),
            "a backend did not publish",
        )
        .await;
    }
    let watch_this = [("gateway", this.pid, false)];
    let watch_that = [("gateway", that.pid, false)];
    let url = |g: &OurGateway| format!("{}{ENDPOINT}?secret={SECRET}", g.url);
    let (ws_this, ws_that) = side_by_side_pair(
        o.seconds,
        load(o.clients, &watch_this, |_| ws_caller(url(&this))),
        load(o.clients, &watch_that, |_| ws_caller(url(&that))),
    )
    .await;
    print_rpc("ws_rpc this", &ws_this);
    print_rpc("ws_rpc other", &ws_that);
    let call = format!("{ENDPOINT}/echo?secret={SECRET}");
    let (p_this, p_that) = (this.port, that.port);
    let (http_this, http_that) = side_by_side_pair(
        o.seconds,
        load(o.clients, &watch_this, |_| {
            http_caller(p_this, call.clone())
        }),
        load(o.clients, &watch_that, |_| {
            http_caller(p_that, call.clone())
        }),
    )
    .await;
    print_rpc("http_rpc this", &http_this);
    print_rpc("http_rpc other", &http_that);
    let mut ratios = report::Ratios::default();
    ratios.add("ws_rpc this / other", ws_this.rate(), ws_that.rate());
    ratios.add("http_rpc this / other", http_this.rate(), http_that.rate());
    println!("ratios         {}", to_json(&ratios));
    drop(backends);
}

/// `reconnect_storm` with jitter, then without, each printed.
pub(crate) async fn storm_pair(o: &Options, dir: &std::path::Path) -> (Storm, Storm) {
    let with = reconnect_storm(o, dir, o.storm_clients, true).await;
    let without = reconnect_storm(o, dir, o.storm_clients, false).await;
    for (name, s) in [("jitter", &with), ("no jitter", &without)] {
        println!(
            "reconnect_storm {name}: {} of {} clients back in {:?} s, peak {} joins/s, peak {} attempts/s",
            s.back, s.clients, s.back_s, s.peak_per_s, s.peak_attempts_per_s
        );
    }
    (with, without)
}

/// Starts `clients/js/bench/storm.mjs` holding `n` clients of the JS package; None (and says
/// why) when Node or the built package is missing.
fn spawn_js_storm(url: &str, n: usize, jitter: bool, file: &std::path::Path) -> Option<Proc> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js");
    let script = root.join("bench/storm.mjs");
    if !root.join("dist/index.js").exists() || !root.join("node_modules/ws").exists() {
        println!(
            "reconnect_storm: no JS clients (build clients/js first: npm ci && npm run build)"
        );
        return None;
    }
    let child = Command::new("node")
        .arg(&script)
        .arg(url)
        .arg(n.to_string())
        .arg(if jitter { "1" } else { "0" })
        .arg(file)
        .stdout(Stdio::null())
        .spawn();
    match child {
        Ok(child) => Some(Proc::polite(child)),
        Err(e) => {
            println!("reconnect_storm: no JS clients (node: {e})");
            None
        }
    }
}

/// The storm's ratio: the peak rate of connection attempts with jitter against without.
pub(crate) fn storm_ratio(ratios: &mut report::Ratios, (with, without): &(Storm, Storm)) {
    ratios.add(
        "reconnect_storm peak attempts jitter / no jitter",
        with.peak_attempts_per_s,
        without.peak_attempts_per_s.max(1.0),
    );
}
