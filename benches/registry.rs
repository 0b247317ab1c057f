//! Registry at scale (issue #13): a database holding 1,000,000 signed records (each advertising
//! 3 of 1,000 model names), then
//!
//! 1. look-ups by model (first page, 100 records) — in process through the store, and end to
//!    end over HTTPS against a real `arknet registry serve` (answers signature-checked);
//! 2. signed heartbeats per second — in process (binding read, full validation with Ed25519
//!    verify, upsert transaction) and end to end over HTTPS.
//!
//! Run: `cargo bench --bench registry` (release; not in CI). `ARKNET_BENCH_RECORDS` changes the
//! record count, `ARKNET_BENCH_DATABASE=postgres://...` runs on PostgreSQL instead of a SQLite
//! file in a temp dir. Prints medians, p99 and rates (on stderr).

#[path = "../tests/support/child.rs"]
#[allow(dead_code)] // the bench needs only the CPU time
mod child;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arknet::registry::client::RegistryClient;
use arknet::registry::record::{
    validate_binding, validate_write, Policy, Record, SignedRecord, Signer,
};
use arknet::registry::store::Store;

const MODELS: usize = 1000;
const LOOKUPS: usize = 2000;
const HEARTBEAT_SECS: u64 = 10;
const WRITERS: usize = 16;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn signer(n: u64) -> Signer {
    let mut seed = [3u8; 32];
    seed[..8].copy_from_slice(&n.to_le_bytes());
    Signer::from_seed(&seed).expect("seed")
}

fn record(n: u64, s: &Signer, seq: u64, t: u64) -> SignedRecord {
    let m = n as usize;
    Record {
        node_id: format!("bench-{n}"),
        public_key: s.public_key().to_string(),
        endpoint: format!("10.{}.{}.{}:7443", (n >> 16) & 255, (n >> 8) & 255, n & 255),
        models: vec![
            format!("model-{}", m % MODELS),
            format!("model-{}", (m * 7 + 1) % MODELS),
            format!("model-{}", (m * 13 + 2) % MODELS),
        ],
        seq,
        issued_at: t,
        // Fill records outlive a week of re-runs; heartbeats (seq > 1) stay within the
        // policy's maximum TTL.
        expires: if seq == 1 { t + 7 * 86_400 } else { t + 3000 },
    }
    .sign(s)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    eprintln!(
        "{name}: n={} p50={:.3} ms p99={:.3} ms max={:.3} ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
}

fn random(state: &mut u64) -> u64 {
    // xorshift: reproducible, no dependency.
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Fills the store with `count` signed records (signing on two threads while the previous
/// batch is written), unless it already holds that many live records: a kept database
/// (`ARKNET_BENCH_DATABASE=sqlite:/some/file`) is filled once and reused across runs.
async fn populate(store: &Store, count: u64) {
    let live = store.count_live(now()).await.expect("count");
    if live >= count {
        eprintln!("populate: reusing the {live} live records already stored");
        return;
    }
    let started = Instant::now();
    let t = now();
    let batch = 10_000u64;
    let sign = move |n: u64| {
        let end = (n + batch).min(count);
        let half = n + (end - n) / 2;
        tokio::task::spawn(async move {
            let a = tokio::task::spawn_blocking(move || {
                (n..half)
                    .map(|i| record(i, &signer(i), 1, t))
                    .collect::<Vec<_>>()
            });
            let b = tokio::task::spawn_blocking(move || {
                (half..end)
                    .map(|i| record(i, &signer(i), 1, t))
                    .collect::<Vec<_>>()
            });
            let mut records = a.await.expect("sign");
            records.extend(b.await.expect("sign"));
            records
        })
    };
    let mut next = sign(0);
    let mut n = 0;
    while n < count {
        let records: Vec<SignedRecord> = next.await.expect("sign");
        n += records.len() as u64;
        next = sign(n);
        store.put_many(&records, true).await.expect("put_many");
    }
    eprintln!(
        "populate: {count} signed records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

async fn store_lookups(store: &Store) {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut samples = Vec::with_capacity(LOOKUPS);
    let t = now();
    for _ in 0..LOOKUPS {
        let model = format!("model-{}", random(&mut rng) as usize % MODELS);
        let started = Instant::now();
        let page = store.by_model(&model, "", 100, t).await.expect("by_model");
        samples.push(started.elapsed());
        // With a million records every model fills its first page.
        assert!(!page.is_empty(), "{model}");
    }
    report("store look-up by model (100 per page)", samples);
}

/// Heartbeats signed ahead of the timed phase, as the nodes would sign them on their own
/// machines: `per_writer` for each of the [`WRITERS`], spread over the stored records, each
/// with a seq above anything stored before (also on a kept database).
async fn presign(count: u64, per_writer: u64) -> Vec<Vec<SignedRecord>> {
    let started = Instant::now();
    let seq = now() * 1000;
    let mut lanes = Vec::new();
    for w in 0..WRITERS as u64 {
        lanes.push(tokio::task::spawn_blocking(move || {
            (0..per_writer)
                .map(|i| {
                    let n = (w + i * WRITERS as u64) % count;
                    // A lane that wraps round the records signs the next round one seq higher.
                    let round = (w + i * WRITERS as u64) / count;
                    record(n, &signer(n), seq + round, now())
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut out = Vec::new();
    for lane in lanes {
        out.push(lane.await.expect("sign"));
    }
    eprintln!(
        "pre-signed {} heartbeats in {:.1} s",
        per_writer * WRITERS as u64,
        started.elapsed().as_secs_f64()
    );
    out
}

/// Sums the writers' (accepted, refused) counts.
async fn tally(mut tasks: tokio::task::JoinSet<(u64, u64)>) -> (u64, u64) {
    let (mut total, mut refused) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (d, f) = r.expect("writer");
        total += d;
        refused += f;
    }
    (total, refused)
}

/// Heartbeats each writer may send in the timed phase (more than 10 s can use at 10,000/s).
const PER_WRITER: u64 = 7_500;

async fn store_heartbeats(store: Arc<Store>, count: u64) {
    let policy = Policy {
        allow_private: true,
        max_ttl: 3600,
        ..Policy::default()
    };
    let lanes = presign(count, PER_WRITER).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(HEARTBEAT_SECS);
    let mut tasks = tokio::task::JoinSet::new();
    for lane in lanes {
        let store = store.clone();
        let policy = policy.clone();
        tasks.spawn(async move {
            let (mut done, mut refused) = (0u64, 0u64);
            for hb in lane {
                if Instant::now() >= deadline {
                    break;
                }
                // What the registry does for a heartbeat: the checks that need no read
                // (Ed25519 verify included), then the conditional update in a group commit;
                // the full path (binding read, checks, upsert) only if that did not apply.
                if validate_write(&hb, None, None, now(), &policy).is_err() {
                    refused += 1;
                    continue;
                }
                if store.heartbeat(&hb).await.expect("heartbeat") {
                    done += 1;
                    continue;
                }
                let (stored, owner) = store
                    .binding(&hb.record.public_key, &hb.record.node_id)
                    .await
                    .expect("binding");
                if validate_binding(&hb, stored.as_ref(), owner.as_deref()).is_ok() {
                    store
                        .put(&hb, true, stored.as_ref().map(|s| s.models.as_str()))
                        .await
                        .expect("put");
                    done += 1;
                } else {
                    refused += 1;
                }
            }
            (done, refused)
        });
    }
    let (total, refused) = tally(tasks).await;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "store signed heartbeats: {total} in {secs:.1} s = {:.0}/s ({refused} refused; \
         {WRITERS} writers; checks and commit as the registry does them, signed beforehand)",
        total as f64 / secs
    );
}

struct Registry {
    child: std::process::Child,
    url: String,
    ca: std::path::PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry(dir: &std::path::Path, database: &str) -> Registry {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let (cert_path, key_path) = (dir.join("r.crt"), dir.join("r.key"));
    std::fs::write(&cert_path, cert.pem()).expect("cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("key");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let config = dir.join("registry.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ndatabase = \"{database}\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\nallow_private = true\nmax_ttl_secs = 3600\n\
             reachability_check = false\nwrites_per_key_per_minute = 0\n\
             writes_per_address_per_minute = 0\nlog_level = \"warn\"\n",
            dir.join("data").display(),
            cert_path.display(),
            key_path.display()
        ),
    )
    .expect("config");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_arknet"))
        .args(["registry", "serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn registry");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Registry {
        child,
        url: format!("https://localhost:{port}"),
        ca: cert_path,
    }
}

async fn http_lookups(reg: &Registry) {
    let client = RegistryClient::new(&reg.url, Some(&reg.ca), None).expect("client");
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut samples = Vec::with_capacity(LOOKUPS);
    for _ in 0..LOOKUPS {
        let model = random(&mut rng) as usize % MODELS;
        let started = Instant::now();
        let a = client
            .call(
                "GET",
                &format!("/registry/v1/records?model=model-{model}&limit=100"),
                None,
            )
            .await
            .expect("look-up");
        samples.push(started.elapsed());
        assert_eq!(a.status, 200);
    }
    report(
        "HTTPS look-up by model (100 per page, answer signature verified)",
        samples,
    );
}

async fn http_heartbeats(reg: &Registry, count: u64) {
    let lanes = presign(count, PER_WRITER).await;
    let (server_cpu, client_cpu) = (
        child::cpu_time(reg.child.id()),
        child::cpu_time(std::process::id()),
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(HEARTBEAT_SECS);
    let mut tasks = tokio::task::JoinSet::new();
    for lane in lanes {
        let client = RegistryClient::new(&reg.url, Some(&reg.ca), None).expect("client");
        tasks.spawn(async move {
            let (mut done, mut refused) = (0u64, 0u64);
            for hb in lane {
                if Instant::now() >= deadline {
                    break;
                }
                let body = serde_json::to_vec(&hb).expect("json");
                match client
                    .call("POST", "/registry/v1/heartbeat", Some(&body))
                    .await
                {
                    Ok(a) if a.status == 200 => done += 1,
                    _ => refused += 1,
                }
            }
            (done, refused)
        });
    }
    let (total, refused) = tally(tasks).await;
    let secs = started.elapsed().as_secs_f64();
    let per = |cpu: Duration| cpu.as_secs_f64() * 1e6 / total.max(1) as f64;
    eprintln!(
        "HTTPS signed heartbeats: {total} accepted ({refused} failed) in {secs:.1} s = {:.0}/s \
         ({WRITERS} keep-alive clients on the same 2 cores, answers' signatures verified); \
         CPU per heartbeat: registry {:.0} us, clients {:.0} us",
        total as f64 / secs,
        per(child::cpu_time(reg.child.id()) - server_cpu),
        per(child::cpu_time(std::process::id()) - client_cpu),
    );
}

/// The same heartbeats from Debian's `wrk` (2 threads, 16 keep-alive TLS connections): a
/// standard load generator that spends far less CPU per request than the bench's clients
/// (it does not verify the answers' signatures), so more of the 2 cores go to the registry.
async fn wrk_heartbeats(reg: &Registry, count: u64) {
    const WRK: &str = "/usr/bin/wrk";
    if !std::path::Path::new(WRK).exists() {
        eprintln!("wrk heartbeats: skipped, no {WRK}");
        return;
    }
    let lanes = presign(count, PER_WRITER).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bodies = dir.path().join("bodies.ndjson");
    let mut text = String::new();
    // Interleaved lanes: consecutive lines belong to different nodes.
    for i in 0..PER_WRITER as usize {
        for lane in &lanes {
            text.push_str(&serde_json::to_string(&lane[i]).expect("json"));
            text.push('\n');
        }
    }
    std::fs::write(&bodies, text).expect("bodies");
    // Each wrk thread sends every other line, each once.
    let script = dir.path().join("heartbeat.lua");
    std::fs::write(
        &script,
        format!(
            "local threads = 0\n\
             function setup(thread) threads = threads + 1; thread:set('id', threads) end\n\
             function init(args)\n  bodies = {{}}; next_body = 1; local n = 0\n\
               for line in io.lines('{}') do\n\
                 if n % 2 == id - 1 then bodies[#bodies + 1] = line end\n    n = n + 1\n  end\nend\n\
             function request()\n  local b = bodies[next_body]\n\
               next_body = next_body % #bodies + 1\n\
               return wrk.format('POST', '/registry/v1/heartbeat', \
                 {{['Content-Type'] = 'application/json', ['Host'] = 'localhost'}}, b)\nend\n",
            bodies.display()
        ),
    )
    .expect("script");
    let server_cpu = child::cpu_time(reg.child.id());
    let out = std::process::Command::new(WRK)
        .args(["-t2", "-c16", &format!("-d{HEARTBEAT_SECS}s"), "-s"])
        .arg(&script)
        .arg(&reg.url)
        .output()
        .expect("run wrk");
    let server_cpu = child::cpu_time(reg.child.id()) - server_cpu;
    let report = String::from_utf8_lossy(&out.stdout);
    let number_after = |label: &str| -> Option<f64> {
        let line = report.lines().find(|l| l.contains(label))?;
        line.split_whitespace()
            .find_map(|w| w.trim_end_matches(',').parse::<f64>().ok())
    };
    let (Some(total), Some(secs)) = (
        number_after("requests in"),
        report
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split("requests in ").nth(1))
            .and_then(|t| t.split('s').next())
            .and_then(|t| t.parse::<f64>().ok()),
    ) else {
        panic!(
            "unreadable wrk report:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let failed = number_after("Non-2xx").unwrap_or(0.0);
    let accepted = total - failed;
    eprintln!(
        "wrk signed heartbeats: {accepted:.0} accepted ({failed:.0} failed) in {secs:.1} s = \
         {:.0}/s (wrk -t2 -c16 on the same 2 cores); registry CPU per heartbeat {:.0} us",
        accepted / secs,
        server_cpu.as_secs_f64() * 1e6 / accepted.max(1.0)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument that is not ours is ignored.
    let count: u64 = std::env::var("ARKNET_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let database = std::env::var("ARKNET_BENCH_DATABASE")
        .unwrap_or_else(|_| format!("sqlite:{}", dir.path().join("registry.db").display()));
    eprintln!(
        "registry bench: {count} records on {}",
        arknet::registry::redact(&database)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let store = rt.block_on(async {
        let store = Store::open(&database).await.expect("open");
        populate(&store, count).await;
        store_lookups(&store).await;
        store
    });
    let store = Arc::new(store);
    rt.block_on(store_heartbeats(store.clone(), count));
    rt.block_on(store.close());
    let reg = start_registry(dir.path(), &database);
    rt.block_on(async {
        http_lookups(&reg).await;
        http_heartbeats(&reg, count).await;
        wrk_heartbeats(&reg, count).await;
    });
}
