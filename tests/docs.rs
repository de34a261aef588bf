//! The reference docs agree with the code: every config key the gateway reads is in
//! `docs/configuration.md` and every key there is read, and every YAML example in the docs and in
//! `conf/` passes `--check` on the real binary.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::gateway_binary;
use duplex_gateway::config::parse;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fields a config section accepts, read from the error serde gives for an unknown one.
fn fields(yaml: &str) -> Vec<String> {
    let error = match parse(yaml, "probe", &|_| None) {
        Ok(_) => panic!("`zz_unknown` was accepted in {yaml}"),
        Err(e) => e.message,
    };
    assert!(error.contains("zz_unknown"), "{yaml}: {error}");
    let expected = error
        .split_once("expected")
        .map(|(_, list)| list)
        .unwrap_or_else(|| panic!("{yaml}: {error}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

const LISTEN: &str = "listen: [{address: 127.0.0.1:1}]\n";

/// Every config key the code reads, as dotted names (`listen[].tls.cert`, `limits.call_timeout`).
fn keys_in_code() -> BTreeSet<String> {
    // The sections, and a config with an unknown key in each.
    let sections: Vec<(&str, String)> = vec![
        ("listen[]", "listen: [{address: 127.0.0.1:1, zz_unknown: 1}]".into()),
        (
            "listen[].tls",
            "listen: [{address: 127.0.0.1:1, tls: {cert: a, key: b, zz_unknown: 1}}]".into(),
        ),
        ("metrics", format!("{LISTEN}metrics: {{address: 127.0.0.1:2, zz_unknown: 1}}")),
        ("tls", format!("{LISTEN}tls: {{zz_unknown: 1}}")),
        (
            "tokens[]",
            format!("{LISTEN}tokens: [{{name: a, token: 0123456789abcdef0, endpoints: [/a], zz_unknown: 1}}]"),
        ),
        ("endpoints[]", format!("{LISTEN}endpoints: [{{path: /a, zz_unknown: 1}}]")),
        (
            "endpoints[].auth",
            format!("{LISTEN}endpoints: [{{path: /a, auth: {{zz_unknown: 1}}}}]"),
        ),
        (
            "endpoints[].auth.jwt",
            format!("{LISTEN}endpoints: [{{path: /a, auth: {{jwt: {{zz_unknown: 1}}}}}}]"),
        ),
        ("limits", format!("{LISTEN}limits: {{zz_unknown: 1}}")),
        (
            "admin",
            format!("{LISTEN}admin: {{token: 0123456789abcdef0, zz_unknown: 1}}"),
        ),
        ("log", format!("{LISTEN}log: {{zz_unknown: 1}}")),
        (
            "tracing",
            format!("{LISTEN}tracing: {{otlp_endpoint: 'http://x', zz_unknown: 1}}"),
        ),
        ("cors", format!("{LISTEN}cors: {{allowed_origins: ['*'], zz_unknown: 1}}")),
        (
            "cluster",
            format!("{LISTEN}cluster: {{nats: [nats://127.0.0.1:4222], zz_unknown: 1}}"),
        ),
        (
            "cluster.auth",
            format!("{LISTEN}cluster: {{nats: [nats://127.0.0.1:4222], auth: {{zz_unknown: 1}}}}"),
        ),
        (
            "cluster.tls",
            format!("{LISTEN}cluster: {{nats: [nats://127.0.0.1:4222], tls: {{zz_unknown: 1}}}}"),
        ),
    ];
    let top: BTreeSet<String> = fields(&format!("{LISTEN}zz_unknown: 1"))
        .into_iter()
        .collect();
    let known_top: BTreeSet<String> = sections
        .iter()
        .map(|(name, _)| name.split(['[', '.']).next().unwrap_or(name).to_string())
        .collect();
    assert_eq!(
        top, known_top,
        "a top-level section was added or removed: teach this test (and docs/configuration.md)"
    );
    let mut keys = BTreeSet::new();
    for (prefix, yaml) in &sections {
        for field in fields(yaml) {
            let key = format!("{prefix}.{field}");
            // A field that is a section of its own is listed by its keys.
            if sections.iter().any(|(p, _)| *p == key) {
                continue;
            }
            keys.insert(key);
        }
    }
    keys
}

/// The keys `docs/configuration.md` documents: the first cell of its table rows.
fn keys_in_docs() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("docs/configuration.md")).expect("docs");
    text.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(key, _)| key.to_string()))
        .collect()
}

#[test]
fn every_config_key_is_documented_and_every_documented_key_exists() {
    let code = keys_in_code();
    let docs = keys_in_docs();
    assert!(code.len() > 15, "{code:?}");
    let undocumented: Vec<_> = code.difference(&docs).collect();
    let unknown: Vec<_> = docs.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "keys missing from docs/configuration.md: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/configuration.md documents keys the gateway does not read: {unknown:?}"
    );
}

/// Every fenced ```yaml block of a Markdown file.
fn yaml_blocks(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("markdown");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_start() == "```yaml" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_start() == "```" => blocks.extend(current.take()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    blocks
}

fn check(path: &Path, envs: &[(&str, &str)]) -> Result<(), String> {
    let out = Command::new(gateway_binary())
        .args(["--check", "--config"])
        .arg(path)
        .envs(envs.iter().copied())
        .output()
        .expect("run --check");
    match out.status.code() {
        Some(0) => Ok(()),
        _ => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

#[test]
fn every_yaml_example_in_the_docs_passes_check() {
    let dir = tempfile::tempdir().expect("dir");
    let mut markdown: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    markdown.push(repo().join("README.md"));
    let mut checked = 0;
    for file in markdown {
        for (i, block) in yaml_blocks(&file).into_iter().enumerate() {
            let path = dir.path().join(format!("example-{i}.yaml"));
            // Examples name key files of a production machine: the test keys stand in.
            let block = block.replace(
                "/etc/duplex-gateway/app-public.pem",
                &repo().join("tests/keys/rsa.pub").display().to_string(),
            );
            std::fs::write(&path, &block).expect("write");
            if let Err(e) = check(
                &path,
                &[("DEMO_JWT_SECRET", "a-demo-secret-of-at-least-32-bytes!")],
            ) {
                panic!(
                    "{} example {i} fails --check:\n{block}\n{e}",
                    file.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} examples found");
}

#[test]
fn every_config_in_conf_passes_check() {
    let dir = tempfile::tempdir().expect("dir");
    // The production example names certificate files on the machine it runs on: the same text
    // with certificates made here.
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, key.cert.pem()).expect("cert");
    std::fs::write(&key_path, key.signing_key.serialize_pem()).expect("key");
    let envs = [
        ("DUPLEX_GATEWAY_TOKEN", "a-token-of-enough-length"),
        ("CI_PUBLISH_TOKEN", "ci-token-0123456789"),
        ("SEARCH_TOKEN_SHA256", &"ab".repeat(32)),
        ("CHAT_SECRET", "chat-secret"),
        ("DUPLEX_GATEWAY_NATS_PASSWORD", "a-nats-password"),
        (
            "DUPLEX_GATEWAY_CLUSTER_KEY",
            "a-cluster-key-of-at-least-32-bytes",
        ),
    ];
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, *v)).collect();
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("conf")).expect("conf") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let text = text
            .replace(
                "/etc/duplex-gateway/fullchain.pem",
                &cert_path.display().to_string(),
            )
            .replace(
                "/etc/duplex-gateway/privkey.pem",
                &key_path.display().to_string(),
            );
        let copy = dir.path().join(path.file_name().expect("name"));
        std::fs::write(&copy, text).expect("write");
        if let Err(e) = check(&copy, &envs) {
            panic!("{} fails --check:\n{e}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} configs in conf/");
}
