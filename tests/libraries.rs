//! The client libraries against each other through the real gateway: a backend written with
//! each (Rust, JavaScript, Python) serves a client written with each. The JavaScript and Python
//! sides are the example programs of `clients/js/examples` and `clients/python/examples`
//! (`scripts/test.sh` builds and installs those packages first: `clients/*/run-tests.sh`).

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The command that runs the example program `name` (`backend` or `client`) of `language`.
fn example(language: &str, name: &str) -> Command {
    match language {
        "js" => {
            let script = repo().join(format!("clients/js/examples/{name}.mjs"));
            let dist = repo().join("clients/js/dist/index.js");
            assert!(
                dist.exists(),
                "the JavaScript package is not built: run clients/js/run-tests.sh (scripts/test.sh does)"
            );
            let mut c = Command::new("node");
            c.arg(script);
            c
        }
        "python" => {
            let python = repo().join("clients/python/.venv/bin/python");
            assert!(
                python.exists(),
                "the Python package is not installed: run clients/python/run-tests.sh (scripts/test.sh does)"
            );
            let mut c = Command::new(python);
            c.arg(repo().join(format!("clients/python/examples/{name}.py")));
            c
        }
        other => panic!("no {other} examples"),
    }
}

/// Publishes the example backend of `language` at `path`; the process lives as long as the
/// returned guard.
fn backend(gw: &Gateway, language: &str, path: &str) -> Process {
    let mut cmd = example(language, "backend");
    cmd.args(["--url", &format!("ws://127.0.0.1:{}", gw.port)])
        .args(["--path", path, "--token", TOKEN, "--secret", "s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("start the example backend");
    let stdout = child.stdout.take().expect("stdout");
    let process = Process::new(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim() == "ready" {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("the {language} backend did not say ready\n{}", gw.log()));
    process
}

/// Runs the example client of `language` against `path`: its JSON lines. (Waited for on a
/// blocking thread: the Rust backend answers in this test's runtime meanwhile.)
async fn run_client(gw: &Gateway, language: &str, path: &str) -> Vec<Value> {
    let mut cmd = example(language, "client");
    cmd.args(["--url", &format!("ws://127.0.0.1:{}", gw.port)])
        .args(["--path", path, "--secret", "s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("start the example client");
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("client output");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        out.status.success(),
        "the {language} client failed on {path}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The Rust client's run of the same calls.
async fn rust_client(gw: &Gateway, path: &str) -> Vec<Value> {
    let peer = client(gw, path, "s").await;
    let echo = peer
        .call("echo", json!({"hello": "rust"}))
        .await
        .expect("echo");
    let mut stream = peer.call_stream("count", json!(3)).expect("count");
    let mut counted = Vec::new();
    while let Some(item) = stream.next().await {
        counted.push(item.expect("count item"));
    }
    let sum = peer
        .call_with_input("add", &[json!(1), json!(2), json!(3)])
        .expect("add")
        .last()
        .await
        .expect("add");
    vec![
        json!({"echo": echo}),
        json!({"count": counted}),
        json!({"add": sum}),
    ]
}

fn check(results: &[Value], who: &str) {
    let field = |name: &str| {
        results
            .iter()
            .find_map(|r| r.get(name).cloned())
            .unwrap_or_else(|| panic!("{who}: no `{name}` in {results:?}"))
    };
    assert!(field("echo").get("hello").is_some(), "{who}: {results:?}");
    assert_eq!(field("count"), json!([1, 2, 3]), "{who}");
    assert_eq!(field("add"), json!(6), "{who}");
}

#[tokio::test]
async fn every_backend_library_serves_every_client_library() {
    let gw = Gateway::start("");
    // The Rust backend is the test backend (echo, count, add), in this process.
    let _rust = publish(&gw, "/m-rust", "s").await;
    let _js = backend(&gw, "js", "/m-js");
    let _python = backend(&gw, "python", "/m-python");
    for backend in ["rust", "js", "python"] {
        let path = format!("/m-{backend}");
        check(
            &rust_client(&gw, &path).await,
            &format!("rust client, {backend} backend"),
        );
        for client in ["js", "python"] {
            let results = run_client(&gw, client, &path).await;
            check(&results, &format!("{client} client, {backend} backend"));
        }
    }
}
