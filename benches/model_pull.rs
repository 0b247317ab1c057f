//! Model sharing throughput: the same blob fetched from node B's mutual-TLS mesh listener
//! (`GET /mesh/v1/models/blob`, as a pulling peer asks for it) and from nginx over HTTPS on the
//! same machine, with the same client (curl, TLS 1.3, P-256 certificates on both), interleaved
//! rounds, medians and the ratio; then one whole `arknet models pull` (parallel Range parts,
//! sha256, install into a fake Ollama); then the owner's local inference latency on node B,
//! idle and while a peer pulls at full speed.
//!
//! `cargo bench --bench model_pull` (release). Knobs: `ARKNET_PULL_BENCH_MB` (blob size,
//! default 512), `ARKNET_PULL_BENCH_ROUNDS` (default 3). Loopback only; every child process is
//! ended by its own PID.

#[path = "../tests/support/blobs.rs"]
mod blobs;
#[path = "../tests/support/fake_backend.rs"]
mod fake_backend;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_backend::{FakeBackend, FakeConfig};

const ARKNET: &str = env!("CARGO_BIN_EXE_arknet");

/// A line of the report on stdout (the bench's product).
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
const NGINX: &str = "/usr/sbin/nginx";
const MB: f64 = 1_000_000.0;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One HTTP/1.1 request with `Connection: close`: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Node {
    api: SocketAddr,
    mesh: SocketAddr,
    config: PathBuf,
    data: PathBuf,
    _proc: Proc,
}

fn start_node(dir: &Path, name: &str, ip: Ipv4Addr, backend: &str, extra: &str) -> Node {
    let api = SocketAddr::from((ip, free_port(ip)));
    let mesh = SocketAddr::from((ip, free_port(ip)));
    let data = dir.join(format!("{name}-data"));
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlog_level = \"warn\"\n[api]\nlisten = \"{api}\"\n[mesh]\nlisten = \"{mesh}\"\nhello_interval_secs = 1\n[upstream]\nmodels_refresh_secs = 1\n\n[[backends]]\nname = \"ollama\"\nkind = \"ollama\"\nurl = \"http://{backend}\"\nmax_concurrent = 64\nreserved_local_slots = 0\n{extra}\n",
            data.display().to_string()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let child = Command::new(ARKNET)
        .args(["serve", "--no-mdns", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn arknet");
    let node = Node {
        api,
        mesh,
        config,
        data,
        _proc: Proc(child),
    };
    wait_until("node health", || {
        http(api, "GET", "/health", "").is_some_and(|(s, _)| s == 200)
    });
    node
}

fn health(node: &Node, key: &str) -> String {
    let (_, body) = http(node.api, "GET", "/health", "").expect("health");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v[key].as_str().expect("field").to_string()
}

fn approve(owner: &Node, peer: &Node, models: &[&str], pulls: bool) {
    let body = serde_json::json!({
        "node_id": health(peer, "node_id"),
        "public_key": health(peer, "public_key"),
        "endpoint": peer.mesh.to_string(),
        "permissions": {"can_request_inference": true, "can_pull_models": pulls,
                        "models_shared": models, "max_concurrent_requests": 4},
    });
    let (status, text) =
        http(owner.api, "POST", "/peers/approve", &body.to_string()).expect("approve");
    assert_eq!(status, 200, "{text}");
}

/// curl downloads `url` to /dev/null: bytes per second.
fn curl_rate(url: &str, extra: &[&str]) -> f64 {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "--max-time",
            "300",
            "-o",
            "/dev/null",
            "-w",
            "%{speed_download} %{http_code}",
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut it = text.split_whitespace();
    let rate: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let code = it.next().unwrap_or("?");
    assert!(
        code == "200",
        "curl {url}: HTTP {code} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rate
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// `n` owner chats on node B's API, one after another: latencies in ms.
fn owner_chats(api: SocketAddr, n: usize) -> Vec<f64> {
    let body =
        r#"{"model":"bench-model","stream":false,"messages":[{"role":"user","content":"hi"}]}"#;
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let (status, text) = http(api, "POST", "/api/chat", body).expect("chat");
            assert_eq!(status, 200, "{text}");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

fn main() {
    let size_mb: u64 = std::env::var("ARKNET_PULL_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let rounds: usize = std::env::var("ARKNET_PULL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let ip = Ipv4Addr::new(127, 0, 0, 1 + (std::process::id() % 200 + 20) as u8);
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path();

    // The model: one weights blob of random bytes in an Ollama models dir.
    let models = root.join("models");
    std::fs::create_dir_all(models.join("blobs")).expect("mkdir");
    let tmp = models.join("blobs/tmp");
    blobs::random_file(&tmp, size_mb * 1_000_000, 0x9e37_79b9_7f4a_7c15);
    let hex = blobs::sha256_hex(&tmp);
    let blob_name = format!("sha256-{hex}");
    std::fs::rename(&tmp, models.join("blobs").join(&blob_name)).expect("rename");
    let manifest = serde_json::json!({"schemaVersion": 2, "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": size_mb * 1_000_000}]});
    let mdir = models.join("manifests/registry.ollama.ai/library/bench");
    std::fs::create_dir_all(&mdir).expect("mkdir");
    std::fs::write(mdir.join("latest"), manifest.to_string()).expect("manifest");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (fake_b, fake_a) = rt.block_on(async {
        let cfg = || FakeConfig::ollama(&["bench-model"]).record(false);
        (
            FakeBackend::start(IpAddr::V4(ip), cfg()).await,
            FakeBackend::start(IpAddr::V4(ip), cfg()).await,
        )
    });
    let b = start_node(
        root,
        "b",
        ip,
        &fake_b.addr.to_string(),
        &format!("models_dir = {:?}", models.display().to_string()),
    );
    let a = start_node(root, "a", ip, &fake_a.addr.to_string(), "");
    approve(&b, &a, &["bench"], true);
    approve(&a, &b, &[], false);
    wait_until("A learns B's offer", || {
        http(a.api, "GET", "/peers/status", "").is_some_and(|(_, t)| t.contains("bench:latest"))
    });

    // nginx over HTTPS on the same blobs dir, with a P-256 certificate like the mesh's.
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    std::fs::write(root.join("nginx.crt"), cert.cert.pem()).expect("crt");
    std::fs::write(root.join("nginx.key"), cert.signing_key.serialize_pem()).expect("key");
    let nginx_addr = SocketAddr::from((ip, free_port(ip)));
    std::fs::write(
        root.join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/nginx-error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n access_log off;\n client_body_temp_path {root}/nginx-tmp;\n server {{\n  listen {nginx_addr} ssl;\n  ssl_certificate {root}/nginx.crt;\n  ssl_certificate_key {root}/nginx.key;\n  ssl_protocols TLSv1.3;\n  root {blobs};\n }}\n}}\n",
            root = root.display(),
            blobs = models.join("blobs").display()
        ),
    )
    .expect("nginx.conf");
    let _nginx = Proc(
        Command::new(NGINX)
            .args(["-p"])
            .arg(root)
            .arg("-c")
            .arg(root.join("nginx.conf"))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx"),
    );
    let nginx_url = format!("https://{nginx_addr}/{blob_name}");
    wait_until("nginx serves", || {
        Command::new("curl")
            .args([
                "-sk",
                "-o",
                "/dev/null",
                "-r",
                "0-0",
                "-w",
                "%{http_code}",
                &nginx_url,
            ])
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"206"))
    });

    let id = a.data.join("identity");
    let (cert_arg, key_arg) = (
        id.join("tls-chain.crt").display().to_string(),
        id.join("tls.key").display().to_string(),
    );
    let mesh_url = format!(
        "https://{}/mesh/v1/models/blob?model=bench&digest=sha256:{hex}",
        b.mesh
    );
    let mesh_args = [
        "--cert",
        cert_arg.as_str(),
        "--key",
        key_arg.as_str(),
        "-H",
        "x-arknet-protocol: 1",
    ];

    out!(
        "model_pull bench: {size_mb} MB blob, {rounds} rounds, loopback {ip}, curl client, TLS 1.3"
    );
    let (mut mesh, mut web) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so page-cache and noise fall on both alike.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_mesh in order {
            if is_mesh {
                mesh.push(curl_rate(&mesh_url, &mesh_args));
            } else {
                web.push(curl_rate(&nginx_url, &[]));
            }
        }
        out!(
            "  round {}: arknet mesh {:.0} MB/s, nginx https {:.0} MB/s",
            round + 1,
            mesh[round] / MB,
            web[round] / MB
        );
    }
    let (m, n) = (median(&mut mesh), median(&mut web));
    out!(
        "single stream, median: arknet mesh (mTLS) {:.0} MB/s, nginx (HTTPS) {:.0} MB/s, ratio {:.2} (target >= 0.80)",
        m / MB,
        n / MB,
        m / n
    );

    // One whole pull: parallel Range parts (2 streams), sha256, POST /api/blobs + /api/create.
    let t = Instant::now();
    let out = Command::new(ARKNET)
        .args([
            "models",
            "pull",
            "bench",
            "--api",
            &a.api.to_string(),
            "--config",
        ])
        .arg(&a.config)
        .output()
        .expect("arknet models pull");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out!(
        "arknet models pull (download in parts + sha256 + install into a fake Ollama): {size_mb} MB in {secs:.1} s = {:.0} MB/s end to end",
        size_mb as f64 / secs
    );

    // The owner's own inference on B, idle and while A pulls from B at full speed.
    let n_chats = 60;
    let _ = owner_chats(b.api, 10);
    let mut idle = owner_chats(b.api, n_chats);
    let stop = Arc::new(AtomicBool::new(false));
    let pullers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, url) = (stop.clone(), mesh_url.clone());
            let args: Vec<String> = mesh_args.iter().map(|s| s.to_string()).collect();
            std::thread::spawn(move || {
                let mut rates = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                    rates.push(curl_rate(&url, &refs));
                }
                rates
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut busy = owner_chats(b.api, n_chats);
    stop.store(true, Ordering::SeqCst);
    let rates: Vec<f64> = pullers
        .into_iter()
        .flat_map(|p| p.join().unwrap_or_default())
        .collect();
    out!(
        "  the pull during the owner's chats: {} downloads, {:.0} MB/s each on average",
        rates.len(),
        rates.iter().sum::<f64>() / rates.len().max(1) as f64 / MB
    );
    out!(
        "owner chat on B (fake Ollama backend, {n_chats} sequential): idle p50 {:.2} ms p99 {:.2} ms; during a 2-stream pull p50 {:.2} ms p99 {:.2} ms",
        percentile(&mut idle, 0.5),
        percentile(&mut idle, 0.99),
        percentile(&mut busy, 0.5),
        percentile(&mut busy, 0.99),
    );
    drop(a);
    drop(b);
    drop(rt);
}
