//! The Grafana dashboard (`dashboards/duplex-gateway.json`): every query it holds is valid
//! PromQL over the gateway's metric names, checked against a real Prometheus scraping a running
//! gateway under a little load; the queries that should have data return data.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Every `expr` of the dashboard's panels (rows included), and the metric of each template
/// variable's `label_values(...)`.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let title = panel["title"].as_str().unwrap_or("?").to_string();
                    out.push((title, expr.to_string()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(def) = var["definition"].as_str() {
            let metric = def
                .strip_prefix("label_values(")
                .and_then(|r| r.split(',').next())
                .unwrap_or_else(|| panic!("unexpected variable query {def}"));
            out.push((
                format!("variable {}", var["name"]),
                metric.trim().to_string(),
            ));
        }
    }
    out
}

fn prometheus_binary() -> &'static str {
    ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Prometheus is not installed: run scripts/setup.sh (Debian package `prometheus`)")
}

async fn query(port: u16, expr: &str) -> Value {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .expect("prometheus answers")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn every_dashboard_query_is_valid_promql_with_data_from_a_running_gateway() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dashboards/duplex-gateway.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let queries = queries(&dashboard);
    assert!(queries.len() >= 15, "{queries:?}");

    // A gateway with a little of everything: calls, an error, a refusal, a dropped frame.
    let gw = Gateway::start("");
    let _backend = publish(&gw, "/dash", "s").await;
    let peer = client(&gw, "/dash", "s").await;
    let mut raw = Raw::open(&gw.client_url("/dash", "s")).await;
    raw.send_json(&json!({"type": "rep", "id": 99, "payload": 1}))
        .await;
    let load = tokio::spawn({
        let url = gw.http("/dash/echo?secret=s");
        async move {
            let http = reqwest::Client::new();
            loop {
                let _ = peer.call("echo", json!(1)).await;
                let _ = peer.call("fail", json!({"code": -5})).await;
                let _ = http.post(&url).body("1").send().await;
                let _ = http
                    .post(url.replace("secret=s", "secret=x"))
                    .body("1")
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // Prometheus scraping it every second.
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            gw.metrics_port
        ),
    )
    .expect("config");
    let port = free_port();
    let child = Command::new(prometheus_binary())
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let _prometheus = Process::new(child);

    // Until Prometheus has scraped the gateway for a few seconds (a rate needs two samples).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let samples = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/api/v1/query"))
            .query(&[("query", "count_over_time(up{job=\"gateway\"}[1m])")])
            .send()
            .await;
        let enough = match samples {
            Ok(resp) => resp.json::<Value>().await.ok().is_some_and(|v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|n| n.parse::<f64>().ok())
                    .is_some_and(|n| n >= 4.0)
            }),
            Err(_) => false,
        };
        if enough {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the gateway"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Queries that may rightly be empty here: no backend failed over.
    let may_be_empty = ["Failovers per second, per endpoint"];
    let mut failures = Vec::new();
    for (title, expr) in &queries {
        let promql = expr
            .replace("$__rate_interval", "30s")
            .replace("$endpoint", ".*");
        let answer = query(port, &promql).await;
        if answer["status"] != "success" {
            failures.push(format!("{title}: `{promql}` is not valid: {answer}"));
            continue;
        }
        let empty = answer["data"]["result"]
            .as_array()
            .is_none_or(|r| r.is_empty());
        if empty && !may_be_empty.contains(&title.as_str()) {
            failures.push(format!("{title}: `{promql}` has no data"));
        }
    }
    load.abort();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
