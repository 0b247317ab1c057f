//! The mesh listener's security matrix: more than a thousand hostile or out-of-bounds attempts,
//! each answered with its documented status, none reaching the backend.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use serde_json::json;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{assert_eventually, loopback_ip, BackendSpec, NodeProc, NodeSpec};
use support::mesh::{self, As};

const MODEL: &str = "llama3.1:8b";
const OTHER: &str = "qwen3.5:35b";
const ROUNDS: usize = 100;

fn chat(model: &str) -> Option<String> {
    Some(
        json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": false})
            .to_string(),
    )
}

fn idle_node() -> NodeProc {
    NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(
        "http://127.0.0.1:9",
    )))
}

/// Sends `ROUNDS` copies of `item` as `who` and checks every status.
fn attempt(
    target: &NodeProc,
    who: Option<&As>,
    item: (&str, &str, Option<String>),
    want: u16,
    what: &str,
) -> usize {
    let items = vec![item; ROUNDS];
    let statuses = mesh::batch(target.mesh, who, &items);
    assert_eq!(
        statuses.len(),
        ROUNDS,
        "{what}: curl answered {} of {ROUNDS}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| *s == want),
        "{what}: expected {want}, got {statuses:?}"
    );
    ROUNDS
}

#[test]
fn hostile_and_out_of_bounds_peer_requests_never_reach_the_backend() {
    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::both(&[MODEL, OTHER])
            .chunks(40)
            .chunk_delay(Duration::from_millis(50)),
    );
    let mut a = NodeProc::start(
        &NodeSpec::with_backend(BackendSpec::ollama(backend.url()).max_concurrent(8))
            .api("max_body_bytes = 4096"),
    );
    let approved = idle_node();
    let stranger = idle_node();
    let revoked = idle_node();
    let no_inference = idle_node();
    a.approve(&approved, &[MODEL], 1);
    a.approve(&revoked, &[MODEL], 1);
    a.revoke(&revoked);
    let rsp = a.post(
        "/peers/approve",
        &json!({"node_id": no_inference.node_id(), "public_key": no_inference.public_key(),
                "permissions": {"can_request_inference": false, "models_shared": [MODEL]}}),
    );
    assert_eq!(rsp.status, 200);
    assert_eventually(Duration::from_secs(5), "catalog knows the models", || {
        a.get("/api/tags").text().contains(MODEL)
    });

    let mut attempts = 0;
    attempts += attempt(
        &a,
        None,
        ("POST", "/api/chat", chat(MODEL)),
        403,
        "no client certificate",
    );
    attempts += attempt(
        &a,
        As::node(&stranger).as_ref(),
        ("POST", "/api/chat", chat(MODEL)),
        403,
        "unknown key",
    );
    attempts += attempt(
        &a,
        As::node(&revoked).as_ref(),
        ("POST", "/v1/chat/completions", chat(MODEL)),
        403,
        "revoked key",
    );
    attempts += attempt(
        &a,
        As::node(&no_inference).as_ref(),
        ("POST", "/api/generate", chat(MODEL)),
        403,
        "no inference permission",
    );
    attempts += attempt(
        &a,
        As::node(&approved).as_ref(),
        ("POST", "/api/chat", chat(OTHER)),
        403,
        "model not shared",
    );
    attempts += attempt(
        &a,
        As::node(&stranger).as_ref(),
        ("GET", "/mesh/v1/hello", None),
        403,
        "hello from a stranger",
    );

    // A stranger claiming the approved peer's node id: ids prove nothing, keys do.
    let spoof_id = approved.node_id();
    let mut spoofed = 0;
    for _ in 0..ROUNDS {
        let out = std::process::Command::new("curl")
            .args(["-s", "-k", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("x-arknet-node-id: {spoof_id}"))
            .args(["--cert"])
            .arg(stranger.tls_files().1)
            .args(["--key"])
            .arg(stranger.tls_files().0)
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(chat(MODEL).expect("body"))
            .arg(format!("https://{}/api/chat", a.mesh))
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
        spoofed += 1;
    }
    attempts += spoofed;

    // A chain whose leaf was not issued by the identity it carries: the handshake is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let forged_chain = dir.path().join("forged.crt");
    let stranger_chain = std::fs::read_to_string(stranger.tls_files().1).expect("chain");
    let approved_chain = std::fs::read_to_string(approved.tls_files().1).expect("chain");
    let leaf = stranger_chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .expect("leaf");
    let approved_identity = approved_chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .nth(1)
        .expect("identity");
    std::fs::write(&forged_chain, format!("{leaf}{approved_identity}")).expect("write");
    let forged = As {
        key: stranger.tls_files().0,
        chain: forged_chain,
    };
    attempts += attempt(
        &a,
        Some(&forged),
        ("POST", "/api/chat", chat(MODEL)),
        0,
        "forged chain (TLS refused)",
    );

    // Bodies out of bounds from the approved peer.
    let huge = json!({"model": MODEL, "prompt": "x".repeat(10_000)}).to_string();
    attempts += attempt(
        &a,
        As::node(&approved).as_ref(),
        ("POST", "/api/generate", Some(huge)),
        413,
        "oversized body",
    );
    attempts += attempt(
        &a,
        As::node(&approved).as_ref(),
        ("POST", "/api/generate", Some("{not json".into())),
        400,
        "malformed body",
    );

    // Not TLS at all, or TLS garbage.
    for i in 0..ROUNDS {
        let mut s = TcpStream::connect(a.mesh).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let garbage: Vec<u8> = if i % 2 == 0 {
            b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}".to_vec()
        } else {
            [0x16, 0x03, 0x01, 0xff, 0xff]
                .iter()
                .copied()
                .chain((0..200).map(|b| b as u8))
                .collect()
        };
        let _ = s.write_all(&garbage);
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(
            !String::from_utf8_lossy(&buf[..n]).contains("200 OK"),
            "plaintext got an answer"
        );
        attempts += 1;
    }

    // Concurrency over the grant (1): one long stream in flight, then more requests -> 429.
    let hits_before = backend.hits();
    let long_as = As::node(&approved);
    let mesh_addr = a.mesh;
    let long = std::thread::spawn(move || {
        let body = json!({"model": MODEL, "prompt": "long", "stream": true}).to_string();
        mesh::call(
            mesh_addr,
            long_as.as_ref(),
            "POST",
            "/api/generate",
            Some(&body),
        )
    });
    assert_eventually(
        Duration::from_secs(5),
        "the long stream is in flight",
        || backend.in_flight() == 1,
    );
    attempts += attempt(
        &a,
        As::node(&approved).as_ref(),
        ("POST", "/api/chat", chat(MODEL)),
        429,
        "over the grant",
    );
    let (status, _) = long.join().expect("long stream");
    assert_eq!(status, 200);

    assert!(attempts >= 1000, "matrix has {attempts} attempts");
    assert_eq!(
        backend.hits(),
        hits_before + 1,
        "only the one legitimate stream reached the backend"
    );
    assert_eq!(hits_before, 0, "no refused attempt reached the backend");
    assert!(a.alive() && a.get("/health").status == 200);
    let pending = a.get("/peers/pending").json();
    let stranger_key = stranger.public_key();
    assert!(
        pending["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .any(|p| p["public_key"] == stranger_key.as_str()),
        "the stranger that connected is pending: {pending}"
    );
    let metrics = a.get("/metrics").text();
    assert!(
        metrics.contains("arknet_mesh_refused_total{reason=\"peer_not_approved\"}"),
        "{metrics}"
    );
    eprintln!(
        "security matrix: {attempts} attempts, backend hits {}",
        backend.hits()
    );
}

#[test]
fn a_node_pinned_to_one_key_refuses_another_at_that_address() {
    let (a, b, c) = (idle_node(), idle_node(), idle_node());
    // a approves b's key but is told b lives at c's address: c cannot prove b's key.
    let rsp = a.post(
        "/peers/approve",
        &json!({"node_id": b.node_id(), "public_key": b.public_key(), "endpoint": c.mesh.to_string(),
                "permissions": {"models_shared": [MODEL]}}),
    );
    assert_eq!(rsp.status, 200);
    assert_eventually(Duration::from_secs(10), "spoof detected", || {
        a.get("/peers/status").json()["peers"][0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("spoof"))
    });
    let status = a.get("/peers/status").json();
    assert_eq!(status["peers"][0]["reachable"], false, "{status}");
    assert!(a
        .get("/metrics")
        .text()
        .lines()
        .any(|l| l.starts_with("arknet_mesh_spoofs_total") && !l.ends_with(" 0")));
}
