//! In-process tests of the mesh listener's refusals, on a real [`Mesh`] handler: the client is
//! an in-memory stream that presents no TLS identity, the backend a scripted server on loopback
//! that counts its connections. No child process, no root, no namespace. (Approved peers over
//! real mutual TLS are the multi-process tests' part: `tests/mesh_*.rs`.)

use super::*;
use crate::identity::Identity;
use crate::session::BodyBudget;
use crate::testkit::{answer, answering_backend, backend, local_relay, session};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Rig {
    mesh: Mesh,
    backend_connections: Arc<AtomicUsize>,
    audit: Arc<AuditLog>,
    dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, backend_connections) = answering_backend().await;
    let identity = Identity::load_or_create(dir.path()).expect("identity");
    let (relay, _, metrics) = local_relay(vec![backend(addr, 4)]);
    let audit = Arc::new(AuditLog::open(dir.path(), 1 << 20).expect("audit"));
    let mesh = Mesh::new(
        NodeInfo {
            node_id: "here".into(),
            public_key: identity.public_key(),
        },
        "identity pem".into(),
        Arc::new(PeerTable::open(dir.path())),
        relay,
        audit.clone(),
        metrics,
        BodyLimits {
            max_bytes: 1 << 20,
            budget: BodyBudget::new(1 << 24),
        },
    );
    Rig {
        mesh,
        backend_connections,
        audit,
        dir,
    }
}

fn chat(protocol: Option<&str>) -> Vec<u8> {
    let body = r#"{"model":"m","messages":[]}"#;
    let protocol = protocol.map_or(String::new(), |p| format!("{PROTOCOL_HEADER}: {p}\r\n"));
    format!(
        "POST /api/chat HTTP/1.1\r\nhost: arknet-mesh\r\n{protocol}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn handle(mesh: &Mesh, raw: &[u8]) -> String {
    let (client, mut s) = session(raw).await;
    mesh.handle(&mut s).await;
    answer(client, s).await
}

/// The lines on disk, once the buffered ones are written.
fn audit_lines(rig: &Rig) -> Vec<String> {
    rig.audit.flush();
    let dir = rig.dir.path();
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).expect("data dir").flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("audit") {
            let text = std::fs::read_to_string(entry.path()).expect("audit log");
            lines.extend(text.lines().map(str::to_string));
        }
    }
    lines
}

#[tokio::test]
async fn a_request_without_a_verified_identity_is_refused_before_any_backend_is_touched() {
    let rig = rig().await;
    let v = PROTOCOL_VERSION.to_string();
    let raw = handle(&rig.mesh, &chat(Some(&v))).await;
    assert!(raw.starts_with("HTTP/1.1 403"), "{raw}");
    assert!(raw.contains("\"no_client_certificate\""), "{raw}");
    assert!(
        raw.contains("\"node_id\":\"here\""),
        "strangers learn who we are: {raw}"
    );
    assert_eq!(rig.backend_connections.load(Ordering::SeqCst), 0);
    let audit = audit_lines(&rig);
    assert_eq!(audit.len(), 1, "the refusal is audited: {audit:?}");
    assert!(audit[0].contains("no certificate"), "{audit:?}");
    assert!(!audit[0].contains("messages"), "never the text: {audit:?}");
}

#[tokio::test]
async fn a_hello_without_identity_is_refused_and_not_audited() {
    let rig = rig().await;
    let raw = format!(
        "GET {HELLO_PATH} HTTP/1.1\r\nhost: arknet-mesh\r\n{PROTOCOL_HEADER}: {PROTOCOL_VERSION}\r\n\r\n"
    );
    let raw = handle(&rig.mesh, raw.as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 403"), "{raw}");
    assert!(audit_lines(&rig).is_empty());
}

#[tokio::test]
async fn another_protocol_version_is_400_with_the_versions_we_speak() {
    let rig = rig().await;
    for announced in [Some("99"), Some("two"), None] {
        let raw = handle(&rig.mesh, &chat(announced)).await;
        if announced.is_none() && protocol::speaks(1) {
            // A peer that announces nothing speaks version 1.
            continue;
        }
        assert!(raw.starts_with("HTTP/1.1 400"), "{announced:?}: {raw}");
        assert!(raw.contains("\"protocol_version\""), "{raw}");
        assert!(
            raw.contains(&format!("\"supported\":[{PROTOCOL_VERSION}]")),
            "{raw}"
        );
    }
    assert_eq!(rig.backend_connections.load(Ordering::SeqCst), 0);
}
