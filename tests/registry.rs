//! The public registry (issue #13) against a real `arknet registry serve` on loopback: every
//! kind of bad write refused with its status and reason, every answer signed, HTTPS only, slow
//! headers cut, records expiring, surviving restarts and kill -9.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arknet::registry::client::{Answer, RegistryClient};
use arknet::registry::record::{DeleteRequest, Record, SignedRecord, Signer};
use serde_json::{json, Value};
use support::registry::RegistryProc;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn signer(n: u32) -> Signer {
    let mut seed = [7u8; 32];
    seed[..4].copy_from_slice(&n.to_le_bytes());
    seed[4..8].copy_from_slice(&std::process::id().to_le_bytes());
    Signer::from_seed(&seed).expect("seed")
}

fn record(s: &Signer, id: &str, seq: u64) -> Record {
    let t = now();
    Record {
        node_id: id.to_string(),
        public_key: s.public_key().to_string(),
        endpoint: "127.0.0.1:7443".into(),
        models: vec!["qwen3:8b".into()],
        seq,
        issued_at: t,
        expires: t + 300,
    }
}

async fn post(c: &RegistryClient, path: &str, body: &Value) -> Answer {
    let bytes = serde_json::to_vec(body).expect("json");
    c.call("POST", path, Some(&bytes))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn register(c: &RegistryClient, w: &SignedRecord) -> Answer {
    post(c, "/registry/v1/register", &json!(w)).await
}

fn code(a: &Answer) -> String {
    a.json()["error"]["code"].as_str().unwrap_or("").to_string()
}

fn refusals_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("arknet_registry_refusals_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

const MATRIX_CONFIG: &str = "reachability_check = false\nwrites_per_key_per_minute = 3\n\
     writes_per_address_per_minute = 60\nmax_ttl_secs = 600\nmax_body_bytes = 8192\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_write_is_refused_with_its_status_and_reason() {
    let reg = RegistryProc::start(MATRIX_CONFIG, None);
    refusal_matrix(&reg, None).await;
}

/// Every kind of bad write against `reg`; `reader`, another instance on the same database,
/// must then read what `reg` accepted.
async fn refusal_matrix(reg: &RegistryProc, reader: Option<&RegistryProc>) {
    let c = reg.client();
    let mut refused: Vec<(&str, u16, String)> = Vec::new();
    let mut expect = |case: &'static str, a: &Answer, status: u16, want: &str| {
        assert_eq!(
            (a.status, code(a).as_str()),
            (status, want),
            "{case}: {}",
            a.json()
        );
        assert!(a.json()["error"]["message"].is_string(), "{case}");
        refused.push((case, a.status, code(a)));
    };

    let owner = signer(1);
    let ok = register(&c, &record(&owner, "owner", 10).sign(&owner)).await;
    assert_eq!(ok.status, 200, "{}", ok.json());
    assert_eq!(ok.json()["stored"], true);

    // Unsigned.
    let mut w = record(&owner, "owner", 11).sign(&owner);
    w.signature.clear();
    expect("unsigned", &register(&c, &w).await, 401, "unsigned");
    // Forged: signed by another key than the one it names.
    let thief = signer(2);
    let forged = SignedRecord {
        record: record(&owner, "owner", 11),
        signature: thief.sign_b64(&record(&owner, "owner", 11).canonical()),
    };
    expect("forged", &register(&c, &forged).await, 401, "bad_signature");
    // Tampered after signing: the endpoint moved to a victim's address.
    let mut tampered = record(&owner, "owner", 11).sign(&owner);
    tampered.record.endpoint = "127.0.0.9:7443".into();
    expect(
        "tampered",
        &register(&c, &tampered).await,
        401,
        "bad_signature",
    );
    // Replays: the same seq again, and a lower one.
    let same = record(&owner, "owner", 10).sign(&owner);
    expect("replay same seq", &register(&c, &same).await, 409, "replay");
    let lower = record(&owner, "owner", 3).sign(&owner);
    expect(
        "replay lower seq",
        &register(&c, &lower).await,
        409,
        "replay",
    );
    // Replay of an old capture: issued_at outside the clock window.
    let old = Record {
        issued_at: now() - 1000,
        expires: now() + 100,
        ..record(&owner, "owner", 12)
    }
    .sign(&owner);
    expect(
        "stale issued_at",
        &register(&c, &old).await,
        400,
        "clock_window",
    );
    // Expired, and asking to live longer than the registry allows.
    let expired = Record {
        issued_at: now() - 100,
        expires: now() - 1,
        ..record(&owner, "owner", 12)
    }
    .sign(&owner);
    expect("expired", &register(&c, &expired).await, 400, "expired");
    let forever = Record {
        expires: now() + 100_000,
        ..record(&owner, "owner", 12)
    }
    .sign(&owner);
    expect(
        "ttl too long",
        &register(&c, &forever).await,
        400,
        "ttl_too_long",
    );
    // Cross-key: another key claiming the owner's node id.
    let cross = record(&thief, "owner", 1).sign(&thief);
    expect(
        "cross-key node_id",
        &register(&c, &cross).await,
        409,
        "node_id_taken",
    );
    // Unroutable even on a private registry.
    let nowhere = Record {
        endpoint: "0.0.0.0:7443".into(),
        ..record(&thief, "thief", 1)
    }
    .sign(&thief);
    expect(
        "unspecified endpoint",
        &register(&c, &nowhere).await,
        422,
        "unroutable_endpoint",
    );
    let multicast = Record {
        endpoint: "224.0.0.251:5353".into(),
        ..record(&thief, "thief", 1)
    }
    .sign(&thief);
    expect(
        "multicast endpoint",
        &register(&c, &multicast).await,
        422,
        "unroutable_endpoint",
    );
    // Oversized: too many models; and a body over the cap (refused from its length).
    let many = Record {
        models: (0..65).map(|i| format!("m{i}")).collect(),
        ..record(&thief, "thief", 1)
    }
    .sign(&thief);
    expect(
        "too many models",
        &register(&c, &many).await,
        413,
        "oversized",
    );
    let big = json!({"record": record(&thief, "thief", 1), "signature": "A".repeat(9000)});
    expect(
        "body over cap",
        &post(&c, "/registry/v1/register", &big).await,
        413,
        "oversized",
    );
    // Malformed JSON and unknown fields.
    let junk = c
        .call("POST", "/registry/v1/register", Some(b"{not json"))
        .await
        .expect("junk");
    expect("malformed json", &junk, 400, "malformed");
    let mut extra = json!(record(&thief, "thief", 1).sign(&thief));
    extra["record"]["hardware"] = json!("rtx 4090");
    expect(
        "unknown field",
        &post(&c, "/registry/v1/register", &extra).await,
        400,
        "malformed",
    );
    // Deletes: unsigned, forged, replayed, unknown.
    let mut del = DeleteRequest::signed("owner", &owner, 11, now());
    del.signature.clear();
    expect(
        "delete unsigned",
        &post(&c, "/registry/v1/delete", &json!(del)).await,
        401,
        "unsigned",
    );
    let mut del = DeleteRequest::signed("owner", &thief, 11, now());
    del.public_key = owner.public_key().to_string();
    expect(
        "delete forged",
        &post(&c, "/registry/v1/delete", &json!(del)).await,
        401,
        "bad_signature",
    );
    let del = DeleteRequest::signed("owner", &owner, 10, now());
    expect(
        "delete replay",
        &post(&c, "/registry/v1/delete", &json!(del)).await,
        409,
        "replay",
    );
    let nobody = signer(3);
    let del = DeleteRequest::signed("nobody", &nobody, 1, now());
    expect(
        "delete unknown",
        &post(&c, "/registry/v1/delete", &json!(del)).await,
        404,
        "not_found",
    );
    // Per key: 3 writes a minute (the first register counted); forged writes above did not
    // spend the owner's quota.
    for seq in [20, 21] {
        let a = register(&c, &record(&owner, "owner", seq).sign(&owner)).await;
        assert_eq!(a.status, 200, "{}", a.json());
    }
    let fourth = register(&c, &record(&owner, "owner", 22).sign(&owner)).await;
    expect("rate limited per key", &fourth, 429, "rate_limited");
    assert!(fourth.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("key")));
    // Per source address: 60 a minute; fresh keys until the address is cut off.
    let mut limited = None;
    for n in 100..200u32 {
        let s = signer(n);
        let a = register(&c, &record(&s, &format!("n{n}"), 1).sign(&s)).await;
        if a.status != 200 {
            limited = Some(a);
            break;
        }
    }
    let limited = limited.expect("the address limit must bite within 100 writes");
    assert!(limited.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("address")));
    expect("rate limited per address", &limited, 429, "rate_limited");

    // The registry counted exactly these refusals.
    let metrics = c.call("GET", "/metrics", None).await.expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert_eq!(refusals_total(&text), refused.len() as u64, "{text}");
    eprintln!("{} refusals:", refused.len());
    for (case, status, code) in &refused {
        eprintln!("  {case}: {status} {code}");
    }
    // The owner's record is intact: the last accepted write, signed by the owner.
    let key = arknet::upstream::query_value(&owner.public_key().to_string());
    let got = c
        .call("GET", &format!("/registry/v1/record?key={key}"), None)
        .await
        .expect("look-up");
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["record"]["seq"], 21);
    assert_eq!(got.json()["record"]["endpoint"], "127.0.0.1:7443");
    if let Some(other) = reader {
        let got = other
            .client()
            .call("GET", &format!("/registry/v1/record?key={key}"), None)
            .await
            .expect("look-up on the other instance");
        assert_eq!(got.status, 200, "{}", got.json());
        assert_eq!(
            got.json()["record"]["seq"],
            21,
            "a write on one is read on the other"
        );
        assert_ne!(
            got.registry_key, metrics.registry_key,
            "two instances, each signing with its own key"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_only_and_slow_headers_are_cut() {
    let reg = RegistryProc::start("reachability_check = false\n", None);
    // Plain HTTP gets no HTTP answer: the TLS handshake fails and the connection closes.
    let mut plain = std::net::TcpStream::connect(reg.addr).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    plain
        .write_all(b"GET /registry/v1/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(
        !String::from_utf8_lossy(&buf).starts_with("HTTP/"),
        "plain HTTP answered: {}",
        String::from_utf8_lossy(&buf)
    );
    // A TLS client that sends half a header is cut after the header deadline (1 s here).
    let mut ctx = boring::ssl::SslConnector::builder(boring::ssl::SslMethod::tls()).expect("ctx");
    ctx.set_verify(boring::ssl::SslVerifyMode::NONE);
    let tcp = std::net::TcpStream::connect(reg.addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut tls = ctx
        .build()
        .connect("localhost", tcp)
        .expect("TLS handshake");
    tls.write_all(b"GET /registry/v1/info HTTP/1.1\r\nHost: loc")
        .expect("write");
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "slow header held the connection {waited:?}"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
    // Every answer is signed, errors too.
    let c = reg.client();
    let info = c
        .call("GET", "/registry/v1/info", None)
        .await
        .expect("info");
    assert_eq!(info.status, 200);
    assert_eq!(
        info.json()["public_key"].as_str(),
        Some(info.registry_key.to_string().as_str())
    );
    let missing = c.call("GET", "/nope", None).await.expect("404 signed");
    assert_eq!(missing.status, 404);
    // A client pinning another registry key refuses the answers.
    let wrong = RegistryClient::new(&reg.url, Some(&reg.ca_file), Some(signer(9).public_key()))
        .expect("client");
    let err = wrong
        .call("GET", "/registry/v1/info", None)
        .await
        .expect_err("pinned key mismatch");
    assert!(err.contains("pinned"), "{err}");
    // `--check` validates the config; a bad key names its line.
    let out = std::process::Command::new(support::grid::ARKNET)
        .args(["registry", "serve", "--check", "--config"])
        .arg(&reg.config_path)
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = reg.config_path.with_file_name("bad.toml");
    let text = std::fs::read_to_string(&reg.config_path).expect("read");
    std::fs::write(&bad, format!("{text}max_ttl_secs = \"long\"\n")).expect("write");
    let out = std::process::Command::new(support::grid::ARKNET)
        .args(["registry", "serve", "--check", "--config"])
        .arg(&bad)
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().count() + 1;
    assert!(
        err.contains(&format!("bad.toml:{line}: key `max_ttl_secs`")),
        "{err}"
    );
}

const DURABILITY_CONFIG: &str = "reachability_check = false\nwrites_per_key_per_minute = 0\n\
     writes_per_address_per_minute = 0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_expire_survive_restart_and_kill_9_loses_no_acknowledged_write() {
    let mut reg = RegistryProc::start(DURABILITY_CONFIG, None);
    expiry_restart_and_kill_9(&mut reg, None).await;
}

/// Expiry, restart and kill -9 against `reg`; `reader`, another instance on the same
/// database, checks the acknowledged writes while `reg` is dead.
async fn expiry_restart_and_kill_9(reg: &mut RegistryProc, reader: Option<&RegistryProc>) {
    let c = reg.client();
    let short = signer(1);
    let t = now();
    let brief = Record {
        expires: t + 2,
        ..record(&short, "brief", 1)
    }
    .sign(&short);
    assert_eq!(register(&c, &brief).await.status, 200);
    let long = signer(2);
    assert_eq!(
        register(&c, &record(&long, "long", 1).sign(&long))
            .await
            .status,
        200
    );
    let listed = |a: &Answer| -> Vec<String> {
        a.json()["records"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|x| x["record"]["node_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let all = c
        .call("GET", "/registry/v1/records", None)
        .await
        .expect("list");
    assert_eq!(listed(&all).len(), 2, "{}", all.json());
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let all = c
        .call("GET", "/registry/v1/records", None)
        .await
        .expect("list");
    assert_eq!(listed(&all), ["long"], "{}", all.json());
    let gone = c
        .call("GET", "/registry/v1/record?node_id=brief", None)
        .await
        .expect("get");
    assert_eq!(gone.status, 404);

    // Streams of writes from 8 clients at once (so the registry commits them in groups, and
    // batches heartbeats), kill -9 in the middle: every acknowledged write is there after.
    // Each node registers, then heartbeats twice (the registry's read-free path).
    let acked = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let mut writers = Vec::new();
    for lane in 0..8u32 {
        let acked = acked.clone();
        let c = reg.client();
        writers.push(tokio::spawn(async move {
            for n in (1000 + lane..3000u32).step_by(8) {
                let s = signer(n);
                for seq in 1..=3 {
                    let w = record(&s, &format!("w{n}"), seq).sign(&s);
                    let bytes = serde_json::to_vec(&w).expect("json");
                    match c.call("POST", "/registry/v1/register", Some(&bytes)).await {
                        Ok(a) if a.status == 200 => {
                            acked
                                .lock()
                                .expect("lock")
                                .insert(w.record.node_id.clone(), seq);
                        }
                        _ => return,
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    reg.kill();
    for w in writers {
        let _ = w.await;
    }
    let acked: Vec<(String, u64)> = acked.lock().expect("lock").clone().into_iter().collect();
    assert!(
        acked.iter().any(|(_, seq)| *seq == 3),
        "no heartbeat acknowledged before the kill"
    );
    assert!(
        acked.len() > 5,
        "too few writes before the kill: {}",
        acked.len()
    );
    if let Some(other) = reader {
        // While the killed instance is down, the other serves every acknowledged record.
        let c = other.client();
        for (id, seq) in &acked {
            let a = c
                .call("GET", &format!("/registry/v1/record?node_id={id}"), None)
                .await
                .expect("get");
            assert_eq!(a.status, 200, "acknowledged {id} not on the other instance");
            // A later write may have committed with its answer lost to the kill.
            let stored = a.json()["record"]["seq"].as_u64().unwrap_or(0);
            assert!(
                (*seq..=3).contains(&stored),
                "{id}: acked seq {seq}, stored {stored}"
            );
        }
    }
    reg.restart();
    let c = reg.client();
    for (id, seq) in &acked {
        let a = c
            .call("GET", &format!("/registry/v1/record?node_id={id}"), None)
            .await
            .expect("get");
        assert_eq!(a.status, 200, "acknowledged {id} lost after kill -9");
        let stored = a.json()["record"]["seq"].as_u64().unwrap_or(0);
        assert!(
            (*seq..=3).contains(&stored),
            "{id}: acked seq {seq}, stored {stored}"
        );
    }
    eprintln!(
        "{} acknowledged writes before kill -9, all present after restart",
        acked.len()
    );
    // And the earlier record survived both the restart and the kill.
    let kept = c
        .call("GET", "/registry/v1/record?node_id=long", None)
        .await
        .expect("get");
    assert_eq!(kept.status, 200);
}

fn registry_table(reg: &RegistryProc, models: &[&str]) -> String {
    format!(
        "[discovery.registry]\nenabled = true\nurl = \"{}\"\nca_file = \"{}\"\nttl_secs = 60\n\
         fetch_interval_secs = 1\nadvertise_models = {:?}\n",
        reg.url,
        reg.ca_file.display(),
        models
    )
}

fn registry_sighting(node: &support::grid::NodeProc, key: &str) -> Option<Value> {
    node.get("/peers/discovered").json()["peers"]
        .as_array()?
        .iter()
        .find(|p| {
            p["public_key"] == key
                && p["sources"]
                    .as_array()
                    .is_some_and(|s| s.contains(&json!("registry")))
        })
        .cloned()
}

/// Approves what the registry made `node` discover (not what the test knows about the peer).
fn approve_sighting(node: &support::grid::NodeProc, seen: &Value, models: &[&str]) {
    let rsp = node.post(
        "/peers/approve",
        &json!({
            "node_id": seen["node_id"],
            "public_key": seen["public_key"],
            "endpoint": seen["endpoint"],
            "permissions": {"models_shared": models, "max_concurrent_requests": 2},
        }),
    );
    assert_eq!(rsp.status, 200, "approve: {}", rsp.text());
}

#[test]
fn two_nodes_find_each_other_only_through_the_registry_and_route_a_chat() {
    use support::fake_backend::FakeConfig;
    use support::grid::{assert_eventually, Ark};
    let reg = RegistryProc::start("writes_per_address_per_minute = 0\n", None);
    // mDNS is off (the harness default) and no static peers: the registry is the only way.
    let a = Ark::start_with(FakeConfig::ollama(&["llama3.1:8b"]), 4, |s| {
        s.table(&registry_table(&reg, &[]))
    });
    let mut b = Ark::start_with(FakeConfig::ollama(&["qwen3.5:35b"]), 4, |s| {
        s.table(&registry_table(&reg, &["qwen3.5:35b"]))
    });
    let (a_key, b_key) = (a.node.public_key(), b.node.public_key());
    let mut seen = (None, None);
    assert_eventually(
        Duration::from_secs(20),
        "each finds the other via the registry",
        || {
            seen = (
                registry_sighting(&a.node, &b_key),
                registry_sighting(&b.node, &a_key),
            );
            seen.0.is_some() && seen.1.is_some()
        },
    );
    let (b_seen, a_seen) = (seen.0.expect("b seen"), seen.1.expect("a seen"));
    for s in [&b_seen, &a_seen] {
        // `connect` may be there too: the other's registry-driven hello reached us first.
        let sources = s["sources"].as_array().expect("sources");
        assert!(
            sources.iter().all(|x| x == "registry" || x == "connect"),
            "{s}"
        );
        assert_eq!(s["state"], "pending", "found is not approved: {s}");
    }
    assert_eq!(b_seen["endpoint"], b.node.mesh.to_string());
    // The registry reached each node over mutual TLS before listing it; the CLI says so.
    let status = std::process::Command::new(support::grid::ARKNET)
        .args(["registry", "status", "--config"])
        .arg(&b.node.config_path)
        .args(["--url", &reg.url, "--ca-file"])
        .arg(&reg.ca_file)
        .output()
        .expect("registry status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(text.contains("reachable from the registry: yes"), "{text}");
    assert!(text.contains("models: qwen3.5:35b"), "{text}");
    // Nobody can list a victim's address as their own: a fresh key at a's endpoint is stored
    // but not listed, and the owner is told why.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let c = reg.client();
    let liar = signer(77);
    let claim = Record {
        endpoint: a.node.mesh.to_string(),
        ..record(&liar, "liar", 1)
    }
    .sign(&liar);
    let answer = rt.block_on(register(&c, &claim));
    assert_eq!(answer.status, 200, "{}", answer.json());
    assert_eq!(answer.json()["listed"], false, "{}", answer.json());
    assert_eq!(answer.json()["reachability"]["reachable"], false);
    let all = rt
        .block_on(c.call("GET", "/registry/v1/records", None))
        .expect("list");
    let listed: Vec<String> = all.json()["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["record"]["node_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        listed.len(),
        2,
        "only the two proven nodes are listed: {listed:?}"
    );
    assert!(!listed.contains(&"liar".to_string()));

    // Approve each other from what was discovered, then route a chat from a to b's model.
    approve_sighting(&b.node, &a_seen, &["qwen3.5:35b"]);
    approve_sighting(&a.node, &b_seen, &[]);
    assert_eventually(
        Duration::from_secs(15),
        "a learns b's models by hello",
        || {
            a.node.get("/peers/status").json()["peers"]
                .as_array()
                .is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["public_key"] == b_key.as_str()
                            && p["reachable"] == true
                            && !p["models_shared_with_us"]
                                .as_array()
                                .is_none_or(Vec::is_empty)
                    })
                })
        },
    );
    let before = b.backend.hits();
    let rsp = a.node.post(
        "/api/chat",
        &json!({"model": "qwen3.5:35b", "messages": [{"role": "user", "content": "hi"}], "stream": false}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(
        b.backend.hits(),
        before + 1,
        "the chat was served by b's backend"
    );

    // A clean shutdown withdraws b's record.
    b.node.terminate();
    let key = arknet::upstream::query_value(&b_key);
    assert_eventually(
        Duration::from_secs(10),
        "b's record withdrawn at shutdown",
        || {
            rt.block_on(c.call("GET", &format!("/registry/v1/record?key={key}"), None))
                .is_ok_and(|a| a.status == 404)
        },
    );
    b.node.kill();
    // `arknet registry deregister` withdraws a's record with a's key.
    let out = std::process::Command::new(support::grid::ARKNET)
        .args(["registry", "deregister", "--config"])
        .arg(&a.node.config_path)
        .args(["--url", &reg.url, "--ca-file"])
        .arg(&reg.ca_file)
        .output()
        .expect("registry deregister");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let key = arknet::upstream::query_value(&a_key);
    let gone = rt
        .block_on(c.call("GET", &format!("/registry/v1/record?key={key}"), None))
        .expect("look-up");
    assert_eq!(gone.status, 404, "{}", gone.json());
}

#[test]
fn a_listed_key_its_endpoint_cannot_prove_is_dropped_and_counted_as_a_spoof() {
    use support::fake_backend::FakeConfig;
    use support::grid::{assert_eventually, Ark};
    // This registry lists without dialling, so a lie reaches the nodes: they must catch it.
    let reg = RegistryProc::start("reachability_check = false\n", None);
    let a = Ark::start_with(FakeConfig::ollama(&["llama3.1:8b"]), 4, |s| {
        s.table(&registry_table(&reg, &[]))
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let c = reg.client();
    let liar = signer(78);
    // The liar's record points at a's own mesh listener, which answers with a's key.
    let claim = Record {
        endpoint: a.node.mesh.to_string(),
        ..record(&liar, "liar", 1)
    }
    .sign(&liar);
    let answer = rt.block_on(register(&c, &claim));
    assert_eq!(answer.json()["listed"], true, "{}", answer.json());
    let spoofs = || -> u64 {
        a.node
            .get("/metrics")
            .text()
            .lines()
            .find(|l| l.starts_with("arknet_mesh_spoofs_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert_eventually(
        Duration::from_secs(15),
        "a counts the liar as a spoof",
        || spoofs() >= 1,
    );
    let liar_key = liar.public_key().to_string();
    assert!(
        a.node.get("/peers/discovered").json()["peers"]
            .as_array()
            .is_none_or(|ps| ps.iter().all(|p| p["public_key"] != liar_key.as_str())),
        "an unproven key must not be listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_back_end_passes_the_same_suite_with_two_instances_on_one_database() {
    let pg = support::postgres::Postgres::start();
    let matrix_db = pg.create_db("matrix");
    let one = RegistryProc::start(MATRIX_CONFIG, Some(&matrix_db));
    let two = RegistryProc::start(MATRIX_CONFIG, Some(&matrix_db));
    refusal_matrix(&one, Some(&two)).await;
    drop((one, two));
    let durable_db = pg.create_db("durable");
    let mut one = RegistryProc::start(DURABILITY_CONFIG, Some(&durable_db));
    let two = RegistryProc::start(DURABILITY_CONFIG, Some(&durable_db));
    expiry_restart_and_kill_9(&mut one, Some(&two)).await;
}
