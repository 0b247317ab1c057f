//! `approved_peers.json` on disk: hand edits apply without restart, a corrupt file is reported and
//! ignored without losing the last good approvals, and a `kill -9` during approval churn never
//! leaves a torn file or loses an acknowledged approval.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::grid::{assert_eventually, BackendSpec, NodeProc, NodeSpec};
use support::http;

fn node() -> NodeProc {
    NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(
        "http://127.0.0.1:9",
    )))
}

fn key(i: u32) -> String {
    use std::fmt::Write;
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&i.to_be_bytes());
    bytes[31] = 1;
    // Standard base64 of 32 bytes, without a dependency in the tests.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (k, shift) in [18, 12, 6, 0].iter().enumerate() {
            if k <= c.len() {
                let _ = write!(out, "{}", T[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn file_of(node: &NodeProc) -> std::path::PathBuf {
    node.data_dir.join("approved_peers.json")
}

fn approved_ids(node: &NodeProc) -> BTreeSet<String> {
    node.get("/peers/approved").json()["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["node_id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_hand_edit_applies_without_restart_and_a_corrupt_file_keeps_the_last_good() {
    let a = node();
    let rsp = a.post(
        "/peers/approve",
        &json!({"node_id": "api-peer", "public_key": key(1)}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());

    let mut file: Value =
        serde_json::from_str(&std::fs::read_to_string(file_of(&a)).expect("read")).expect("json");
    file["peers"].as_array_mut().expect("peers").push(json!({
        "node_id": "hand-peer", "public_key": key(2), "name": "by hand", "approved_at": "2026-03-15T10:30:00Z",
        "permissions": {"can_request_inference": true, "can_pull_models": false, "models_shared": ["m"], "max_concurrent_requests": 2}
    }));
    std::fs::write(
        file_of(&a),
        serde_json::to_string_pretty(&file).expect("json"),
    )
    .expect("hand edit");
    assert_eventually(Duration::from_secs(5), "hand edit picked up", || {
        approved_ids(&a).contains("hand-peer")
    });

    std::fs::write(file_of(&a), "{ \"peers\": [ { \"node_id\": ").expect("corrupt");
    assert_eventually(Duration::from_secs(5), "corruption reported", || {
        a.get("/peers/status").json()["approvals_file"]["valid"] == false
    });
    let status = a.get("/peers/status").json();
    assert!(
        status["approvals_file"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("approved_peers.json:1:")),
        "{status}"
    );
    assert!(a
        .get("/metrics")
        .text()
        .contains("arknet_approvals_file_valid 0"));
    assert_eq!(
        approved_ids(&a),
        BTreeSet::from(["api-peer".to_string(), "hand-peer".to_string()]),
        "last good approvals stay"
    );
    let refused = a.post(
        "/peers/approve",
        &json!({"node_id": "third", "public_key": key(3)}),
    );
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(
        std::fs::read_to_string(file_of(&a)).expect("read"),
        "{ \"peers\": [ { \"node_id\": ",
        "the corrupt file is never replaced"
    );

    std::fs::write(file_of(&a), serde_json::to_string(&file).expect("json")).expect("fix");
    assert_eventually(Duration::from_secs(5), "valid again", || {
        a.get("/peers/status").json()["approvals_file"]["valid"] == true
    });
    assert_eq!(
        a.post(
            "/peers/approve",
            &json!({"node_id": "third", "public_key": key(3)})
        )
        .status,
        200
    );
}

#[test]
fn kill_9_during_approval_churn_never_loses_an_acknowledged_approval() {
    let mut a = node();
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut i = 0u32;
    for round in 0..3 {
        let api = a.api;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_w = stop.clone();
        let mut acked_round = acked.clone();
        let mut n = i;
        let worker = std::thread::spawn(move || {
            // Approve a new peer and revoke an older one, over and over, until the node dies.
            let mut done = 0;
            let mut uncertain = None;
            while !stop_w.load(std::sync::atomic::Ordering::Relaxed) && done < 400 {
                n += 1;
                let id = format!("churn-{n}");
                let rsp =
                    http::try_send_raw(api, &approve_raw(&id, &key(n)), Duration::from_secs(5));
                match rsp {
                    Ok(r) if r.status == 200 => {
                        acked_round.insert(id);
                    }
                    Ok(r) => panic!("approve {id} answered {}: {}", r.status, r.text()),
                    Err(e) => {
                        eprintln!("approve {id}: {e}");
                        break;
                    }
                }
                if n % 3 == 0 && acked_round.contains(&format!("churn-{}", n - 1)) {
                    let old = format!("churn-{}", n - 1);
                    let body = json!({"node_id": old}).to_string();
                    let raw = format!(
                        "POST /peers/revoke HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    match http::try_send_raw(api, raw.as_bytes(), Duration::from_secs(5)) {
                        Ok(r) if r.status == 200 => {
                            acked_round.remove(&old);
                        }
                        _ => {
                            // The revocation was sent but not acknowledged: it may or may not
                            // have been applied before the kill.
                            uncertain = Some(old);
                            break;
                        }
                    }
                }
                done += 1;
            }
            (acked_round, n, done, uncertain)
        });
        std::thread::sleep(Duration::from_millis(1000 + 250 * round));
        let pid = a.pid();
        let _ = std::process::Command::new("kill")
            .arg("-9")
            .arg(pid.to_string())
            .status();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut acked_after, last_n, done, uncertain) = worker.join().expect("worker");
        if let Some(old) = uncertain {
            acked_after.remove(&old);
        }
        a.kill();
        let text = std::fs::read_to_string(file_of(&a)).expect("file exists");
        let file: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("torn file after kill -9 ({e}):\n{text}"));
        let on_disk: BTreeSet<String> = file["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter_map(|p| p["node_id"].as_str().map(str::to_string))
            .collect();
        let lost: Vec<&String> = acked_after.difference(&on_disk).collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged approvals lost after kill -9: {lost:?}"
        );
        // At most the one request in flight at the kill may be on disk without an ack.
        assert!(
            on_disk.difference(&acked_after).count() <= 1,
            "round {round}: unexpected entries"
        );
        assert!(
            done >= 20,
            "round {round}: only {done} cycles before the kill"
        );
        eprintln!(
            "round {round}: {done} cycles, {} approvals on disk",
            on_disk.len()
        );
        acked = on_disk;
        i = last_n + 1;
        a.restart();
        assert_eq!(
            approved_ids(&a),
            acked,
            "the restarted node serves what is on disk"
        );
    }
}

fn approve_raw(id: &str, key: &str) -> Vec<u8> {
    let body = json!({"node_id": id, "public_key": key, "permissions": {"models_shared": ["m"]}})
        .to_string();
    format!(
        "POST /peers/approve HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
