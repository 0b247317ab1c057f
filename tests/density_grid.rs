//! The density grid: five households, each with its own model server and model table, all
//! approving each other. Requests from Ark #1's own users reach every model in the grid, go to
//! a peer when Ark #1 is busy, and fail over without a client-visible error when that peer dies.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{assert_eventually, loopback_ip, BackendSpec, NodeProc, NodeSpec};
use support::http;

/// (models, backend slots) per Ark, #1 first.
const TABLE: [(&[&str], usize); 5] = [
    (&["qwen3.5:35b", "llama3.1:8b"], 1),
    (&["llama3.1:8b", "mistral:7b"], 4),
    (&["qwen3.5:35b", "phi3:mini"], 2),
    (&["gemma2:9b"], 4),
    (&["qwen3.5:35b", "llama3.1:70b"], 4),
];

#[test]
fn five_arks_share_their_models_and_survive_a_busy_owner_and_a_dead_peer() {
    let backends: Vec<FakeBackend> = TABLE
        .iter()
        .enumerate()
        .map(|(i, (models, _))| {
            // Ark #1 answers slowly so that one request keeps it busy.
            let delay = if i == 0 { 50 } else { 0 };
            FakeBackend::start_in_thread(
                IpAddr::V4(loopback_ip()),
                FakeConfig::both(models)
                    .chunks(20)
                    .chunk_delay(Duration::from_millis(delay)),
            )
        })
        .collect();
    let mut arks: Vec<NodeProc> = TABLE
        .iter()
        .zip(&backends)
        .map(|((_, slots), b)| {
            NodeProc::start(&NodeSpec::with_backend(
                BackendSpec::ollama(b.url()).max_concurrent(*slots),
            ))
        })
        .collect();
    for (i, owner) in arks.iter().enumerate() {
        for (j, peer) in arks.iter().enumerate() {
            if i != j {
                owner.approve(peer, TABLE[i].0, 4);
            }
        }
    }
    let every_model = [
        "qwen3.5:35b",
        "llama3.1:8b",
        "mistral:7b",
        "phi3:mini",
        "gemma2:9b",
        "llama3.1:70b",
    ];
    assert_eventually(
        Duration::from_secs(20),
        "Ark #1 lists every model of the grid",
        || {
            let listing = arks[0].get("/v1/models").json();
            every_model.iter().all(|m| {
                listing["data"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|e| e["id"] == *m))
            })
        },
    );
    let started = std::time::Instant::now();
    assert_eventually(
        Duration::from_secs(20),
        "every Ark sees every other as reachable",
        || {
            arks.iter().all(|a| {
                a.get("/peers/status").json()["peers"]
                    .as_array()
                    .is_some_and(|ps| ps.len() == 4 && ps.iter().all(|p| p["reachable"] == true))
            })
        },
    );
    eprintln!(
        "all 5 arks saw each other reachable {:?} after the listing converged",
        started.elapsed()
    );

    // Models only peers have are served through Ark #1's local API.
    for (model, holder) in [
        ("gemma2:9b", 3),
        ("mistral:7b", 1),
        ("phi3:mini", 2),
        ("llama3.1:70b", 4),
    ] {
        let before = backends[holder].hits();
        let rsp = arks[0].post("/api/chat", &json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hi"}]}));
        assert_eq!(rsp.status, 200, "{model}: {}", rsp.text());
        assert_eq!(
            backends[holder].hits(),
            before + 1,
            "{model} served by Ark #{}",
            holder + 1
        );
    }

    // Ark #1 is busy: its users' qwen request goes to Ark #5 (most free capacity).
    let api = arks[0].api;
    let long = std::thread::spawn(move || {
        http::post_json(
            api,
            "/api/generate",
            &json!({"model": "qwen3.5:35b", "prompt": "long"}),
        )
    });
    assert_eventually(Duration::from_secs(5), "Ark #1 busy", || {
        backends[0].in_flight() == 1
    });
    let before5 = backends[4].hits();
    let rsp = arks[0].post(
        "/v1/chat/completions",
        &json!({"model": "qwen3.5:35b", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(backends[4].hits(), before5 + 1, "served by Ark #5");

    // Ark #5 dies: the next requests go to Ark #3 with no error seen by the client.
    arks[4].kill();
    let before3 = backends[2].hits();
    for _ in 0..5 {
        let rsp = arks[0].post(
            "/v1/chat/completions",
            &json!({"model": "qwen3.5:35b", "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(
            rsp.status,
            200,
            "client saw an error after Ark #5 died: {}",
            rsp.text()
        );
    }
    assert_eq!(backends[2].hits(), before3 + 5, "served by Ark #3");
    assert_eq!(long.join().expect("long request").status, 200);
    assert_eq!(
        backends[0].max_in_flight(),
        1,
        "Ark #1's backend never exceeded its one slot"
    );
}
