//! The workspace's shape: the peer crate (`duplex`) builds without Pingora and without cmake, so
//! a user who only writes a backend or a client compiles none of the gateway.

use std::process::Command;

#[test]
fn the_peer_crate_depends_on_neither_pingora_nor_cmake() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--locked",
            "-p",
            "duplex",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .args([
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ])
        .output()
        .expect("cargo tree");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        tree.lines().any(|l| l.starts_with("tokio-tungstenite ")),
        "{tree}"
    );
    for heavy in [
        "pingora",
        "cmake ",
        "libz-ng-sys",
        "duplex-gateway",
        "prometheus",
        "clap ",
    ] {
        let found: Vec<&str> = tree.lines().filter(|l| l.starts_with(heavy)).collect();
        assert!(found.is_empty(), "the peer crate pulls in {found:?}");
    }
}
