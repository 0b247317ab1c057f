//! Both API dialects round-trip through a node to its backends: chat, generate/completions,
//! embeddings, show, listings, streamed and not.

mod support;

use std::net::IpAddr;

use serde_json::json;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{loopback_ip, BackendSpec, NodeProc, NodeSpec};

struct Setup {
    ollama: FakeBackend,
    openai: FakeBackend,
    node: NodeProc,
}

fn setup() -> Setup {
    let ollama = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        // Real Ollama serves its own API and the OpenAI one.
        FakeConfig::both(&["llama3.1:8b", "qwen3.5:35b"]),
    );
    let openai = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::openai(&["smollm2-135m"]),
    );
    let node = NodeProc::start(
        &NodeSpec::with_backend(BackendSpec::ollama(ollama.url()))
            .backend(BackendSpec::openai(openai.url())),
    );
    Setup {
        ollama,
        openai,
        node,
    }
}

#[test]
fn ollama_chat_streams_ndjson_from_the_ollama_backend() {
    let s = setup();
    let rsp = s.node.post(
        "/api/chat",
        &json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hello there"}]}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert!(rsp
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/x-ndjson")));
    let lines = rsp.lines();
    assert_eq!(lines.len(), 9, "8 tokens and the final line: {lines:?}");
    let last: serde_json::Value =
        serde_json::from_str(lines.last().expect("lines")).expect("json line");
    assert_eq!(last["done"], true);
    assert_eq!(last["prompt_eval_count"], 2);
    assert_eq!(s.ollama.hits(), 1);
    assert_eq!(s.openai.hits(), 0);
    let seen = &s.ollama.requests()[s.ollama.requests().len() - 1];
    assert_eq!(seen.path, "/api/chat");
    assert_eq!(
        seen.header("host"),
        Some(s.ollama.addr.to_string().as_str()),
        "Host is rewritten for the backend"
    );
}

#[test]
fn ollama_generate_and_show_and_embeddings_round_trip() {
    let s = setup();
    let rsp = s.node.post(
        "/api/generate",
        &json!({"model": "qwen3.5:35b", "prompt": "why", "stream": false}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["done"], true);
    assert!(rsp.json()["response"]
        .as_str()
        .is_some_and(|r| r.starts_with("tok0")));

    let rsp = s.node.post(
        "/api/embed",
        &json!({"model": "llama3.1:8b", "input": ["a b", "c"]}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["embeddings"].as_array().map(Vec::len), Some(2));

    let rsp = s.node.post(
        "/api/embeddings",
        &json!({"model": "llama3.1:8b", "prompt": "a b"}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert!(rsp.json()["embedding"].is_array());

    let rsp = s.node.post("/api/show", &json!({"name": "llama3.1:8b"}));
    assert_eq!(rsp.status, 200, "{}", rsp.text());
}

#[test]
fn openai_chat_streams_sse_with_usage_and_done_marker() {
    let s = setup();
    let rsp = s.node.post(
        "/v1/chat/completions",
        &json!({"model": "smollm2-135m", "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "one two three"}]}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert!(rsp
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let lines = rsp.lines();
    assert_eq!(lines.last().map(String::as_str), Some("data: [DONE]"));
    let usage = lines
        .iter()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("usage chunk");
    assert_eq!(usage["usage"]["prompt_tokens"], 3);
    assert_eq!(s.openai.hits(), 1);
}

#[test]
fn openai_routes_reach_ollama_models_too() {
    let s = setup();
    let rsp = s.node.post(
        "/v1/chat/completions",
        &json!({"model": "llama3.1:8b", "messages": []}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["object"], "chat.completion");
    assert_eq!((s.ollama.hits(), s.openai.hits()), (1, 0));

    let rsp = s.node.post(
        "/v1/completions",
        &json!({"model": "smollm2-135m", "prompt": "hi"}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["object"], "text_completion");

    let rsp = s.node.post(
        "/v1/embeddings",
        &json!({"model": "smollm2-135m", "input": "hello"}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["data"][0]["object"], "embedding");
}

#[test]
fn listings_merge_every_backend_in_both_dialects() {
    let s = setup();
    let ids = |v: serde_json::Value, list: &str, key: &str| -> Vec<String> {
        let mut ids: Vec<String> = v[list]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|m| m[key].as_str().map(str::to_string))
            .collect();
        ids.sort();
        ids
    };
    let all = ["llama3.1:8b", "qwen3.5:35b", "smollm2-135m"];
    support::grid::assert_eventually(
        std::time::Duration::from_secs(5),
        "catalog lists all models",
        || ids(s.node.get("/v1/models").json(), "data", "id") == all,
    );
    assert_eq!(ids(s.node.get("/api/tags").json(), "models", "name"), all);
    let tags = s.node.get("/api/tags").json();
    assert!(tags["models"]
        .as_array()
        .expect("models")
        .iter()
        .all(|m| m["details"].is_object()));
    let ps = s.node.get("/api/ps");
    assert_eq!(ps.status, 200);
    assert!(ps.json()["models"].is_array());
    assert!(s.node.get("/api/version").json()["version"].is_string());
}

#[test]
fn ollama_clients_reach_an_openai_only_model_through_translation() {
    let s = setup();
    // Streamed chat: SSE from the backend, NDJSON to the client, counts from the usage chunk.
    let rsp = s.node.post(
        "/api/chat",
        &json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "one two three"}]}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert!(rsp
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/x-ndjson")));
    let lines: Vec<serde_json::Value> = rsp
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).expect("ndjson line"))
        .collect();
    assert_eq!(lines.len(), 9, "8 tokens and a done line: {lines:?}");
    assert_eq!(lines[0]["message"]["content"], "tok0 ");
    assert_eq!(lines[8]["done"], true);
    assert_eq!(lines[8]["prompt_eval_count"], 3);
    assert_eq!(lines[8]["eval_count"], 8);
    let sent = s
        .openai
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == "/v1/chat/completions")
        .expect("translated request");
    assert_eq!(
        sent.json().expect("json")["stream_options"]["include_usage"],
        true
    );

    // Non-streamed generate, and both embedding endpoints.
    let rsp = s.node.post(
        "/api/generate",
        &json!({"model": "smollm2-135m", "prompt": "hi", "stream": false}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["done"], true);
    assert!(rsp.json()["response"]
        .as_str()
        .is_some_and(|r| r.starts_with("tok0")));
    let rsp = s.node.post(
        "/api/embed",
        &json!({"model": "smollm2-135m", "input": ["a", "b c"]}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["embeddings"].as_array().map(Vec::len), Some(2));
    let rsp = s.node.post(
        "/api/embeddings",
        &json!({"model": "smollm2-135m", "prompt": "a"}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert!(rsp.json()["embedding"].is_array());
    assert_eq!(s.ollama.hits(), 0);

    // /api/show has no OpenAI counterpart: still a clear 404.
    let rsp = s.node.post("/api/show", &json!({"model": "smollm2-135m"}));
    assert_eq!(rsp.status, 404);
    assert!(
        rsp.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("/v1/")),
        "{}",
        rsp.text()
    );
}

#[test]
fn client_connection_is_kept_alive_across_requests() {
    use std::io::{Read, Write};
    let s = setup();
    let mut conn = std::net::TcpStream::connect(s.node.api).expect("connect");
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let body = json!({"model": "llama3.1:8b", "prompt": "x", "stream": false}).to_string();
    for _ in 0..3 {
        write!(
            conn,
            "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\"done\":true") {
            let n = conn.read(&mut buf).expect("read");
            assert!(n > 0, "connection closed after a complete response");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    }
    assert_eq!(s.ollama.hits(), 3);
}

#[test]
fn backend_connections_are_pooled_and_reused() {
    let s = setup();
    support::grid::assert_eventually(
        std::time::Duration::from_secs(5),
        "catalog refreshed",
        || s.node.get("/api/tags").text().contains("llama3.1:8b"),
    );
    let before = s.ollama.connections();
    for _ in 0..20 {
        let rsp = s.node.post(
            "/api/generate",
            &json!({"model": "llama3.1:8b", "prompt": "x", "stream": false}),
        );
        assert_eq!(rsp.status, 200);
    }
    let opened = s.ollama.connections() - before;
    // Sequential requests through one node need one connection; allow a refresh racing in.
    assert!(
        opened <= 2,
        "20 sequential requests opened {opened} backend connections"
    );
}
