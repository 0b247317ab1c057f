//! The command line: config validation, identity creation and persistence.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use support::grid::{BackendSpec, NodeProc, NodeSpec, ARKNET};

fn check(config_text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("arknet.toml");
    std::fs::write(&path, config_text).expect("write");
    let out = Command::new(ARKNET)
        .args(["serve", "--check", "--config"])
        .arg(&path)
        .output()
        .expect("run arknet");
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn shipped_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/arknet.toml");
    let out = Command::new(ARKNET)
        .args(["serve", "--check", "--config", path])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_names_file_line_and_key_and_exits_64() {
    let (code, err) = check("log_level = \"info\"\n\n[api]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n");
    assert_eq!(code, 64);
    assert!(
        err.contains("FILE:5: key `api.lisen`: unknown field"),
        "{err}"
    );

    let (code, err) = check("[api]\nlisten = \"not an address\"\n");
    assert_eq!(code, 64);
    assert!(err.contains("FILE:2: key `api.listen`"), "{err}");

    let (code, err) = check("[[backends]]\nname = \"a\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:1\"\nmax_concurrent = -1\n");
    assert_eq!(code, 64);
    assert!(
        err.contains("FILE:5: key `backends.max_concurrent`"),
        "{err}"
    );

    let (code, err) = check("[upstream\n");
    assert_eq!(code, 64);
    assert!(err.contains("FILE:1:"), "{err}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = Command::new(ARKNET)
        .args(["serve", "--check", "--config", "/nonexistent/arknet.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/arknet.toml: cannot read config"));
}

#[test]
fn id_creates_the_identity_once_with_a_private_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = || {
        let out = Command::new(ARKNET)
            .args(["id", "--data-dir"])
            .arg(dir.path())
            .current_dir(dir.path())
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    let first = run();
    let key = first
        .lines()
        .find_map(|l| l.strip_prefix("public_key: "))
        .expect("public_key line")
        .to_string();
    assert_eq!(key.len(), 44, "WireGuard-style base64: {key}");
    assert!(
        first.lines().any(|l| l.starts_with("node_id: ark-")),
        "{first}"
    );
    assert_eq!(run(), first, "a second run shows the same identity");
    let mode = std::fs::metadata(dir.path().join("identity/node.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let cert = std::fs::read_to_string(dir.path().join("identity/node.crt")).expect("cert");
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
}

#[test]
fn a_restarted_node_keeps_its_key() {
    let mut node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(
        "http://127.0.0.1:9",
    )));
    let before = node.public_key();
    node.restart();
    assert_eq!(node.public_key(), before);
    let out = Command::new(ARKNET)
        .args(["id", "--data-dir"])
        .arg(&node.data_dir)
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&before));
}

#[test]
fn corrupt_key_stops_the_node_and_is_left_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("identity")).expect("mkdir");
    std::fs::write(dir.path().join("identity/node.key"), "garbage").expect("write");
    let out = Command::new(ARKNET)
        .args(["id", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to replace"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("identity/node.key")).expect("read"),
        "garbage"
    );
}

#[test]
fn a_taken_port_is_reported_in_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(ARKNET)
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cannot listen on {addr}")));
}

#[test]
fn peers_cli_approves_lists_and_revokes_through_the_admin_api() {
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(
        "http://127.0.0.1:9",
    )));
    let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let run = |args: &[&str]| {
        let out = Command::new(ARKNET)
            .arg("peers")
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--api")
            .arg(node.api.to_string())
            .args(args)
            .output()
            .expect("run arknet peers");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = run(&[
        "approve",
        "--node-id",
        "dave",
        "--public-key",
        key,
        "--models",
        "a,b",
        "--max-concurrent",
        "3",
    ]);
    assert!(ok, "{out}");
    let approved = node.get("/peers/approved").json();
    assert_eq!(
        approved["peers"][0]["permissions"]["models_shared"],
        serde_json::json!(["a", "b"])
    );
    assert_eq!(
        approved["peers"][0]["permissions"]["max_concurrent_requests"],
        3
    );
    let (ok, out) = run(&["list"]);
    assert!(
        ok && out.contains("dave") && out.contains("approved"),
        "{out}"
    );
    let (ok, out) = run(&["revoke", "--node-id", "dave"]);
    assert!(ok, "{out}");
    assert_eq!(
        node.get("/peers/approved").json()["peers"],
        serde_json::json!([])
    );
    let (ok, out) = run(&["revoke", "--node-id", "nobody"]);
    assert!(!ok && out.contains("no approved peer"), "{out}");
}

#[test]
fn version_names_the_release_and_the_commit_it_was_built_from() {
    let out = Command::new(ARKNET)
        .arg("--version")
        .output()
        .expect("run arknet");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // build.rs asks git; outside a checkout (a source tarball) the commit is "unknown".
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let commit = std::env::var("ARKNET_COMMIT")
        .ok()
        .or(head)
        .unwrap_or_else(|| "unknown".to_string());
    assert_eq!(
        text.trim(),
        format!("arknet {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}
