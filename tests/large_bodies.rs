//! Chat bodies far over Pingora's 64 KiB retry buffer (the reason the gateway is not a
//! `ProxyHttp`) arrive whole at the backend, routed locally and through a peer.

mod support;

use serde_json::{json, Value};
use support::fake_backend::FakeConfig;
use support::grid::{share, Ark};
use support::http;

/// A long chat history: `n` turns of about 1 KiB each, with non-ASCII text.
fn long_chat(model: &str, n: usize) -> Value {
    let messages: Vec<Value> = (0..n)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            json!({"role": role, "content": format!("turn {i}: {}", "héllo wörld ".repeat(80))})
        })
        .collect();
    json!({"model": model, "stream": false, "messages": messages})
}

#[test]
fn a_chat_over_64_kib_reaches_the_backend_whole_locally_and_through_a_peer() {
    let peer = Ark::start(FakeConfig::ollama(&["remote-model"]), 4);
    let us = Ark::start(FakeConfig::ollama(&["local-model"]), 4);
    share(&peer, &us, &["remote-model"], 2);

    let local = long_chat("local-model", 300);
    let bytes = local.to_string().into_bytes();
    assert!(bytes.len() > 256 * 1024, "{} bytes", bytes.len());
    let rsp = http::request(
        us.node.api,
        "POST",
        "/api/chat",
        &[("Content-Type", "application/json")],
        &bytes,
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let got = us
        .backend
        .request_to("/api/chat")
        .expect("the local backend got the chat");
    assert_eq!(got.body.len(), bytes.len());
    assert!(
        got.body == bytes,
        "the local backend received other bytes than the client sent"
    );

    let remote = long_chat("remote-model", 300);
    let rsp = us.node.post("/api/chat", &remote);
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let got = peer
        .backend
        .request_to("/api/chat")
        .expect("the peer's backend got the chat");
    // Through a peer the body is rebuilt from the allow-list: the same JSON, every message.
    let received: Value = serde_json::from_slice(&got.body).expect("JSON");
    assert_eq!(received["messages"], remote["messages"]);
    assert!(got.body.len() > 256 * 1024);
}
