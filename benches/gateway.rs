//! Load benchmark: the same fake backend served directly, through nginx, and through arknet.
//!
//! One run, interleaved: every round runs each scenario against each target (in a rotating
//! order), so machine noise lands on all three alike; the tables report medians across rounds
//! and ratios. Run with `cargo bench --bench gateway`; see `benches/README.md` for the knobs.
//!
//! Everything listens on 127.0.0.0/8 only, every child process is ended by its own PID (also
//! when the bench panics), and the whole run is bounded (about 2 minutes by default).

#[path = "../tests/support/fake_backend.rs"]
mod fake_backend;

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
/// Tokens per reply: SSE streams carry this many content chunks; JSON replies this many tokens.
const CHUNKS: usize = 64;
const NGINX: &str = "/usr/sbin/nginx";
const ARKNET: &str = env!("CARGO_BIN_EXE_arknet");
/// Upper bound for one request/stream; a slower one counts as an error and its connection is
/// dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounded wait for a started process to serve.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two measured runs, so closing connections settle.
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    stream: bool,
    concurrency: usize,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "chat json c=1",
        stream: false,
        concurrency: 1,
    },
    Scenario {
        name: "chat json c=64",
        stream: false,
        concurrency: 64,
    },
    Scenario {
        name: "sse 64 chunks c=32",
        stream: true,
        concurrency: 32,
    },
];

/// Knobs, from the environment, clamped so the run stays bounded.
struct Settings {
    rounds: usize,
    run: Duration,
    warmup: Duration,
    /// `[api] threads` for arknet; `None` leaves its default (one per CPU core).
    arknet_threads: Option<usize>,
    /// Scenarios to run (all by default): indexes into `SCENARIOS`.
    scenarios: Vec<usize>,
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
        let scenarios: Vec<usize> = (0..SCENARIOS.len())
            .filter(|&s| SCENARIOS[s].name.contains(only.as_str()))
            .collect();
        assert!(
            !scenarios.is_empty(),
            "ARKNET_BENCH_SCENARIO={only:?} matches no scenario"
        );
        Settings {
            rounds,
            run: Duration::from_secs_f64(secs),
            warmup: Duration::from_millis(300),
            arknet_threads,
            scenarios,
        }
    }
}

fn main() {
    let settings = Settings::from_env();
    let clk_tck = clock_ticks_per_second();
    let ip = bench_ip();

    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(ip),
        FakeConfig::both(&[MODEL])
            .record(false)
            .chunks(CHUNKS)
            .chunk_delay(Duration::ZERO),
    );
    let nginx = start_nginx(ip, backend.addr);
    let arknet = start_arknet(ip, &backend.url(), settings.arknet_threads);

    let targets = [
        Target {
            name: "direct",
            addr: backend.addr,
            pid: None,
        },
        Target {
            name: "nginx",
            addr: nginx.addr,
            pid: Some(nginx.pid()),
        },
        Target {
            name: "arknet",
            addr: arknet.addr,
            pid: Some(arknet.pid()),
        },
    ];

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

    let mut nginx = nginx;
    let mut arknet = arknet;
    nginx.assert_alive();
    arknet.assert_alive();
    let report = render_report(
        &settings,
        &targets,
        &results,
        &Context {
            clk_tck,
            total,
            nginx_threads: thread_count(nginx.pid()),
            arknet_threads: thread_count(arknet.pid()),
            backend_workers: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        },
    );
    io::stdout()
        .write_all(report.as_bytes())
        .expect("write report to stdout");
    drop(arknet);
    drop(nginx);
    drop(backend);
}

// ---------------------------------------------------------------------------------------------
// Targets and the processes behind them
// ---------------------------------------------------------------------------------------------

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The proxy process whose CPU time is measured; `None` for the in-process backend.
    pid: Option<u32>,
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
        let request = chat_request(false);
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
         events {{ worker_connections 4096; }}\n\
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

/// The built release `arknet` with a generated config: one Ollama-kind backend, room for 1024
/// requests in flight, everything else at its default.
fn start_arknet(ip: Ipv4Addr, backend_url: &str, threads: Option<usize>) -> Proc {
    let dir = tempfile::tempdir().expect("arknet tempdir");
    let addr = SocketAddr::from((ip, free_port(ip)));
    let threads = threads.map_or(String::new(), |t| format!("threads = {t}\n"));
    let conf = format!(
        "data_dir = {:?}\n\n[api]\nlisten = \"{addr}\"\n{threads}\n[[backends]]\nname = \"bench\"\n\
         kind = \"ollama\"\nurl = {backend_url:?}\nmax_concurrent = 1024\n",
        dir.path().join("data").display().to_string()
    );
    let conf_path = dir.path().join("arknet.toml");
    std::fs::write(&conf_path, conf).expect("write arknet.toml");
    let log = dir.path().join("arknet.log");
    let out = std::fs::File::create(&log).expect("arknet log file");
    let child = Command::new(ARKNET)
        .arg("serve")
        .arg("--config")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("arknet log fd"))
        .stderr(out)
        .spawn()
        .expect("spawn arknet");
    let mut proc = Proc {
        name: "arknet",
        addr,
        child,
        log,
        _dir: dir,
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    let health = b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
    while probe_status(addr, health) != Some(200) {
        proc.assert_alive();
        assert!(
            Instant::now() < deadline,
            "arknet /health not 200 within {READY_TIMEOUT:?}; log:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // /health answers before the model catalog has listed the backend; wait for a real reply.
    proc.wait_ready();
    proc
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

fn chat_request(stream: bool) -> Vec<u8> {
    let body = format!(
        "{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":{stream}}}"
    );
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc
// ---------------------------------------------------------------------------------------------

/// `getconf CLK_TCK` (the crate has no libc binding to call sysconf); 100 if that fails, which
/// is the value on every mainstream Linux.
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

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

#[derive(Clone, Copy, Default)]
struct CpuTicks {
    /// The proxy process (all its threads).
    proxy: u64,
    /// Threads of this process running the fake backend.
    backend: u64,
    /// Every other thread of this process: the load generator.
    client: u64,
}

fn cpu_ticks(proxy: Option<u32>) -> CpuTicks {
    let mut ticks = CpuTicks {
        proxy: proxy
            .and_then(|pid| stat_ticks(&PathBuf::from(format!("/proc/{pid}/stat"))))
            .map_or(0, |(_, t)| t),
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
    /// CPU seconds spent during the run.
    proxy_cpu: f64,
    backend_cpu: f64,
    client_cpu: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }

    /// Nearest-rank percentile in ms.
    fn percentile_ms(&self, p: f64) -> f64 {
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
    let request: Arc<[u8]> = chat_request(scenario.stream).into();
    let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(scenario.concurrency);
    let mut workers = JoinSet::new();
    for _ in 0..scenario.concurrency {
        workers.spawn(worker(
            target.addr,
            request.clone(),
            scenario.stream,
            ready_tx.clone(),
            start_rx.clone(),
        ));
    }
    drop(ready_tx);
    while ready_rx.recv().await.is_some() {}

    let before = cpu_ticks(target.pid);
    let start = Instant::now();
    start_tx
        .send(Some(start + duration))
        .expect("workers hold the start receiver");
    let mut run = Run {
        done: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        proxy_cpu: 0.0,
        backend_cpu: 0.0,
        client_cpu: 0.0,
    };
    while let Some(joined) = workers.join_next().await {
        let stats = joined.expect("bench worker panicked");
        run.done += stats.done;
        run.errors += stats.errors;
        run.latencies.extend(stats.latencies);
    }
    run.elapsed = start.elapsed();
    let after = cpu_ticks(target.pid);
    run.latencies.sort_unstable();
    let secs = |a: u64, b: u64| a.saturating_sub(b) as f64 / clk_tck;
    run.proxy_cpu = secs(after.proxy, before.proxy);
    run.backend_cpu = secs(after.backend, before.backend);
    run.client_cpu = secs(after.client, before.client);
    run
}

struct WorkerStats {
    done: u64,
    errors: u64,
    latencies: Vec<u64>,
}

async fn worker(
    addr: SocketAddr,
    request: Arc<[u8]>,
    stream: bool,
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
        match tokio::time::timeout(REQUEST_TIMEOUT, c.exchange(&request, stream)).await {
            Ok(Ok(reply)) => {
                if reply.status == 200 && reply.body_ok {
                    let at = if stream {
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

    async fn exchange(&mut self, request: &[u8], stream: bool) -> io::Result<Reply> {
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
            body_ok: body_complete(&self.body, stream),
        })
    }
}

/// The last token is present (and, for SSE, the `[DONE]` sentinel); only the tail is scanned.
fn body_complete(body: &[u8], stream: bool) -> bool {
    let tail = &body[body.len().saturating_sub(1024)..];
    let last_token = format!("tok{} ", CHUNKS - 1);
    find(tail, last_token.as_bytes()).is_some()
        && (!stream || find(tail, b"data: [DONE]").is_some())
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
    arknet_threads: Option<u64>,
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
    proxy_us: f64,
    backend_us: f64,
    client_us: f64,
}

fn summarize(runs: &[Run]) -> Summary {
    let rates: Vec<f64> = runs.iter().map(Run::rate).collect();
    Summary {
        rate: median(rates.clone()),
        rate_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
        rate_max: rates.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        p50: median(runs.iter().map(|r| r.percentile_ms(50.0)).collect()),
        p99: median(runs.iter().map(|r| r.percentile_ms(99.0)).collect()),
        errors: runs.iter().map(|r| r.errors).sum(),
        done: runs.iter().map(|r| r.done).sum(),
        proxy_us: median(runs.iter().map(|r| r.per_request_us(r.proxy_cpu)).collect()),
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
    let _ = writeln!(
        out,
        "limits: these {cpus} CPU(s) are shared by the client (1 thread), the fake backend ({} tokio \
         workers), nginx (1 worker process, master_process off; {} threads) and arknet (api threads \
         {arknet_cfg}; {} threads in all). Absolute numbers are capped by that sharing; compare ratios.",
        ctx.backend_workers,
        threads(ctx.nginx_threads),
        threads(ctx.arknet_threads),
    );
    let _ = writeln!(
        out,
        "JSON rows: latency of the whole exchange. SSE rows: rate is streams/s, p50/p99 are time to \
         first body byte. CPU from /proc utime+stime at CLK_TCK={} (getconf), per request/stream.\n",
        ctx.clk_tck
    );
    let _ = writeln!(
        out,
        "{:<20} {:<7} {:>10} {:>19} {:>9} {:>9} {:>7} {:>8} {:>9} {:>9}",
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
        "{:<20} {:<7} {:>10} {:>19} {:>9} {:>9} {:>7} {:>8} {:>9} {:>9}",
        "", "", "", "", "", "", "", "us CPU", "us CPU", "us CPU"
    );
    let summaries: Vec<Vec<Summary>> = results
        .iter()
        .map(|per_target| per_target.iter().map(|runs| summarize(runs)).collect())
        .collect();
    let measured = |s: usize| results[s].iter().all(|runs| !runs.is_empty());
    for (s, scenario) in SCENARIOS.iter().enumerate().filter(|(s, _)| measured(*s)) {
        for (t, target) in targets.iter().enumerate() {
            let m = &summaries[s][t];
            let proxy = if target.pid.is_some() {
                format!("{:.1}", m.proxy_us)
            } else {
                "-".to_string()
            };
            let _ = writeln!(
                out,
                "{:<20} {:<7} {:>10.0} {:>19} {:>9.3} {:>9.3} {:>7} {:>8} {:>9.1} {:>9.1}",
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
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(out);
    if measured(0) {
        // Added p50 of arknet minus added p50 of nginx, both over direct.
        let gap = summaries[0][a].p50 - summaries[0][n].p50;
        let _ = writeln!(
            out,
            "issue target (informational, never a failure): c=1 arknet added p50 within 0.1 ms of \
             nginx's: {} ({gap:+.3} ms)",
            verdict(gap <= 0.1)
        );
    }
    if measured(1) {
        let ratio = summaries[1][a].rate / summaries[1][n].rate;
        let _ = writeln!(
            out,
            "issue target (informational, never a failure): c=64 arknet rate >= nginx's: {} \
             (x{ratio:.2})",
            verdict(ratio >= 1.0)
        );
    }
    let _ = writeln!(
        out,
        "arknet CPU per request (median of rounds): {}",
        SCENARIOS
            .iter()
            .enumerate()
            .filter(|(s, _)| measured(*s))
            .map(|(s, sc)| format!(
                "{} {:.1} us (nginx {:.1} us)",
                sc.name, summaries[s][a].proxy_us, summaries[s][n].proxy_us
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let done: u64 = summaries.iter().flatten().map(|m| m.done).sum();
    let errors: u64 = summaries.iter().flatten().map(|m| m.errors).sum();
    let _ = writeln!(out, "requests/streams measured: {done}, errors: {errors}");
    out
}
