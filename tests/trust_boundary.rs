//! The owner's trust boundary and the listeners' defences, tried the way an attacker would:
//! cross-site requests, rebound host names, proxied readers, bodies that lie about their size,
//! ambiguous framing, slow and idle clients, too many connections, expired certificates and a
//! hostile peer. Real `arknet` processes, raw sockets and curl; every case asserts what the
//! attacker got (nothing) and that the owner's own requests still work.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fake_backend::{FakeConfig, HOSTILE_HEADERS, HOSTILE_TOKENS};
use support::grid::{assert_eventually, share, Ark, BackendSpec, Grid, NodeProc, NodeSpec};
use support::http;
use support::mesh::{self, As};

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

fn approve_body() -> String {
    json!({"node_id": "mallory", "public_key": KEY, "endpoint": "127.0.0.1:1"}).to_string()
}

/// A raw request with `Host` set to the node's own address unless `headers` names one.
fn raw(
    node: &NodeProc,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> http::Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {}\r\n", node.api));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    http::send_raw(node.api, req.as_bytes())
}

fn approved_count(node: &NodeProc) -> usize {
    node.get("/peers/approved").json()["peers"]
        .as_array()
        .map_or(0, Vec::len)
}

fn token(node: &NodeProc) -> String {
    let t = std::fs::read_to_string(node.data_dir.join("admin.token")).expect("admin.token");
    format!("Bearer {}", t.trim())
}

#[test]
fn cross_site_and_non_json_changes_are_refused_and_change_nothing() {
    let node = NodeProc::start(&NodeSpec::default());
    let body = approve_body();
    let attempts: [(&[(&str, &str)], u16); 6] = [
        // The "simple request" a page can send with fetch() and no preflight.
        (
            &[
                ("Content-Type", "text/plain"),
                ("Origin", "http://evil.example"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
            403,
        ),
        // Same, from a browser that sends no fetch metadata.
        (
            &[
                ("Content-Type", "text/plain;charset=UTF-8"),
                ("Origin", "http://evil.example"),
            ],
            403,
        ),
        // An auto-submitted <form enctype="text/plain"> whose field name carries the JSON.
        (
            &[
                ("Content-Type", "text/plain"),
                ("Sec-Fetch-Site", "cross-site"),
                ("Sec-Fetch-Mode", "navigate"),
            ],
            403,
        ),
        // JSON from another site (needs a preflight a browser would not get, but refused anyway).
        (
            &[
                ("Content-Type", "application/json"),
                ("Sec-Fetch-Site", "same-site"),
            ],
            403,
        ),
        // A page on another loopback origin.
        (
            &[
                ("Content-Type", "application/json"),
                ("Origin", "http://127.0.0.5:9000"),
            ],
            403,
        ),
        // Not JSON, even from the owner.
        (
            &[("Content-Type", "application/x-www-form-urlencoded")],
            415,
        ),
    ];
    for (headers, status) in attempts {
        let rsp = raw(&node, "POST", "/peers/approve", headers, &body);
        assert_eq!(rsp.status, status, "{headers:?}: {}", rsp.text());
        let revoke = raw(
            &node,
            "POST",
            "/peers/revoke",
            headers,
            r#"{"node_id":"mallory"}"#,
        );
        assert_eq!(revoke.status, status, "{headers:?}");
    }
    // The token does not make a cross-site change acceptable.
    let t = token(&node);
    let with_token = [
        ("Content-Type", "application/json"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Authorization", t.as_str()),
    ];
    assert_eq!(
        raw(&node, "POST", "/peers/approve", &with_token, &body).status,
        403
    );
    assert_eq!(approved_count(&node), 0, "nothing was approved");

    // The owner's own change, as the admin page sends it, works.
    let page = [
        ("Content-Type", "application/json"),
        ("Origin", &*format!("http://{}", node.api)),
        ("Sec-Fetch-Site", "same-origin"),
    ];
    let rsp = raw(&node, "POST", "/peers/approve", &page, &body);
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(approved_count(&node), 1);
}

#[test]
fn a_rebound_host_name_is_answered_421_on_every_route() {
    let node = NodeProc::start(&NodeSpec::default());
    let host = format!("evil.example:{}", node.api.port());
    for (method, path, body) in [
        ("GET", "/status", ""),
        ("GET", "/audit", ""),
        ("GET", "/peers/approved", ""),
        ("GET", "/v1/models", ""),
        ("GET", "/", ""),
        ("POST", "/peers/approve", approve_body().as_str()),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model":"m","messages":[]}"#,
        ),
    ] {
        let headers = [
            ("Host", host.as_str()),
            ("Content-Type", "application/json"),
        ];
        let rsp = raw(&node, method, path, &headers, body);
        assert_eq!(rsp.status, 421, "{method} {path}: {}", rsp.text());
        assert_eq!(rsp.json()["error"]["code"], "unknown_host");
    }
    assert_eq!(approved_count(&node), 0);
    for ok in ["localhost", "127.0.0.1", "arknet", "host.docker.internal"] {
        let rsp = raw(&node, "GET", "/health", &[("Host", ok)], "");
        assert_eq!(rsp.status, 200, "Host {ok}");
    }
}

#[test]
fn admin_reads_need_the_token_unless_the_owner_asks_directly() {
    let node = NodeProc::start(&NodeSpec::default());
    let t = token(&node);
    let routes = [
        "/status",
        "/audit",
        "/peers",
        "/peers/approved",
        "/peers/status",
        "/peers/discovered",
        "/peers/pending",
    ];
    for path in routes {
        for forwarded in [
            ("X-Forwarded-For", "192.168.1.50"),
            ("Forwarded", "for=192.168.1.50"),
            ("X-Real-IP", "192.168.1.50"),
            ("Via", "1.1 nginx"),
        ] {
            let rsp = raw(&node, "GET", path, &[forwarded], "");
            assert_eq!(rsp.status, 401, "{path} {forwarded:?}");
            assert!(
                !rsp.text().contains(&*node.data_dir.to_string_lossy()),
                "no data dir path leaks"
            );
        }
        let cross = raw(&node, "GET", path, &[("Sec-Fetch-Site", "cross-site")], "");
        assert_eq!(cross.status, 401, "{path} from another site");
        let proxied = raw(
            &node,
            "GET",
            path,
            &[("X-Forwarded-For", "192.168.1.50"), ("Authorization", &t)],
            "",
        );
        assert_eq!(proxied.status, 200, "{path} with the token");
        assert_eq!(
            raw(&node, "GET", path, &[], "").status,
            200,
            "{path} from the owner"
        );
    }
    // The page itself is public, but cannot be framed by another site.
    let page = raw(
        &node,
        "GET",
        "/",
        &[("X-Forwarded-For", "192.168.1.50")],
        "",
    );
    assert_eq!(page.status, 200);
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
}

/// Opens a connection that declares a body of `declared` bytes and sends only `sent`.
fn lying_body(addr: SocketAddr, declared: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("head");
    s.write_all(&b"{\"model\":\"m\",\"x\":\"".repeat(1 + sent / 18)[..sent])
        .expect("body");
    s
}

fn vm_size_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize")
}

#[test]
fn bodies_that_lie_about_their_length_cost_nothing_under_an_address_space_limit() {
    let mut node = NodeProc::start(&NodeSpec::default().api("max_connections_per_client = 1000"));
    let pid = node.pid();
    // Leave the node 1 GiB of address space beyond what it uses: 200 reservations of 16 MiB
    // (what a header can claim) would need 3.2 GB.
    let limit = (vm_size_kib(pid) + 1024 * 1024) * 1024;
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--as={limit}:{limit}")])
        .status()
        .expect("prlimit");
    assert!(status.success());
    let conns: Vec<TcpStream> = (0..200)
        .map(|_| lying_body(node.api, 16 * 1024 * 1024 - 1, 10))
        .collect();
    // Give every connection time to be read and its body buffer (not) reserved.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        node.alive(),
        "node died under the address-space limit; log:\n{}",
        node.log()
    );
    let rsp = node.get("/health");
    assert_eq!(rsp.status, 200);
    drop(conns);
    assert!(node.alive());
    assert!(!node.log().contains("memory allocation"), "{}", node.log());
}

#[test]
fn bodies_beyond_the_node_wide_budget_get_503_and_the_budget_comes_back() {
    let node = NodeProc::start(&NodeSpec::default().api("max_bodies_in_flight_bytes = 262144"));
    // 16 KiB is the first allocation of each body; 16 of them fill the budget.
    let mut conns: Vec<TcpStream> = (0..40).map(|_| lying_body(node.api, 1 << 20, 10)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut refused = 0;
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        if let Ok(n) = c.read(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.starts_with("HTTP/1.1 503") {
                assert!(text.contains("overloaded"), "{text}");
                refused += 1;
            }
        }
    }
    assert!(
        (20..=24).contains(&refused),
        "{refused} of 40 refused with a 256 KiB budget"
    );
    drop(conns);
    // The held bytes were given back: a normal request is read again.
    assert_eventually(Duration::from_secs(5), "budget returned", || {
        let rsp = http::post_json(
            node.api,
            "/v1/chat/completions",
            &json!({"model": "nope", "messages": []}),
        );
        // Read whole and routed (the node has no reachable backend): anything but 503.
        rsp.status != 503
    });
}

/// Reads until the peer closes or `patience` passes; returns what arrived and whether it closed.
fn read_until_closed(s: &mut TcpStream, patience: Duration) -> (String, bool) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let deadline = Instant::now() + patience;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), false)
}

#[test]
fn ambiguous_framing_closes_the_connection_and_unknown_codings_get_501() {
    let node = NodeProc::start(&NodeSpec::default());
    let addr = node.api;
    // TE + CL, then a second request on the same connection: it must never be answered.
    let mut s = TcpStream::connect(addr).expect("connect");
    let smuggle = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /status HTTP/1.1\r\nHost: {addr}\r\n\r\n"
    );
    s.write_all(smuggle.as_bytes()).expect("write");
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5));
    assert!(closed, "connection kept open after TE+CL: {got}");
    assert_eq!(
        got.matches("HTTP/1.1 ").count(),
        1,
        "only one answer: {got}"
    );

    for coding in ["gzip, chunked", "identity", "chunked, chunked", "x-custom"] {
        let mut s = TcpStream::connect(addr).expect("connect");
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: {coding}\r\n\r\n0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).expect("write");
        let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5));
        assert!(
            got.starts_with("HTTP/1.1 501") || got.starts_with("HTTP/1.1 400"),
            "{coding}: {got}"
        );
        assert!(closed, "{coding}: connection left open");
    }
}

#[test]
fn slow_headers_idle_connections_and_stalled_handshakes_are_dropped_in_seconds() {
    let node = NodeProc::start(
        &NodeSpec::default()
            .api("header_timeout_secs = 2")
            .api("idle_timeout_secs = 2"),
    );
    let addr = node.api;
    // Slowloris: a header line per second, forever.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())
        .expect("write");
    let started = Instant::now();
    let mut dropped = false;
    for i in 0..8 {
        std::thread::sleep(Duration::from_secs(1));
        if s.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
            .is_err()
        {
            dropped = true;
            break;
        }
        let (_, closed) = read_until_closed(&mut s, Duration::from_millis(10));
        if closed {
            dropped = true;
            break;
        }
    }
    assert!(
        dropped,
        "slow client still connected after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "dropped only after {:?}",
        started.elapsed()
    );

    // A kept-alive connection that goes silent.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .expect("write");
    let started = Instant::now();
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(8));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(closed, "idle connection kept past 8 s");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed before the idle time"
    );

    // The mesh listener: a silent TCP connection, and a TLS record header that never finishes.
    for first_bytes in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00][..]] {
        let mut s = TcpStream::connect(node.mesh).expect("connect mesh");
        s.write_all(first_bytes).expect("write");
        let started = Instant::now();
        let (_, closed) = read_until_closed(&mut s, Duration::from_secs(8));
        assert!(
            closed,
            "stalled handshake ({first_bytes:?}) kept past 8 s (limit 3 s)"
        );
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "dropped before its time"
        );
    }
}

#[test]
fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let node = NodeProc::start(&NodeSpec::default().api("max_connections_per_client = 8"));
    let held: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(node.api).expect("connect");
            s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .expect("write");
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).expect("answer");
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            s
        })
        .collect();
    let ninth = http::get(node.api, "/health");
    assert_eq!(ninth.status, 503, "{}", ninth.text());
    assert_eq!(ninth.json()["error"]["code"], "too_many_connections");
    // Another client address is not affected (curl leaves from 127.0.0.77).
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "--interface",
            "127.0.0.77",
        ])
        .arg(format!("http://{}/health", node.api))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    drop(held);
    assert_eventually(Duration::from_secs(5), "places given back", || {
        http::get(node.api, "/health").status == 200
    });
}

#[test]
fn expired_or_future_leaf_certificates_are_refused_on_the_mesh() {
    let unix = |t: i64| time::OffsetDateTime::from_unix_timestamp(t).expect("time");
    let a = NodeProc::start(&NodeSpec::default());
    let b = NodeProc::start(&NodeSpec::default());
    a.approve(&b, &[], 1);
    let as_b = As::node(&b).expect("b's credentials");
    assert_eq!(
        mesh::call(a.mesh, Some(&as_b), "GET", "/mesh/v1/hello", None).0,
        200,
        "b's own leaf works"
    );

    let identity = arknet::identity::Identity::load_or_create(&b.data_dir).expect("b's identity");
    let dir = tempfile::tempdir().expect("tempdir");
    let day = time::Duration::days(1);
    let now = time::OffsetDateTime::now_utc();
    let cases = [
        ("expired in 2020", unix(1_546_300_800), unix(1_577_836_800)),
        (
            "expired an hour ago",
            now - day,
            now - time::Duration::hours(1),
        ),
        ("valid from tomorrow", now + day, now + 2 * day),
    ];
    for (what, from, until) in cases {
        let leaf = identity.leaf_valid(from, until).expect("leaf");
        let key = dir.path().join("k.pem");
        let chain = dir.path().join("c.pem");
        std::fs::write(&key, &leaf.key_pem).expect("key");
        std::fs::write(&chain, format!("{}{}", leaf.cert_pem, leaf.identity_pem)).expect("chain");
        let who = As { key, chain };
        let (status, body) = mesh::call(a.mesh, Some(&who), "GET", "/mesh/v1/hello", None);
        assert_eq!(status, 0, "{what}: answered {status} {body}");
    }
    // Within the clock-skew allowance (a peer whose clock is a minute ahead) is fine.
    let leaf = identity
        .leaf_valid(now + time::Duration::minutes(1), now + day)
        .expect("leaf");
    let key = dir.path().join("k.pem");
    let chain = dir.path().join("c.pem");
    std::fs::write(&key, &leaf.key_pem).expect("key");
    std::fs::write(&chain, format!("{}{}", leaf.cert_pem, leaf.identity_pem)).expect("chain");
    let who = As { key, chain };
    assert_eq!(
        mesh::call(a.mesh, Some(&who), "GET", "/mesh/v1/hello", None).0,
        200
    );
}

#[test]
fn a_hostile_peer_gets_nothing_but_its_status_and_stream_through_to_our_client() {
    let hostile = Ark::start(FakeConfig::both(&["evil-model"]).hostile(), 4);
    let us = Ark::start(FakeConfig::ollama(&["local-model"]), 4);
    share(&hostile, &us, &["evil-model"], 2);
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": "evil-model", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "evil-model", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/api/chat",
            json!({"model": "evil-model", "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ];
    for (path, body) in &cases {
        let rsp = us.node.post(path, body);
        assert_eq!(rsp.status, 200, "{path}: {}", rsp.text());
        for (name, value) in HOSTILE_HEADERS {
            if name == "content-type" {
                assert_ne!(
                    rsp.header(name),
                    Some(value),
                    "{path}: the peer's content type"
                );
                continue;
            }
            assert_eq!(
                rsp.header(name),
                None,
                "{path}: the peer's `{name}` reached the client"
            );
        }
        let ct = rsp.header("content-type").unwrap_or_default();
        assert!(
            [
                "application/json",
                "text/event-stream",
                "application/x-ndjson"
            ]
            .contains(&ct),
            "{path}: content type {ct}"
        );
        assert_eq!(rsp.header("x-content-type-options"), Some("nosniff"));
        assert!(!rsp.text().is_empty());
    }
    // The audit and the metrics record our own count, marked, not the peer's claim.
    let entries: Vec<Value> = us.node.get("/audit").json()["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let outbound: Vec<&Value> = entries
        .iter()
        .filter(|e| e["direction"] == "outbound")
        .collect();
    assert_eq!(outbound.len(), cases.len(), "{entries:?}");
    for e in outbound {
        assert_eq!(e["claim_refused"], true, "{e}");
        assert_eq!(e["token_source"], "counted", "{e}");
        assert!(
            e["completion_tokens"].as_u64().is_none_or(|n| n < 100),
            "{e}"
        );
        assert!(
            e["prompt_tokens"]
                .as_u64()
                .is_none_or(|n| n < HOSTILE_TOKENS),
            "{e}"
        );
    }
    let metrics = us.node.get("/metrics").text();
    let token_lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("arknet_peer_tokens_total{"))
        .collect();
    assert!(!token_lines.is_empty(), "our own counts are in the metrics");
    for line in token_lines {
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("value");
        assert!(n < 1000.0, "a claimed count reached the metrics: {line}");
    }
}

#[test]
fn a_local_body_that_is_not_utf8_json_is_refused_before_any_backend() {
    let ark = Ark::start(FakeConfig::ollama(&["m"]), 4);
    let mut body = br#"{"model":"m","messages":[{"role":"user","content":"caf"#.to_vec();
    body.extend_from_slice(&[0xe9, 0xff]);
    body.extend_from_slice(br#""}]}"#);
    let rsp = http::request(
        ark.node.api,
        "POST",
        "/api/chat",
        &[("Content-Type", "application/json")],
        &body,
    );
    assert_eq!(rsp.status, 400, "{}", rsp.text());
    assert!(rsp.text().contains("UTF-8"), "{}", rsp.text());
    assert!(
        ark.backend.request_to("/api/chat").is_none(),
        "the backend saw the request"
    );
}

#[test]
fn headers_that_connection_names_stop_at_the_gateway() {
    let ark = Ark::start(FakeConfig::ollama(&["m"]), 4);
    let body =
        json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    let rsp = http::request(
        ark.node.api,
        "POST",
        "/api/chat",
        &[
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive, X-Hop-Secret"),
            ("X-Hop-Secret", "for-the-next-hop-only"),
            ("X-End-To-End", "kept"),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let got = ark
        .backend
        .request_to("/api/chat")
        .expect("the backend got the chat");
    let has = |name: &str| got.headers.iter().any(|(k, _)| k == name);
    assert!(!has("x-hop-secret"), "{:?}", got.headers);
    assert!(has("x-end-to-end"), "{:?}", got.headers);
}

#[test]
fn another_sites_page_cannot_spend_the_gpu_either() {
    let ark = Ark::start(FakeConfig::ollama(&["m"]), 4);
    let body =
        json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    for headers in [
        &[
            ("Content-Type", "text/plain"),
            ("Sec-Fetch-Site", "cross-site"),
        ][..],
        &[
            ("Content-Type", "text/plain"),
            ("Origin", "http://evil.example"),
        ][..],
    ] {
        let rsp = raw(&ark.node, "POST", "/api/chat", headers, &body);
        assert_eq!(rsp.status, 403, "{headers:?}: {}", rsp.text());
    }
    assert!(
        ark.backend.request_to("/api/chat").is_none(),
        "the backend ran a cross-site request"
    );
    // Reads are harmless (a cross-site page cannot read the answer), and the node's own pages
    // and plain clients are served.
    let listing = raw(
        &ark.node,
        "GET",
        "/api/tags",
        &[("Sec-Fetch-Site", "cross-site")],
        "",
    );
    assert_eq!(listing.status, 200);
    let own = raw(
        &ark.node,
        "POST",
        "/api/chat",
        &[
            ("Content-Type", "application/json"),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        &body,
    );
    assert_eq!(own.status, 200, "{}", own.text());
    assert!(ark.backend.request_to("/api/chat").is_some());
}

#[test]
fn a_peer_announcing_another_protocol_version_is_refused_with_the_supported_ones() {
    let a = NodeProc::start(&NodeSpec::default());
    let b = NodeProc::start(&NodeSpec::default());
    a.approve(&b, &[], 1);
    let who = As::node(&b).expect("b's credentials");
    for (version, want) in [("99", 400), ("x", 400), ("1", 200)] {
        let out = Command::new("curl")
            .args(["-sS", "-k", "--max-time", "20", "-w", "\n%{http_code}"])
            .arg("--cert")
            .arg(&who.chain)
            .arg("--key")
            .arg(&who.key)
            .args(["-H", &format!("x-arknet-protocol: {version}")])
            .arg(format!("https://{}/mesh/v1/hello", a.mesh))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        assert_eq!(
            code.trim().parse::<u16>().ok(),
            Some(want),
            "version {version}: {body}"
        );
        if want == 400 {
            let v: Value = serde_json::from_str(body).expect("JSON refusal");
            assert_eq!(v["error"]["code"], "protocol_version", "{v}");
            assert_eq!(v["supported"], json!([1]), "{v}");
        }
    }
}

#[test]
fn fresh_keys_from_one_address_cannot_flood_the_pending_list() {
    let idle = || NodeSpec::with_backend(BackendSpec::ollama("http://127.0.0.1:9"));
    let node = NodeProc::start(&idle());
    // Five strangers, each a real node with its own key and leaf, knock from one address.
    let strangers = Grid::start(&vec![idle(); 5]);
    for stranger in &strangers.nodes {
        let who = As::node(stranger);
        let (status, body) = mesh::call(node.mesh, who.as_ref(), "GET", "/mesh/v1/hello", None);
        assert_eq!(status, 403, "{body}");
    }
    let pending = node.get("/peers/pending").json();
    assert_eq!(
        pending["peers"].as_array().map(Vec::len),
        Some(4),
        "{pending}"
    );
    let metrics = node.get("/metrics").text();
    assert!(
        metrics.contains("arknet_mesh_strangers_unlisted_total 1"),
        "{metrics}"
    );
    // Not listed is not locked out: the owner can still approve the fifth by its key.
    let fifth = strangers.node(4);
    assert_eq!(node.approve(fifth, &[], 1).status, 200);
    let (status, body) = mesh::call(
        node.mesh,
        As::node(fifth).as_ref(),
        "GET",
        "/mesh/v1/hello",
        None,
    );
    assert_eq!(status, 200, "{body}");
}
