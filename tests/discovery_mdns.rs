//! mDNS discovery across network namespaces on a bridge (real multicast, never on the
//! machine's own interfaces): nodes find each other within seconds, are listed as pending, are
//! approved, route a request across the LAN, and a node that stops is noticed as gone.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::grid::assert_eventually;
use support::netns::{Host, Lan, NsNode, MDNS_ON_LAN};

fn discovered(host: &Host) -> Vec<Value> {
    host.api("GET", "/peers/discovered", None).1["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn identity(host: &Host) -> (String, String) {
    let h = host.api("GET", "/health", None).1;
    (
        h["node_id"].as_str().unwrap_or_default().to_string(),
        h["public_key"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn three_namespaces_discover_approve_route_and_notice_a_departure() {
    let Some(lan) = Lan::create(3) else { return };
    let models: [&[&str]; 3] = [&["llama3.1:8b"], &["qwen3.5:35b"], &["phi3:mini"]];
    let mut nodes: Vec<NsNode> = lan
        .hosts
        .iter()
        .zip(models)
        .map(|(h, m)| NsNode::start(h, m, MDNS_ON_LAN))
        .collect();
    let ids: Vec<(String, String)> = lan.hosts.iter().map(identity).collect();

    let started = std::time::Instant::now();
    for (i, host) in lan.hosts.iter().enumerate() {
        assert_eventually(
            Duration::from_secs(20),
            "each node lists the two others as pending via mdns",
            || {
                let seen = discovered(host);
                seen.len() == 2
                    && seen.iter().all(|p| {
                        p["state"] == "pending"
                            && p["sources"]
                                .as_array()
                                .is_some_and(|s| s.iter().any(|x| x == "mdns"))
                            && p["endpoint"]
                                .as_str()
                                .is_some_and(|e| e.starts_with("10.77."))
                            && ids
                                .iter()
                                .enumerate()
                                .any(|(j, (_, k))| j != i && p["public_key"] == k.as_str())
                    })
            },
        );
    }
    eprintln!("3 nodes discovered each other in {:?}", started.elapsed());

    // Owners approve: B shares qwen with A; A approves B back so hellos flow both ways.
    let (a, b) = (&lan.hosts[0], &lan.hosts[1]);
    let approve = |on: &Host, peer: &(String, String), models: &[&str]| {
        let (status, body) = on.api(
            "POST",
            "/peers/approve",
            Some(&json!({"node_id": peer.0, "public_key": peer.1, "permissions": {"models_shared": models, "max_concurrent_requests": 2}})),
        );
        assert_eq!(status, 200, "{body}");
    };
    approve(b, &ids[0], &["qwen3.5:35b"]);
    approve(a, &ids[1], &[]);
    assert_eventually(Duration::from_secs(15), "A learns qwen from B", || {
        a.api("GET", "/v1/models", None).1["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == "qwen3.5:35b"))
    });
    let (status, body) = a.api(
        "POST",
        "/api/chat",
        Some(&json!({"model": "qwen3.5:35b", "stream": false, "messages": [{"role": "user", "content": "hi"}]})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["done"], true);
    let audit = b.api("GET", "/audit?limit=10", None).1;
    assert_eq!(audit["entries"][0]["peer"], ids[0].0.as_str(), "{audit}");

    // C stops (SIGTERM: goodbye packets); A and B notice it is gone.
    nodes[2].node.terminate();
    for host in &lan.hosts[..2] {
        assert_eventually(Duration::from_secs(15), "the stopped node is gone", || {
            !discovered(host)
                .iter()
                .any(|p| p["public_key"] == ids[2].1.as_str())
        });
    }
    let log = nodes[0].node.log();
    assert!(!log.contains("panicked"), "{log}");
}
