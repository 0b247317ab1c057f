//! In-process tests of the grid's decisions, on a real [`Grid`] assembled from its parts: the
//! client side is an in-memory duplex stream, the backend a scripted HTTP/1.1 server on
//! loopback in the test's runtime. No child process, no root, no namespace.

use super::*;
use crate::identity::Identity;
use crate::mesh::protocol::SharedModel;
use crate::mesh::tls::MeshTls;
use crate::peers::store::{ApprovedPeer, Permissions};
use crate::peers::PeerStatus;
use crate::session::{read_model_request, BodyBudget, BodyLimits};
use std::time::Duration;

use crate::testkit::{answer, answering_backend, backend, local_relay, session, ANSWER};

struct Rig {
    grid: Grid,
    peers: Arc<PeerTable>,
    _dir: tempfile::TempDir,
}

/// A grid with the given backends (their model lists unknown, so each is a candidate for any
/// model) and an empty peer table in a fresh data dir.
fn rig(backends: Vec<crate::config::BackendConfig>) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::load_or_create(dir.path()).expect("identity");
    let leaf = identity.issue_tls_leaf().expect("leaf");
    let tls = Arc::new(MeshTls::new(&leaf, [127, 0, 0, 1].into()).expect("tls"));
    let (relay, upstream, metrics) = local_relay(backends);
    let client = Arc::new(MeshClient::new(
        tls,
        upstream.clone(),
        metrics.clone(),
        "test-node",
        9,
    ));
    let peers = Arc::new(PeerTable::open(dir.path()));
    let audit = Arc::new(AuditLog::open(dir.path(), 1 << 20).expect("audit"));
    let grid = Grid::new(relay, client, peers.clone(), upstream, audit, metrics);
    Rig {
        grid,
        peers,
        _dir: dir,
    }
}

/// Sends one chat request for `model` through `grid` and returns the raw response.
async fn chat(grid: &Grid, model: &str) -> String {
    let body = format!(r#"{{"model":"{model}","messages":[],"stream":false}}"#);
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (client, mut s) = session(request.as_bytes()).await;
    let limits = BodyLimits {
        max_bytes: 1 << 20,
        budget: BodyBudget::new(1 << 24),
    };
    let Ok((body, model)) = read_model_request(&mut s, &limits, Dialect::Ollama).await else {
        panic!("the request body was refused");
    };
    let req = ModelRequest {
        dialect: Dialect::Ollama,
        path: "/api/chat",
        model: &model,
        body: body.bytes.clone(),
        started: Instant::now(),
        forward_client_headers: false,
        stop: None,
        from_peer: false,
    };
    grid.serve(&mut s, req).await;
    answer(client, s).await
}

#[tokio::test]
async fn a_local_backend_answers_and_the_client_gets_its_body_under_our_header_policy() {
    let (addr, _) = answering_backend().await;
    let rig = rig(vec![backend(addr, 4)]);
    let raw = chat(&rig.grid, "m").await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.ends_with(ANSWER), "{raw}");
    assert!(
        !raw.to_ascii_lowercase().contains("set-cookie"),
        "backend headers are rebuilt from the allow-list: {raw}"
    );
}

#[tokio::test]
async fn a_full_backend_with_no_peer_is_503_at_once_without_queueing() {
    let (addr, _) = answering_backend().await;
    let rig = rig(vec![backend(addr, 0)]);
    let raw = tokio::time::timeout(Duration::from_secs(3), chat(&rig.grid, "m"))
        .await
        .expect("answered at once");
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
}

fn shared(name: &str) -> SharedModel {
    SharedModel {
        name: name.into(),
        free_slots: 2,
        loaded: true,
        dialects: vec!["ollama".into()],
    }
}

#[tokio::test]
async fn a_model_only_on_ejected_peers_is_503_peers_ejected_with_retry_after() {
    let rig = rig(Vec::new());
    let key = PublicKey::from_bytes([3; 32]);
    rig.peers
        .approve(ApprovedPeer {
            node_id: "flaky".into(),
            public_key: key,
            name: String::new(),
            approved_at: String::new(),
            permissions: Permissions {
                max_concurrent_requests: 2,
                ..Permissions::default()
            },
            endpoint: Some("127.0.0.1:9".into()),
            extra: Default::default(),
        })
        .await
        .expect("approve");
    rig.peers.set_status(
        key,
        PeerStatus {
            reachable: true,
            models: vec![shared("m:latest")],
            grant: 2,
            ..PeerStatus::default()
        },
    );
    // Before any failure the peer is a candidate: it is tried (and fails: its identity was
    // never verified by a hello), so the answer is a gateway failure, not an ejection.
    let raw = chat(&rig.grid, "m").await;
    assert!(raw.starts_with("HTTP/1.1 502"), "{raw}");
    let now = reputation::unix_now();
    let mut ejected = false;
    for _ in 0..3 {
        ejected |= rig
            .peers
            .reputations()
            .request(&key, RequestOutcome::failed(), now, 1);
    }
    assert!(ejected, "three consecutive failures eject");
    rig.peers.reputation_changed();
    let raw = chat(&rig.grid, "m").await;
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    assert!(raw.contains("failed repeatedly"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("retry-after: "), "{raw}");
    let raw = chat(&rig.grid, "other").await;
    assert!(raw.starts_with("HTTP/1.1 404"), "unknown everywhere: {raw}");
}
