//! WireGuard: two namespaces whose nodes know each other only through a real userspace
//! WireGuard tunnel (wireguard-go), mDNS off. Each node finds the other in its `wg` peer list,
//! proves its key by hello over the tunnel, and a request is routed through the tunnel.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::grid::assert_eventually;
use support::netns::{Host, Lan, NsNode, NsProc};

fn wg_key(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("wg")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wg (wireguard-tools) is installed by .ci/run");
    if let Some(input) = stdin {
        child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wg");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn in_ns(host: &Host, args: &[&str]) {
    let out = host
        .command(args[0])
        .args(&args[1..])
        .output()
        .expect("command in namespace");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nodes_behind_a_wireguard_tunnel_find_each_other_and_route_through_it() {
    assert!(
        Path::new("/usr/bin/wireguard-go").exists(),
        "wireguard-go missing: apt-get install wireguard-go wireguard-tools"
    );
    let Some(lan) = Lan::create(2) else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = std::process::id() % 100_000;
    // Interface names are unique across namespaces: wireguard-go's control socket lives in the
    // shared /run/wireguard.
    let ifaces = [format!("wg{tag}a"), format!("wg{tag}b")];
    let tunnel_ip = |i: usize| format!("10.99.{}.{}", tag % 250, i + 1);
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| {
            let private = wg_key(&["genkey"], None);
            let public = wg_key(&["pubkey"], Some(&private));
            (private, public)
        })
        .collect();
    let mut wg_procs: Vec<NsProc> = Vec::new();
    for (i, host) in lan.hosts.iter().enumerate() {
        let mut cmd = host.command("wireguard-go");
        cmd.args(["-f", &ifaces[i]])
            .env("WG_PROCESS_FOREGROUND", "1");
        let log = dir.path().join(format!("wg{i}.log"));
        let file = std::fs::File::create(&log).expect("log");
        let child = cmd
            .stdout(file.try_clone().expect("fd"))
            .stderr(file)
            .spawn()
            .expect("wireguard-go");
        wg_procs.push(NsProc { child, log });
        assert_eventually(Duration::from_secs(10), "tunnel interface created", || {
            host.command("ip")
                .args(["link", "show", &ifaces[i]])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    }
    for (i, host) in lan.hosts.iter().enumerate() {
        let other = 1 - i;
        let key_file = dir.path().join(format!("private{i}"));
        std::fs::write(&key_file, &keys[i].0).expect("key file");
        in_ns(
            host,
            &[
                "wg",
                "set",
                &ifaces[i],
                "private-key",
                &key_file.display().to_string(),
                "listen-port",
                "51820",
                "peer",
                &keys[other].1,
                "allowed-ips",
                &format!("{}/32", tunnel_ip(other)),
                "endpoint",
                &format!("{}:51820", lan.hosts[other].ip),
                "persistent-keepalive",
                "1",
            ],
        );
        in_ns(
            host,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", tunnel_ip(i)),
                "dev",
                &ifaces[i],
            ],
        );
        in_ns(host, &["ip", "link", "set", &ifaces[i], "up"]);
    }
    let discovery = |i: usize| {
        format!(
            "mdns = false\nwireguard = {{ enabled = true, interface = \"{}\" }}",
            ifaces[i]
        )
    };
    let models: [&[&str]; 2] = [&["llama3.1:8b"], &["qwen3.5:35b"]];
    let _nodes: Vec<NsNode> = lan
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| NsNode::start(h, models[i], &discovery(i)))
        .collect();
    let ids: Vec<(String, String)> = lan
        .hosts
        .iter()
        .map(|h| {
            let v = h.api("GET", "/health", None).1;
            (
                v["node_id"].as_str().unwrap_or_default().to_string(),
                v["public_key"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();

    for (i, host) in lan.hosts.iter().enumerate() {
        let other = 1 - i;
        assert_eventually(
            Duration::from_secs(30),
            "the tunnel peer is discovered via wireguard",
            || {
                host.api("GET", "/peers/discovered", None).1["peers"]
                    .as_array()
                    .is_some_and(|ps| {
                        ps.iter().any(|p| {
                            p["public_key"] == ids[other].1.as_str()
                                && p["sources"]
                                    .as_array()
                                    .is_some_and(|s| s.iter().any(|x| x == "wireguard"))
                                && p["endpoint"] == format!("{}:8911", tunnel_ip(other)).as_str()
                                && p["wireguard_key"] == keys[other].1.as_str()
                                && p["state"] == "pending"
                        })
                    })
            },
        );
    }

    let (a, b) = (&lan.hosts[0], &lan.hosts[1]);
    let approve = |on: &Host, peer: &(String, String), models: &[&str]| {
        let body = json!({"node_id": peer.0, "public_key": peer.1, "permissions": {"models_shared": models, "max_concurrent_requests": 2}});
        let (status, v) = on.api("POST", "/peers/approve", Some(&body));
        assert_eq!(status, 200, "{v}");
    };
    approve(b, &ids[0], &["qwen3.5:35b"]);
    approve(a, &ids[1], &[]);
    assert_eventually(
        Duration::from_secs(15),
        "A learns qwen over the tunnel",
        || {
            a.api("GET", "/v1/models", None).1["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|m| m["id"] == "qwen3.5:35b"))
        },
    );
    let rx_before = tunnel_rx_bytes(a, &ifaces[0]);
    let (status, body) = a.api(
        "POST",
        "/api/chat",
        Some(&json!({"model": "qwen3.5:35b", "stream": false, "messages": [{"role": "user", "content": "over the tunnel"}]})),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        tunnel_rx_bytes(a, &ifaces[0]) > rx_before,
        "the answer came through the WireGuard tunnel"
    );
    drop(wg_procs);
}

/// Bytes received from the tunnel peer (`wg show <if> transfer`).
fn tunnel_rx_bytes(host: &Host, iface: &str) -> u64 {
    let out = host
        .command("wg")
        .args(["show", iface, "transfer"])
        .output()
        .expect("wg show");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
