//! Load benchmark: the same fake backend served directly, through nginx, through a bare Pingora
//! proxy (`examples/pingora_floor.rs`: what the library arknet is built on costs alone), through
//! arknet, and through two arknet nodes joined by the mutual-TLS mesh (client -> node A's API ->
//! mesh -> node B's mesh listener -> B's backend).
//!
//! One run, interleaved: every round runs each scenario against each target (in a rotating
//! order), so machine noise lands on all of them alike; the tables report medians across rounds
//! and ratios. Run with `cargo bench --bench gateway`; see `benches/README.md` for the knobs.
//!
//! Everything listens on 127.0.0.0/8 only, every child process is ended by its own PID (also
//! when the bench panics), and the whole run is bounded (about 2.5 minutes by default).

#[path = "../tests/support/child.rs"]
#[allow(dead_code)]
// the bench reads /proc its own way, per thread; it shares the tick unit and the spawn
mod child;
#[path = "../tests/support/fake_backend.rs"]
mod fake_backend;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_backend::{FakeBackend, FakeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

const MODEL: &str = "bench-model";
/// Served by the same backend with a pause between chunks: paced streams, as a model generates.
const PACED_MODEL: &str = "bench-paced";
/// Pause between two chunks of `PACED_MODEL`.
const PACE: Duration = Duration::from_millis(5);
/// Served with a long pause between chunks: the many-slow-streams phase holds its streams open.
const SLOW_MODEL: &str = "bench-slow";
/// Pause between two chunks of `SLOW_MODEL`: a stream lasts `CHUNKS` x this (32 s), longer than
/// the ramp and the hold together.
const SLOW_PACE: Duration = Duration::from_millis(500);
/// Streams the slow phase holds at once by default (`ARKNET_BENCH_SLOW_STREAMS`).
const SLOW_STREAMS: usize = 10_000;
/// Connections per client source address in the slow phase: under arknet's default per-address
/// bound (256), so the load comes from many loopback addresses as from many clients.
const SLOW_PER_SOURCE: usize = 200;
/// Streams one slow-phase client worker process holds at most (two sockets each would not fit
/// one process's open-file limit for 10,000 streams, with the backend ends too).
const SLOW_PER_WORKER: usize = 2_500;
/// Set (to "addr bench_ip first count") when this bench binary runs as a slow-stream client
/// worker ([`slow_worker`]).
const SLOW_WORKER_ENV: &str = "ARKNET_BENCH_SLOW_WORKER";
/// Longest the slow phase waits for all its streams to start.
const SLOW_RAMP_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the slow phase holds all its streams open before measuring again.
const SLOW_HOLD: Duration = Duration::from_secs(5);
/// The only model of node A's own backend: A must reach `MODEL` through the mesh.
const OTHER_MODEL: &str = "other-model";
/// Requests node B lets node A have in flight; above every scenario's concurrency, or A would
/// answer 503 when its grant is used up.
const MESH_GRANT: usize = 256;
/// `max_concurrent` of every arknet backend; above every scenario's concurrency and the slow
/// phase's stream count.
const BACKEND_SLOTS: usize = 16_384;
/// Tokens per reply: SSE streams carry this many content chunks; JSON replies this many tokens.
const CHUNKS: usize = 64;
const NGINX: &str = "/usr/sbin/nginx";
/// Debian's `wrk`: the standard load generator run beside the bench's own client.
const WRK: &str = "/usr/bin/wrk";
const ARKNET: &str = env!("CARGO_BIN_EXE_arknet");
/// Upper bound for one request/stream; a slower one counts as an error and its connection is
/// dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounded wait for a started process to serve.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two measured runs, so closing connections settle.
const SETTLE: Duration = Duration::from_millis(100);
/// The target for the mesh hop: added p50 at c=1 with connection reuse.
const MESH_HOP_TARGET_MS: f64 = 0.3;

/// What one request asks for and how its reply is checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `POST /v1/chat/completions`, `stream: false`: one JSON reply.
    Json,
    /// `POST /v1/chat/completions`, `stream: true`: server-sent events ending in `[DONE]`.
    Sse,
    /// `POST /api/chat`, `stream: true`: Ollama's NDJSON lines ending in `"done":true`.
    Ndjson,
}

/// Who sends the load.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    /// The bench's own client (one current-thread runtime in this process).
    Own,
    /// `wrk` with this many threads, in its own process.
    Wrk { threads: usize },
}

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    kind: Kind,
    model: &'static str,
    concurrency: usize,
    load: Load,
}

const SCENARIOS: [Scenario; 7] = [
    Scenario {
        name: "chat json c=1",
        kind: Kind::Json,
        model: MODEL,
        concurrency: 1,
        load: Load::Own,
    },
    Scenario {
        name: "chat json c=64",
        kind: Kind::Json,
        model: MODEL,
        concurrency: 64,
        load: Load::Own,
    },
    Scenario {
        name: "sse 64 chunks c=32",
        kind: Kind::Sse,
        model: MODEL,
        concurrency: 32,
        load: Load::Own,
    },
    Scenario {
        name: "ndjson 64 lines c=32",
        kind: Kind::Ndjson,
        model: MODEL,
        concurrency: 32,
        load: Load::Own,
    },
    Scenario {
        name: "sse paced 5ms c=32",
        kind: Kind::Sse,
        model: PACED_MODEL,
        concurrency: 32,
        load: Load::Own,
    },
    Scenario {
        name: "wrk json c=64 t=2",
        kind: Kind::Json,
        model: MODEL,
        concurrency: 64,
        load: Load::Wrk { threads: 2 },
    },
    Scenario {
        name: "wrk json c=1 t=1",
        kind: Kind::Json,
        model: MODEL,
        concurrency: 1,
        load: Load::Wrk { threads: 1 },
    },
];

const _: () = {
    let mut i = 0;
    while i < SCENARIOS.len() {
        assert!(SCENARIOS[i].concurrency < MESH_GRANT && MESH_GRANT <= BACKEND_SLOTS);
        i += 1;
    }
};

/// Knobs, from the environment, clamped so the run stays bounded.
struct Settings {
    rounds: usize,
    run: Duration,
    warmup: Duration,
    /// `[api] threads` for arknet; `None` leaves its default (one per CPU core).
    arknet_threads: Option<usize>,
    /// Scenarios to run (all by default): indexes into `SCENARIOS`.
    scenarios: Vec<usize>,
    /// The `wrk` scenarios were left out: no `wrk` installed.
    no_wrk: bool,
    /// Streams of the slow phase (0: the phase is skipped).
    slow_streams: usize,
    /// Another `arknet` binary (say, a build of the previous commit) run as one more 1-hop
    /// target, `arknet base`, so that a change is compared before/after in the same rounds.
    baseline: Option<PathBuf>,
    /// The built `pingora_floor` example, run as target `pingora`; `None` leaves it out.
    pingora: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Settings {
        let num = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok());
        let rounds = num("ARKNET_BENCH_ROUNDS").map_or(5, |r| r.clamp(1.0, 10.0) as usize);
        let secs = num("ARKNET_BENCH_SECS").map_or(2.0, |s| s.clamp(0.2, 5.0));
        let arknet_threads =
            num("ARKNET_BENCH_ARKNET_THREADS").map(|t| t.clamp(1.0, 64.0) as usize);
        // A substring of scenario names, for profiling one of them (e.g. "sse").
        let only = std::env::var("ARKNET_BENCH_SCENARIO").unwrap_or_default();
        let no_wrk = !Path::new(WRK).exists();
        let scenarios: Vec<usize> = (0..SCENARIOS.len())
            .filter(|&s| SCENARIOS[s].name.contains(only.as_str()))
            .filter(|&s| !(no_wrk && matches!(SCENARIOS[s].load, Load::Wrk { .. })))
            .collect();
        let slow_streams = if "slow streams".contains(only.as_str()) || only.is_empty() {
            num("ARKNET_BENCH_SLOW_STREAMS")
                .map_or(SLOW_STREAMS, |n| n.clamp(0.0, 20_000.0) as usize)
        } else {
            0
        };
        assert!(
            !scenarios.is_empty() || slow_streams > 0,
            "ARKNET_BENCH_SCENARIO={only:?} matches no scenario"
        );
        Settings {
            rounds,
            run: Duration::from_secs_f64(secs),
            warmup: Duration::from_millis(300),
            arknet_threads,
            scenarios,
            no_wrk,
            slow_streams,
            baseline: std::env::var_os("ARKNET_BENCH_BASELINE")
                .map(PathBuf::from)
                .filter(|p| {
                    assert!(
                        p.is_file(),
                        "ARKNET_BENCH_BASELINE={} is not a file",
                        p.display()
                    );
                    true
                }),
            pingora: pingora_floor_bin(),
        }
    }
}

/// `target/<profile>/examples/pingora_floor` beside this bench binary (which cargo puts in
/// `target/<profile>/deps/`), if it was built: `cargo bench` does not build examples.
fn pingora_floor_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    Some(profile_dir.join("examples").join("pingora_floor")).filter(|p| p.is_file())
}

fn main() {
    if let Ok(spec) = std::env::var(SLOW_WORKER_ENV) {
        slow_worker(&spec);
        return;
    }
    let settings = Settings::from_env();
    // Before any child starts: nginx, arknet and the slow-phase workers inherit it. The slow
    // phase holds two sockets per stream in each proxy (client end, backend end), one in this
    // process (the backend end) and one in a worker (the client end).
    let nofile = raise_nofile(2 * settings.slow_streams as u64 + 4096);
    let clk_tck = child::clock_ticks_per_second();
    let ip = bench_ip();

    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(ip),
        FakeConfig::both(&[MODEL, PACED_MODEL, SLOW_MODEL])
            .record(false)
            .chunks(CHUNKS)
            .chunk_delay(Duration::ZERO)
            .pace(PACED_MODEL, PACE)
            .pace(SLOW_MODEL, SLOW_PACE),
    );
    // Node A's own backend: another model, so A has a local backend but must use the mesh.
    let other_backend = FakeBackend::start_in_thread(
        IpAddr::V4(ip),
        FakeConfig::both(&[OTHER_MODEL]).record(false),
    );
    let nginx = start_nginx(ip, backend.addr);
    let pingora = settings
        .pingora
        .as_deref()
        .map(|bin| start_pingora(bin, ip, backend.addr, settings.arknet_threads));
    // Node B is both the 1-hop target (its API listener) and the far end of the 2-hop one (its
    // mesh listener); the runs never overlap, so each measures one path at a time.
    let mut node_b = start_arknet(
        "arknet B",
        Path::new(ARKNET),
        ip,
        &backend.url(),
        settings.arknet_threads,
    );
    node_b.proc.wait_ready();
    let mut node_a = start_arknet(
        "arknet A",
        Path::new(ARKNET),
        ip,
        &other_backend.url(),
        settings.arknet_threads,
    );
    join_mesh(&mut node_a, &mut node_b);
    let mut node_base = settings.baseline.as_deref().map(|bin| {
        let mut node = start_arknet(
            "arknet base",
            bin,
            ip,
            &backend.url(),
            settings.arknet_threads,
        );
        node.proc.wait_ready();
        node
    });
    // The baseline's own two-hop path: a second baseline node with A's backend, meshed with
    // `arknet base` as A is with B, so the mesh hop too is compared before/after in one run.
    let mut node_base_a = settings.baseline.as_deref().map(|bin| {
        let mut node = start_arknet(
            "arknet base A",
            bin,
            ip,
            &other_backend.url(),
            settings.arknet_threads,
        );
        if let Some(base) = node_base.as_mut() {
            join_mesh(&mut node, base);
        }
        node
    });

    let mut targets = vec![
        Target {
            name: "direct",
            addr: backend.addr,
            pids: Vec::new(),
            watch: Vec::new(),
        },
        Target {
            name: "nginx",
            addr: nginx.addr,
            pids: vec![nginx.pid()],
            watch: vec![("nginx->backend", backend.addr)],
        },
    ];
    if let Some(floor) = &pingora {
        targets.push(Target {
            name: "pingora",
            addr: floor.addr,
            pids: vec![floor.pid()],
            watch: vec![("pingora->backend", backend.addr)],
        });
    }
    targets.extend([
        Target {
            name: "arknet",
            addr: node_b.proc.addr,
            pids: vec![node_b.proc.pid()],
            watch: vec![("arknet->backend", backend.addr)],
        },
        Target {
            name: "arknet 2-hop",
            addr: node_a.proc.addr,
            pids: vec![node_a.proc.pid(), node_b.proc.pid()],
            watch: vec![
                ("2-hop A->B mesh", node_b.mesh),
                ("2-hop B->backend", backend.addr),
            ],
        },
    ]);
    if let Some(node) = &node_base {
        targets.push(Target {
            name: "arknet base",
            addr: node.proc.addr,
            pids: vec![node.proc.pid()],
            watch: vec![("base->backend", backend.addr)],
        });
        if let Some(base_a) = &node_base_a {
            targets.push(Target {
                name: "arknet base 2-hop",
                addr: base_a.proc.addr,
                pids: vec![base_a.proc.pid(), node.proc.pid()],
                watch: vec![("base 2-hop A->B mesh", node.mesh)],
            });
        }
    }

    // The client is one thread (this one) so it never takes more than one core; it is cheap
    // per request (see the client column) compared with either proxy.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");

    let mut results: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); targets.len()]; SCENARIOS.len()];
    let started = Instant::now();
    runtime.block_on(async {
        for target in &targets {
            for &s in &settings.scenarios {
                run_load(target, SCENARIOS[s], settings.warmup, clk_tck).await;
            }
        }
        for round in 0..settings.rounds {
            eprintln!(
                "round {}/{} ({:.0} s elapsed)",
                round + 1,
                settings.rounds,
                started.elapsed().as_secs_f64()
            );
            for &s in &settings.scenarios {
                for k in 0..targets.len() {
                    let t = (k + round) % targets.len();
                    let run = run_load(&targets[t], SCENARIOS[s], settings.run, clk_tck).await;
                    results[s][t].push(run);
                    tokio::time::sleep(SETTLE).await;
                }
            }
        }
    });
    let total = started.elapsed();
    let slow = if settings.slow_streams > 0 {
        // One socket per stream in this process, plus room for everything else. The proxies'
        // two per stream are not capped here: a proxy at its limit shows in the failures.
        let n = settings
            .slow_streams
            .min(nofile.saturating_sub(1024) as usize);
        let by_name = |name| {
            targets
                .iter()
                .find(|t| t.name == name)
                .expect("bench target")
        };
        let slow_targets = [
            (by_name("nginx"), nginx.pid()),
            (by_name("arknet"), node_b.proc.pid()),
        ];
        runtime.block_on(async {
            let mut reports = Vec::new();
            for (target, pid) in slow_targets {
                eprintln!("slow streams: {n} through {}", target.name);
                reports.push(slow_streams(target.name, target.addr, pid, n, ip, clk_tck).await);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            reports
        })
    } else {
        Vec::new()
    };

    let mut nginx = nginx;
    nginx.assert_alive();
    let mut pingora = pingora;
    if let Some(floor) = pingora.as_mut() {
        floor.assert_alive();
    }
    node_a.proc.assert_alive();
    node_b.proc.assert_alive();
    if let Some(node) = node_base.as_mut() {
        node.proc.assert_alive();
    }
    if let Some(node) = node_base_a.as_mut() {
        node.proc.assert_alive();
    }
    let report = render_report(
        &settings,
        &targets,
        &results,
        &Context {
            clk_tck,
            total,
            nginx_threads: thread_count(nginx.pid()),
            pingora_threads: pingora.as_ref().and_then(|p| thread_count(p.pid())),
            arknet_threads: thread_count(node_b.proc.pid()),
            arknet_a_threads: thread_count(node_a.proc.pid()),
            backend_workers: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        },
    );
    let report = report + &render_slow(&slow, settings.slow_streams, nofile);
    io::stdout()
        .write_all(report.as_bytes())
        .expect("write report to stdout");
    drop(node_base_a);
    drop(node_base);
    drop(node_a);
    drop(node_b);
    drop(nginx);
    drop(pingora);
    drop(other_backend);
    drop(backend);
}

// ---------------------------------------------------------------------------------------------
// Targets and the processes behind them
// ---------------------------------------------------------------------------------------------

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The proxy processes whose CPU time is measured, in hop order; none for the in-process
    /// backend.
    pids: Vec<u32>,
    /// Servers behind the proxy whose new inbound TCP connections are counted during each run:
    /// (label, listening address).
    watch: Vec<(&'static str, SocketAddr)>,
}

/// A child process ended by its own PID (SIGKILL) when dropped, panics included.
struct Proc {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}); log:\n{}", self.name, self.log());
        }
    }

    /// Polls (bounded) until a chat request through this process answers 200.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let request = request_bytes(Kind::Json, MODEL);
        loop {
            self.assert_alive();
            if probe_status(self.addr, &request) == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not serving chat within {READY_TIMEOUT:?}; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx as a plain keep-alive reverse proxy: one process (`master_process off` runs a single
/// worker whatever `worker_processes` says), upstream keep-alive pool of 64, no buffering.
fn start_nginx(ip: Ipv4Addr, backend: SocketAddr) -> Proc {
    assert!(
        Path::new(NGINX).exists(),
        "{NGINX} is missing: install Debian's nginx (bash .ci/run does)"
    );
    let dir = tempfile::tempdir().expect("nginx tempdir");
    let p = dir.path().display().to_string();
    let addr = SocketAddr::from((ip, free_port(ip)));
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\n\
         worker_rlimit_nofile 65536;\n\
         events {{ worker_connections 32768; }}\n\
         http {{\n access_log off;\n client_body_temp_path {p}/body;\n proxy_temp_path {p}/proxy;\n\
         fastcgi_temp_path {p}/fastcgi;\n uwsgi_temp_path {p}/uwsgi;\n scgi_temp_path {p}/scgi;\n\
         keepalive_requests 1000000;\n\
         upstream backend {{ server {backend}; keepalive 64; keepalive_requests 1000000; }}\n\
         server {{\n  listen {addr};\n  location / {{\n   proxy_pass http://backend;\n\
         proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n   proxy_buffering off;\n  }}\n }}\n}}\n"
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let log = dir.path().join("error.log");
    let child = Command::new(NGINX)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nginx");
    let mut proc = Proc {
        name: "nginx",
        addr,
        child,
        log,
        _dir: dir,
    };
    proc.wait_ready();
    proc
}

/// Starts `command` (stdin closed, stdout and stderr into `log.txt` in `dir`, which the returned
/// process owns) for a server that will listen on `addr`.
fn spawn_logged(
    name: &'static str,
    mut command: Command,
    addr: SocketAddr,
    dir: tempfile::TempDir,
) -> Proc {
    let log = dir.path().join("log.txt");
    let child = child::spawn_into_log(&mut command, &log, false)
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    Proc {
        name,
        addr,
        child,
        log,
        _dir: dir,
    }
}

/// The `pingora_floor` example (a bare Pingora proxy) in front of `backend`, with `threads`
/// worker threads when given (as arknet's `[api] threads`; else one per core, as arknet).
/// Its pid file and upgrade socket go into the process's own tempdir.
fn start_pingora(bin: &Path, ip: Ipv4Addr, backend: SocketAddr, threads: Option<usize>) -> Proc {
    let dir = tempfile::tempdir().expect("pingora tempdir");
    let addr = SocketAddr::from((ip, free_port(ip)));
    let mut command = Command::new(bin);
    command
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--upstream")
        .arg(backend.to_string())
        .arg("--run-dir")
        .arg(dir.path());
    if let Some(t) = threads {
        command.arg("--threads").arg(t.to_string());
    }
    let mut proc = spawn_logged("pingora", command, addr, dir);
    proc.wait_ready();
    proc
}

/// A running `arknet serve`: the process (its API listener is `proc.addr`) and its mesh listener.
struct Node {
    proc: Proc,
    mesh: SocketAddr,
}

/// The built release `arknet` with a generated config: one Ollama-kind backend with room for
/// `BACKEND_SLOTS` requests in flight, all of them open to peers (`reserved_local_slots = 0`),
/// the mesh listener on the bench address, a hello every second, everything else at its
/// default. Returns once `/health` answers; the caller waits for the models it needs.
fn start_arknet(
    name: &'static str,
    bin: &Path,
    ip: Ipv4Addr,
    backend_url: &str,
    threads: Option<usize>,
) -> Node {
    let dir = tempfile::tempdir().expect("arknet tempdir");
    let addr = SocketAddr::from((ip, free_port(ip)));
    let mesh = SocketAddr::from((ip, free_port(ip)));
    let threads = threads.map_or(String::new(), |t| format!("threads = {t}\n"));
    let conf = format!(
        "data_dir = {:?}\n\n[api]\nlisten = \"{addr}\"\n{threads}\n\
         [mesh]\nlisten = \"{mesh}\"\nhello_interval_secs = 1\n\n\
         [[backends]]\nname = \"bench\"\nkind = \"ollama\"\nurl = {backend_url:?}\n\
         max_concurrent = {BACKEND_SLOTS}\nreserved_local_slots = 0\n",
        dir.path().join("data").display().to_string()
    );
    let conf_path = dir.path().join("arknet.toml");
    std::fs::write(&conf_path, conf).expect("write arknet.toml");
    let mut command = Command::new(bin);
    command.arg("serve").arg("--config").arg(&conf_path);
    let mut proc = spawn_logged(name, command, addr, dir);
    let deadline = Instant::now() + READY_TIMEOUT;
    let health = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    while probe_status(addr, health) != Some(200) {
        proc.assert_alive();
        assert!(
            Instant::now() < deadline,
            "{name} /health not 200 within {READY_TIMEOUT:?}; log:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Node { proc, mesh }
}

/// Joins A and B through the admin API: B approves A sharing `MODEL` with a grant of
/// `MESH_GRANT`, A approves B (sharing nothing). Then waits (bounded) until A lists `MODEL`,
/// learnt from B's hello, and a chat through A answers 200.
fn join_mesh(a: &mut Node, b: &mut Node) {
    let identity = |node: &Node| {
        let health = admin_json(node, "GET", "/health", None);
        let field = |key: &str| {
            health[key]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no {key} in /health: {health}", node.proc.name))
                .to_string()
        };
        (field("node_id"), field("public_key"))
    };
    let approve = |on: &Node, peer: &Node, models: &[&str], grant: usize| {
        let (node_id, public_key) = identity(peer);
        let body = serde_json::json!({
            "node_id": node_id,
            "public_key": public_key,
            "endpoint": peer.mesh.to_string(),
            "permissions": {"models_shared": models, "max_concurrent_requests": grant},
        });
        admin_json(on, "POST", "/peers/approve", Some(&body));
    };
    approve(b, a, &[MODEL, PACED_MODEL, SLOW_MODEL], MESH_GRANT);
    approve(a, b, &[], 1);

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        a.proc.assert_alive();
        b.proc.assert_alive();
        let listed = http_call(a.proc.addr, "GET", "/v1/models", None)
            .filter(|(status, _)| *status == 200)
            .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok())
            .and_then(|v| {
                v["data"]
                    .as_array()
                    .map(|models| models.iter().any(|m| m["id"] == MODEL))
            })
            .unwrap_or(false);
        if listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "arknet A does not list {MODEL} (from B's hello) within {READY_TIMEOUT:?}; \
             A's log:\n{}\nB's log:\n{}",
            a.proc.log(),
            b.proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    a.proc.wait_ready();
}

/// One admin call that must answer 200 with JSON.
fn admin_json(
    node: &Node,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> serde_json::Value {
    let body = body.map(serde_json::Value::to_string);
    let (status, reply) = http_call(node.proc.addr, method, path, body.as_deref())
        .unwrap_or_else(|| panic!("{}: {method} {path}: no answer", node.proc.name));
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(status, 200, "{}: {method} {path}: {text}", node.proc.name);
    serde_json::from_slice(&reply).unwrap_or_else(|e| {
        panic!(
            "{}: {method} {path}: not JSON ({e}): {text}",
            node.proc.name
        )
    })
}

/// One blocking `Connection: close` exchange with an optional JSON body: (status, body), the
/// body de-chunked if needed; `None` on any failure.
fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, Vec<u8>)> {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let body = body.unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let head_len = find(&raw, b"\r\n\r\n")?;
    let head = parse_head(&raw[..head_len]).ok()?;
    let mut rest = &raw[head_len + 4..];
    if !head.chunked {
        return Some((head.status, rest.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let line = find(rest, b"\r\n")?;
        let size = parse_chunk_size(&rest[..line]).ok()?;
        rest = rest.get(line + 2..)?;
        if size == 0 {
            return Some((head.status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// One loopback address per bench process, away from the test harness's 127.20-219.x.x range.
fn bench_ip() -> Ipv4Addr {
    let pid = std::process::id();
    Ipv4Addr::new(127, 240, (pid % 250) as u8, (pid / 250 % 250 + 2) as u8)
}

/// A port that was free a moment ago on `ip`.
fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// Status of one blocking `Connection: close` exchange, `None` on any failure.
fn probe_status(addr: SocketAddr, request: &[u8]) -> Option<u16> {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(request).ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// (path, JSON body) of a chat request of this kind for `model`.
fn chat_request(kind: Kind, model: &str) -> (&'static str, String) {
    let (path, stream) = match kind {
        Kind::Json => ("/v1/chat/completions", false),
        Kind::Sse => ("/v1/chat/completions", true),
        Kind::Ndjson => ("/api/chat", true),
    };
    let body = format!(
        "{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":{stream}}}"
    );
    (path, body)
}

/// The whole HTTP/1.1 request, ready to write.
fn request_bytes(kind: Kind, model: &str) -> Vec<u8> {
    let (path, body) = chat_request(kind, model);
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc
// ---------------------------------------------------------------------------------------------

/// (comm, utime + stime in ticks) of a `/proc/.../stat` file.
fn stat_ticks(path: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After "(comm)": state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

#[derive(Clone, Default)]
struct CpuTicks {
    /// Each proxy process (all its threads), in the target's order.
    proxy: Vec<u64>,
    /// Threads of this process running the fake backend.
    backend: u64,
    /// Every other thread of this process: the load generator.
    client: u64,
}

fn cpu_ticks(proxies: &[u32]) -> CpuTicks {
    let mut ticks = CpuTicks {
        proxy: proxies
            .iter()
            .map(|pid| {
                stat_ticks(&PathBuf::from(format!("/proc/{pid}/stat"))).map_or(0, |(_, t)| t)
            })
            .collect(),
        ..CpuTicks::default()
    };
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Some((comm, t)) = stat_ticks(&task.path().join("stat")) {
                if comm.starts_with("fake-backend") {
                    ticks.backend += t;
                } else {
                    ticks.client += t;
                }
            }
        }
    }
    ticks
}

/// TCP connections to one server, from `/proc/net/tcp`, each named by its client end (address
/// and port as printed there).
#[derive(Default)]
struct TcpClients {
    /// In any state but LISTEN, seen from either end: a connection that shows up in a later
    /// snapshot but not in an earlier one was opened in between. TIME_WAIT entries last 60 s, so
    /// connections opened and closed in between are seen too (unless the kernel reused the same
    /// client port for the same server meanwhile: an undercount).
    all: HashSet<(u32, u16)>,
    /// ESTABLISHED at either end.
    established: HashSet<(u32, u16)>,
}

fn tcp_clients(server: SocketAddr) -> TcpClients {
    let mut out = TcpClients::default();
    let SocketAddr::V4(server) = server else {
        return out;
    };
    let ip = u32::from_ne_bytes(server.ip().octets());
    let port = server.port();
    let parse = |field: &str| -> Option<(u32, u16)> {
        let (a, p) = field.split_once(':')?;
        Some((
            u32::from_str_radix(a, 16).ok()?,
            u16::from_str_radix(p, 16).ok()?,
        ))
    };
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().take(4).collect();
        let (Some(local), Some(remote), Some(&state)) = (
            fields.get(1).and_then(|f| parse(f)),
            fields.get(2).and_then(|f| parse(f)),
            fields.get(3),
        ) else {
            continue;
        };
        // 0A is LISTEN, 01 ESTABLISHED.
        let client = if state == "0A" {
            continue;
        } else if local == (ip, port) {
            remote
        } else if remote == (ip, port) {
            local
        } else {
            continue;
        };
        if state == "01" {
            out.established.insert(client);
        }
        out.all.insert(client);
    }
    out
}

fn thread_count(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------------------------

/// One measured run of one scenario against one target.
#[derive(Clone)]
struct Run {
    done: u64,
    errors: u64,
    elapsed: Duration,
    /// Sorted latencies in ns: whole exchange for JSON, time to first body byte for SSE.
    latencies: Vec<u64>,
    /// (p50, p99) in ms as `wrk` reported them, for its runs (no latencies of its own).
    reported: Option<(f64, f64)>,
    /// CPU seconds spent during the run, per proxy process in the target's order.
    proxy_cpu: Vec<f64>,
    backend_cpu: f64,
    client_cpu: f64,
    /// TCP connections opened during the run to each of the target's watched servers.
    opened: Vec<u64>,
    /// TCP connections to each watched server established at the end of the run: shows that the
    /// count above looked at the right sockets.
    seen: Vec<u64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }

    /// Nearest-rank percentile in ms.
    fn percentile_ms(&self, p: f64) -> f64 {
        match self.reported {
            Some((p50, _)) if p == 50.0 => return p50,
            Some((_, p99)) if p == 99.0 => return p99,
            _ => {}
        }
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.latencies.len()) - 1;
        self.latencies[i] as f64 / 1e6
    }

    fn per_request_us(&self, cpu: f64) -> f64 {
        if self.done == 0 {
            return f64::NAN;
        }
        cpu * 1e6 / self.done as f64
    }
}

/// Opens `concurrency` keep-alive connections, then lets each one run back-to-back requests
/// until `duration` has passed; CPU is sampled only around the timed part.
async fn run_load(target: &Target, scenario: Scenario, duration: Duration, clk_tck: f64) -> Run {
    if let Load::Wrk { threads } = scenario.load {
        return run_wrk(target, scenario, threads, duration, clk_tck).await;
    }
    let request: Arc<[u8]> = request_bytes(scenario.kind, scenario.model).into();
    let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(scenario.concurrency);
    let mut workers = JoinSet::new();
    for _ in 0..scenario.concurrency {
        workers.spawn(worker(
            target.addr,
            request.clone(),
            scenario.kind,
            ready_tx.clone(),
            start_rx.clone(),
        ));
    }
    drop(ready_tx);
    while ready_rx.recv().await.is_some() {}

    let clients_before: Vec<HashSet<(u32, u16)>> = target
        .watch
        .iter()
        .map(|(_, server)| tcp_clients(*server).all)
        .collect();
    let before = cpu_ticks(&target.pids);
    let start = Instant::now();
    start_tx
        .send(Some(start + duration))
        .expect("workers hold the start receiver");
    let mut run = Run {
        done: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        reported: None,
        proxy_cpu: Vec::new(),
        backend_cpu: 0.0,
        client_cpu: 0.0,
        opened: Vec::new(),
        seen: Vec::new(),
    };
    while let Some(joined) = workers.join_next().await {
        let stats = joined.expect("bench worker panicked");
        run.done += stats.done;
        run.errors += stats.errors;
        run.latencies.extend(stats.latencies);
    }
    run.elapsed = start.elapsed();
    let after = cpu_ticks(&target.pids);
    for ((_, server), before) in target.watch.iter().zip(&clients_before) {
        let after = tcp_clients(*server);
        run.opened.push(after.all.difference(before).count() as u64);
        run.seen.push(after.established.len() as u64);
    }
    run.latencies.sort_unstable();
    let secs = |a: u64, b: u64| a.saturating_sub(b) as f64 / clk_tck;
    run.proxy_cpu = after
        .proxy
        .iter()
        .zip(&before.proxy)
        .map(|(a, b)| secs(*a, *b))
        .collect();
    run.backend_cpu = secs(after.backend, before.backend);
    run.client_cpu = secs(after.client, before.client);
    run
}

/// One `wrk` run (keep-alive connections opened by wrk at its start, inside the timed window;
/// `wrk` does not read bodies, only statuses): rate, p50/p99 and errors from its report, CPU of
/// the proxies from `/proc` and of `wrk` itself from this process's reaped children.
async fn run_wrk(
    target: &Target,
    scenario: Scenario,
    threads: usize,
    duration: Duration,
    clk_tck: f64,
) -> Run {
    let dir = tempfile::tempdir().expect("wrk tempdir");
    let script = dir.path().join("chat.lua");
    let (path, body) = chat_request(scenario.kind, scenario.model);
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.body = '{body}'\n\
         wrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Host\"] = \"localhost\"\n"
    );
    std::fs::write(&script, lua).expect("write wrk script");
    // wrk takes whole seconds.
    let secs = duration.as_secs_f64().round().max(1.0) as u64;
    let clients_before: Vec<HashSet<(u32, u16)>> = target
        .watch
        .iter()
        .map(|(_, server)| tcp_clients(*server).all)
        .collect();
    let before = cpu_ticks(&target.pids);
    let children_before = children_cpu(clk_tck);
    let start = Instant::now();
    let output = tokio::process::Command::new(WRK)
        .arg(format!("-t{threads}"))
        .arg(format!("-c{}", scenario.concurrency))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .arg("-s")
        .arg(&script)
        .arg(format!("http://{}{path}", target.addr))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run wrk");
    let wall = start.elapsed();
    let after = cpu_ticks(&target.pids);
    let wrk_cpu = children_cpu(clk_tck) - children_before;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wrk failed ({}): {text}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report = parse_wrk(&text).unwrap_or_else(|| panic!("unreadable wrk report:\n{text}"));
    let mut run = Run {
        done: report.requests.saturating_sub(report.errors),
        errors: report.errors,
        elapsed: report.elapsed.unwrap_or(wall),
        latencies: Vec::new(),
        reported: Some((report.p50_ms, report.p99_ms)),
        proxy_cpu: Vec::new(),
        backend_cpu: 0.0,
        client_cpu: 0.0,
        opened: Vec::new(),
        seen: Vec::new(),
    };
    for ((_, server), before) in target.watch.iter().zip(&clients_before) {
        let after = tcp_clients(*server);
        run.opened.push(after.all.difference(before).count() as u64);
        run.seen.push(after.established.len() as u64);
    }
    let secs = |a: u64, b: u64| a.saturating_sub(b) as f64 / clk_tck;
    run.proxy_cpu = after
        .proxy
        .iter()
        .zip(&before.proxy)
        .map(|(a, b)| secs(*a, *b))
        .collect();
    run.backend_cpu = secs(after.backend, before.backend);
    run.client_cpu = secs(after.client, before.client) + wrk_cpu;
    run
}

/// CPU seconds (user + system) of this process's children that have been waited for
/// (`cutime` + `cstime` of `/proc/self/stat`, as `getrusage(RUSAGE_CHILDREN)` gives them).
fn children_cpu(clk_tck: f64) -> f64 {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = text
        .rfind(')')
        .map_or("", |close| &text[close + 1..])
        .split_whitespace()
        .collect();
    // After "(comm)": cutime is field 16, cstime field 17.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(13) + ticks(14)) as f64 / clk_tck
}

/// What a `wrk --latency` report says.
struct WrkReport {
    requests: u64,
    /// Non-2xx/3xx answers plus socket errors.
    errors: u64,
    elapsed: Option<Duration>,
    p50_ms: f64,
    p99_ms: f64,
}

fn parse_wrk(text: &str) -> Option<WrkReport> {
    // "2.74ms", "812.00us", "1.02s", "1.00m"
    let ms = |v: &str| -> Option<f64> {
        let split = v.find(|c: char| c.is_ascii_alphabetic())?;
        let (n, unit) = v.split_at(split);
        let n: f64 = n.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            "m" => n * 60_000.0,
            _ => return None,
        })
    };
    let mut p50 = None;
    let mut p99 = None;
    let mut requests = None;
    let mut elapsed = None;
    let mut errors = 0u64;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => p50 = ms(v),
            ["99%", v] => p99 = ms(v),
            [n, "requests", "in", t, ..] => {
                requests = n.parse().ok();
                elapsed = ms(t.trim_end_matches(',')).map(|m| Duration::from_secs_f64(m / 1000.0));
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    Some(WrkReport {
        requests: requests?,
        errors,
        elapsed,
        p50_ms: p50?,
        p99_ms: p99?,
    })
}

struct WorkerStats {
    done: u64,
    errors: u64,
    latencies: Vec<u64>,
}

async fn worker(
    addr: SocketAddr,
    request: Arc<[u8]>,
    kind: Kind,
    ready: mpsc::Sender<()>,
    mut start: watch::Receiver<Option<Instant>>,
) -> WorkerStats {
    let mut stats = WorkerStats {
        done: 0,
        errors: 0,
        latencies: Vec::with_capacity(4096),
    };
    let mut conn = Conn::connect(addr).await.ok();
    drop(ready);
    let deadline = loop {
        if let Some(deadline) = *start.borrow_and_update() {
            break deadline;
        }
        if start.changed().await.is_err() {
            return stats;
        }
    };
    while Instant::now() < deadline {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(addr).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    stats.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, c.exchange(&request, kind)).await {
            Ok(Ok(reply)) => {
                if reply.status == 200 && reply.body_ok {
                    let at = if kind != Kind::Json {
                        reply.first_body.unwrap_or_else(Instant::now)
                    } else {
                        Instant::now()
                    };
                    stats.done += 1;
                    stats.latencies.push((at - sent).as_nanos() as u64);
                } else {
                    stats.errors += 1;
                }
                if !reply.keep_alive {
                    conn = None;
                }
            }
            Ok(Err(_)) | Err(_) => {
                stats.errors += 1;
                conn = None;
            }
        }
    }
    stats
}

struct Reply {
    status: u16,
    keep_alive: bool,
    /// When the first byte of the response body was read.
    first_body: Option<Instant>,
    /// The body ended as a complete reply of `CHUNKS` tokens should.
    body_ok: bool,
}

/// A minimal HTTP/1.1 keep-alive client connection: writes a prepared request, reads one
/// response (Content-Length, chunked, or until close).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    body: Vec<u8>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            body: Vec::with_capacity(32 * 1024),
        })
    }

    /// Reads more bytes into the buffer; EOF is an error.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(n)
    }

    /// Index (relative to `start`) of the next `needle`, reading more until it shows up.
    async fn until(&mut self, needle: &[u8]) -> io::Result<usize> {
        let mut from = 0;
        loop {
            if let Some(i) = find(&self.buf[self.start + from..self.end], needle) {
                return Ok(from + i);
            }
            // Relative to `start`, so still valid after `fill` moves the unread bytes.
            from = (self.end - self.start).saturating_sub(needle.len() - 1);
            self.fill().await?;
        }
    }

    /// Moves `n` body bytes from the buffer into `body`, reading as needed.
    async fn body_bytes(&mut self, mut n: usize, first: &mut Option<Instant>) -> io::Result<()> {
        while n > 0 {
            if self.start == self.end {
                self.fill().await?;
            }
            let take = n.min(self.end - self.start);
            first.get_or_insert_with(Instant::now);
            self.body
                .extend_from_slice(&self.buf[self.start..self.start + take]);
            self.start += take;
            n -= take;
        }
        Ok(())
    }

    async fn exchange(&mut self, request: &[u8], kind: Kind) -> io::Result<Reply> {
        self.stream.write_all(request).await?;
        self.body.clear();
        let head_len = self.until(b"\r\n\r\n").await?;
        let head = parse_head(&self.buf[self.start..self.start + head_len])?;
        self.start += head_len + 4;
        let mut first_body = None;
        let mut keep_alive = !head.close;
        if head.chunked {
            loop {
                let line = self.until(b"\r\n").await?;
                let size = parse_chunk_size(&self.buf[self.start..self.start + line])?;
                self.start += line + 2;
                if size == 0 {
                    // Trailer section: lines until an empty one.
                    loop {
                        let line = self.until(b"\r\n").await?;
                        self.start += line + 2;
                        if line == 0 {
                            break;
                        }
                    }
                    break;
                }
                self.body_bytes(size, &mut first_body).await?;
                while self.end - self.start < 2 {
                    self.fill().await?;
                }
                if &self.buf[self.start..self.start + 2] != b"\r\n" {
                    return Err(invalid("chunk not followed by CRLF"));
                }
                self.start += 2;
            }
        } else if let Some(len) = head.content_length {
            self.body_bytes(len, &mut first_body).await?;
        } else {
            // Neither length nor chunked: the body runs until the server closes.
            keep_alive = false;
            loop {
                let n = self.end - self.start;
                self.body_bytes(n, &mut first_body).await?;
                match self.fill().await {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Reply {
            status: head.status,
            keep_alive,
            first_body,
            body_ok: body_complete(&self.body, kind),
        })
    }
}

/// The last token is present, and the stream's end marker (SSE `[DONE]`, NDJSON `"done":true`);
/// only the tail is scanned.
fn body_complete(body: &[u8], kind: Kind) -> bool {
    let tail = &body[body.len().saturating_sub(1024)..];
    let last_token = format!("tok{} ", CHUNKS - 1);
    find(tail, last_token.as_bytes()).is_some()
        && match kind {
            Kind::Json => true,
            Kind::Sse => find(tail, b"data: [DONE]").is_some(),
            Kind::Ndjson => find(tail, b"\"done\":true").is_some(),
        }
}

struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
}

fn parse_head(head: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(head).map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let mut out = Head {
        status,
        content_length: None,
        chunked: false,
        close: status_line.starts_with("HTTP/1.0"),
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            out.content_length = Some(value.parse().map_err(|_| invalid("bad content-length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            out.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            out.close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(out)
}

fn parse_chunk_size(line: &[u8]) -> io::Result<usize> {
    let hex = line.split(|b| *b == b';').next().unwrap_or_default();
    let hex = std::str::from_utf8(hex).map_err(|_| invalid("bad chunk size"))?;
    usize::from_str_radix(hex.trim(), 16).map_err(|_| invalid("bad chunk size"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

struct Context {
    clk_tck: f64,
    total: Duration,
    nginx_threads: Option<u64>,
    /// The bare Pingora proxy's, when it runs.
    pingora_threads: Option<u64>,
    /// Node B's: the 1-hop target and the far end of the 2-hop one.
    arknet_threads: Option<u64>,
    arknet_a_threads: Option<u64>,
    backend_workers: usize,
}

/// Median of the finite values, NaN if none.
fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Medians across rounds for one (scenario, target).
struct Summary {
    rate: f64,
    rate_min: f64,
    rate_max: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    done: u64,
    /// All the target's proxy processes together.
    proxy_us: f64,
    /// Each proxy process, in the target's order.
    proxy_parts_us: Vec<f64>,
    backend_us: f64,
    client_us: f64,
    /// Connections opened per run to each watched server.
    opened: Vec<f64>,
    /// Connections established at the end of a run, per watched server.
    seen: Vec<f64>,
}

fn summarize(runs: &[Run], target: &Target) -> Summary {
    let rates: Vec<f64> = runs.iter().map(Run::rate).collect();
    Summary {
        rate: median(rates.clone()),
        rate_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
        rate_max: rates.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        p50: median(runs.iter().map(|r| r.percentile_ms(50.0)).collect()),
        p99: median(runs.iter().map(|r| r.percentile_ms(99.0)).collect()),
        errors: runs.iter().map(|r| r.errors).sum(),
        done: runs.iter().map(|r| r.done).sum(),
        proxy_us: median(
            runs.iter()
                .map(|r| r.per_request_us(r.proxy_cpu.iter().sum()))
                .collect(),
        ),
        proxy_parts_us: (0..target.pids.len())
            .map(|p| {
                median(
                    runs.iter()
                        .map(|r| r.per_request_us(r.proxy_cpu.get(p).copied().unwrap_or(f64::NAN)))
                        .collect(),
                )
            })
            .collect(),
        backend_us: median(
            runs.iter()
                .map(|r| r.per_request_us(r.backend_cpu))
                .collect(),
        ),
        client_us: median(
            runs.iter()
                .map(|r| r.per_request_us(r.client_cpu))
                .collect(),
        ),
        opened: (0..target.watch.len())
            .map(|w| {
                median(
                    runs.iter()
                        .map(|r| r.opened.get(w).map_or(f64::NAN, |n| *n as f64))
                        .collect(),
                )
            })
            .collect(),
        seen: (0..target.watch.len())
            .map(|w| {
                median(
                    runs.iter()
                        .map(|r| r.seen.get(w).map_or(f64::NAN, |n| *n as f64))
                        .collect(),
                )
            })
            .collect(),
    }
}

fn render_report(
    settings: &Settings,
    targets: &[Target],
    results: &[Vec<Vec<Run>>],
    ctx: &Context,
) -> String {
    let mut out = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let threads = |t: Option<u64>| t.map_or("?".to_string(), |n| n.to_string());
    let arknet_cfg = settings
        .arknet_threads
        .map_or("default = one per core".to_string(), |t| t.to_string());
    let _ = writeln!(
        out,
        "\n== gateway load bench: {} rounds x {:.1} s per (scenario, target), interleaved, {:.0} s total ==",
        settings.rounds,
        settings.run.as_secs_f64(),
        ctx.total.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "machine: {cpus} CPU(s), {model}; load avg at end: {}",
        load.trim()
    );
    let pingora_limits = if settings.pingora.is_some() {
        format!(
            ", a bare Pingora proxy (threads as arknet's api threads; {} threads in all)",
            threads(ctx.pingora_threads)
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "limits: these {cpus} CPU(s) are shared by the client (1 thread), the fake backends ({} tokio \
         workers each), nginx (1 worker process, master_process off; {} threads){pingora_limits} and \
         two arknet nodes (api threads {arknet_cfg}; B {} threads, A {} threads in all). Absolute \
         numbers are capped by that sharing; compare ratios.",
        ctx.backend_workers,
        threads(ctx.nginx_threads),
        threads(ctx.arknet_threads),
        threads(ctx.arknet_a_threads),
    );
    let pingora_target = if settings.pingora.is_some() {
        " pingora = client -> bare Pingora proxy (examples/pingora_floor.rs) -> backend;"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "targets: direct = client -> fake backend; nginx = client -> nginx -> backend;{pingora_target} \
         arknet = client -> node B's API -> backend (1 hop); arknet 2-hop = client -> node A's API \
         -> mTLS mesh -> node B's mesh listener -> backend (A has only another model)."
    );
    let _ = writeln!(
        out,
        "JSON rows: latency of the whole exchange. SSE rows: rate is streams/s, p50/p99 are time to \
         first body byte. CPU from /proc utime+stime at CLK_TCK={} (getconf), per request/stream; \
         the 2-hop proxy column is A + B.\n",
        ctx.clk_tck
    );
    let _ = writeln!(
        out,
        "{:<20} {:<12} {:>10} {:>19} {:>9} {:>9} {:>7} {:>8} {:>9} {:>9}",
        "scenario",
        "target",
        "rate/s",
        "(min..max)",
        "p50 ms",
        "p99 ms",
        "errors",
        "proxy",
        "backend",
        "client"
    );
    let _ = writeln!(
        out,
        "{:<20} {:<12} {:>10} {:>19} {:>9} {:>9} {:>7} {:>8} {:>9} {:>9}",
        "", "", "", "", "", "", "", "us CPU", "us CPU", "us CPU"
    );
    let summaries: Vec<Vec<Summary>> = results
        .iter()
        .map(|per_target| {
            per_target
                .iter()
                .zip(targets)
                .map(|(runs, target)| summarize(runs, target))
                .collect()
        })
        .collect();
    let measured = |s: usize| results[s].iter().all(|runs| !runs.is_empty());
    // One row per measured scenario: target `a` against target `b` (this build vs a baseline).
    let compare = |out: &mut String, a: usize, b: usize| {
        for (s, scenario) in SCENARIOS.iter().enumerate().filter(|(s, _)| measured(*s)) {
            let (am, bm) = (&summaries[s][a], &summaries[s][b]);
            let _ = writeln!(
                out,
                "{:<20} {:>12.2} {:>12.3} {:>12.3} {:>12.1} {:>12.1} {:>12.2}",
                scenario.name,
                am.rate / bm.rate,
                am.p50,
                bm.p50,
                am.proxy_us,
                bm.proxy_us,
                am.proxy_us / bm.proxy_us
            );
        }
    };
    for (s, scenario) in SCENARIOS.iter().enumerate().filter(|(s, _)| measured(*s)) {
        for (t, target) in targets.iter().enumerate() {
            let m = &summaries[s][t];
            let proxy = if target.pids.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", m.proxy_us)
            };
            let _ = writeln!(
                out,
                "{:<20} {:<12} {:>10.0} {:>19} {:>9.3} {:>9.3} {:>7} {:>8} {:>9.1} {:>9.1}",
                scenario.name,
                target.name,
                m.rate,
                format!("({:.0}..{:.0})", m.rate_min, m.rate_max),
                m.p50,
                m.p99,
                m.errors,
                proxy,
                m.backend_us,
                m.client_us
            );
        }
    }

    let find_target = |name: &str| targets.iter().position(|t| t.name == name);
    let (Some(d), Some(n), Some(a)) = (
        find_target("direct"),
        find_target("nginx"),
        find_target("arknet"),
    ) else {
        return out;
    };
    let _ = writeln!(
        out,
        "\n{:<20} {:>13} {:>14} {:>16} {:>13} {:>13} {:>15}",
        "scenario",
        "nginx +p50 ms",
        "arknet +p50 ms",
        "arknet-nginx ms",
        "nginx/direct",
        "arknet/direct",
        "arknet/nginx"
    );
    let _ = writeln!(
        out,
        "{:<20} {:>13} {:>14} {:>16} {:>13} {:>13} {:>15}",
        "", "(over direct)", "(over direct)", "(added p50)", "(rate)", "(rate)", "(rate)"
    );
    for (s, scenario) in SCENARIOS.iter().enumerate().filter(|(s, _)| measured(*s)) {
        let (dm, nm, am) = (&summaries[s][d], &summaries[s][n], &summaries[s][a]);
        let _ = writeln!(
            out,
            "{:<20} {:>13.3} {:>14.3} {:>16.3} {:>13.2} {:>13.2} {:>15.2}",
            scenario.name,
            nm.p50 - dm.p50,
            am.p50 - dm.p50,
            am.p50 - nm.p50,
            nm.rate / dm.rate,
            am.rate / dm.rate,
            am.rate / nm.rate
        );
    }

    let floor = find_target("pingora");
    if let Some(p) = floor {
        let _ = writeln!(
            out,
            "\nfloor: bare Pingora (client -> pingora_floor example -> backend), what the library \
             arknet is built on costs alone, vs arknet (1 hop) and nginx"
        );
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>10}",
            "scenario",
            "pingora",
            "pingora",
            "arknet/",
            "nginx/",
            "pingora",
            "arknet",
            "nginx",
            "arknet/",
            "nginx/"
        );
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>10}",
            "",
            "rate/s",
            "+p50 ms",
            "pingora",
            "pingora",
            "CPU us",
            "CPU us",
            "CPU us",
            "pingora",
            "pingora"
        );
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>10}",
            "", "", "", "(rate)", "(rate)", "", "", "", "(CPU)", "(CPU)"
        );
        for (s, scenario) in SCENARIOS.iter().enumerate().filter(|(s, _)| measured(*s)) {
            let (dm, pm, am, nm) = (
                &summaries[s][d],
                &summaries[s][p],
                &summaries[s][a],
                &summaries[s][n],
            );
            let _ = writeln!(
                out,
                "{:<20} {:>10.0} {:>10.3} {:>10.2} {:>10.2} {:>10.1} {:>10.1} {:>10.1} {:>11.2} {:>10.2}",
                scenario.name,
                pm.rate,
                pm.p50 - dm.p50,
                am.rate / pm.rate,
                nm.rate / pm.rate,
                pm.proxy_us,
                am.proxy_us,
                nm.proxy_us,
                am.proxy_us / pm.proxy_us,
                nm.proxy_us / pm.proxy_us
            );
        }
    }

    if let Some(b) = find_target("arknet base") {
        let _ = writeln!(
            out,
            "\nthis build vs the baseline binary (arknet base, ARKNET_BENCH_BASELINE), both 1 hop, same rounds"
        );
        let _ = writeln!(
            out,
            "{:<20} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "scenario",
            "rate ratio",
            "p50 ms",
            "base p50 ms",
            "CPU us/req",
            "base CPU",
            "CPU ratio"
        );
        compare(&mut out, a, b);
        if let (Some(h), Some(hb)) = (
            find_target("arknet 2-hop"),
            find_target("arknet base 2-hop"),
        ) {
            let _ = writeln!(
                out,
                "two hops: this build (arknet 2-hop) vs the baseline's (arknet base 2-hop), CPU of both nodes"
            );
            compare(&mut out, h, hb);
        }
    }

    let hop = find_target("arknet 2-hop");
    if let Some(h) = hop {
        let _ = writeln!(
            out,
            "\nmesh hop: arknet 2-hop (client -> A -> mTLS -> B -> backend) vs arknet 1-hop (client \
             -> B -> backend)"
        );
        let _ = writeln!(
            out,
            "{:<20} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8} {:>8}",
            "scenario",
            "2-hop +p50",
            "2-hop +p99",
            "2-hop/1-hop",
            "2-hop/direct",
            "1-hop CPU",
            "2-hop CPU",
            "of it A",
            "of it B"
        );
        let _ = writeln!(
            out,
            "{:<20} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8} {:>8}",
            "",
            "(ms, added)",
            "(ms, added)",
            "(rate)",
            "(rate)",
            "us/req",
            "us/req",
            "us/req",
            "us/req"
        );
        for (s, scenario) in SCENARIOS.iter().enumerate().filter(|(s, _)| measured(*s)) {
            let (dm, am, hm) = (&summaries[s][d], &summaries[s][a], &summaries[s][h]);
            let part = |p: usize| hm.proxy_parts_us.get(p).copied().unwrap_or(f64::NAN);
            let _ = writeln!(
                out,
                "{:<20} {:>12.3} {:>12.3} {:>12.2} {:>12.2} {:>10.1} {:>10.1} {:>8.1} {:>8.1}",
                scenario.name,
                hm.p50 - am.p50,
                hm.p99 - am.p99,
                hm.rate / am.rate,
                hm.rate / dm.rate,
                am.proxy_us,
                hm.proxy_us,
                part(0),
                part(1)
            );
        }
    }

    let watched: Vec<(usize, usize, &'static str)> = targets
        .iter()
        .enumerate()
        .flat_map(|(t, target)| {
            target
                .watch
                .iter()
                .enumerate()
                .map(move |(w, (label, _))| (t, w, *label))
        })
        .collect();
    if !watched.is_empty() {
        let _ = writeln!(
            out,
            "\nTCP connections opened during a timed run (median of rounds; /proc/net/tcp: client \
             ports not seen before the run; the load client's own connections are opened before it)"
        );
        let mut header = format!("{:<20}", "scenario");
        for (_, _, label) in &watched {
            let _ = write!(header, " {label:>17}");
        }
        let _ = writeln!(out, "{header}");
        for (s, scenario) in SCENARIOS.iter().enumerate().filter(|(s, _)| measured(*s)) {
            let mut row = format!("{:<20}", scenario.name);
            for (t, w, _) in &watched {
                let m = &summaries[s][*t];
                let runs = results[s][*t].len().max(1) as f64;
                let per_run = m.done as f64 / runs;
                let _ = write!(
                    row,
                    " {:>17}",
                    format!("{:.0}/{:.0} of {:.0}", m.opened[*w], m.seen[*w], per_run)
                );
            }
            let _ = writeln!(out, "{row}");
        }
        let _ = writeln!(
            out,
            "(\"N/S of M\": N connections opened during a run of M requests/streams on average, S \
             established to that server (from any client) at its end; N near 0 means pooled connections were reused)"
        );
    }

    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(out);
    let by_name = |name: &str| {
        SCENARIOS
            .iter()
            .position(|sc| sc.name == name)
            .filter(|s| measured(*s))
    };
    let note = "issue target (informational, never a failure)";
    for name in ["chat json c=1", "wrk json c=1 t=1"] {
        let Some(s) = by_name(name) else { continue };
        // Added p50 of arknet minus added p50 of nginx, both over direct.
        let gap = summaries[s][a].p50 - summaries[s][n].p50;
        let _ = writeln!(
            out,
            "{note}: {name}: arknet added p50 within 0.02 ms of nginx's: {} ({gap:+.3} ms)",
            verdict(gap <= 0.02)
        );
        if let Some(h) = hop {
            let added = summaries[s][h].p50 - summaries[s][d].p50;
            let _ = writeln!(
                out,
                "{note}: {name}: 2-hop adds at most {MESH_HOP_TARGET_MS} ms p50 over direct: {} \
                 ({added:+.3} ms; over 1-hop {:+.3} ms)",
                verdict(added <= MESH_HOP_TARGET_MS),
                summaries[s][h].p50 - summaries[s][a].p50
            );
        }
    }
    for name in ["chat json c=64", "wrk json c=64 t=2"] {
        let Some(s) = by_name(name) else { continue };
        let ratio = summaries[s][a].rate / summaries[s][n].rate;
        let _ = writeln!(
            out,
            "{note}: {name}: arknet rate >= nginx's: {} (x{ratio:.2})",
            verdict(ratio >= 1.0)
        );
    }
    if let Some(s) = by_name("sse paced 5ms c=32") {
        let gap = summaries[s][a].p50 - summaries[s][n].p50;
        let _ = writeln!(
            out,
            "{note}: paced-stream TTFB p50 within 0.2 ms of nginx's: {} ({gap:+.3} ms)",
            verdict(gap <= 0.2)
        );
    }
    for (s, sc) in SCENARIOS.iter().enumerate().filter(|(s, _)| measured(*s)) {
        let (am, nm) = (&summaries[s][a], &summaries[s][n]);
        let mut line = format!(
            "{note}: {}: arknet CPU/request <= nginx's: {} ({:.1} vs {:.1} us, x{:.2})",
            sc.name,
            verdict(am.proxy_us <= nm.proxy_us),
            am.proxy_us,
            nm.proxy_us,
            am.proxy_us / nm.proxy_us
        );
        if let Some(h) = hop {
            let hm = &summaries[s][h];
            let _ = write!(
                line,
                "; 2-hop CPU (A+B) <= 2x 1-hop: {} ({:.1} us, x{:.2})",
                verdict(hm.proxy_us <= 2.0 * am.proxy_us),
                hm.proxy_us,
                hm.proxy_us / am.proxy_us
            );
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "arknet CPU per request (median of rounds): {}",
        SCENARIOS
            .iter()
            .enumerate()
            .filter(|(s, _)| measured(*s))
            .map(|(s, sc)| {
                let hop = hop.map_or(String::new(), |h| {
                    let m = &summaries[s][h];
                    format!(
                        ", 2-hop {:.1} us = A {:.1} + B {:.1}",
                        m.proxy_us,
                        m.proxy_parts_us.first().copied().unwrap_or(f64::NAN),
                        m.proxy_parts_us.get(1).copied().unwrap_or(f64::NAN)
                    )
                });
                format!(
                    "{} {:.1} us (nginx {:.1} us{hop})",
                    sc.name, summaries[s][a].proxy_us, summaries[s][n].proxy_us
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    if let Some(p) = floor {
        for (s, sc) in SCENARIOS.iter().enumerate().filter(|(s, _)| measured(*s)) {
            let (pm, am, nm) = (&summaries[s][p], &summaries[s][a], &summaries[s][n]);
            let _ = writeln!(
                out,
                "{}: arknet CPU/req vs bare pingora: x{:.2}, nginx vs bare pingora: x{:.2} \
                 (arknet {:.1}, pingora {:.1}, nginx {:.1} us)",
                sc.name,
                am.proxy_us / pm.proxy_us,
                nm.proxy_us / pm.proxy_us,
                am.proxy_us,
                pm.proxy_us,
                nm.proxy_us
            );
        }
    }
    let done: u64 = summaries.iter().flatten().map(|m| m.done).sum();
    let errors: u64 = summaries.iter().flatten().map(|m| m.errors).sum();
    let _ = writeln!(out, "requests/streams measured: {done}, errors: {errors}");
    if settings.no_wrk {
        let _ = writeln!(
            out,
            "wrk scenarios left out: {WRK} is missing (scripts/deps.sh bench installs it)"
        );
    }
    if settings.pingora.is_none() {
        let _ = writeln!(
            out,
            "pingora target left out: build it with `cargo build --release --example pingora_floor`"
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Many slow streams held at once
// ---------------------------------------------------------------------------------------------

/// Raises this process's open-file limit to `want` (children inherit it) with util-linux's
/// `prlimit`: beyond the hard limit when allowed (root with CAP_SYS_RESOURCE), else to the hard
/// limit. Returns the soft limit in force (from `/proc/self/limits`).
fn raise_nofile(want: u64) -> u64 {
    let pid = std::process::id().to_string();
    let set = |limit: &str| {
        Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={limit}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !set(&format!("{want}:{want}")) {
        // Soft up to the hard limit, which needs no privilege.
        let hard = nofile_limits().1;
        set(&format!("{hard}:{hard}"));
    }
    nofile_limits().0
}

/// (soft, hard) open-file limits of this process; 1024 each when unreadable.
fn nofile_limits() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files"));
    let mut numbers = line
        .into_iter()
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.parse::<u64>().ok());
    (
        numbers.next().unwrap_or(1024),
        numbers.next().unwrap_or(1024),
    )
}

/// Resident set size of a process in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What one proxy did with many slow streams at once.
struct SlowReport {
    target: &'static str,
    wanted: usize,
    /// Streams whose first body byte arrived within the ramp timeout.
    opened: usize,
    ramp: Duration,
    /// RSS before the first stream, KiB.
    rss_base: u64,
    /// (streams open, RSS KiB) as the ramp crossed each quarter.
    ramp_rss: Vec<(usize, u64)>,
    /// RSS at the start and at the end of the hold, KiB.
    hold_rss: (u64, u64),
    /// Streams still open (no error, no early end) at the end of the hold.
    held: usize,
    /// Proxy CPU seconds during the hold.
    hold_cpu: f64,
    /// RSS 2 s after the client closed every stream, KiB.
    rss_after: u64,
    /// Why streams did not open: "count x reason".
    failures: Vec<String>,
}

/// Opens `n` SSE streams of `SLOW_MODEL` through `addr` from many loopback source addresses
/// (`SLOW_PER_SOURCE` each), at most 256 connecting at a time; once all have their first body
/// byte (or the ramp times out), holds them for `SLOW_HOLD` while they keep receiving chunks,
/// then closes them all. RSS of `pid` is sampled along the way. Bounded: ramp timeout + hold +
/// a few seconds.
///
/// The client ends are held by child processes of this bench ([`slow_worker`], at most
/// `SLOW_PER_WORKER` streams each), so that no process needs more sockets than its open-file
/// limit allows: this process keeps only the backend ends.
async fn slow_streams(
    target: &'static str,
    addr: SocketAddr,
    pid: u32,
    n: usize,
    bench_ip: Ipv4Addr,
    clk_tck: f64,
) -> SlowReport {
    let rss_base = rss_kib(pid);
    let (open_tx, mut open_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let (held_tx, mut held_rx) = mpsc::unbounded_channel::<usize>();
    let exe = std::env::current_exe().expect("bench executable path");
    let mut workers = Vec::new();
    for first in (0..n).step_by(SLOW_PER_WORKER) {
        let count = SLOW_PER_WORKER.min(n - first);
        let mut child = Command::new(&exe)
            .env(
                SLOW_WORKER_ENV,
                format!("{addr} {bench_ip} {first} {count}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a slow-stream worker");
        let stdout = child.stdout.take().expect("worker stdout");
        let (open_tx, held_tx) = (open_tx.clone(), held_tx.clone());
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ok" {
                    let _ = open_tx.send(Ok(()));
                } else if let Some(why) = line.strip_prefix("err ") {
                    let _ = open_tx.send(Err(why.to_string()));
                } else if let Some(k) = line.strip_prefix("held ") {
                    let _ = held_tx.send(k.parse().unwrap_or(0));
                }
            }
        });
        workers.push(Worker(child));
    }
    drop((open_tx, held_tx));
    let ramp_start = Instant::now();
    let deadline = ramp_start + SLOW_RAMP_TIMEOUT;
    let (mut opened, mut answered) = (0usize, 0usize);
    let mut failures: std::collections::BTreeMap<String, usize> = Default::default();
    let mut ramp_rss = Vec::new();
    let mut next_quarter = 1;
    while answered < n {
        let Ok(Some(result)) = tokio::time::timeout_at(deadline.into(), open_rx.recv()).await
        else {
            break;
        };
        answered += 1;
        match result {
            Ok(()) => opened += 1,
            Err(e) => *failures.entry(e).or_default() += 1,
        }
        while next_quarter <= 4 && opened >= n * next_quarter / 4 {
            ramp_rss.push((opened, rss_kib(pid)));
            next_quarter += 1;
        }
    }
    let ramp = ramp_start.elapsed();
    let failures: Vec<String> = failures
        .into_iter()
        .map(|(why, n)| format!("{n} x {why}"))
        .collect();
    let hold_start_rss = rss_kib(pid);
    let cpu_before = stat_ticks(&PathBuf::from(format!("/proc/{pid}/stat"))).map_or(0, |t| t.1);
    tokio::time::sleep(SLOW_HOLD).await;
    let cpu_after = stat_ticks(&PathBuf::from(format!("/proc/{pid}/stat"))).map_or(0, |t| t.1);
    let hold_end_rss = rss_kib(pid);
    // The end of its stdin tells a worker to close its streams and report how many it held.
    for w in &mut workers {
        drop(w.0.stdin.take());
    }
    let mut held = 0;
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        for _ in 0..workers.len() {
            match held_rx.recv().await {
                Some(k) => held += k,
                None => break,
            }
        }
    })
    .await;
    drop(workers);
    tokio::time::sleep(Duration::from_secs(2)).await;
    SlowReport {
        target,
        wanted: n,
        opened,
        ramp,
        rss_base,
        ramp_rss,
        hold_rss: (hold_start_rss, hold_end_rss),
        held,
        hold_cpu: cpu_after.saturating_sub(cpu_before) as f64 / clk_tck,
        rss_after: rss_kib(pid),
        failures,
    }
}

/// A slow-stream worker process, killed by its own PID when dropped (it has normally exited by
/// then).
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The slow-stream client worker (this bench binary started with `SLOW_WORKER_ENV` =
/// "addr bench_ip first count"): opens streams `first..first + count` of the slow phase, at
/// most 64 connecting at a time, writing `ok` or `err <why>` per stream to stdout as each gets
/// its first body byte or fails; keeps reading them until its stdin ends, then closes them
/// and writes `held <streams still open>`. Bounded: it also stops when the parent is gone
/// (stdin ends) and never runs longer than the ramp timeout + a minute.
fn slow_worker(spec: &str) {
    let mut parts = spec.split(' ');
    let mut next = || {
        parts
            .next()
            .expect("worker spec: addr bench_ip first count")
    };
    let addr: SocketAddr = next().parse().expect("worker addr");
    let bench_ip: Ipv4Addr = next().parse().expect("worker bench ip");
    let first: usize = next().parse().expect("worker first");
    let count: usize = next().parse().expect("worker count");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("worker runtime");
    let say = |line: String| {
        let mut out = io::stdout().lock();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    };
    runtime.block_on(async {
        let request: Arc<[u8]> = request_bytes(Kind::Sse, SLOW_MODEL).into();
        let (stop_tx, stop_rx) = watch::channel(false);
        let connecting = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = JoinSet::new();
        let [_, b, c, _] = bench_ip.octets();
        for i in first..first + count {
            // 127.241.b.(c+k): a /8 loopback address of its own per SLOW_PER_SOURCE connections.
            let k = (i / SLOW_PER_SOURCE) as u32;
            let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 241, b, c)) + k);
            let request = request.clone();
            let connecting = connecting.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let permit = connecting.acquire_owned().await;
                let started = tokio::time::timeout(
                    REQUEST_TIMEOUT * 2,
                    open_slow_stream(source, addr, &request),
                )
                .await;
                drop(permit);
                let mut stream = match started {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        say(format!("err {e}\n"));
                        return false;
                    }
                    Err(_) => {
                        say("err no first body byte in time\n".to_string());
                        return false;
                    }
                };
                say("ok\n".to_string());
                // Keep reading (and dropping) the chunks until told to stop; an end or an error
                // before that means the stream was not held.
                let mut buf = [0u8; 2048];
                loop {
                    tokio::select! {
                        read = stream.read(&mut buf) => match read {
                            Ok(0) | Err(_) => return false,
                            Ok(_) => {}
                        },
                        _ = stop.wait_for(|s| *s) => return true,
                    }
                }
            });
        }
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = io::stdin().read_to_end(&mut sink);
        });
        let _ =
            tokio::time::timeout(SLOW_RAMP_TIMEOUT + Duration::from_secs(60), stdin_closed).await;
        let _ = stop_tx.send(true);
        let mut held = 0;
        let closing = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(done) = tasks.join_next().await {
                held += usize::from(done.unwrap_or(false));
            }
        })
        .await;
        if closing.is_err() {
            tasks.abort_all();
        }
        say(format!("held {held}\n"));
    });
}

/// Connects from `source`, sends `request` and reads until the first body byte of a 200 answer.
async fn open_slow_stream(
    source: Ipv4Addr,
    addr: SocketAddr,
    request: &[u8],
) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(request).await?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&head, b"\r\n\r\n") {
            if parse_head(&head[..end])?.status != 200 {
                return Err(invalid("slow stream not answered 200"));
            }
            if head.len() > end + 4 {
                return Ok(stream);
            }
        }
        if head.len() > 64 * 1024 {
            return Err(invalid("response head too long"));
        }
    }
}

fn render_slow(reports: &[SlowReport], wanted: usize, nofile: u64) -> String {
    let mut out = String::new();
    if reports.is_empty() {
        return out;
    }
    let n = reports.first().map_or(0, |r| r.wanted);
    let _ = writeln!(
        out,
        "\nslow streams: {n} SSE streams at once ({} chunks {} ms apart) through each proxy, \
         {SLOW_PER_SOURCE} per client source address; RSS of the proxy process from /proc \
         (VmRSS); hold {} s.{}",
        CHUNKS,
        SLOW_PACE.as_millis(),
        SLOW_HOLD.as_secs(),
        if n < wanted {
            format!(" ({wanted} asked; open-file limit {nofile} allows {n})")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "{:<8} {:>7} {:>7} {:>7} {:>9} {:>24} {:>11} {:>11} {:>10} {:>10} {:>12}",
        "target",
        "opened",
        "held",
        "ramp s",
        "RSS base",
        "RSS at 1/4 2/4 3/4 4/4",
        "hold start",
        "hold end",
        "after",
        "KiB per",
        "hold CPU"
    );
    let _ = writeln!(
        out,
        "{:<8} {:>7} {:>7} {:>7} {:>9} {:>24} {:>11} {:>11} {:>10} {:>10} {:>12}",
        "", "", "", "", "MiB", "(MiB)", "MiB", "MiB", "MiB", "stream", "us/stream/s"
    );
    let mib = |k: u64| k as f64 / 1024.0;
    for r in reports {
        let ramp: Vec<String> = r
            .ramp_rss
            .iter()
            .map(|(_, k)| format!("{:.0}", mib(*k)))
            .collect();
        let per_stream = r.hold_rss.1.saturating_sub(r.rss_base) as f64 / r.opened.max(1) as f64;
        let cpu = r.hold_cpu * 1e6 / (r.held.max(1) as f64 * SLOW_HOLD.as_secs_f64());
        let _ = writeln!(
            out,
            "{:<8} {:>7} {:>7} {:>7.1} {:>9.1} {:>24} {:>11.1} {:>11.1} {:>10.1} {:>10.1} {:>12.1}",
            r.target,
            r.opened,
            r.held,
            r.ramp.as_secs_f64(),
            mib(r.rss_base),
            ramp.join(" "),
            mib(r.hold_rss.0),
            mib(r.hold_rss.1),
            mib(r.rss_after),
            per_stream,
            cpu
        );
    }
    for r in reports.iter().filter(|r| !r.failures.is_empty()) {
        let _ = writeln!(
            out,
            "{}: streams that did not open: {}",
            r.target,
            r.failures.join("; ")
        );
    }
    let _ = writeln!(
        out,
        "(KiB per stream = (RSS at hold end - RSS base) / streams opened; flat memory means the \
         quarters grow evenly and hold start = hold end; held = streams still open, receiving, \
         at the end of the hold)"
    );
    out
}
