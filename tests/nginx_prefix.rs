//! ArkNet as the upstream of a real nginx at `/arknet/`, with the prefix kept and stripped,
//! using the location block shipped in `conf/nginx-arknet.conf`.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{free_port, loopback_ip, BackendSpec, NodeProc, NodeSpec};
use support::http;
use support::nginx::Nginx;

/// The shipped location block, pointed at `node`, served on `kept` (prefix kept) and on
/// `stripped` (same block with `proxy_pass http://arknet/;`).
fn nginx_in_front(node: SocketAddr, kept: SocketAddr, stripped: SocketAddr) -> Nginx {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/nginx-arknet.conf"
    ))
    .expect("conf/nginx-arknet.conf");
    let (upstream, location) = shipped
        .split_once("# Inside your server block:")
        .expect("marker in shipped conf");
    let upstream = upstream.replace("127.0.0.1:8910", &node.to_string());
    let location_stripped =
        location.replace("proxy_pass http://arknet;", "proxy_pass http://arknet/;");
    assert_ne!(
        location, location_stripped,
        "the shipped block uses `proxy_pass http://arknet;`"
    );
    let body = format!(
        "{upstream}\nserver {{ listen {kept}; {location} }}\nserver {{ listen {stripped}; {location_stripped} }}\n"
    );
    Nginx::start(&body, stripped)
}

#[test]
fn api_works_through_nginx_with_the_prefix_kept_or_stripped() {
    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::both(&["llama3.1:8b"])
            .chunks(8)
            .chunk_delay(Duration::from_millis(50)),
    );
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(backend.url())));
    let ip = loopback_ip();
    let kept = SocketAddr::from((ip, free_port(ip)));
    let stripped = SocketAddr::from((ip, free_port(ip)));
    let nginx = nginx_in_front(node.api, kept, stripped);

    for front in [kept, stripped] {
        support::grid::assert_eventually(
            Duration::from_secs(5),
            "models listed through nginx",
            || {
                http::get(front, "/arknet/v1/models")
                    .text()
                    .contains("llama3.1:8b")
            },
        );
        assert_eq!(http::get(front, "/arknet/health").json()["status"], "ok");
        assert_eq!(http::get(front, "/arknet/api/tags").status, 200);
        let rsp = http::post_json(
            front,
            "/arknet/api/chat",
            &json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(
            rsp.status,
            200,
            "{} / nginx: {}",
            rsp.text(),
            nginx.error_log()
        );
        assert_eq!(rsp.lines().len(), 9);
        let first = rsp.arrivals.iter().find(|(_, n)| *n > 0).expect("body").0;
        let last = rsp.arrivals.last().expect("arrivals").0;
        assert!(
            last - first >= Duration::from_millis(250),
            "nginx + arknet buffered the stream: {first:?}..{last:?}"
        );
        let rsp = http::post_json(
            front,
            "/arknet/v1/chat/completions",
            &json!({"model": "nope", "messages": []}),
        );
        assert_eq!(rsp.status, 404);
        assert_eq!(rsp.json()["error"]["code"], "model_not_found");
    }
    let paths: Vec<String> = backend.requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths.iter().all(|p| !p.starts_with("/arknet")),
        "the backend never sees the prefix: {paths:?}"
    );
}
