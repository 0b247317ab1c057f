//! `make demo` (scripts/demo.sh) as a user runs it: a real llama-server with SmolLM2-135M
//! behind node A, node B with no model, mutual approval, a chat through B answered by A's
//! model; then Ctrl-C (SIGINT to the script) must leave nothing running.
//!
//! Bounded: every wait in the script is bounded, and the test gives the whole run 5 minutes.
//! Needs the venv of tests/python/setup.sh (PyPI on first run), like tests/python_clients.rs.

mod support;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::grid::{free_port, loopback_ip, ARKNET};
use support::process::{loopback_only_env, signal};
use support::python::Venv;

/// The demo script, ended by its own PID if the test fails half-way: SIGTERM first, so its
/// trap stops the llama-server and nodes it started, SIGKILL only if that does not finish.
struct Demo {
    child: Child,
}

impl Demo {
    /// Waits (bounded) for the script to exit by itself.
    fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), "TERM");
            if self.wait(Duration::from_secs(20)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A base port on `ip` such that the demo's ports (base+1 .. base+21) are free there.
fn base_port(ip: Ipv4Addr) -> u16 {
    for _ in 0..50 {
        let base = free_port(ip);
        let free = |off: u16| std::net::TcpListener::bind((ip, base + off)).is_ok();
        if base < 65_000 && [1, 10, 11, 20, 21].into_iter().all(free) {
            return base;
        }
    }
    panic!("no free port range on {ip}");
}

#[test]
fn demo_shows_a_chat_answered_through_the_grid_and_ctrl_c_stops_everything() {
    let venv = Venv::setup("setup.sh", "pyvenv", "PYVENV").unwrap_or_else(|e| panic!("{e}"));
    let ip = loopback_ip();
    let base = base_port(ip);
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("demo.out");
    let mut cmd = Command::new("bash");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh"))
        .env("ARKNET", ARKNET)
        .env("PYVENV", &venv.dir)
        .env("DEMO_HOST", ip.to_string())
        .env("DEMO_PORT", base.to_string())
        .env("DEMO_DIR", dir.path().join("demo"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("out file"))
        .stderr(std::fs::File::create(dir.path().join("demo.err")).expect("err file"));
    loopback_only_env(&mut cmd);
    let mut demo = Demo {
        child: cmd.spawn().expect("run scripts/demo.sh"),
    };
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let errors = || std::fs::read_to_string(dir.path().join("demo.err")).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(300);
    while !output().contains("Press Ctrl-C") {
        if let Some(status) = demo.child.try_wait().expect("try_wait") {
            panic!(
                "demo exited ({status}) before the grid worked:\n{}\n{}",
                output(),
                errors()
            );
        }
        assert!(
            Instant::now() < deadline,
            "demo not done in 300 s:\n{}\n{}",
            output(),
            errors()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = output();
    eprintln!("{text}");
    let answer = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("answer: "))
        .expect("an answer line");
    assert!(!answer.trim().is_empty(), "{text}");
    assert!(
        text.contains("smollm2-135m {'local': False, 'peers': ['demo-a']}"),
        "B lists A's model as a grid model: {text}"
    );
    assert!(
        text.contains("direction=inbound, peer=demo-b, model=smollm2-135m, status=200"),
        "A audited B's request: {text}"
    );
    assert!(
        text.contains(&format!("admin pages: http://{ip}:{}/", base + 10)),
        "{text}"
    );
    let pids: Vec<u32> = text
        .lines()
        .filter_map(|l| l.split(" pid ").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(pids.len(), 3, "llama-server, A and B: {text}");

    // Ctrl-C in a terminal: SIGINT to the script.
    assert!(signal(demo.child.id(), "INT"), "demo still running");
    let status = demo
        .wait(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("demo did not stop within 30 s of Ctrl-C:\n{}", output()));
    assert_eq!(status.code(), Some(130), "{}", output());
    assert!(
        output().contains("stopped; nothing left running"),
        "{}",
        output()
    );
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists after Ctrl-C"
        );
    }
    for off in [1, 10, 11, 20, 21] {
        let addr = SocketAddr::from((ip, base + off));
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
            "{addr} still accepts connections after Ctrl-C"
        );
    }
}
