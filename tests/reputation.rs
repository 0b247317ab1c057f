//! Reputation routes: a flaky peer and a slow peer lose traffic to a healthy one, a peer that
//! keeps failing is ejected, and after a kill -9 and restart the node still knows all of it.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::fake_backend::FakeConfig;
use support::grid::{assert_eventually, share, Ark};

const MODEL: &str = "shared-model";

fn chat(ark: &Ark) -> u16 {
    let body =
        json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    ark.node.post("/api/chat", &body).status
}

fn reputation_of(us: &Ark, peer: &Ark) -> Value {
    let id = peer.node.node_id();
    us.node.get("/peers/status").json()["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["node_id"] == id.as_str()).cloned())
        .map(|p| p["reputation"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn flaky_and_slow_peers_lose_traffic_to_a_healthy_one_and_the_node_remembers() {
    // The flaky peer has the model loaded (hot), the others not: by the hellos alone it would
    // be tried first. The slow one is otherwise the healthy one's equal; which of the two is
    // tried first depends on their hello round trips.
    let healthy = Ark::start(FakeConfig::ollama(&[MODEL]).loaded(&[]), 8);
    let flaky = Ark::start(FakeConfig::ollama(&[MODEL]).fail_every(2), 8);
    let slow = Ark::start(
        FakeConfig::ollama(&[MODEL])
            .loaded(&[])
            .first_byte_delay(Duration::from_millis(250)),
        8,
    );
    let mut us = Ark::start(FakeConfig::ollama(&["local-only"]), 4);
    for peer in [&healthy, &flaky, &slow] {
        share(peer, &us, &[MODEL], 4);
    }
    const REQUESTS: usize = 40;
    for _ in 0..REQUESTS {
        assert_eq!(
            chat(&us),
            200,
            "failover hides a flaky peer from the client"
        );
    }
    let (h, f, s) = (
        healthy.backend.hits(),
        flaky.backend.hits(),
        slow.backend.hits(),
    );
    eprintln!("requests served: healthy {h}, flaky {f} (half of them failed), slow {s}");
    assert!(
        h >= REQUESTS * 6 / 10,
        "the healthy peer served {h} of {REQUESTS}"
    );
    assert!(
        f <= REQUESTS / 4 && s <= REQUESTS / 4,
        "flaky {f}, slow {s}"
    );

    let rep_flaky = reputation_of(&us, &flaky);
    let rep_slow = reputation_of(&us, &slow);
    let rep_healthy = reputation_of(&us, &healthy);
    assert!(
        rep_flaky["requests_failed"].as_u64() > Some(0),
        "{rep_flaky}"
    );
    assert!(
        rep_flaky["success_rate"].as_f64() < rep_healthy["success_rate"].as_f64(),
        "{rep_flaky} {rep_healthy}"
    );
    // Whether the slow peer was tried at all depends on the hello round trips; when it was,
    // its measured time to first byte is what pushed it behind.
    if s > 0 {
        assert!(
            rep_slow["ttfb_ewma_ms"].as_f64() > Some(200.0),
            "{rep_slow}"
        );
    }
    assert!(
        rep_healthy["ttfb_ewma_ms"].as_f64() < Some(200.0),
        "{rep_healthy}"
    );
    assert!(
        rep_healthy["uptime_hour"].as_f64() > Some(0.9),
        "{rep_healthy}"
    );

    // The file catches up within its flush interval; then a kill -9 and a restart lose nothing.
    let file = us.node.data_dir.join("reputation.json");
    let flaky_key = flaky.node.public_key();
    let failed_before = rep_flaky["requests_failed"].as_u64().expect("count");
    assert_eventually(
        Duration::from_secs(15),
        "reputation.json has the flaky peer's failures",
        || {
            std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| v[flaky_key.as_str()]["requests_failed"].as_u64())
                == Some(failed_before)
        },
    );
    us.node.restart();
    let after = reputation_of(&us, &flaky);
    assert_eq!(
        after["requests_failed"].as_u64(),
        Some(failed_before),
        "{after}"
    );
    assert_eq!(after["requests_ok"], rep_flaky["requests_ok"], "{after}");
}

#[test]
fn a_peer_that_keeps_failing_is_ejected_and_left_alone_for_its_backoff() {
    let broken = Ark::start(FakeConfig::ollama(&[MODEL]).status_override(502), 8);
    let us = Ark::start(FakeConfig::ollama(&["local-only"]), 4);
    share(&broken, &us, &[MODEL], 4);
    let statuses: Vec<u16> = (0..6).map(|_| chat(&us)).collect();
    // Three failures eject it; the next requests are answered at once, without trying it.
    assert_eq!(broken.backend.hits(), 3, "statuses {statuses:?}");
    assert_eq!(&statuses[..3], &[502, 502, 502]);
    assert_eq!(&statuses[3..], &[503, 503, 503]);
    let rsp = us.node.post(
        "/api/chat",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert!(rsp.text().contains("left alone"), "{}", rsp.text());
    assert!(rsp.header("retry-after").is_some());
    let rep = reputation_of(&us, &broken);
    assert_eq!(rep["standing"], "ejected", "{rep}");
    assert!(
        rep["ejected_for_secs"].as_u64().is_some_and(|s| s > 0),
        "{rep}"
    );
    assert_eq!(rep["consecutive_failures"], 3, "{rep}");
    let declined = us.node.log().matches("peer declined").count();
    assert_eq!(declined, 1, "three refusals in a row are one log line");
}
