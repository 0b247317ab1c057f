//! What clients and the audit log see when a peer request does not simply succeed: every row
//! of the README's error table on the peer route, and one audit line per peer request on the
//! requesting node and the serving node, with its real outcome (a timeout, a refusal, a stream
//! cut by a revocation), and prompt tokens for streams.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::fake_backend::FakeConfig;
use support::grid::{assert_eventually, share, Ark, NodeProc};
use support::http::{self, Response};
use support::mesh::{self, As};

const MODEL: &str = "qwen3.5:35b";

fn chat(stream: bool) -> Value {
    json!({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "tell me a story please"}]})
}

fn audit(node: &NodeProc) -> Vec<Value> {
    node.get("/audit?limit=100").json()["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `node`'s audit entries with `peer`, once there are `n` (a line is written just after the
/// response went out, so a client can be a moment ahead of it).
fn audit_of(node: &NodeProc, peer: &str, n: usize) -> Vec<Value> {
    assert_eventually(Duration::from_secs(3), "audit lines written", || {
        audit(node).iter().filter(|e| e["peer"] == peer).count() >= n
    });
    audit(node)
        .into_iter()
        .filter(|e| e["peer"] == peer)
        .collect()
}

fn assert_openai_error(rsp: &Response, status: u16, code: &str) {
    assert_eq!(rsp.status, status, "{}", rsp.text());
    assert_eq!(rsp.json()["error"]["code"], code, "{}", rsp.text());
}

/// `a` without the model, `b` serving it to `a`; `b`'s backend configured by `config`.
fn pair(config: impl FnOnce(FakeConfig) -> FakeConfig, first_byte_timeout: u64) -> (Ark, Ark) {
    let a = Ark::start_with(FakeConfig::both(&["llama3.1:8b"]), 4, |s| {
        s.upstream(&format!("first_byte_timeout_secs = {first_byte_timeout}"))
    });
    let b = Ark::start(config(FakeConfig::both(&[MODEL])), 4);
    share(&b, &a, &[MODEL], 2);
    (a, b)
}

#[test]
fn a_peer_silent_past_the_first_byte_timeout_is_504_and_audited_by_the_requester() {
    let (a, b) = pair(|c| c.first_byte_delay(Duration::from_secs(4)), 1);
    let rsp = a.node.post("/v1/chat/completions", &chat(false));
    assert_openai_error(&rsp, 504, "backend_timeout");
    let rsp = a.node.post("/api/chat", &chat(true));
    assert_eq!(rsp.status, 504, "{}", rsp.text());
    let b_id = b.node.node_id();
    let lines: Vec<Value> = audit(&a.node)
        .into_iter()
        .filter(|e| e["direction"] == "outbound" && e["peer"] == b_id.as_str())
        .collect();
    assert_eq!(lines.len(), 2, "one line per request: {lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l["status"] == 504 && l["model"] == MODEL && l["error"].is_string()),
        "{lines:?}"
    );
}

#[test]
fn a_local_backend_silent_past_the_first_byte_timeout_is_504() {
    let a = Ark::start_with(
        FakeConfig::both(&[MODEL]).first_byte_delay(Duration::from_secs(4)),
        4,
        |s| s.upstream("first_byte_timeout_secs = 1"),
    );
    assert_openai_error(
        &a.node.post("/v1/chat/completions", &chat(false)),
        504,
        "backend_timeout",
    );
    assert_eq!(a.node.post("/api/chat", &chat(false)).status, 504);
}

#[test]
fn error_table_rows_on_the_peer_route() {
    // 404: nobody, local or peer, has the model.
    let (a, b) = pair(|c| c, 300);
    let rsp = a.node.post(
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": []}),
    );
    assert_openai_error(&rsp, 404, "model_not_found");
    // 400 and 405 are decided before any routing, so a peer model changes nothing.
    let rsp = http::request(
        a.node.api,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        b"{\"model\": \"qwen3.5:35b\", ",
    );
    assert_openai_error(&rsp, 400, "invalid_request");
    assert_openai_error(
        &a.node.get("/v1/chat/completions"),
        405,
        "method_not_allowed",
    );
    // 503 with Retry-After: the peer's backend is at its limit, so the peer answers 429/503.
    b.backend.set_status_override(Some(503));
    let rsp = a.node.post("/v1/chat/completions", &chat(false));
    assert_openai_error(&rsp, 503, "backend_busy");
    assert_eq!(rsp.header("retry-after"), Some("1"), "{:?}", rsp.headers);
    // 502: the peer cannot reach its backend, and no other candidate exists.
    b.backend.set_status_override(Some(502));
    let rsp = a.node.post("/v1/chat/completions", &chat(false));
    assert_openai_error(&rsp, 502, "backend_unreachable");
    b.backend.set_status_override(None);
    assert_eq!(
        a.node.post("/v1/chat/completions", &chat(false)).status,
        200
    );
    // Each of those three peer requests left an outbound line with what the peer answered.
    let b_id = b.node.node_id();
    let statuses: Vec<Value> = audit_of(&a.node, &b_id, 3)
        .into_iter()
        .filter(|e| e["direction"] == "outbound")
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!(503), json!(502), json!(200)]);
}

#[test]
fn a_413_from_the_peer_reaches_the_client() {
    let a = Ark::start_with(FakeConfig::both(&["llama3.1:8b"]), 4, |s| s);
    let b = Ark::start_with(FakeConfig::both(&[MODEL]), 4, |s| {
        s.api("max_body_bytes = 2048")
    });
    share(&b, &a, &[MODEL], 2);
    let mut body = chat(false);
    body["messages"][0]["content"] = json!("x".repeat(4096));
    assert_openai_error(
        &a.node.post("/v1/chat/completions", &body),
        413,
        "request_too_large",
    );
    assert_eq!(b.backend.hits(), 0);
    // An error answer (JSON error body, no stream) is audited with its own status at both
    // ends, not as a cut stream.
    let b_id = b.node.node_id();
    let out = audit_of(&a.node, &b_id, 1);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["status"], 413, "{}", out[0]);
}

#[test]
fn a_refusal_after_revoke_is_audited_on_the_requesting_node() {
    // A slow hello on `a`: it still believes `b` shares the model when it sends the request.
    let a = Ark::start_with(FakeConfig::both(&["llama3.1:8b"]), 4, |s| {
        s.hello_interval(5)
    });
    let b = Ark::start(FakeConfig::both(&[MODEL]), 4);
    share(&b, &a, &[MODEL], 2);
    b.node.revoke(&a.node);
    let rsp = a.node.post("/v1/chat/completions", &chat(false));
    assert_eq!(rsp.status, 502, "{}", rsp.text());
    let b_id = b.node.node_id();
    let a_key = a.node.public_key();
    let out: Vec<Value> = audit(&a.node)
        .into_iter()
        .filter(|e| e["direction"] == "outbound" && e["peer"] == b_id.as_str())
        .collect();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["status"], 403);
    // The serving node audits the refusal too, naming the no longer approved key.
    let refused = audit_of(&b.node, &a_key, 1);
    assert!(
        refused
            .iter()
            .any(|e| e["direction"] == "inbound" && e["status"] == 403),
        "{refused:?}"
    );
    assert_eq!(b.backend.hits(), 0);
}

#[test]
fn a_stream_cut_by_a_revocation_is_audited_as_refused_at_both_ends() {
    let (a, b) = pair(
        |c| c.chunks(100).chunk_delay(Duration::from_millis(50)),
        300,
    );
    let api = a.node.api;
    let client =
        std::thread::spawn(move || http::post_json(api, "/v1/chat/completions", &chat(true)));
    assert_eventually(Duration::from_secs(5), "stream under way", || {
        b.backend.in_flight() == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    b.node.revoke(&a.node);
    let rsp = client.join().expect("client");
    assert_eq!(rsp.status, 200);
    assert!(
        rsp.text().contains("revoked"),
        "the client is told: {}",
        rsp.text()
    );
    let a_id = a.node.node_id();
    let b_id = b.node.node_id();
    assert_eventually(Duration::from_secs(3), "both ends audited", || {
        audit(&b.node).iter().any(|e| e["peer"] == a_id.as_str())
    });
    let inbound: Vec<Value> = audit(&b.node)
        .into_iter()
        .filter(|e| e["peer"] == a_id.as_str())
        .collect();
    let outbound: Vec<Value> = audit(&a.node)
        .into_iter()
        .filter(|e| e["peer"] == b_id.as_str())
        .collect();
    assert_eq!(inbound.len(), 1, "{inbound:?}");
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    for line in [&inbound[0], &outbound[0]] {
        assert_eq!(line["status"], 403, "{line}");
        assert!(
            line["error"]
                .as_str()
                .is_some_and(|e| e.contains("revoked")),
            "{line}"
        );
    }
}

#[test]
fn streams_record_prompt_tokens_estimated_when_the_backend_reports_none() {
    let (a, b) = pair(|c| c.chunks(3), 300);
    // OpenAI stream without include_usage: no count in the stream, so an estimate.
    let rsp = a.node.post("/v1/chat/completions", &chat(true));
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    // Ollama stream: the final line carries prompt_eval_count, an exact count.
    let rsp = a.node.post("/api/chat", &chat(true));
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let a_id = a.node.node_id();
    assert_eventually(Duration::from_secs(3), "serving node audited", || {
        audit(&b.node)
            .iter()
            .filter(|e| e["peer"] == a_id.as_str())
            .count()
            == 2
    });
    for node in [&a.node, &b.node] {
        let lines = audit(node);
        assert_eq!(lines.len(), 2, "{lines:?}");
        // "tell me a story please": 22 characters, 6 tokens at four characters a token.
        assert_eq!(lines[0]["prompt_tokens"], 6, "{}", lines[0]);
        assert_eq!(lines[0]["prompt_tokens_estimated"], true, "{}", lines[0]);
        assert!(lines[1]["prompt_tokens"].as_u64().is_some(), "{}", lines[1]);
        assert!(
            lines[1].get("prompt_tokens_estimated").is_none(),
            "{}",
            lines[1]
        );
    }
}

#[test]
fn a_strangers_refused_request_is_audited_by_key() {
    let b = Ark::start(FakeConfig::both(&[MODEL]), 4);
    let stranger = Ark::start(FakeConfig::both(&["x"]), 4);
    let as_stranger = As::node(&stranger.node);
    let body = chat(false).to_string();
    let (status, _) = mesh::call(
        b.node.mesh,
        as_stranger.as_ref(),
        "POST",
        "/v1/chat/completions",
        Some(&body),
    );
    assert_eq!(status, 403);
    let key = stranger.node.public_key();
    // The line is written just after the refusal went out.
    assert_eventually(Duration::from_secs(3), "refusal audited", || {
        !audit(&b.node).is_empty()
    });
    let lines = audit(&b.node);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["peer"], key.as_str());
    assert_eq!(lines[0]["status"], 403);
    assert_eq!(lines[0]["direction"], "inbound");
    assert_eq!(b.backend.hits(), 0);
}
