//! A dead local backend costs one failure, not one per request: the node skips it while it is
//! down (its peers serve the model), probes it in the background, uses it again once it
//! answers, and does not fill its log with one warning per request.

mod support;

use std::time::Duration;

use serde_json::json;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{assert_eventually, share, Ark};

const MODEL: &str = "llama3.1:8b";

fn connect_errors(ark_node: &support::grid::NodeProc) -> u64 {
    let text = ark_node.get("/metrics").text();
    text.lines()
        .find(|l| l.starts_with("arknet_upstream_connect_errors_total{backend=\"ollama\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_dead_local_backend_is_skipped_probed_and_used_again_when_it_returns() {
    let a = Ark::start(FakeConfig::both(&[MODEL]), 4);
    let b = Ark::start(FakeConfig::both(&[MODEL]), 4);
    share(&b, &a, &[MODEL], 4);
    let chat =
        json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(a.node.post("/api/chat", &chat).status, 200);
    assert_eq!(a.backend.hits(), 1, "local first while it is up");

    let Ark { backend, node } = a;
    let addr = backend.addr;
    drop(backend);
    const REQUESTS: usize = 40;
    for i in 0..REQUESTS {
        let rsp = node.post("/api/chat", &chat);
        assert_eq!(rsp.status, 200, "request {i}: {}", rsp.text());
    }
    assert_eq!(b.backend.hits(), REQUESTS, "the peer served every request");
    let errors = connect_errors(&node);
    assert!(
        errors <= 2,
        "the dead backend was tried {errors} times for {REQUESTS} requests"
    );
    let log = node.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("backend"))
        .count();
    assert!(warnings <= 3, "{warnings} warnings:\n{log}");

    // The owner restarts the backend on its address: the node finds it and uses it again.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let revived = runtime.block_on(FakeBackend::start_on(
        addr.ip(),
        addr.port(),
        FakeConfig::both(&[MODEL]),
    ));
    assert_eventually(Duration::from_secs(15), "local backend used again", || {
        node.post("/api/chat", &chat).status == 200 && revived.hits() > 0
    });
    assert!(node.log().contains("backend is up again"), "{}", node.log());
}
