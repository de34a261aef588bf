//! Measurement: closed-loop loads, run side by side (A B B A), their latency histograms and
//! the CPU time per call of each process, RSS and descriptors.

use super::*;

/// Calls per second and latency percentiles of a closed-loop run.
pub(crate) struct RpcResult {
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    pub(crate) seconds: f64,
    pub(crate) hist: Histogram<u64>,
    /// CPU time (user + system) per call of each watched process, in microseconds.
    pub(crate) cpu: Vec<(&'static str, f64)>,
}

impl RpcResult {
    pub(crate) fn rate(&self) -> f64 {
        self.calls as f64 / self.seconds
    }
}

/// The processes whose CPU time a run measures: a name, a pid, and whether its child processes
/// count with it (nginx's workers with their master).
pub(crate) type Watched = [(&'static str, u32, bool)];

/// CPU time (user + system, all threads) of `pid` (and of its direct children if
/// `children`), in clock ticks.
pub(crate) fn cpu_ticks(pid: u32, children: bool) -> u64 {
    if !children {
        return std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat_ticks(&stat).map(|(_, ticks)| ticks))
            .unwrap_or(0);
    }
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(other) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{other}/stat")) else {
            continue;
        };
        if let Some((ppid, ticks)) = stat_ticks(&stat) {
            if other == pid || ppid == pid {
                total += ticks;
            }
        }
    }
    total
}

/// The parent pid and the CPU time (utime + stime, clock ticks) in a `/proc/<pid>/stat` line.
pub(crate) fn stat_ticks(stat: &str) -> Option<(u32, u64)> {
    // After the command name (in parentheses, which may hold spaces): state, ppid, ...
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let ppid = u32::try_from(field(1)?).ok()?;
    Some((ppid, field(11)? + field(12)?))
}

pub(crate) fn cpu_sample(watch: &Watched) -> Vec<u64> {
    watch
        .iter()
        .map(|(_, pid, children)| cpu_ticks(*pid, *children))
        .collect()
}

/// The CPU time per call of each watched process between two samples.
pub(crate) fn cpu_per_call(
    watch: &Watched,
    before: &[u64],
    after: &[u64],
    calls: u64,
) -> Vec<(&'static str, f64)> {
    // SAFETY: sysconf has no memory effects.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    watch
        .iter()
        .zip(before.iter().zip(after))
        .map(|((name, _, _), (b, a))| {
            let seconds = a.saturating_sub(*b) as f64 / ticks_per_sec;
            (*name, seconds * 1e6 / calls.max(1) as f64)
        })
        .collect()
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

/// The payload of every call: a JSON string of 100 bytes.
pub(crate) fn payload() -> Value {
    Value::String("x".repeat(98))
}

/// C clients, each calling in a loop for `seconds` (after a short warm-up that is not counted).
pub(crate) async fn closed_loop<F, Fut>(clients: usize, seconds: f64, make: F) -> RpcResult
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Box<dyn FnMut() -> CallFuture + Send>>,
{
    closed_loop_watched(clients, seconds, &[], make).await
}

/// [`closed_loop`], also measuring the CPU time per call of the `watch`ed processes (and of
/// this load generator) over the counted seconds.
pub(crate) async fn closed_loop_watched<F, Fut>(
    clients: usize,
    seconds: f64,
    watch: &Watched,
    make: F,
) -> RpcResult
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Box<dyn FnMut() -> CallFuture + Send>>,
{
    let watching: Vec<(&'static str, u32, bool)> = match watch {
        [] => Vec::new(),
        _ => std::iter::once(("load generator", std::process::id(), false))
            .chain(watch.iter().copied())
            .collect(),
    };
    let mut callers = Vec::with_capacity(clients);
    for i in 0..clients {
        callers.push(make(i).await);
    }
    let warmup = Duration::from_millis(500);
    let start = Instant::now() + warmup;
    let end = start + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|mut call| {
            tokio::spawn(async move {
                let mut hist = new_hist();
                let (mut calls, mut errors) = (0u64, 0u64);
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let ok = call().await;
                    if t0 >= start {
                        if ok {
                            calls += 1;
                            let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                        } else {
                            errors += 1;
                        }
                    }
                }
                (calls, errors, hist)
            })
        })
        .collect();
    tokio::time::sleep_until(start.into()).await;
    let before = cpu_sample(&watching);
    let mut total = RpcResult {
        calls: 0,
        errors: 0,
        seconds,
        hist: new_hist(),
        cpu: Vec::new(),
    };
    for t in tasks {
        let (calls, errors, hist) = t.await.expect("caller");
        total.calls += calls;
        total.errors += errors;
        let _ = total.hist.add(hist);
    }
    let after = cpu_sample(&watching);
    total.cpu = cpu_per_call(&watching, &before, &after, total.calls);
    total
}

impl RpcResult {
    /// Two runs of the same load as one.
    pub(crate) fn merge(self, other: RpcResult) -> RpcResult {
        let calls = self.calls + other.calls;
        let cpu = self
            .cpu
            .iter()
            .zip(&other.cpu)
            .map(|((name, a), (_, b))| {
                let weighted = a * self.calls as f64 + b * other.calls as f64;
                (*name, weighted / calls.max(1) as f64)
            })
            .collect();
        let mut hist = self.hist;
        let _ = hist.add(other.hist);
        RpcResult {
            calls,
            errors: self.errors + other.errors,
            seconds: self.seconds + other.seconds,
            hist,
            cpu,
        }
    }
}

/// One load of a comparison: runs for the seconds given.
pub(crate) type Load<'a> =
    Box<dyn FnMut(f64) -> Pin<Box<dyn Future<Output = RpcResult> + 'a>> + 'a>;

/// Runs loads side by side: each for half of `seconds` in turn, then each again in the reverse
/// order (A B B A), so a change in what the shared machine gives this run (its other tenants
/// come and go within seconds) weighs on each load alike. Each result is its two halves.
pub(crate) async fn side_by_side(seconds: f64, mut loads: Vec<Load<'_>>) -> Vec<RpcResult> {
    let half = seconds / 2.0;
    let mut first = Vec::with_capacity(loads.len());
    for load in loads.iter_mut() {
        first.push(load(half).await);
    }
    let mut second = Vec::with_capacity(loads.len());
    for load in loads.iter_mut().rev() {
        second.push(load(half).await);
    }
    second.reverse();
    first
        .into_iter()
        .zip(second)
        .map(|(a, b)| a.merge(b))
        .collect()
}

/// The [`Load`] of `clients` callers that `make` opens, with the CPU time per call of `watch`
/// (none if empty).
pub(crate) fn load<'a, F, Fut>(clients: usize, watch: &'a Watched, make: F) -> Load<'a>
where
    F: Fn(usize) -> Fut + Clone + 'a,
    Fut: Future<Output = Box<dyn FnMut() -> CallFuture + Send>> + 'a,
{
    Box::new(move |secs| Box::pin(closed_loop_watched(clients, secs, watch, make.clone())))
}

/// [`side_by_side`] for two loads.
pub(crate) async fn side_by_side_pair<'a>(
    seconds: f64,
    a: Load<'a>,
    b: Load<'a>,
) -> (RpcResult, RpcResult) {
    let mut results = side_by_side(seconds, vec![a, b]).await.into_iter();
    match (results.next(), results.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("one result per load"),
    }
}

/// A load while the gateway reloads every 100 ms, side by side with the same load without
/// reloads: (with reloads, without, how many reloads were sent).
pub(crate) async fn reload_side_by_side<F, Fut>(
    g: &OurGateway,
    clients: usize,
    seconds: f64,
    make: F,
) -> (RpcResult, RpcResult, u64)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn FnMut() -> CallFuture + Send>>,
{
    let reloads = std::cell::Cell::new(0u64);
    let (make, counted) = (&make, &reloads);
    let (with, without) = side_by_side_pair(
        seconds,
        Box::new(|secs| {
            let load = closed_loop(clients, secs, make);
            Box::pin(async move {
                let (result, n) = with_reloads(g, load).await;
                counted.set(counted.get() + n);
                result
            })
        }),
        load(clients, &[], make),
    )
    .await;
    (with, without, reloads.get())
}

/// Closes a peer when dropped (a `Peer` otherwise keeps its connection open).
pub(crate) struct ClosedOnDrop(Peer);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A WebSocket Duplex client calling `echo`; its connection closes when the load ends.
pub(crate) async fn ws_caller(url: String) -> Box<dyn FnMut() -> CallFuture + Send> {
    let peer = ClosedOnDrop(Peer::builder().connect(&url).await.expect("connect"));
    let payload = payload();
    Box::new(move || {
        let peer = peer.0.clone();
        let payload = payload.clone();
        Box::pin(async move { peer.call("echo", payload.clone()).await.as_ref() == Ok(&payload) })
    })
}

/// A keep-alive HTTP/1.1 connection POSTing the payload to `path` on 127.0.0.1:`port`.
pub(crate) async fn http_caller(port: u16, path: String) -> Box<dyn FnMut() -> CallFuture + Send> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let body = Bytes::from(payload().to_string());
    Box::new(move || {
        let sender = sender.clone();
        let body = body.clone();
        let path = path.clone();
        Box::pin(async move {
            let req = hyper::Request::post(path)
                .header("host", "127.0.0.1")
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))
                .expect("request");
            let mut sender = sender.lock().await;
            let Ok(resp) = sender.send_request(req).await else {
                return false;
            };
            let ok = resp.status() == 200;
            match resp.into_body().collect().await {
                Ok(got) => ok && got.to_bytes() == body,
                Err(_) => false,
            }
        })
    })
}

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// A client that, on every call, connects (handshake included), calls `echo` once and closes.
pub(crate) async fn connect_caller(url: String) -> Box<dyn FnMut() -> CallFuture + Send> {
    let payload = payload();
    Box::new(move || {
        let (url, payload) = (url.clone(), payload.clone());
        Box::pin(async move {
            let Ok(peer) = Peer::builder().connect(&url).await else {
                return false;
            };
            let ok = peer.call("echo", payload.clone()).await.as_ref() == Ok(&payload);
            peer.close();
            ok
        })
    })
}

/// Runs `load` while the gateway gets SIGHUP every 100 ms, its config alternating between two
/// valid versions (a limit that differs, so each reload really swaps something).
pub(crate) async fn with_reloads(
    g: &OurGateway,
    load: impl std::future::Future<Output = RpcResult>,
) -> (RpcResult, u64) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloader = tokio::spawn({
        let (stop, config, text, pid) = (stop.clone(), g.config.clone(), g.text.clone(), g.pid);
        async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let ping = if n.is_multiple_of(2) { "30s" } else { "31s" };
                let _ = std::fs::write(&config, format!("{text}  ping_interval: {ping}\n"));
                // A signal, not a `kill` process: forking this busy process would cost the
                // load generator more than the reload costs the gateway.
                // SAFETY: kill(2) with a pid of our own child and a valid signal number.
                let _ = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        }
    });
    let result = load.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reloads = reloader.await.unwrap_or(0);
    let _ = std::fs::write(&g.config, &g.text);
    (result, reloads)
}

/// How many descriptors a process has open.
pub(crate) fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

pub(crate) fn print_rpc(name: &str, r: &RpcResult) {
    println!(
        "{name:<14} {:>10.0} calls/s   p50 {:>6} us   p99 {:>6} us   p99.9 {:>6} us   errors {}",
        r.rate(),
        r.hist.value_at_quantile(0.5),
        r.hist.value_at_quantile(0.99),
        r.hist.value_at_quantile(0.999),
        r.errors
    );
    if !r.cpu.is_empty() {
        let each: Vec<String> = r
            .cpu
            .iter()
            .map(|(name, us)| format!("{name} {us:.1}"))
            .collect();
        println!("{:<14} cpu us per call: {}", "", each.join(", "));
    }
}
