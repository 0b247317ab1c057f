//! What the operator sees and types: a start-up summary, INFO lines for peer events, no colour
//! codes in a log file, a prompt stop when idle, CLI options after the subcommand, no panic
//! when the output pipe closes, and `serve --mdns`.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::fake_backend::FakeConfig;
use support::grid::{
    assert_eventually, free_port, loopback_ip, share, Ark, BackendSpec, NodeProc, NodeSpec, ARKNET,
};
use support::http;
use support::mesh::{self, As};
use support::process::{run_bounded, Daemon};

fn idle_node() -> NodeProc {
    NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(
        "http://127.0.0.1:9",
    )))
}

#[test]
fn cli_options_are_accepted_after_the_subcommand() {
    let node = idle_node();
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(ARKNET);
    cmd.args([
        "peers",
        "status",
        "--api",
        &node.api.to_string(),
        "--data-dir",
    ])
    .arg(&node.data_dir)
    .current_dir(cwd.path());
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("\"peers\""), "{}", out.stdout);
}

#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    let node = idle_node();
    let cwd = tempfile::tempdir().expect("tempdir");
    for args in [
        vec!["peers", "list", "--api", &node.api.to_string()],
        vec!["id"],
    ] {
        let mut child = Command::new(ARKNET)
            .args(&args)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .current_dir(cwd.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // The reader is gone before the command writes anything (it has to ask the node or
        // read its identity first), as with `| head` that already exited.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {stderr}");
    }
}

#[test]
fn the_log_file_has_a_start_up_summary_and_no_colour_codes() {
    let ark = Ark::start(FakeConfig::both(&["llama3.1:8b", "qwen3.5:35b"]), 4);
    assert_eventually(Duration::from_secs(10), "backend models logged", || {
        ark.node.log().contains("backend models")
    });
    let log = ark.node.log();
    assert!(!log.contains('\u{1b}'), "escape codes in a file:\n{log}");
    let summary = log
        .lines()
        .find(|l| l.contains("arknet node starting"))
        .unwrap_or_else(|| panic!("no start-up line:\n{log}"));
    for needle in [
        ark.node.config_path.display().to_string(),
        ark.node.data_dir.display().to_string(),
        ark.node.api.to_string(),
        ark.node.mesh.to_string(),
        "mdns=off".to_string(),
        ark.backend.url(),
    ] {
        assert!(summary.contains(&needle), "`{needle}` missing: {summary}");
    }
    let models = log
        .lines()
        .find(|l| l.contains("backend models"))
        .expect("models line");
    assert!(
        models.contains("llama3.1:8b") && models.contains("qwen3.5:35b"),
        "{models}"
    );
}

#[test]
fn an_idle_node_stops_promptly_and_a_busy_one_when_its_requests_end() {
    // Idle: SIGTERM ends it well before the 5 s grace period.
    let mut node = NodeProc::start(
        &NodeSpec::with_backend(BackendSpec::ollama("http://127.0.0.1:9")).shutdown_grace(5),
    );
    let sent = Instant::now();
    node.terminate();
    assert_eventually(Duration::from_secs(10), "node exited", || !node.alive());
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "idle node took {took:?} to stop"
    );

    // Busy: the stream in flight finishes whole, and the node exits soon after it.
    let ark = Ark::start_with(
        FakeConfig::both(&["m"])
            .chunks(10)
            .chunk_delay(Duration::from_millis(150)),
        4,
        |s| s.shutdown_grace(8),
    );
    let api = ark.node.api;
    let client = std::thread::spawn(move || {
        http::post_json(
            api,
            "/api/generate",
            &json!({"model": "m", "prompt": "count to ten"}),
        )
    });
    assert_eventually(Duration::from_secs(5), "stream under way", || {
        ark.backend.in_flight() == 1
    });
    let Ark { backend, mut node } = ark;
    let sent = Instant::now();
    node.terminate();
    let rsp = client.join().expect("client");
    assert_eq!(rsp.status, 200);
    let last = rsp.lines().last().cloned().unwrap_or_default();
    assert!(last.contains("\"done\":true"), "cut short: {last}");
    assert_eventually(Duration::from_secs(15), "node exited", || !node.alive());
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "busy node took {took:?} (grace 8 s) to stop"
    );
    drop(backend);
}

#[test]
fn peer_events_are_logged_at_info() {
    let a = Ark::start(FakeConfig::both(&["llama3.1:8b"]), 4);
    let b = Ark::start(FakeConfig::both(&["x"]), 4);
    share(&a, &b, &["llama3.1:8b"], 1);
    let (a_id, b_id) = (a.node.node_id(), b.node.node_id());
    let has = |node: &NodeProc, words: &[&str]| {
        node.log()
            .lines()
            .any(|l| l.contains(" INFO ") && words.iter().all(|w| l.contains(w)))
    };
    assert!(has(&a.node, &["peer approved", &b_id, "llama3.1:8b"]));
    assert_eventually(Duration::from_secs(5), "b hears a approved it", || {
        has(&b.node, &["peer approved us", &a_id])
            && has(&b.node, &["peer shares a model with us", "llama3.1:8b"])
    });

    // The owner withdraws the model, then revokes b.
    let rsp = http::request(
        a.node.api,
        "PATCH",
        &format!("/peers/{b_id}"),
        &[("Content-Type", "application/json")],
        json!({"permissions": {"models_shared": []}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert!(has(&a.node, &["model withdrawn from peer", "llama3.1:8b"]));
    assert_eventually(Duration::from_secs(5), "b sees the withdrawal", || {
        has(&b.node, &["peer withdrew a model from us", "llama3.1:8b"])
    });
    a.node.revoke(&b.node);
    assert!(has(&a.node, &["peer revoked", &b_id]));

    // A stranger knocks: discovered, pending approval.
    let c = Ark::start(FakeConfig::both(&["y"]), 4);
    let (status, _) = mesh::call(
        a.node.mesh,
        As::node(&c.node).as_ref(),
        "GET",
        "/mesh/v1/hello",
        None,
    );
    assert_eq!(status, 403);
    assert!(
        has(
            &a.node,
            &["node discovered", "pending approval", &c.node.public_key()]
        ),
        "{}",
        a.node.log()
    );
}

#[test]
fn serve_mdns_turns_discovery_on_and_conflicts_with_no_mdns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ip = loopback_ip();
    let api = std::net::SocketAddr::from((ip, free_port(ip)));
    let mut cmd = Command::new(ARKNET);
    cmd.args(["serve", "--mdns", "--mdns-interface", "lo", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--backend", "http://127.0.0.1:9", "--listen"])
        .arg(api.to_string())
        .arg("--mesh-listen")
        .arg(format!("{ip}:{}", free_port(ip)))
        .env("RUST_LOG", "info")
        .current_dir(dir.path());
    let mut node = Daemon::spawn("arknet", cmd, api, dir.path().join("arknet.log"));
    node.wait_http_ok("/health", Duration::from_secs(20), "");
    assert_eventually(Duration::from_secs(10), "mDNS started on lo", || {
        node.log_text().contains("mDNS discovery started")
    });
    assert!(
        node.log_text().contains("mdns=on (lo)"),
        "{}",
        node.log_text()
    );
    drop(node);

    let mut cmd = Command::new(ARKNET);
    cmd.args(["serve", "--check", "--mdns", "--no-mdns"])
        .current_dir(dir.path());
    let out = run_bounded(cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
}

#[test]
fn default_node_ids_are_readable_and_differ_per_data_dir() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let ids: Vec<String> = (0..3)
        .map(|_| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut cmd = Command::new(ARKNET);
            cmd.args(["id", "--data-dir"])
                .arg(dir.path())
                .current_dir(cwd.path());
            let out = run_bounded(cmd, Duration::from_secs(20));
            assert!(out.status.success(), "{}", out.stderr);
            out.stdout
                .lines()
                .find_map(|l| l.strip_prefix("node_id: "))
                .expect("node_id line")
                .to_string()
        })
        .collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    for id in &ids {
        // ark-<host>-<adjective>-<animal>: words, not a hex tag.
        let tail = id
            .strip_prefix(&format!("ark-{}-", host.trim()))
            .unwrap_or_else(|| panic!("{id}"));
        let words: Vec<&str> = tail.split('-').collect();
        assert_eq!(words.len(), 2, "{id}");
        assert!(
            words
                .iter()
                .all(|w| w.len() >= 2 && w.chars().all(|c| c.is_ascii_lowercase())),
            "{id}"
        );
    }
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    // 4096 names: three identities share one with a probability under 0.1%.
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
}
