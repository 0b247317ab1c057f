//! Grid routing across real nodes: a model only a peer has is served through the local API as
//! if it were local; a busy or dead candidate is skipped before the first byte; forwarded
//! requests carry nothing outside the allow-list; both ends audit every peer request.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{json, Value};
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{assert_eventually, loopback_ip, share, Ark, BackendSpec, NodeProc, NodeSpec};
use support::http;

fn ark(
    models: &[&str],
    max_concurrent: usize,
    config: impl FnOnce(FakeConfig) -> FakeConfig,
) -> Ark {
    Ark::start(config(FakeConfig::both(models)), max_concurrent)
}

fn chat(model: &str) -> Value {
    json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hello grid"}]})
}

fn audit(node: &NodeProc) -> Vec<Value> {
    node.get("/audit?limit=100").json()["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_model_only_a_peer_has_is_served_through_the_local_api_without_client_identity() {
    let a = ark(&["llama3.1:8b"], 4, |c| c);
    let b = ark(&["qwen3.5:35b"], 4, |c| c);
    share(&b, &a, &["qwen3.5:35b"], 2);

    let listing = a.node.get("/v1/models").json();
    let qwen = listing["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|m| m["id"] == "qwen3.5:35b")
        .cloned()
        .expect("qwen listed on a");
    assert_eq!(qwen["arknet"]["local"], false);
    assert_eq!(qwen["arknet"]["peers"][0], b.node.node_id().as_str());
    let tags = a.node.get("/api/tags").json();
    assert!(tags["models"]
        .as_array()
        .expect("models")
        .iter()
        .any(|m| m["name"] == "qwen3.5:35b"));

    let mut body = chat("qwen3.5:35b");
    body["user"] = json!("alice@example.com");
    body["metadata"] = json!({"chat_id": "c-42"});
    body["messages"][0]["name"] = json!("Alice");
    let rsp = http::request(
        a.node.api,
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer sk-local-secret"),
            ("Cookie", "session=abc"),
            ("X-OpenWebUI-User-Email", "alice@example.com"),
            ("X-OpenWebUI-User-Name", "Alice"),
            ("X-Forwarded-For", "192.168.1.23"),
            ("Via", "1.1 nginx"),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["object"], "chat.completion");
    assert_eq!((a.backend.hits(), b.backend.hits()), (0, 1));

    let seen = b
        .backend
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == "/v1/chat/completions")
        .expect("b's backend got it");
    let sent: Value = seen.json().expect("json body");
    assert_eq!(
        sent,
        json!({"model": "qwen3.5:35b", "stream": false, "messages": [{"role": "user", "content": "hello grid"}]})
    );
    for (name, value) in &seen.headers {
        let lower = value.to_ascii_lowercase();
        assert!(
            ["host", "content-type", "content-length"].contains(&name.as_str()),
            "unexpected header reached the peer's backend: {name}: {value}"
        );
        assert!(
            !lower.contains("alice") && !lower.contains("sk-local") && !lower.contains("192.168"),
            "{name}: {value}"
        );
    }

    // The audit line is written once the relay has finished, just after the client has read
    // the last byte.
    assert_eventually(Duration::from_secs(5), "audit lines on both ends", || {
        audit(&a.node).len() == 1 && audit(&b.node).len() == 1
    });
    let out = audit(&a.node);
    let inn = audit(&b.node);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["direction"], "outbound");
    assert_eq!(out[0]["peer"], b.node.node_id().as_str());
    assert_eq!(out[0]["model"], "qwen3.5:35b");
    assert_eq!(out[0]["status"], 200);
    assert_eq!(out[0]["prompt_tokens"], 2);
    assert_eq!(inn.len(), 1);
    assert_eq!(inn[0]["direction"], "inbound");
    assert_eq!(inn[0]["peer"], a.node.node_id().as_str());
    assert_eq!(inn[0]["completion_tokens"], 8);
    let text = std::fs::read_to_string(b.node.data_dir.join("audit.log")).expect("audit.log");
    assert!(
        !text.contains("hello grid") && !text.contains("tok0"),
        "no prompt or response text in the audit log"
    );
}

#[test]
fn a_busy_local_backend_sends_the_request_to_a_peer() {
    let a = ark(&["qwen3.5:35b"], 1, |c| {
        c.chunks(30).chunk_delay(Duration::from_millis(50))
    });
    let b = ark(&["qwen3.5:35b"], 4, |c| c);
    share(&b, &a, &["qwen3.5:35b"], 2);
    let api = a.node.api;
    let long = std::thread::spawn(move || {
        http::post_json(
            api,
            "/api/generate",
            &json!({"model": "qwen3.5:35b", "prompt": "long"}),
        )
    });
    assert_eventually(Duration::from_secs(5), "a's backend busy", || {
        a.backend.in_flight() == 1
    });
    let rsp = a.node.post("/api/chat", &chat("qwen3.5:35b"));
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(b.backend.hits(), 1, "the second request went to the peer");
    assert_eq!(long.join().expect("long").status, 200);
    assert_eq!(a.backend.max_in_flight(), 1);
}

#[test]
fn a_dead_peer_is_skipped_before_the_first_byte_with_no_client_errors() {
    let a = ark(&["llama3.1:8b"], 4, |c| c);
    let mut b = ark(&["qwen3.5:35b"], 4, |c| c);
    let c = ark(&["qwen3.5:35b"], 4, |c| c);
    share(&b, &a, &["qwen3.5:35b"], 4);
    share(&c, &a, &["qwen3.5:35b"], 4);
    b.node.kill();
    let mut ok = 0;
    for _ in 0..10 {
        let rsp = a.node.post("/api/chat", &chat("qwen3.5:35b"));
        assert_eq!(rsp.status, 200, "client saw an error: {}", rsp.text());
        ok += 1;
    }
    assert_eq!(ok, 10);
    assert_eq!(c.backend.hits(), 10);
    let _ = &mut b;
}

#[test]
fn a_peer_that_dies_mid_stream_ends_the_stream_with_an_error_event() {
    let a = ark(&["llama3.1:8b"], 4, |c| c);
    let b = ark(&["qwen3.5:35b"], 4, |c| {
        c.chunks(60).chunk_delay(Duration::from_millis(50))
    });
    share(&b, &a, &["qwen3.5:35b"], 2);
    let api = a.node.api;
    let client = std::thread::spawn(move || {
        let body = json!({"model": "qwen3.5:35b", "stream": true, "messages": [{"role": "user", "content": "x"}]});
        let rsp = http::post_json(api, "/v1/chat/completions", &body);
        (rsp, std::time::Instant::now())
    });
    assert_eventually(Duration::from_secs(5), "stream under way", || {
        b.backend.in_flight() == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    let killed = std::time::Instant::now();
    let Ark { backend, mut node } = b;
    node.kill();
    let (rsp, ended) = client.join().expect("client");
    assert!(
        ended.duration_since(killed) < Duration::from_secs(1),
        "stream hung after the peer died"
    );
    assert_eq!(rsp.status, 200);
    let last = rsp.lines().last().cloned().unwrap_or_default();
    assert!(last.starts_with("data: {\"error\""), "last event: {last}");
    drop(backend);
}

#[test]
fn peers_get_only_the_slots_beyond_the_owners_reservation() {
    // b: 2 slots, 1 reserved for b's own clients; a may use 1.
    let a = ark(&["llama3.1:8b"], 4, |c| c);
    let b = ark(&["qwen3.5:35b"], 2, |c| {
        c.chunks(20).chunk_delay(Duration::from_millis(50))
    });
    share(&b, &a, &["qwen3.5:35b"], 4);
    let b_api = b.node.api;
    let local = std::thread::spawn(move || {
        http::post_json(
            b_api,
            "/api/generate",
            &json!({"model": "qwen3.5:35b", "prompt": "owner"}),
        )
    });
    assert_eventually(Duration::from_secs(5), "owner's request in flight", || {
        b.backend.in_flight() == 1
    });
    // One slot is left but it is reserved: the peer is refused at once (503 after failover).
    let rsp = a.node.post("/api/chat", &chat("qwen3.5:35b"));
    assert_eq!(rsp.status, 503, "{}", rsp.text());
    assert!(rsp.header("retry-after").is_some());
    // The owner still gets the reserved slot.
    let mine = b.node.post("/api/chat", &chat("qwen3.5:35b"));
    assert_eq!(mine.status, 200, "{}", mine.text());
    assert_eq!(local.join().expect("local").status, 200);
}

#[test]
fn a_peer_cannot_make_the_owner_load_a_model_beyond_the_guest_vram_budget() {
    // b has "small" loaded (~0.7 GB); loading "big" (~0.7 GB) too would exceed 1000 MB.
    let backend_b = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::both(&["small", "big"]).loaded(&["small"]),
    );
    let b = Ark {
        node: NodeProc::start(&NodeSpec::with_backend(
            BackendSpec::ollama(backend_b.url()).toml("guest_vram_budget_mb = 1000"),
        )),
        backend: backend_b,
    };
    let a = ark(&["llama3.1:8b"], 4, |c| c);
    share(&b, &a, &["small", "big"], 2);
    let as_a = support::mesh::As::node(&a.node);
    let (status, body) = support::mesh::call(
        b.node.mesh,
        as_a.as_ref(),
        "POST",
        "/api/chat",
        Some(&chat("big").to_string()),
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("VRAM"), "{body}");
    assert_eq!(
        a.node.post("/api/chat", &chat("big")).status,
        503,
        "through the grid too"
    );
    assert_eq!(
        b.backend.hits(),
        0,
        "the refused loads never reached the backend"
    );
    assert_eq!(
        a.node.post("/api/chat", &chat("small")).status,
        200,
        "a loaded model is fine"
    );
    assert_eq!(
        b.node.post("/api/chat", &chat("big")).status,
        200,
        "the owner is not limited"
    );
    assert_eq!(b.backend.hits(), 2);
}

#[test]
fn an_ollama_request_is_translated_for_a_peer_that_only_speaks_openai() {
    let a = ark(&["llama3.1:8b"], 4, |c| c);
    let backend_b =
        FakeBackend::start_in_thread(IpAddr::V4(loopback_ip()), FakeConfig::openai(&["smollm2"]));
    let b = Ark {
        node: NodeProc::start(&NodeSpec::with_backend(BackendSpec::openai(
            backend_b.url(),
        ))),
        backend: backend_b,
    };
    share(&b, &a, &["smollm2"], 2);
    let tags = a.node.get("/api/tags").json();
    assert!(
        tags["models"]
            .as_array()
            .expect("models")
            .iter()
            .any(|m| m["name"] == "smollm2"),
        "{tags}"
    );
    let rsp = a.node.post(
        "/api/chat",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let lines = rsp.lines();
    let last: Value = serde_json::from_str(lines.last().expect("lines")).expect("ndjson");
    assert_eq!(last["done"], true, "{lines:?}");
    assert_eq!(last["eval_count"], 8);
    assert_eq!(b.backend.hits(), 1);
    let seen = b
        .backend
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == "/v1/chat/completions")
        .expect("b's backend got OpenAI");
    assert!(seen
        .json()
        .is_some_and(|v| v["messages"][0]["content"] == "hi"));
}

#[test]
fn a_clean_shutdown_leaves_every_audit_line_on_disk() {
    // Audit lines are written in batches by a background thread; neither SIGTERM (graceful)
    // nor SIGINT (Pingora's quick shutdown, Ctrl-C) may lose the last batch (the nodes exit
    // right after the last request, inside one batch window).
    for signal in ["TERM", "INT"] {
        shutdown_keeps_audit_lines(signal);
    }
}

fn shutdown_keeps_audit_lines(signal: &str) {
    let a = ark(&["llama3.1:8b"], 4, |c| c);
    let b = ark(&["qwen3.5:35b"], 4, |c| c);
    share(&b, &a, &["qwen3.5:35b"], 2);
    const N: usize = 20;
    for _ in 0..N {
        let rsp = a.node.post("/v1/chat/completions", &chat("qwen3.5:35b"));
        assert_eq!(rsp.status, 200, "{}", rsp.text());
    }
    let Ark {
        node: mut a_node,
        backend: a_backend,
    } = a;
    let Ark {
        node: mut b_node,
        backend: b_backend,
    } = b;
    a_node.signal(signal);
    b_node.signal(signal);
    assert_eventually(Duration::from_secs(15), "both nodes exited", || {
        !a_node.alive() && !b_node.alive()
    });
    let lines = |node: &NodeProc, direction: &str| {
        std::fs::read_to_string(node.data_dir.join("audit.log"))
            .expect("audit.log")
            .lines()
            .filter(|l| l.contains(&format!("\"direction\":\"{direction}\"")))
            .count()
    };
    assert_eq!(lines(&a_node, "outbound"), N, "SIG{signal}");
    assert_eq!(lines(&b_node, "inbound"), N, "SIG{signal}");
    drop((a_backend, b_backend));
}
