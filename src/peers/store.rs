//! `approved_peers.json`: the owner's approvals, the one file that decides who reaches the GPU.
//!
//! Shape exactly as in DESIGN §4; fields this version does not know are kept as they are when
//! the file is rewritten. Writes are atomic (temp file, fsync, rename, fsync of the directory),
//! so a crash leaves either the old or the new file, never a torn one. A file that does not
//! parse is reported and never overwritten by this module.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::valid_node_id;
use crate::identity::PublicKey;

/// File name inside the data dir.
pub const FILE_NAME: &str = "approved_peers.json";

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApprovedPeers {
    /// Approved peers, in the order the owner approved them.
    #[serde(default)]
    pub peers: Vec<ApprovedPeer>,
    /// Top-level fields added by hand or by newer versions, kept on rewrite.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One approved peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovedPeer {
    /// The name the peer goes by (its identity is the key, not this).
    pub node_id: String,
    /// 44-character base64 Ed25519 key: the peer's identity.
    #[serde(with = "key_string")]
    pub public_key: PublicKey,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// RFC 3339 time of approval.
    #[serde(default)]
    pub approved_at: String,
    /// What the peer may do here.
    pub permissions: Permissions,
    /// Where the peer's mesh listener is (`ip:port`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Per-peer fields added by hand or by newer versions, kept on rewrite.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What an approved peer may do on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// May run inference here.
    pub can_request_inference: bool,
    /// May pull model blobs from here.
    pub can_pull_models: bool,
    /// Models this node shares with the peer.
    pub models_shared: Vec<String>,
    /// Requests the peer may have in flight here at once; more get 429.
    pub max_concurrent_requests: u32,
}

impl Default for Permissions {
    fn default() -> Self {
        Permissions {
            can_request_inference: true,
            can_pull_models: false,
            models_shared: Vec::new(),
            max_concurrent_requests: 1,
        }
    }
}

/// Why the file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Not JSON, or not the expected shape; `line` is 1-based.
    #[error("{path}:{line}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where.
        line: usize,
        /// What.
        message: String,
    },
    /// Reading or writing failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What.
        message: String,
    },
}

impl ApprovedPeers {
    /// Reads the file; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })
            }
        };
        Self::parse(&text, path)
    }

    /// Parses and checks file contents (`path` only labels errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, StoreError> {
        let corrupt = |line: usize, message: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            line,
            message,
        };
        let file: ApprovedPeers =
            serde_json::from_str(text).map_err(|e| corrupt(e.line(), e.to_string()))?;
        let mut keys = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        for (i, p) in file.peers.iter().enumerate() {
            let line = line_of_key(text, &p.public_key.to_string());
            if !valid_node_id(&p.node_id) {
                return Err(corrupt(
                    line,
                    format!("peers[{i}].node_id `{}` is not a valid node id", p.node_id),
                ));
            }
            if !keys.insert(p.public_key) {
                return Err(corrupt(
                    line,
                    format!("peers[{i}].public_key appears twice"),
                ));
            }
            if !ids.insert(p.node_id.as_str()) {
                return Err(corrupt(
                    line,
                    format!("peers[{i}].node_id `{}` appears twice", p.node_id),
                ));
            }
        }
        Ok(file)
    }

    /// Writes the file atomically (temp, fsync, rename, fsync dir), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| StoreError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        text.push('\n');
        crate::fsutil::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| StoreError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The entry for `key`.
    pub fn by_key(&self, key: &PublicKey) -> Option<&ApprovedPeer> {
        self.peers.iter().find(|p| p.public_key == *key)
    }

    /// The entry named `node_id`.
    pub fn by_node_id(&self, node_id: &str) -> Option<&ApprovedPeer> {
        self.peers.iter().find(|p| p.node_id == node_id)
    }
}

fn line_of_key(text: &str, key: &str) -> usize {
    text.find(key)
        .map_or(0, |i| text[..i].matches('\n').count() + 1)
}

mod key_string {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::identity::PublicKey;

    pub fn serialize<S: Serializer>(key: &PublicKey, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(key)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"{ "peers": [ {
        "node_id": "ark-neighbor-001",
        "public_key": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
        "name": "Dave's Ark",
        "approved_at": "2026-03-15T10:30:00Z",
        "permissions": {
          "can_request_inference": true,
          "can_pull_models": true,
          "models_shared": ["qwen3.5:35b", "llama3.1:8b"],
          "max_concurrent_requests": 2 } } ] }"#;

    #[test]
    fn the_design_example_parses_and_round_trips() {
        let file = ApprovedPeers::parse(SEED, Path::new("a.json")).expect("seed parses");
        let p = &file.peers[0];
        assert_eq!(p.node_id, "ark-neighbor-001");
        assert_eq!(p.permissions.models_shared, ["qwen3.5:35b", "llama3.1:8b"]);
        assert_eq!(p.permissions.max_concurrent_requests, 2);
        let text = serde_json::to_string(&file).expect("serialize");
        assert_eq!(
            ApprovedPeers::parse(&text, Path::new("a.json")).expect("reparse"),
            file
        );
    }

    #[test]
    fn unknown_fields_survive_a_rewrite() {
        let text = SEED
            .replace("\"name\"", "\"note\": \"kept\", \"name\"")
            .replace("{ \"peers\"", "{ \"comment\": 1, \"peers\"");
        let file = ApprovedPeers::parse(&text, Path::new("a.json")).expect("parses");
        let out = serde_json::to_value(&file).expect("serialize");
        assert_eq!(out["comment"], 1);
        assert_eq!(out["peers"][0]["note"], "kept");
    }

    #[test]
    fn broken_files_are_reported_with_a_line() {
        let cut = &SEED[..SEED.len() / 2];
        match ApprovedPeers::parse(cut, Path::new("a.json")) {
            Err(StoreError::Corrupt { line, .. }) => assert!(line >= 1),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let bad_key = SEED.replace("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=", "short");
        assert!(matches!(
            ApprovedPeers::parse(&bad_key, Path::new("a.json")),
            Err(StoreError::Corrupt { .. })
        ));
        let twice = SEED.replace("} } ] }", "} }, ")
            + &SEED[SEED.find("{ \"peers\": [ ").map_or(0, |i| i + 13)..];
        assert!(
            matches!(
                ApprovedPeers::parse(&twice, Path::new("a.json")),
                Err(StoreError::Corrupt { .. })
            ),
            "{twice}"
        );
    }

    #[test]
    fn save_then_load_is_identity_and_missing_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        assert_eq!(
            ApprovedPeers::load(&path).expect("missing is fine"),
            ApprovedPeers::default()
        );
        let file = ApprovedPeers::parse(SEED, &path).expect("seed");
        file.save(&path).expect("save");
        assert_eq!(ApprovedPeers::load(&path).expect("load"), file);
        assert!(!dir.path().join("approved_peers.tmp").exists());
    }
}
