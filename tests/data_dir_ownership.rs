//! One identity and one owner per data dir: `serve` and `id` started together on a fresh data
//! dir agree on one key (the one on disk), and a second `serve` on a data dir in use is refused
//! with the PID of the node that holds it.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::grid::{free_port, loopback_ip, BackendSpec, NodeProc, NodeSpec, ARKNET};
use support::process::run_bounded;

/// Races per test: the "a hundred times".
const RACES: usize = 100;

fn spawn_id(data_dir: &Path, cwd: &Path) -> Child {
    Command::new(ARKNET)
        .args(["id", "--data-dir"])
        .arg(data_dir)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn arknet id")
}

/// Waits (bounded) for an `arknet id` and returns its public key, failing on any error.
fn key_of(child: Child) -> String {
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut child = child;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("arknet id (PID {pid}) still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "arknet id failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("public_key: "))
        .unwrap_or_else(|| panic!("no public_key line in {stdout}"))
        .to_string()
}

/// The key in the key file, read by a fresh `arknet id` after the race.
fn key_on_disk(data_dir: &Path, cwd: &Path) -> String {
    key_of(spawn_id(data_dir, cwd))
}

#[test]
fn concurrent_id_runs_create_one_identity() {
    let cwd = tempfile::tempdir().expect("tempdir");
    for round in 0..RACES {
        let dir = tempfile::tempdir().expect("tempdir");
        let children: Vec<Child> = (0..3).map(|_| spawn_id(dir.path(), cwd.path())).collect();
        let keys: Vec<String> = children.into_iter().map(key_of).collect();
        let disk = key_on_disk(dir.path(), cwd.path());
        assert!(
            keys.iter().all(|k| *k == disk),
            "round {round}: the racers saw {keys:?}, the disk holds {disk}"
        );
    }
}

#[test]
fn serve_and_id_started_together_agree_on_the_key_on_disk() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let spec = NodeSpec::with_backend(BackendSpec::ollama("http://127.0.0.1:9"));
    let started = Instant::now();
    for round in 0..RACES {
        let mut node = NodeProc::launch(&spec);
        let id = spawn_id(&node.data_dir, cwd.path());
        let id_key = key_of(id);
        node.wait_ready();
        let served = node.public_key();
        let disk = key_on_disk(&node.data_dir, cwd.path());
        assert_eq!(served, disk, "round {round}: running node's key vs disk");
        assert_eq!(id_key, disk, "round {round}: id's key vs disk");
        node.kill();
    }
    eprintln!("{RACES} serve/id races in {:?}", started.elapsed());
}

#[test]
fn a_second_serve_on_a_data_dir_in_use_names_the_holder_and_exits() {
    let first = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(
        "http://127.0.0.1:9",
    )));
    let cwd = tempfile::tempdir().expect("tempdir");
    let ip = loopback_ip();
    let mut cmd = Command::new(ARKNET);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&first.data_dir)
        .args(["--no-mdns", "--backend", "http://127.0.0.1:9"])
        .arg("--listen")
        .arg(format!("{ip}:{}", free_port(ip)))
        .arg("--mesh-listen")
        .arg(format!("{ip}:{}", free_port(ip)))
        .current_dir(cwd.path());
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert!(!out.status.success(), "second serve ran: {}", out.stderr);
    assert!(
        out.stderr.contains(&format!("PID {}", first.pid())),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("in use"), "{}", out.stderr);
    // The first node is untouched.
    assert_eq!(first.get("/health").status, 200);
}
