//! The mesh protocol between nodes: every message a typed struct, versioned (as rathole's
//! `protocol.rs`).
//!
//! | route (mutual TLS) | request | answer |
//! |---|---|---|
//! | `GET /mesh/v1/hello` | headers [`NODE_ID_HEADER`], [`MESH_PORT_HEADER`], [`PROTOCOL_HEADER`] | 200 [`HelloAnswer`]; 403 [`Stranger`] to an unapproved key |
//! | `GET /v1/models`, `/api/tags` | | the models shared with the asking peer |
//! | `POST` model routes | the allow-listed body (DESIGN §6) | the backend's answer, allow-listed |
//!
//! Versioning: [`PROTOCOL_VERSION`] goes in every hello request (header) and answer (field), and
//! in the mDNS TXT `v`. A node answers a peer whose version it does not speak with 400
//! [`WrongVersion`]; a client drops a hello whose `protocol` it does not speak. Within a version,
//! fields are only ever added: unknown fields are ignored (no `deny_unknown_fields`), and new
//! ones carry `#[serde(default)]`, so an older node reads a newer one's messages.
//!
//! Nothing here opens a socket; [`crate::mesh`] serves these and [`crate::mesh::client`] reads
//! them. `serde_json::Value` never travels past [`parse_hello`].

use serde::{Deserialize, Serialize};

/// The mesh protocol version this node speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Path of the hello exchange.
pub const HELLO_PATH: &str = "/mesh/v1/hello";
/// Request header: the asking node's id (informational; the key is what counts).
pub const NODE_ID_HEADER: &str = "x-arknet-node-id";
/// Request header: the asking node's mesh port, so a stranger can be dialled back.
pub const MESH_PORT_HEADER: &str = "x-arknet-mesh-port";
/// Request header: the protocol version the asking node speaks (absent: 1).
pub const PROTOCOL_HEADER: &str = "x-arknet-protocol";

/// A model a node shares with the asking peer, as its hello reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedModel {
    /// The model's name as the node's backends list it.
    pub name: String,
    /// Requests the asking peer could start for it right now.
    #[serde(default)]
    pub free_slots: usize,
    /// Whether the model is loaded in memory (hot) there.
    #[serde(default)]
    pub loaded: bool,
    /// API dialects it is served in: `openai`, `ollama`.
    #[serde(default)]
    pub dialects: Vec<String>,
}

impl SharedModel {
    /// Whether it is served in `dialect` (`"openai"` or `"ollama"`).
    pub fn speaks(&self, dialect: &str) -> bool {
        self.dialects.iter().any(|d| d == dialect)
    }
}

/// What the answering node grants the asking one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct YourGrant {
    /// Requests the asking node may have in flight here.
    #[serde(default)]
    pub grant: u32,
    /// Of which in flight now.
    #[serde(default)]
    pub in_flight: usize,
}

/// `GET /mesh/v1/hello`, 200: who the node is and what it shares with the asking peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAnswer {
    /// The answering node's id.
    pub node_id: String,
    /// Its public key (44-character base64); the TLS handshake proves it.
    pub public_key: String,
    /// Its software version.
    #[serde(default)]
    pub version: String,
    /// The mesh protocol version it speaks.
    pub protocol: u32,
    /// Its identity certificate (PEM), which the asking node pins.
    pub identity_cert: String,
    /// What it grants the asking node.
    #[serde(default)]
    pub you: YourGrant,
    /// The models it shares with the asking node.
    #[serde(default)]
    pub models: Vec<SharedModel>,
    /// The models whose weights the asking node may pull from it (`can_pull_models`).
    #[serde(default)]
    pub pullable: Vec<String>,
}

/// `GET /mesh/v1/hello`, 403: the key is not approved; who the node is, so that the stranger's
/// owner can approve it in return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stranger {
    /// The refusal, OpenAI-shaped.
    pub error: ErrorBody,
    /// The answering node's id.
    #[serde(default)]
    pub node_id: String,
    /// Its public key.
    #[serde(default)]
    pub public_key: String,
    /// Its identity certificate (PEM).
    pub identity_cert: String,
}

/// `{"message","type","code"}`, as in every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable explanation.
    pub message: String,
    /// OpenAI error type.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Stable code.
    #[serde(default)]
    pub code: String,
}

/// 400 to a peer that speaks another protocol version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrongVersion {
    /// The refusal.
    pub error: ErrorBody,
    /// The versions this node speaks.
    pub supported: Vec<u32>,
}

/// A hello answer as the asking node reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// 200: approved; what it shares with us.
    Approved(HelloAnswer),
    /// 403: it has not approved us; its identity certificate.
    NotApproved(Stranger),
}

/// Why a hello answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The body is not the message the status promises.
    #[error("hello answer (HTTP {status}) is not a valid message: {why}")]
    Malformed {
        /// HTTP status of the answer.
        status: u16,
        /// The parser's words.
        why: String,
    },
    /// The peer speaks a protocol version we do not.
    #[error("the peer speaks mesh protocol {theirs}; this node speaks {PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        theirs: u32,
    },
    /// A status the protocol does not define for hello.
    #[error("hello answered HTTP {0}")]
    Status(u16),
}

/// Reads a hello answer: 200 [`HelloAnswer`] or 403 [`Stranger`], checking the version.
pub fn parse_hello(status: u16, body: &[u8]) -> Result<Hello, ProtocolError> {
    let malformed = |e: serde_json::Error| ProtocolError::Malformed {
        status,
        why: e.to_string(),
    };
    match status {
        200 => {
            let answer: HelloAnswer = serde_json::from_slice(body).map_err(malformed)?;
            if !speaks(answer.protocol) {
                return Err(ProtocolError::Version {
                    theirs: answer.protocol,
                });
            }
            check_bounds(&answer).map_err(|why| ProtocolError::Malformed { status, why })?;
            Ok(Hello::Approved(answer))
        }
        403 => {
            let stranger: Stranger = serde_json::from_slice(body).map_err(malformed)?;
            // A node that does not know us may leave its id out, but not send any string.
            if !stranger.node_id.is_empty() && !crate::config::valid_node_id(&stranger.node_id) {
                return Err(ProtocolError::Malformed {
                    status,
                    why: node_id_refused(&stranger.node_id),
                });
            }
            Ok(Hello::NotApproved(stranger))
        }
        400 => match serde_json::from_slice::<WrongVersion>(body) {
            Ok(w) => Err(ProtocolError::Version {
                theirs: w.supported.iter().copied().max().unwrap_or(0),
            }),
            Err(_) => Err(ProtocolError::Status(400)),
        },
        s => Err(ProtocolError::Status(s)),
    }
}

/// Most models (and most pullable models) one hello may list. A household's node serves
/// dozens; the names go into our clients' model listings, the routing table and the admin page.
pub const MAX_HELLO_MODELS: usize = 4096;
/// Longest model name a hello may carry, in bytes.
pub const MAX_MODEL_NAME: usize = 256;

/// Whether a model name can travel in a hello: not empty, at most [`MAX_MODEL_NAME`] bytes, no
/// control characters. The answering side leaves other names out, so that one odd name on a
/// backend does not cost a peer the whole hello.
pub fn shareable_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_MODEL_NAME && !name.chars().any(char::is_control)
}

/// Refuses a hello that lists more than a node could share, or names no client could ask for:
/// an approved peer is trusted with requests, not with the size of our tables.
fn check_bounds(answer: &HelloAnswer) -> Result<(), String> {
    if !crate::config::valid_node_id(&answer.node_id) {
        return Err(node_id_refused(&answer.node_id));
    }
    for (what, count) in [
        ("models", answer.models.len()),
        ("pullable models", answer.pullable.len()),
    ] {
        if count > MAX_HELLO_MODELS {
            return Err(format!("{count} {what}, at most {MAX_HELLO_MODELS}"));
        }
    }
    let names = answer.models.iter().map(|m| m.name.as_str());
    for name in names.chain(answer.pullable.iter().map(String::as_str)) {
        if !shareable_name(name) {
            let shown: String = name.chars().take(64).collect();
            return Err(format!(
                "model name {shown:?} ({} bytes): empty, longer than {MAX_MODEL_NAME} bytes, \
                 or holding a control character",
                name.len()
            ));
        }
    }
    if let Some(m) = answer.models.iter().find(|m| m.dialects.len() > 8) {
        return Err(format!(
            "model {:?} lists {} dialects",
            m.name,
            m.dialects.len()
        ));
    }
    Ok(())
}

/// Why a hello's node id is refused: node ids go into listings, logs and mDNS names, and every
/// node's own passed [`crate::config::valid_node_id`].
fn node_id_refused(id: &str) -> String {
    let shown: String = id.chars().take(64).collect();
    format!(
        "node id {shown:?} ({} bytes): not 1-64 letters, digits, '-', '_' or '.'",
        id.len()
    )
}

/// Whether this node speaks protocol `version`.
pub fn speaks(version: u32) -> bool {
    version == PROTOCOL_VERSION
}

/// The protocol version an asking node announced in [`PROTOCOL_HEADER`] (absent: 1, the
/// version before the header existed); `None` when the header is not a number.
pub fn announced_version(header: Option<&str>) -> Option<u32> {
    match header {
        None => Some(1),
        Some(v) => v.trim().parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> HelloAnswer {
        HelloAnswer {
            node_id: "ark-b".into(),
            public_key: "k".into(),
            version: "0.1.0".into(),
            protocol: PROTOCOL_VERSION,
            identity_cert: "pem".into(),
            you: YourGrant {
                grant: 2,
                in_flight: 0,
            },
            models: vec![SharedModel {
                name: "m".into(),
                free_slots: 2,
                loaded: true,
                dialects: vec!["ollama".into()],
            }],
            pullable: vec!["m".into()],
        }
    }

    #[test]
    fn a_hello_round_trips() {
        let body = serde_json::to_vec(&answer()).expect("json");
        assert_eq!(parse_hello(200, &body), Ok(Hello::Approved(answer())));
    }

    #[test]
    fn unknown_fields_from_a_newer_node_are_ignored_and_missing_optional_ones_default() {
        let body = br#"{"node_id":"n","public_key":"k","protocol":1,"identity_cert":"p",
            "future_field":{"x":1},"models":[{"name":"m","future":true}]}"#;
        let Ok(Hello::Approved(a)) = parse_hello(200, body) else {
            panic!("not read");
        };
        assert_eq!(a.models[0].free_slots, 0);
        assert_eq!(a.you, YourGrant::default());
        assert!(!a.models[0].speaks("openai"));
    }

    #[test]
    fn another_protocol_version_is_refused() {
        let mut a = answer();
        a.protocol = 2;
        let body = serde_json::to_vec(&a).expect("json");
        assert_eq!(
            parse_hello(200, &body),
            Err(ProtocolError::Version { theirs: 2 })
        );
        let refusal = br#"{"error":{"message":"m","type":"t","code":"c"},"supported":[3]}"#;
        assert_eq!(
            parse_hello(400, refusal),
            Err(ProtocolError::Version { theirs: 3 })
        );
        assert_eq!(announced_version(None), Some(1));
        assert_eq!(announced_version(Some("2")), Some(2));
        assert_eq!(announced_version(Some("x")), None);
    }

    #[test]
    fn a_hello_with_the_wrong_shape_is_an_error_not_a_default() {
        assert!(matches!(
            parse_hello(200, br#"{"node_id":"n"}"#),
            Err(ProtocolError::Malformed { status: 200, .. })
        ));
        assert!(matches!(
            parse_hello(200, br#"{"node_id":"n","public_key":"k","protocol":1,"identity_cert":"p","models":[{"free_slots":"many"}]}"#),
            Err(ProtocolError::Malformed { .. })
        ));
        assert_eq!(parse_hello(500, b""), Err(ProtocolError::Status(500)));
    }

    #[test]
    fn a_hello_beyond_what_a_node_could_share_is_refused() {
        let refused = |a: &HelloAnswer| {
            let body = serde_json::to_vec(a).expect("json");
            match parse_hello(200, &body) {
                Err(ProtocolError::Malformed { status: 200, why }) => why,
                other => panic!("accepted: {other:?}"),
            }
        };
        let model = |name: String| SharedModel {
            name,
            free_slots: 1,
            loaded: false,
            dialects: vec!["ollama".into()],
        };
        let mut a = answer();
        a.models = (0..=MAX_HELLO_MODELS)
            .map(|i| model(format!("m{i}")))
            .collect();
        assert!(refused(&a).contains("4097 models"));
        a.models.truncate(MAX_HELLO_MODELS);
        assert!(parse_hello(200, &serde_json::to_vec(&a).expect("json")).is_ok());

        for bad in ["", "a\u{0}b", "line\nbreak"] {
            let mut a = answer();
            a.models.push(model(bad.into()));
            assert!(refused(&a).contains("model name"), "{bad:?}");
        }
        let mut a = answer();
        a.pullable.push("x".repeat(MAX_MODEL_NAME + 1));
        assert!(refused(&a).contains("257 bytes"));
        let mut a = answer();
        a.node_id = "x".repeat(100_000);
        assert!(refused(&a).contains("100000 bytes"));
        let stranger = |id: &str| {
            let body = serde_json::json!({"error": {"message": "m", "type": "t", "code": "c"},
                "node_id": id, "public_key": "k", "identity_cert": "p"});
            parse_hello(403, body.to_string().as_bytes())
        };
        assert!(matches!(stranger(""), Ok(Hello::NotApproved(_))));
        assert!(matches!(stranger("ark-b"), Ok(Hello::NotApproved(_))));
        assert!(matches!(
            stranger("<script>"),
            Err(ProtocolError::Malformed { status: 403, .. })
        ));
        let mut a = answer();
        a.models[0].dialects = vec!["openai".into(); 9];
        assert!(refused(&a).contains("9 dialects"));
        // A name at the limit, in any script, is a name.
        let mut a = answer();
        a.models.push(model("é".repeat(MAX_MODEL_NAME / 2)));
        assert!(parse_hello(200, &serde_json::to_vec(&a).expect("json")).is_ok());
    }
}
