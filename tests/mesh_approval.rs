//! Two nodes serve each other's inference over mutual TLS, only after approval and only within
//! the permissions granted; revocation is immediate.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{assert_eventually, loopback_ip, BackendSpec, NodeProc, NodeSpec};
use support::mesh::{self, As};

fn node_with_backend(models: &[&str]) -> (FakeBackend, NodeProc) {
    let backend = FakeBackend::start_in_thread(IpAddr::V4(loopback_ip()), FakeConfig::both(models));
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(backend.url())));
    (backend, node)
}

#[test]
fn approved_peer_runs_shared_models_and_nothing_else() {
    let (backend_a, a) = node_with_backend(&["llama3.1:8b", "qwen3.5:35b"]);
    let (_backend_b, b) = node_with_backend(&["mistral"]);
    let as_b = As::node(&b);

    let (status, body) = mesh::chat(a.mesh, as_b.as_ref(), "llama3.1:8b");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("peer_not_approved"), "{body}");
    assert_eventually(Duration::from_secs(5), "b listed as pending on a", || {
        a.get("/peers/pending").json()["peers"]
            .as_array()
            .is_some_and(|p| {
                p.iter()
                    .any(|s| s["public_key"] == b.public_key().as_str() && s["state"] == "pending")
            })
    });
    assert_eq!(backend_a.hits(), 0);

    a.approve(&b, &["llama3.1:8b"], 2);
    let (status, body) = mesh::chat(a.mesh, as_b.as_ref(), "llama3.1:8b");
    assert_eq!(status, 200, "{body}");
    assert_eq!(backend_a.hits(), 1);

    let (status, body) = mesh::chat(a.mesh, as_b.as_ref(), "qwen3.5:35b");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not shared with you"), "{body}");

    let (status, body) = mesh::call(a.mesh, as_b.as_ref(), "GET", "/api/tags", None);
    assert_eq!(status, 200);
    let tags: serde_json::Value = serde_json::from_str(&body).expect("json");
    let names: Vec<&str> = tags["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["llama3.1:8b"],
        "a peer sees only what is shared with it"
    );

    let (status, body) = mesh::call(a.mesh, as_b.as_ref(), "GET", "/mesh/v1/hello", None);
    assert_eq!(status, 200, "{body}");
    let hello: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(hello["public_key"], a.public_key().as_str());
    assert_eq!(hello["models"][0]["name"], "llama3.1:8b");
    assert_eq!(hello["models"][0]["free_slots"], 2);

    a.revoke(&b);
    let (status, _) = mesh::chat(a.mesh, as_b.as_ref(), "llama3.1:8b");
    assert_eq!(status, 403);
    assert_eq!(
        backend_a.hits(),
        1,
        "nothing after the revocation reached the backend"
    );
}

#[test]
fn peer_status_shows_reachability_latency_and_shared_models() {
    let (_ba, a) = node_with_backend(&["llama3.1:8b"]);
    // A name no hello may carry (over 256 bytes) on B's backend is left out of B's hello to
    // A; the rest of the hello still arrives.
    let long = format!("hf.co/{}:Q4_K_M", "x".repeat(300));
    let (_bb, b) = node_with_backend(&["mistral", "phi", &long]);
    a.approve(&b, &["llama3.1:8b"], 1);
    b.approve(&a, &["mistral", &long], 3);
    assert_eventually(
        Duration::from_secs(10),
        "a sees b reachable with mistral",
        || {
            let st = a.get("/peers/status").json();
            let p = &st["peers"][0];
            p["reachable"] == true && p["models_shared_with_us"][0]["name"] == "mistral"
        },
    );
    let st = a.get("/peers/status").json();
    assert!(
        st["peers"][0]["latency_ms"]
            .as_f64()
            .is_some_and(|l| l > 0.0),
        "{st}"
    );
    assert_eq!(st["peers"][0]["models_shared_with_us"][0]["free_slots"], 3);
    assert_eq!(
        st["peers"][0]["models_shared_with_us"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{st}"
    );
    assert!(st["peers"][0]["error"].is_null(), "{st}");
}

#[test]
fn revoking_a_peer_ends_its_stream_within_a_second() {
    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::both(&["llama3.1:8b"])
            .chunks(100)
            .chunk_delay(Duration::from_millis(50)),
    );
    let a = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(backend.url())));
    let b = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(
        "http://127.0.0.1:9",
    )));
    a.approve(&b, &["llama3.1:8b"], 1);
    let as_b = As::node(&b);
    let mesh_addr = a.mesh;
    let stream = std::thread::spawn(move || {
        let body = json!({"model": "llama3.1:8b", "prompt": "long story"}).to_string();
        let out = mesh::call(
            mesh_addr,
            as_b.as_ref(),
            "POST",
            "/api/generate",
            Some(&body),
        );
        (out, std::time::Instant::now())
    });
    assert_eventually(Duration::from_secs(5), "stream in flight", || {
        backend.in_flight() == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    let revoked_at = std::time::Instant::now();
    a.revoke(&b);
    let ((status, body), ended_at) = stream.join().expect("stream thread");
    let took = ended_at.duration_since(revoked_at);
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(1),
        "stream ended {took:?} after the revocation"
    );
    let last = body.lines().last().expect("lines");
    assert!(
        last.contains("\"error\"") && last.contains("revoked"),
        "last line: {last}"
    );
    assert!(body.lines().count() < 100, "the stream was cut short");
    assert_eventually(Duration::from_secs(2), "backend released", || {
        backend.in_flight() == 0
    });
}
