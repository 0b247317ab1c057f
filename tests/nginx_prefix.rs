//! ArkNet as the upstream of a real nginx at `/arknet/`, with the prefix kept and stripped,
//! using the snippets shipped in `conf/nginx-arknet-upstream.conf` (inside `http {}`) and
//! `conf/nginx-arknet-location.conf` (inside `server {}`), included as their comments say.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{free_port, loopback_ip, BackendSpec, NodeProc, NodeSpec};
use support::http;
use support::nginx::Nginx;

/// The shipped snippets, pointed at `node`, served on `kept` (prefix kept) and on `stripped`
/// (same location with `proxy_pass http://arknet/;`).
fn nginx_in_front(node: SocketAddr, kept: SocketAddr, stripped: SocketAddr) -> Nginx {
    support::nginx::in_front_of_arknet(node, &[(kept, false), (stripped, true)])
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

/// A fresh identity made by `arknet id` in a temporary data dir: (node_id, public_key).
fn fresh_identity() -> (String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(support::grid::ARKNET)
        .arg("id")
        .arg("--data-dir")
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run arknet id");
    assert!(
        out.status.success(),
        "arknet id: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in `arknet id` output: {text}"))
    };
    (field("node_id:"), field("public_key:"))
}

fn approve_body(id: &str, key: &str) -> Vec<u8> {
    json!({"node_id": id, "public_key": key, "permissions": {"models_shared": ["llama3.1:8b"]}})
        .to_string()
        .into_bytes()
}

fn approved_ids(node: &NodeProc) -> Vec<String> {
    let all = node.get("/peers/approved").json();
    let list = all["peers"].as_array().or(all.as_array()).cloned();
    list.unwrap_or_default()
        .iter()
        .filter_map(|p| p["node_id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn admin_changes_through_nginx_need_the_token_and_loopback_needs_none() {
    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::both(&["llama3.1:8b"]),
    );
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(backend.url())));
    let ip = loopback_ip();
    let kept = SocketAddr::from((ip, free_port(ip)));
    let stripped = SocketAddr::from((ip, free_port(ip)));
    let nginx = nginx_in_front(node.api, kept, stripped);
    let token = std::fs::read_to_string(node.data_dir.join("admin.token"))
        .expect("<data_dir>/admin.token, created at start");
    let token = token.trim();
    assert!(!token.is_empty(), "empty admin.token");
    let bearer = format!("Bearer {token}");
    let json_ct = ("Content-Type", "application/json");
    let (direct, direct_key) = fresh_identity();

    let mut approved_via_nginx = Vec::new();
    for front in [kept, stripped] {
        let (via_nginx, via_nginx_key) = fresh_identity();
        // nginx adds X-Forwarded-For: the loopback exemption no longer applies.
        for auth in [None, Some("Bearer not-the-token".to_string())] {
            let mut headers = vec![json_ct];
            if let Some(a) = &auth {
                headers.push(("Authorization", a.as_str()));
            }
            let rsp = http::request(
                front,
                "POST",
                "/arknet/peers/approve",
                &headers,
                &approve_body(&via_nginx, &via_nginx_key),
            );
            assert_eq!(
                rsp.status,
                401,
                "{auth:?}: {} / nginx: {}",
                rsp.text(),
                nginx.error_log()
            );
            assert!(
                rsp.header("content-type")
                    .is_some_and(|v| v.starts_with("application/json")),
                "{:?}",
                rsp.headers
            );
            assert_eq!(
                rsp.json()["error"]["code"],
                "admin_token_required",
                "{}",
                rsp.text()
            );
        }
        assert!(
            !approved_ids(&node).contains(&via_nginx),
            "a refused approval changed nothing"
        );

        let rsp = http::request(
            front,
            "POST",
            "/arknet/peers/approve",
            &[json_ct, ("Authorization", &bearer)],
            &approve_body(&via_nginx, &via_nginx_key),
        );
        assert_eq!(
            rsp.status,
            200,
            "{} / nginx: {}",
            rsp.text(),
            nginx.error_log()
        );
        assert!(approved_ids(&node).contains(&via_nginx));
        approved_via_nginx.push(via_nginx);

        // Reading needs the token too (the admin page itself is public), through the prefix.
        let page = http::get(front, "/arknet/");
        assert_eq!(page.status, 200, "{}", page.text());
        assert!(
            page.header("content-type")
                .is_some_and(|v| v.starts_with("text/html")),
            "{:?}",
            page.headers
        );
        assert!(
            page.text().to_ascii_lowercase().contains("<html"),
            "{}",
            page.text()
        );
        assert_eq!(http::get(front, "/arknet/peers/approved").status, 401);
        let read = http::request(
            front,
            "GET",
            "/arknet/peers/approved",
            &[("Authorization", &bearer)],
            b"",
        );
        assert_eq!(read.status, 200, "{}", read.text());
    }

    // Straight from loopback, but with a forwarding header (a proxy on this host): token needed.
    let rsp = http::request(
        node.api,
        "POST",
        "/peers/approve",
        &[json_ct, ("X-Forwarded-For", "127.0.0.1")],
        &approve_body(&direct, &direct_key),
    );
    assert_eq!(rsp.status, 401, "{}", rsp.text());

    // Straight to the node from loopback, no forwarding header: no token needed.
    let rsp = http::request(
        node.api,
        "POST",
        "/peers/approve",
        &[json_ct],
        &approve_body(&direct, &direct_key),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let ids = approved_ids(&node);
    assert!(ids.contains(&direct), "{ids:?}");
    assert!(
        approved_via_nginx.iter().all(|id| ids.contains(id)),
        "{ids:?}"
    );
}
