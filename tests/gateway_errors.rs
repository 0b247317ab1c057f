//! Every failure a client can cause or meet gets the documented status and a JSON body in the
//! dialect of the route, and nothing a client sends brings the node down.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{free_port, loopback_ip, BackendSpec, NodeProc, NodeSpec};
use support::http::{self, Response};

fn assert_openai_error(rsp: &Response, status: u16, code: &str) {
    assert_eq!(rsp.status, status, "{}", rsp.text());
    let v = rsp.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"].is_string() && v["error"]["type"].is_string(),
        "{v}"
    );
}

fn assert_ollama_error(rsp: &Response, status: u16) {
    assert_eq!(rsp.status, status, "{}", rsp.text());
    assert!(rsp.json()["error"].is_string(), "{}", rsp.text());
}

fn node_with(config: FakeConfig, spec: impl FnOnce(String) -> NodeSpec) -> (FakeBackend, NodeProc) {
    let backend = FakeBackend::start_in_thread(IpAddr::V4(loopback_ip()), config);
    let node = NodeProc::start(&spec(backend.url()));
    (backend, node)
}

#[test]
fn malformed_json_and_missing_model_are_400_in_both_dialects() {
    let (backend, node) = node_with(FakeConfig::both(&["m"]), |u| {
        NodeSpec::with_backend(BackendSpec::ollama(u))
    });
    let bad = |path: &str, body: &[u8]| {
        http::request(
            node.api,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body,
        )
    };
    assert_openai_error(
        &bad("/v1/chat/completions", b"{not json"),
        400,
        "invalid_request",
    );
    assert_openai_error(
        &bad("/v1/chat/completions", br#"{"messages":[]}"#),
        400,
        "missing_model",
    );
    assert_openai_error(&bad("/v1/embeddings", b""), 400, "invalid_request");
    assert_openai_error(
        &bad("/v1/completions", br#"{"model":42}"#),
        400,
        "invalid_request",
    );
    assert_ollama_error(&bad("/api/chat", b"{not json"), 400);
    assert_ollama_error(&bad("/api/generate", br#"{"prompt":"x"}"#), 400);
    assert_eq!(backend.hits(), 0, "nothing malformed reaches the backend");
}

#[test]
fn unknown_model_is_404_and_never_reaches_a_backend() {
    let (backend, node) = node_with(FakeConfig::both(&["m"]), |u| {
        NodeSpec::with_backend(BackendSpec::ollama(u))
    });
    assert_openai_error(
        &node.post(
            "/v1/chat/completions",
            &json!({"model": "nope", "messages": []}),
        ),
        404,
        "model_not_found",
    );
    assert_ollama_error(
        &node.post("/api/chat", &json!({"model": "nope", "messages": []})),
        404,
    );
    assert_eq!(backend.hits(), 0);
}

#[test]
fn oversized_body_is_413_by_declared_length_and_by_chunked_count() {
    let (backend, node) = node_with(FakeConfig::both(&["m"]), |u| {
        NodeSpec::with_backend(BackendSpec::ollama(u)).api("max_body_bytes = 1024")
    });
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(2000));
    let rsp = http::request(
        node.api,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        big.as_bytes(),
    );
    assert_openai_error(&rsp, 413, "request_too_large");
    let chunked = format!(
        "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    assert_ollama_error(&http::send_raw(node.api, chunked.as_bytes()), 413);
    let fits = json!({"model": "m", "prompt": "x".repeat(900)});
    assert_eq!(node.post("/api/generate", &json!(fits)).status, 200);
    assert_eq!(
        backend.hits(),
        1,
        "only the request within the limit reached the backend"
    );
}

#[test]
fn unreachable_backend_is_502() {
    let ip = loopback_ip();
    let dead = format!("http://{ip}:{}", free_port(ip));
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(dead)));
    let rsp = node.post(
        "/v1/chat/completions",
        &json!({"model": "m", "messages": []}),
    );
    assert_openai_error(&rsp, 502, "backend_unreachable");
    assert_ollama_error(
        &node.post("/api/chat", &json!({"model": "m", "messages": []})),
        502,
    );
    // The first request found the backend refusing; the second skipped it (down until a
    // background probe reaches it) instead of paying for another connect attempt.
    let metrics = node.get("/metrics").text();
    assert!(
        metrics.contains(r#"arknet_upstream_connect_errors_total{backend="ollama"} 1"#),
        "{metrics}"
    );
}

#[test]
fn backend_at_its_limit_is_503_with_retry_after() {
    let (backend, node) = node_with(
        FakeConfig::both(&["m"])
            .chunks(20)
            .chunk_delay(Duration::from_millis(50)),
        |u| NodeSpec::with_backend(BackendSpec::ollama(u).max_concurrent(1)),
    );
    let api = node.api;
    let long = std::thread::spawn(move || {
        http::post_json(api, "/api/generate", &json!({"model": "m", "prompt": "x"}))
    });
    support::grid::assert_eventually(Duration::from_secs(5), "first request in flight", || {
        backend.in_flight() == 1
    });
    let rsp = node.post("/v1/completions", &json!({"model": "m", "prompt": "y"}));
    assert_openai_error(&rsp, 503, "backend_busy");
    assert_eq!(rsp.header("retry-after"), Some("1"));
    assert_ollama_error(
        &node.post("/api/generate", &json!({"model": "m", "prompt": "y"})),
        503,
    );
    assert_eq!(long.join().expect("long request").status, 200);
    assert_eq!(backend.max_in_flight(), 1, "the limit was never exceeded");
    assert_eq!(
        node.post(
            "/api/generate",
            &json!({"model": "m", "prompt": "z", "stream": false})
        )
        .status,
        200
    );
}

#[test]
fn wrong_method_and_unknown_path_get_json_errors() {
    let (_backend, node) = node_with(FakeConfig::both(&["m"]), |u| {
        NodeSpec::with_backend(BackendSpec::ollama(u))
    });
    assert_openai_error(&node.get("/v1/chat/completions"), 405, "method_not_allowed");
    assert_openai_error(&node.get("/v1/nothing"), 404, "not_found");
    assert_ollama_error(&node.get("/api/nothing"), 404);
}

#[test]
fn garbage_on_the_wire_never_takes_the_node_down() {
    let (backend, mut node) = node_with(FakeConfig::both(&["m"]), |u| {
        NodeSpec::with_backend(BackendSpec::ollama(u))
    });
    let nasty: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\x03\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"POST /api/chat HTTP/1.1\r\nContent-Length: -5\r\n\r\n".to_vec(),
        b"POST /api/chat HTTP/1.1\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n{}".to_vec(),
        b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100_000)).into_bytes(),
        format!("POST /api/chat HTTP/1.1\r\nX: {}\r\n\r\n", "b".repeat(200_000)).into_bytes(),
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 30\r\n\r\n{\"model\":\"m\",\"messages\":".to_vec(),
        "POST /api/chat HTTP/1.1\r\nContent-Length: 24\r\n\r\n{\"model\":\"\u{0}\u{ffff}\"}".as_bytes().to_vec(),
    ];
    for bytes in &nasty {
        // Any answer (or a closed connection) is fine; the node must stay up.
        let _ = http::try_send_raw(node.api, bytes, Duration::from_secs(1));
    }
    assert!(node.alive(), "node died; log:\n{}", node.log());
    assert_eq!(node.get("/health").status, 200);
    assert_eq!(
        node.post(
            "/api/generate",
            &json!({"model": "m", "prompt": "x", "stream": false})
        )
        .status,
        200
    );
    assert!(backend.hits() <= 1);
    assert!(!node.log().contains("panicked"), "{}", node.log());
}

#[test]
fn metrics_count_requests_by_route_model_and_status() {
    let (_backend, node) = node_with(FakeConfig::both(&["m"]), |u| {
        NodeSpec::with_backend(BackendSpec::ollama(u))
    });
    support::grid::assert_eventually(Duration::from_secs(5), "catalog knows m", || {
        node.get("/api/tags").text().contains("\"m\"")
    });
    assert_eq!(
        node.post(
            "/api/generate",
            &json!({"model": "m", "prompt": "x", "stream": false})
        )
        .status,
        200
    );
    assert_eq!(
        node.post(
            "/api/generate",
            &json!({"model": "invented-by-client", "prompt": "x"})
        )
        .status,
        404
    );
    let text = node.get("/metrics").text();
    for needle in [
        r#"arknet_http_requests_total{model="m",route="/api/generate",status="200"} 1"#,
        r#"arknet_http_requests_total{model="unknown",route="/api/generate",status="404"} 1"#,
        "arknet_http_request_duration_seconds_bucket",
        "arknet_http_time_to_first_byte_seconds_bucket",
        "arknet_http_requests_in_flight",
        r#"arknet_backend_up{backend="ollama"} 1"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(
        !text.contains("invented-by-client"),
        "client-chosen names never become labels"
    );
}
