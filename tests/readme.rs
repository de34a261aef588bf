//! The README's walk-through, followed as a new user would, on the built binaries: the gateway
//! on its built-in config (127.0.0.1:8080), the example backend published with the same token,
//! then every command of "Call it" with the output the README shows; and `--check`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{example_binary as example, gateway_binary, Process};
use futures_util::StreamExt;

const TOKEN: &str = "my-long-publish-token-123";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The commands of the README's ```sh blocks with the output shown right under them (`# ...`
/// lines with no blank line between; a `# ...` line after a blank line describes the next
/// command).
fn commands_with_output(readme: &str) -> Vec<(String, Vec<String>)> {
    let mut found: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_sh = false;
    let mut attached = false;
    for line in readme.lines() {
        let text = line.trim();
        match text {
            "```sh" | "```" => {
                in_sh = text == "```sh";
                attached = false;
            }
            _ if !in_sh => {}
            "" => attached = false,
            _ if text.starts_with("# ") => {
                if let (true, Some((_, output))) = (attached, found.last_mut()) {
                    output.push(text[2..].to_string());
                }
            }
            _ => {
                found.push((text.to_string(), Vec::new()));
                attached = true;
            }
        }
    }
    // The commands that answer and end: HTTP calls and the example client (a server started in
    // a block, like the page's static server, is not run here).
    found.retain(|(command, output)| {
        !output.is_empty()
            && (command.starts_with("curl ")
                || command.starts_with("cargo run -p duplex --example client"))
    });
    found
}

fn wait_for(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(command: &str, examples: &Path) -> String {
    // `cargo run -p duplex --example client` runs the example built above.
    let command = command.replace(
        "cargo run -p duplex --example client",
        &examples.join("client").display().to_string(),
    );
    // Bounded: a command that hangs fails the test instead of holding it.
    let out = Command::new("timeout")
        .args(["30", "sh", "-c", &command])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{command}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_readme_walk_through_works_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    assert!(readme.contains(&format!("export DUPLEX_GATEWAY_TOKEN={TOKEN}")));
    assert!(readme.contains("cargo run --release --example echo_backend -- /demo --secret s3cret"));
    let backend_bin = example("duplex-gateway", "echo_backend");
    let client_bin = example("duplex", "client");
    let examples = client_bin.parent().expect("dir").to_path_buf();

    // First terminal: the gateway on the built-in config, with the README's token.
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut gateway = Process::new(
        Command::new(gateway_binary())
            .env("DUPLEX_GATEWAY_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("gateway"),
    );
    wait_for(8080);
    // Ours, not another gateway that held the port already.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        gateway.child().try_wait().expect("wait").is_none(),
        "the gateway exited: {}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    // Second terminal: the example backend, same token.
    let _backend = Process::new(
        Command::new(&backend_bin)
            .args(["/demo", "--secret", "s3cret"])
            .env("DUPLEX_GATEWAY_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("backend"),
    );
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = http
            .post("http://127.0.0.1:8080/demo/echo?secret=s3cret")
            .body("1")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the example backend did not publish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every command the README shows with its output.
    let commands = commands_with_output(&readme);
    assert!(commands.len() >= 4, "{commands:?}");
    for (command, expected) in &commands {
        let output = run(command, &examples);
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines, *expected, "`{command}`");
    }

    // A long stream leaves the Rust peer as it is produced: the first line comes long before
    // the millionth.
    let started = Instant::now();
    let resp = http
        .post("http://127.0.0.1:8080/demo/count?secret=s3cret")
        .body("1000000")
        .send()
        .await
        .expect("count");
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    let took = started.elapsed();
    assert!(first.starts_with(b"1\n"), "{first:?}");
    assert!(
        took < Duration::from_secs(1),
        "the first line took {took:?}"
    );
    drop(body);

    // `--check` on the config the README names, without the token variable set.
    let out = Command::new(gateway_binary())
        .args(["--check", "--config"])
        .arg(repo().join("conf/gateway.yaml"))
        .env_remove("DUPLEX_GATEWAY_TOKEN")
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
