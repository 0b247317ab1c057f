//! Model sharing: a node hands the weights of the models it shares to approved peers that may
//! pull them, and pulls missing models from its peers instead of the internet.
//!
//! ```text
//! serving (mesh listener, mutual TLS)         pulling (API listener, `POST /api/pull`)
//!   store.rs: where the weights are on disk     pull.rs: candidates from hellos, manifest,
//!   authz: may_pull (403 before any file)                Range parts from several peers,
//!   serve.rs: manifest, blobs with Range,                resume state, sha256, install
//!             bandwidth cap, transfer cap     install.rs: Ollama /api/blobs + /api/create,
//!                                                         or the GGUF placed where configured
//! ```
//!
//! The wire messages are here, typed, as the rest of the mesh protocol is in
//! [`crate::mesh::protocol`].

pub mod api;
pub mod cli;
pub mod install;
pub mod pull;
pub mod serve;
pub mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Path of a model's manifest on the mesh listener (`?model=NAME`).
pub const MANIFEST_PATH: &str = "/mesh/v1/models/manifest";
/// Path of one of a model's blobs on the mesh listener (`?model=NAME&digest=sha256:HEX`).
pub const BLOB_PATH: &str = "/mesh/v1/models/blob";
/// Prefix of every model-sharing route on the mesh listener.
pub const MESH_PREFIX: &str = "/mesh/v1/models/";

/// How a model's weights are laid out where they come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// An Ollama model: a manifest and content-addressed blobs.
    Ollama,
    /// One or more GGUF files, as llama.cpp and other OpenAI-compatible servers load them.
    Gguf,
}

/// One layer of a model: a file identified by its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// `sha256:<64 lowercase hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Ollama media type (`application/vnd.ollama.image.model`, ...), or
    /// `application/x-gguf` for a GGUF file.
    pub media_type: String,
    /// The file name for GGUF layers (where it is placed on the pulling side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// Media type of a GGUF file shared from a llama.cpp-style backend.
pub const GGUF_MEDIA_TYPE: &str = "application/x-gguf";
/// Media type of an Ollama model's config blob.
pub const OLLAMA_CONFIG_MEDIA_TYPE: &str = "application/vnd.docker.container.image.v1+json";

/// `GET /mesh/v1/models/manifest?model=NAME`, 200: what a model is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// The model's name as the serving node shares it.
    pub model: String,
    /// Its layout.
    pub format: Format,
    /// Every file it needs (for Ollama, the config blob too).
    pub layers: Vec<Layer>,
}

impl ModelManifest {
    /// Total bytes of all layers.
    pub fn total(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// Whether `digest` is `sha256:` and 64 lowercase hex digits (nothing else is a blob name).
pub fn valid_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The hex part of a valid digest.
pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    )
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `sha256:<hex>` of a file's content, read in 1 MiB pieces.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex(ctx.finish().as_ref())))
}

/// Model-sharing settings (`[models]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharingConfig {
    /// Blob transfers this node serves at once, across peers (beyond: 429).
    pub max_transfers: usize,
    /// Bytes per second one peer may pull from us, across its transfers; `None`: no cap.
    pub peer_rate: Option<u64>,
    /// Size of the Range parts a pull asks for.
    pub part_bytes: u64,
    /// Parts in flight per peer during a pull.
    pub streams_per_peer: usize,
}

impl Default for SharingConfig {
    fn default() -> Self {
        SharingConfig {
            max_transfers: DEFAULT_MAX_TRANSFERS,
            peer_rate: None,
            part_bytes: DEFAULT_PART_MB * 1024 * 1024,
            streams_per_peer: DEFAULT_STREAMS_PER_PEER,
        }
    }
}

const DEFAULT_MAX_TRANSFERS: usize = 4;
const DEFAULT_PART_MB: u64 = 16;
const DEFAULT_STREAMS_PER_PEER: usize = 2;

/// On-disk shape of `[models]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSharing {
    max_transfers: usize,
    peer_rate_mb_per_sec: f64,
    part_mb: u64,
    streams_per_peer: usize,
}

impl Default for FileSharing {
    fn default() -> Self {
        FileSharing {
            max_transfers: DEFAULT_MAX_TRANSFERS,
            peer_rate_mb_per_sec: 0.0,
            part_mb: DEFAULT_PART_MB,
            streams_per_peer: DEFAULT_STREAMS_PER_PEER,
        }
    }
}

impl FileSharing {
    /// The validated settings, or `(key, message)` naming what is wrong.
    pub fn validate(&self) -> Result<SharingConfig, (&'static str, String)> {
        if self.max_transfers == 0 {
            return Err(("models.max_transfers", "must be at least 1".into()));
        }
        if !self.peer_rate_mb_per_sec.is_finite() || self.peer_rate_mb_per_sec < 0.0 {
            return Err((
                "models.peer_rate_mb_per_sec",
                "must be 0 (no cap) or a positive number of MB per second".into(),
            ));
        }
        if !(1..=1024).contains(&self.part_mb) {
            return Err(("models.part_mb", "must be 1 to 1024".into()));
        }
        if !(1..=16).contains(&self.streams_per_peer) {
            return Err(("models.streams_per_peer", "must be 1 to 16".into()));
        }
        Ok(SharingConfig {
            max_transfers: self.max_transfers,
            peer_rate: (self.peer_rate_mb_per_sec > 0.0)
                .then_some((self.peer_rate_mb_per_sec * 1_000_000.0) as u64),
            part_bytes: self.part_mb * 1024 * 1024,
            streams_per_peer: self.streams_per_peer,
        })
    }
}

/// Where one backend keeps its weights (`[[backends]]` keys `models_dir`, `gguf`, `gguf_dir`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Weights {
    /// Ollama's models directory (`manifests/`, `blobs/`).
    pub models_dir: Option<std::path::PathBuf>,
    /// Model name -> its GGUF file(s), for OpenAI-compatible servers.
    pub gguf: std::collections::BTreeMap<String, Vec<std::path::PathBuf>>,
    /// Where pulled GGUF files go when `gguf` does not name a place for the model.
    pub gguf_dir: Option<std::path::PathBuf>,
}

/// A GGUF map value: one file or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `"model" = "/path/file.gguf"`.
    One(std::path::PathBuf),
    /// `"model" = ["/path/a.gguf", "/path/b.gguf"]`.
    Many(Vec<std::path::PathBuf>),
}

impl OneOrMany {
    /// The paths.
    pub fn into_vec(self) -> Vec<std::path::PathBuf> {
        match self {
            OneOrMany::One(p) => vec![p],
            OneOrMany::Many(v) => v,
        }
    }
}

/// How long a pull waits before asking a peer again that answered 429 (busy).
pub const BUSY_BACKOFF: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lowercase_sha256_digests_are_valid() {
        let good = format!("sha256:{}", "a1".repeat(32));
        assert!(valid_digest(&good));
        assert!(!valid_digest(&good.to_uppercase()));
        assert!(!valid_digest(&format!("sha256:{}", "A1".repeat(32))));
        assert!(!valid_digest(&format!("sha256-{}", "a1".repeat(32))));
        assert!(!valid_digest(&format!("sha256:{}", "a1".repeat(31))));
        assert!(!valid_digest("sha256:../../etc/passwd"));
        assert!(!valid_digest(&format!("sha512:{}", "a1".repeat(32))));
        assert_eq!(
            sha256_digest(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn sharing_settings_are_checked() {
        let ok = FileSharing::default().validate().expect("defaults valid");
        assert_eq!(ok.peer_rate, None);
        let bad = FileSharing {
            max_transfers: 0,
            ..FileSharing::default()
        };
        assert_eq!(
            bad.validate().err().map(|e| e.0),
            Some("models.max_transfers")
        );
        let rate = FileSharing {
            peer_rate_mb_per_sec: 2.5,
            ..FileSharing::default()
        };
        assert_eq!(rate.validate().expect("valid").peer_rate, Some(2_500_000));
    }
}
