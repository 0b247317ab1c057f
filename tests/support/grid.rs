//! The grid harness: real `arknet` processes (the built binary), each on its own loopback
//! address with its own temporary data dir, started with a bounded readiness poll and ended by
//! their own PID when the test is done (even when it panics).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::http;

/// Path of the binary under test.
pub const ARKNET: &str = env!("CARGO_BIN_EXE_arknet");

/// Starts `arknet <subcommand...> --config CONFIG` with its stdout and stderr appended to
/// `log` (info level), stdin closed.
pub fn spawn_logged(subcommand: &[&str], config: &Path, log: &Path) -> Child {
    let mut cmd = Command::new(ARKNET);
    cmd.args(subcommand)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info");
    super::child::spawn_into_log(&mut cmd, log, true)
        .unwrap_or_else(|e| panic!("spawn arknet {subcommand:?}: {e}"))
}

static NEXT_HOST: AtomicU32 = AtomicU32::new(0);

/// A fresh loopback address for one node or backend: distinct per test process and per call,
/// so parallel tests never share an address (127.0.0.0/8 all routes to `lo` on Linux).
pub fn loopback_ip() -> Ipv4Addr {
    let n = NEXT_HOST.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    Ipv4Addr::new(
        127,
        (pid % 200 + 20) as u8,
        (n / 250) as u8,
        (n % 250 + 2) as u8,
    )
}

/// A port that was free a moment ago on `ip`.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// A backend entry for a node's config.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub name: String,
    pub kind: &'static str,
    pub url: String,
    pub max_concurrent: usize,
    /// Extra TOML lines for this `[[backends]]` table.
    pub extra: String,
}

impl BackendSpec {
    pub fn ollama(url: impl Into<String>) -> Self {
        Self::new("ollama", "ollama", url)
    }

    pub fn openai(url: impl Into<String>) -> Self {
        Self::new("openai", "openai", url)
    }

    pub fn new(name: &str, kind: &'static str, url: impl Into<String>) -> Self {
        BackendSpec {
            name: name.to_string(),
            kind,
            url: url.into(),
            max_concurrent: 4,
            extra: String::new(),
        }
    }

    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n;
        self
    }

    /// Adds a TOML line to this backend's table (e.g. `guest_vram_budget_mb = 1000`).
    pub fn toml(mut self, line: &str) -> Self {
        self.extra.push_str(line);
        self.extra.push('\n');
        self
    }
}

/// What to start: backends plus free-form TOML appended to the generated config.
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    pub backends: Vec<BackendSpec>,
    pub extra_toml: String,
    /// TOML placed in the `[upstream]` table.
    pub upstream_toml: String,
    /// `mesh.hello_interval_secs` (default 1).
    pub hello_interval_secs: Option<u64>,
    /// `api.shutdown_grace_secs` (default 0: tests stop nodes at once).
    pub shutdown_grace_secs: Option<u64>,
    /// Whole TOML tables appended to the config (e.g. `[discovery.registry]`).
    pub tables: String,
}

impl NodeSpec {
    pub fn with_backend(backend: BackendSpec) -> Self {
        NodeSpec {
            backends: vec![backend],
            ..NodeSpec::default()
        }
    }

    pub fn backend(mut self, backend: BackendSpec) -> Self {
        self.backends.push(backend);
        self
    }

    /// TOML placed in the `[upstream]` table (e.g. `first_byte_timeout_secs = 1`).
    pub fn upstream(mut self, toml: &str) -> Self {
        self.upstream_toml.push_str(toml);
        self.upstream_toml.push('\n');
        self
    }

    /// Seconds in-flight requests get after SIGTERM.
    pub fn shutdown_grace(mut self, secs: u64) -> Self {
        self.shutdown_grace_secs = Some(secs);
        self
    }

    /// Seconds between hellos to approved peers.
    pub fn hello_interval(mut self, secs: u64) -> Self {
        self.hello_interval_secs = Some(secs);
        self
    }

    /// A whole TOML table (header included) appended to the config.
    pub fn table(mut self, toml: &str) -> Self {
        self.tables.push('\n');
        self.tables.push_str(toml);
        self.tables.push('\n');
        self
    }

    /// TOML placed in a `[models]` table (model sharing: caps, pull parts).
    pub fn models(mut self, toml: &str) -> Self {
        self.upstream_toml.push_str("\n[models]\n");
        self.upstream_toml.push_str(toml);
        self.upstream_toml.push('\n');
        self
    }

    /// TOML placed in the `[api]` table (e.g. `max_body_bytes = 1024`).
    pub fn api(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }
}

/// One running `arknet serve` process.
pub struct NodeProc {
    pub api: SocketAddr,
    pub mesh: SocketAddr,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl NodeProc {
    /// Starts a node for `spec` and waits (bounded) until `/health` answers.
    pub fn start(spec: &NodeSpec) -> NodeProc {
        let mut node = NodeProc::launch(spec);
        node.wait_ready();
        node
    }

    /// Starts a node for `spec` without waiting for it, for tests that race something against
    /// its start; [`NodeProc::wait_ready`] waits.
    pub fn launch(spec: &NodeSpec) -> NodeProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let ip = loopback_ip();
        let api = SocketAddr::from((ip, free_port(ip)));
        let mesh = SocketAddr::from((ip, free_port(ip)));
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("arknet.toml");
        std::fs::write(&config_path, render_config(spec, api, mesh, &data_dir))
            .expect("write config");
        let mut node = NodeProc {
            api,
            mesh,
            data_dir,
            config_path,
            log_path: dir.path().join("arknet.log"),
            child: None,
            _dir: dir,
        };
        node.spawn_process();
        node
    }

    fn spawn(&mut self) {
        self.spawn_process();
        self.wait_ready();
    }

    fn spawn_process(&mut self) {
        self.child = Some(spawn_logged(&["serve"], &self.config_path, &self.log_path));
    }

    /// Bounded poll until `/health` answers; panics with the log if the process exits first.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("arknet exited early ({status}); log:\n{}", self.log());
            }
            let probe = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            if http::try_send_raw(self.api, probe, Duration::from_secs(2))
                .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "arknet not ready in 20 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("node is running")
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends SIGTERM to the process (by its PID), as a service manager stops it.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends signal `name` (`TERM`, `INT`, ...) to the node by its PID.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {}", self.pid());
    }

    /// Ends the process by its PID (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts the node again with the same config and data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn get(&self, path: &str) -> http::Response {
        http::get(self.api, path)
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> http::Response {
        http::post_json(self.api, path, body)
    }

    /// The node's id, from `/health`.
    pub fn node_id(&self) -> String {
        self.get("/health").json()["node_id"]
            .as_str()
            .expect("node_id in /health")
            .to_string()
    }

    /// Files that let a client speak mTLS as this node: (key, chain).
    pub fn tls_files(&self) -> (PathBuf, PathBuf) {
        let id = self.data_dir.join("identity");
        (id.join("tls.key"), id.join("tls-chain.crt"))
    }

    /// Approves `peer` on this node through the admin API, sharing `models`.
    pub fn approve(&self, peer: &NodeProc, models: &[&str], max_concurrent: u32) -> http::Response {
        let rsp = self.post(
            "/peers/approve",
            &serde_json::json!({
                "node_id": peer.node_id(),
                "public_key": peer.public_key(),
                "endpoint": peer.mesh.to_string(),
                "permissions": {"models_shared": models, "max_concurrent_requests": max_concurrent},
            }),
        );
        assert_eq!(rsp.status, 200, "approve: {}", rsp.text());
        rsp
    }

    /// Revokes `peer` on this node.
    pub fn revoke(&self, peer: &NodeProc) {
        let rsp = self.post(
            "/peers/revoke",
            &serde_json::json!({"public_key": peer.public_key()}),
        );
        assert_eq!(rsp.status, 200, "revoke: {}", rsp.text());
    }

    /// The node's public key, from `/health`.
    pub fn public_key(&self) -> String {
        self.get("/health").json()["public_key"]
            .as_str()
            .expect("public_key in /health")
            .to_string()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// N nodes started together; later issues grow approve/revoke helpers here.
pub struct Grid {
    pub nodes: Vec<NodeProc>,
}

impl Grid {
    pub fn start(specs: &[NodeSpec]) -> Grid {
        Grid {
            nodes: specs.iter().map(NodeProc::start).collect(),
        }
    }

    pub fn node(&self, i: usize) -> &NodeProc {
        &self.nodes[i]
    }
}

fn render_config(spec: &NodeSpec, api: SocketAddr, mesh: SocketAddr, data_dir: &Path) -> String {
    let mut toml = format!(
        "data_dir = {:?}\nlog_level = \"info\"\n\n[api]\nlisten = \"{api}\"\nthreads = 2\nshutdown_grace_secs = {}\n{}\n[mesh]\nlisten = \"{mesh}\"\nhello_interval_secs = {}\nhandshake_timeout_secs = 3\n\n[upstream]\nconnect_timeout_ms = 500\nmodels_refresh_secs = 1\n{}",
        data_dir.display().to_string(),
        spec.shutdown_grace_secs.unwrap_or(0),
        spec.extra_toml,
        spec.hello_interval_secs.unwrap_or(1),
        spec.upstream_toml,
    );
    for b in &spec.backends {
        toml.push_str(&format!(
            "\n[[backends]]\nname = {:?}\nkind = {:?}\nurl = {:?}\nmax_concurrent = {}\n{}",
            b.name, b.kind, b.url, b.max_concurrent, b.extra
        ));
    }
    toml.push_str(&spec.tables);
    toml
}

/// Polls `check` every 25 ms until it returns true or `within` passes; panics with `what`.
pub fn assert_eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A household: a node in front of its own fake model server.
pub struct Ark {
    pub backend: super::fake_backend::FakeBackend,
    pub node: NodeProc,
}

impl Ark {
    /// A fake backend with `config` on a fresh loopback address, and a node in front of it.
    pub fn start(config: super::fake_backend::FakeConfig, max_concurrent: usize) -> Ark {
        Ark::start_with(config, max_concurrent, |spec| spec)
    }

    /// [`Ark::start`], with the node's spec adjusted by `spec` (timeouts, hello interval).
    pub fn start_with(
        config: super::fake_backend::FakeConfig,
        max_concurrent: usize,
        spec: impl FnOnce(NodeSpec) -> NodeSpec,
    ) -> Ark {
        let backend = super::fake_backend::FakeBackend::start_in_thread(
            std::net::IpAddr::V4(loopback_ip()),
            config,
        );
        let node = NodeProc::start(&spec(NodeSpec::with_backend(
            BackendSpec::ollama(backend.url()).max_concurrent(max_concurrent),
        )));
        Ark { backend, node }
    }
}

/// `a` approves `b` (sharing `models`, granting `grant`), `b` approves `a`; waits until `b`
/// has learnt by hello that `a` is reachable and shares models with it.
pub fn share(a: &Ark, b: &Ark, models: &[&str], grant: u32) {
    a.node.approve(&b.node, models, grant);
    b.node.approve(&a.node, &[], 1);
    let a_id = a.node.node_id();
    assert_eventually(
        Duration::from_secs(10),
        "b learns a's shared models by hello",
        || {
            b.node.get("/peers/status").json()["peers"]
                .as_array()
                .is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["node_id"] == a_id.as_str()
                            && p["reachable"] == true
                            && !p["models_shared_with_us"]
                                .as_array()
                                .is_none_or(Vec::is_empty)
                    })
                })
        },
    );
}
