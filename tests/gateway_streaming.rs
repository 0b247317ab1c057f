//! Streams are relayed chunk by chunk as the backend produces them, never buffered.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{loopback_ip, BackendSpec, NodeProc, NodeSpec};

const GAP: Duration = Duration::from_millis(50);
const CHUNKS: usize = 8;

/// Arrival time of the first and of the last body byte.
fn first_and_last(rsp: &support::http::Response) -> (Duration, Duration) {
    let first = rsp
        .arrivals
        .iter()
        .find(|(_, n)| *n > 0)
        .expect("some body arrived")
        .0;
    let last = rsp.arrivals.last().expect("arrivals").0;
    (first, last)
}

fn assert_incremental(rsp: &support::http::Response) {
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let (first, last) = first_and_last(rsp);
    let spread = last - first;
    // The backend needs (CHUNKS - 1) * GAP = 350 ms between its first and last token. A buffering
    // proxy delivers everything at once (spread ~0); an incremental one spreads it out.
    assert!(
        spread >= GAP * (CHUNKS as u32 - 2),
        "chunks arrived together: first {first:?}, last {last:?}"
    );
    assert!(first < GAP * 3, "first chunk took {first:?}");
    let distinct = rsp.arrivals.windows(2).filter(|w| w[1].1 > w[0].1).count() + 1;
    assert!(
        distinct >= CHUNKS / 2,
        "only {distinct} separate arrivals: {:?}",
        rsp.arrivals
    );
}

#[test]
fn ndjson_chunks_arrive_as_the_backend_sends_them() {
    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::ollama(&["llama3.1:8b"])
            .chunks(CHUNKS)
            .chunk_delay(GAP),
    );
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(backend.url())));
    let rsp = node.post(
        "/api/chat",
        &json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_incremental(&rsp);
    assert_eq!(rsp.lines().len(), CHUNKS + 1);
}

#[test]
fn sse_chunks_arrive_as_the_backend_sends_them() {
    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::openai(&["smollm2"])
            .chunks(CHUNKS)
            .chunk_delay(GAP),
    );
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::openai(backend.url())));
    let rsp = node.post(
        "/v1/chat/completions",
        &json!({"model": "smollm2", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_incremental(&rsp);
    assert_eq!(rsp.lines().last().map(String::as_str), Some("data: [DONE]"));
}

#[test]
fn a_backend_that_dies_mid_stream_ends_the_stream_with_an_error_event() {
    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::ollama(&["llama3.1:8b"])
            .chunks(40)
            .chunk_delay(GAP),
    );
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(backend.url())));
    let api = node.api;
    let client = std::thread::spawn(move || {
        support::http::post_json(
            api,
            "/api/generate",
            &json!({"model": "llama3.1:8b", "prompt": "long"}),
        )
    });
    std::thread::sleep(GAP * 4);
    drop(backend);
    let rsp = client.join().expect("client thread");
    assert_eq!(rsp.status, 200);
    let lines = rsp.lines();
    let last: serde_json::Value =
        serde_json::from_str(lines.last().expect("lines")).expect("last line is JSON");
    assert!(last["error"].is_string(), "stream ended with {last}");
    assert!(lines.len() < 41, "the stream was cut short");
}
