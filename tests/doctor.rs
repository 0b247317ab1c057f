//! `arknet doctor`: the report a new owner reads, against a real (fake) backend that is up or
//! down, a damaged data dir, and a node that is already running.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{free_port, loopback_ip, BackendSpec, NodeProc, NodeSpec, ARKNET};
use support::process::{run_bounded, Output};

/// Runs `arknet doctor --config <dir>/arknet.toml` with `toml` as that file (bounded: the
/// doctor waits at most 5 s per probe).
fn doctor(dir: &Path, toml: &str) -> Output {
    let config = dir.join("arknet.toml");
    std::fs::write(&config, toml).expect("write config");
    doctor_with(&config)
}

fn doctor_with(config: &Path) -> Output {
    let mut cmd = Command::new(ARKNET);
    cmd.arg("doctor").arg("--config").arg(config);
    run_bounded(cmd, Duration::from_secs(60))
}

/// A config on a fresh loopback address, with `backends` as its `[[backends]]` tables.
fn config(data_dir: &Path, backends: &str) -> String {
    let ip = loopback_ip();
    let api = SocketAddr::from((ip, free_port(ip)));
    let mesh = SocketAddr::from((ip, free_port(ip)));
    format!(
        "data_dir = {:?}\n[api]\nlisten = \"{api}\"\n[mesh]\nlisten = \"{mesh}\"\n{backends}",
        data_dir.display().to_string()
    )
}

fn line<'a>(out: &'a Output, topic: &str) -> &'a str {
    out.stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(topic))
        .unwrap_or_else(|| panic!("no `{topic}` line in:\n{}", out.stdout))
}

#[test]
fn reachable_backend_and_its_models_make_a_clean_report() {
    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::ollama(&["llama3.1:8b", "qwen3:4b"]),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = doctor(
        dir.path(),
        &config(
            &dir.path().join("data"),
            &format!(
                "[[backends]]\nname = \"home\"\nkind = \"ollama\"\nurl = \"{}\"\n",
                backend.url()
            ),
        ),
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(
        line(&out, "backend").contains("reachable, 2 model(s): llama3.1:8b, qwen3:4b"),
        "{}",
        out.stdout
    );
    assert!(line(&out, "mDNS").contains("off"), "{}", out.stdout);
    assert!(line(&out, "API").contains("is free"), "{}", out.stdout);
    assert!(
        out.stdout.ends_with("No problems found.\n"),
        "{}",
        out.stdout
    );
    assert!(
        !dir.path().join("data").exists(),
        "the doctor only looks: it must not create the data dir"
    );
}

#[test]
fn backend_down_is_a_problem_with_what_to_do() {
    let ip = loopback_ip();
    let dead = format!("http://{ip}:{}", free_port(ip));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = doctor(
        dir.path(),
        &config(
            &dir.path().join("data"),
            &format!("[[backends]]\nname = \"llama\"\nkind = \"openai\"\nurl = \"{dead}\"\n"),
        ),
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    let backend = line(&out, "backend");
    assert!(backend.starts_with("  PROBLEM"), "{backend}");
    assert!(
        backend.contains(&format!("{dead} (openai) does not answer /v1/models"))
            && backend.contains("Connection refused")
            && backend.contains("--backend URL"),
        "{backend}"
    );
    assert!(out.stdout.ends_with("1 problem found.\n"), "{}", out.stdout);
}

#[test]
fn corrupt_approvals_and_an_exposed_token_are_problems() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("approved_peers.json"), "{\n  \"peers\": [ {\n").expect("write");
    let token = data.join("admin.token");
    std::fs::write(&token, "secret\n").expect("write");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    // A top-level key: before the tables `config` writes.
    let toml = format!("backends = []\n{}", config(&data, ""));
    let out = doctor(dir.path(), &toml);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    let approvals = line(&out, "approvals");
    assert!(
        approvals.starts_with("  PROBLEM") && approvals.contains("approved_peers.json:3"),
        "the file and line of the damage: {approvals}"
    );
    let token_line = line(&out, "admin");
    assert!(
        token_line.starts_with("  PROBLEM") && token_line.contains("chmod 600"),
        "{token_line}"
    );
    assert!(
        line(&out, "backend").contains("none configured"),
        "{}",
        out.stdout
    );
    assert_eq!(
        std::fs::read_to_string(data.join("approved_peers.json")).expect("read"),
        "{\n  \"peers\": [ {\n",
        "the doctor never touches the approvals file"
    );
}

#[test]
fn a_running_node_is_recognised_on_its_ports() {
    let backend =
        FakeBackend::start_in_thread(IpAddr::V4(loopback_ip()), FakeConfig::openai(&["m1"]));
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::openai(backend.url())));
    let out = doctor_with(&node.config_path);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let api = line(&out, "API");
    assert!(
        api.contains(&format!(
            "{} is in use by a running arknet node ({})",
            node.api,
            node.node_id()
        )),
        "{api}"
    );
    assert!(
        line(&out, "mesh").contains("in use by the running node"),
        "{}",
        out.stdout
    );
    let identity = line(&out, "identity");
    assert!(identity.contains(&node.public_key()), "{identity}");
    assert!(
        line(&out, "approvals").contains("no peer approved"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_data_dir_that_cannot_be_created_is_a_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A file where a parent directory should be: no user, root included, can create it.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "").expect("write");
    let data = blocker.join("data");
    let out = doctor(dir.path(), &config(&data, ""));
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    let line = line(&out, "data");
    assert!(
        line.starts_with("  PROBLEM")
            && line.contains("cannot be created")
            && line.contains("--data-dir"),
        "{line}"
    );
}
