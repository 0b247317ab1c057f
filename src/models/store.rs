//! Where a node's backends keep their weights, read-only: Ollama's models directory
//! (`manifests/<registry>/<namespace>/<model>/<tag>`, `blobs/sha256-<hex>`) and the GGUF files a
//! config map names for OpenAI-compatible servers.
//!
//! Every path handed out is checked to stay inside the models directory after symlinks are
//! resolved, and a blob is only found through the manifest of the model asked for: a digest
//! that is not one of its layers is "not found", whatever lies on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde::Deserialize;

use super::{valid_digest, Format, Layer, ModelManifest, Weights, GGUF_MEDIA_TYPE};
use crate::routing::model_matches;

/// Registry Ollama pulls from when a name carries none.
pub const DEFAULT_REGISTRY: &str = "registry.ollama.ai";
/// Namespace of Ollama's own models.
pub const DEFAULT_NAMESPACE: &str = "library";

/// Why a model or blob cannot be handed out.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such model, or no such layer in it (or a path that would leave the models directory:
    /// the asker learns nothing about the disk).
    #[error("{0}")]
    NotFound(String),
    /// The weights are there but unreadable or malformed.
    #[error("{0}")]
    Broken(String),
}

/// An Ollama model name split into its manifest path components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaName {
    /// Registry host (`registry.ollama.ai`).
    pub registry: String,
    /// Namespace (`library`).
    pub namespace: String,
    /// Model.
    pub model: String,
    /// Tag (`latest`).
    pub tag: String,
}

impl OllamaName {
    /// Parses `[registry/][namespace/]model[:tag]`; every part must be a plain name (letters,
    /// digits, `.`, `-`, `_`; not `.` or `..`), so it can only ever name a file under
    /// `manifests/`.
    pub fn parse(name: &str) -> Option<OllamaName> {
        let (path, tag) = match name.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, t),
            Some(_) => return None,
            None => (name, "latest"),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (registry, namespace, model) = match parts.as_slice() {
            [m] => (DEFAULT_REGISTRY, DEFAULT_NAMESPACE, *m),
            [n, m] => (DEFAULT_REGISTRY, *n, *m),
            [r, n, m] => (*r, *n, *m),
            _ => return None,
        };
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        };
        [registry, namespace, model, tag]
            .iter()
            .all(|s| plain(s))
            .then(|| OllamaName {
                registry: registry.to_string(),
                namespace: namespace.to_string(),
                model: model.to_string(),
                tag: tag.to_string(),
            })
    }

    /// The short form Ollama lists: `model:tag`, `namespace/model:tag`, or the full name.
    pub fn display(&self) -> String {
        match (
            self.registry == DEFAULT_REGISTRY,
            self.namespace == DEFAULT_NAMESPACE,
        ) {
            (true, true) => format!("{}:{}", self.model, self.tag),
            (true, false) => format!("{}/{}:{}", self.namespace, self.model, self.tag),
            _ => format!(
                "{}/{}/{}:{}",
                self.registry, self.namespace, self.model, self.tag
            ),
        }
    }

    fn manifest_path(&self, root: &Path) -> PathBuf {
        root.join("manifests")
            .join(&self.registry)
            .join(&self.namespace)
            .join(&self.model)
            .join(&self.tag)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OllamaManifestFile {
    config: Option<OllamaLayer>,
    #[serde(default)]
    layers: Vec<OllamaLayer>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OllamaLayer {
    media_type: String,
    digest: String,
    size: u64,
}

/// A model found in the store, with where each of its layers lives.
#[derive(Debug, Clone)]
pub struct Found {
    /// What the peer is told.
    pub manifest: ModelManifest,
    /// The file of each layer, in the order of `manifest.layers`.
    pub files: Vec<PathBuf>,
}

/// The weights of every backend of this node.
pub struct WeightsStore {
    sources: Vec<Weights>,
    /// GGUF digests by path, valid while size and mtime stay the same (hashing gigabytes
    /// per request would be absurd).
    gguf_digests: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
}

impl WeightsStore {
    /// A store over the backends' weight settings.
    pub fn new(sources: Vec<Weights>) -> Self {
        WeightsStore {
            sources,
            gguf_digests: Mutex::new(HashMap::new()),
        }
    }

    /// Whether any backend says where its weights are.
    pub fn is_empty(&self) -> bool {
        self.sources
            .iter()
            .all(|w| w.models_dir.is_none() && w.gguf.is_empty())
    }

    /// Every model this node has weights for (Ollama's short names, GGUF map keys).
    pub fn models(&self) -> Vec<String> {
        let mut out = Vec::new();
        for w in &self.sources {
            if let Some(dir) = &w.models_dir {
                out.extend(ollama_models(dir));
            }
            out.extend(w.gguf.keys().cloned());
        }
        out.sort();
        out.dedup();
        out
    }

    /// The model `name`: its manifest and files. Blocking I/O (a GGUF may be hashed).
    pub fn find(&self, name: &str) -> Result<Found, StoreError> {
        for w in &self.sources {
            if let Some(dir) = &w.models_dir {
                if let Some(found) = find_ollama(dir, name)? {
                    return Ok(found);
                }
            }
            let entry = w
                .gguf
                .iter()
                .find(|(k, _)| *k == name || model_matches(k, name) || model_matches(name, k));
            if let Some((key, files)) = entry {
                return self.find_gguf(key, files);
            }
        }
        Err(StoreError::NotFound(format!(
            "this node has no weights for model \"{name}\""
        )))
    }

    /// The file of `digest` in model `name`, with its size: only a layer of that model's
    /// manifest, only inside the models directory.
    pub fn blob(&self, name: &str, digest: &str) -> Result<(PathBuf, u64), StoreError> {
        if !valid_digest(digest) {
            return Err(StoreError::NotFound(format!(
                "`{digest}` is not a blob digest"
            )));
        }
        let found = self.find(name)?;
        found
            .manifest
            .layers
            .iter()
            .zip(found.files)
            .find(|(l, _)| l.digest == digest)
            .map(|(l, f)| (f, l.size))
            .ok_or_else(|| StoreError::NotFound(format!("model \"{name}\" has no layer {digest}")))
    }

    fn find_gguf(&self, key: &str, files: &[PathBuf]) -> Result<Found, StoreError> {
        let mut layers = Vec::with_capacity(files.len());
        for path in files {
            let meta = std::fs::metadata(path)
                .map_err(|e| StoreError::Broken(format!("{}: {e}", path.display())))?;
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let cached = self
                .gguf_digests
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(path)
                .filter(|(len, at, _)| *len == meta.len() && *at == mtime)
                .map(|(_, _, d)| d.clone());
            let digest = match cached {
                Some(d) => d,
                None => {
                    let d = super::sha256_file(path)
                        .map_err(|e| StoreError::Broken(format!("{}: {e}", path.display())))?;
                    self.gguf_digests
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(path.clone(), (meta.len(), mtime, d.clone()));
                    d
                }
            };
            layers.push(Layer {
                digest,
                size: meta.len(),
                media_type: GGUF_MEDIA_TYPE.to_string(),
                file: path.file_name().map(|f| f.to_string_lossy().into_owned()),
            });
        }
        Ok(Found {
            manifest: ModelManifest {
                model: key.to_string(),
                format: Format::Gguf,
                layers,
            },
            files: files.to_vec(),
        })
    }
}

/// `path` resolved (symlinks followed), if it stays inside `root` (also resolved).
fn inside(root: &Path, path: &Path) -> Option<PathBuf> {
    let root = root.canonicalize().ok()?;
    let real = path.canonicalize().ok()?;
    real.starts_with(&root).then_some(real)
}

fn find_ollama(root: &Path, name: &str) -> Result<Option<Found>, StoreError> {
    let Some(parsed) = OllamaName::parse(name) else {
        return Ok(None);
    };
    let Some(path) = inside(root, &parsed.manifest_path(root)) else {
        return Ok(None);
    };
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read(&path).map_err(|e| StoreError::Broken(format!("manifest of {name}: {e}")))?;
    let file: OllamaManifestFile = serde_json::from_slice(&text)
        .map_err(|e| StoreError::Broken(format!("manifest of {name}: {e}")))?;
    let mut layers = Vec::new();
    let mut files = Vec::new();
    for l in file.config.into_iter().chain(file.layers) {
        if !valid_digest(&l.digest) {
            return Err(StoreError::Broken(format!(
                "manifest of {name} names `{}`, not a sha256 digest",
                l.digest
            )));
        }
        let blob = root
            .join("blobs")
            .join(format!("sha256-{}", super::digest_hex(&l.digest)));
        let Some(real) = inside(root, &blob) else {
            // A blob that is missing, or a symlink leading out of the models directory: the
            // model cannot be shared whole.
            return Err(StoreError::NotFound(format!(
                "model \"{name}\": blob {} is not in the models directory",
                l.digest
            )));
        };
        layers.push(Layer {
            digest: l.digest,
            size: l.size,
            media_type: l.media_type,
            file: None,
        });
        files.push(real);
    }
    Ok(Some(Found {
        manifest: ModelManifest {
            model: parsed.display(),
            format: Format::Ollama,
            layers,
        },
        files,
    }))
}

/// Short names of every manifest under `root/manifests`.
fn ollama_models(root: &Path) -> Vec<String> {
    let list = |p: &Path| -> Vec<String> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let base = root.join("manifests");
    let mut out = Vec::new();
    for registry in list(&base) {
        for namespace in list(&base.join(&registry)) {
            for model in list(&base.join(&registry).join(&namespace)) {
                for tag in list(&base.join(&registry).join(&namespace).join(&model)) {
                    let name = OllamaName {
                        registry: registry.clone(),
                        namespace: namespace.clone(),
                        model: model.clone(),
                        tag,
                    };
                    if OllamaName::parse(&name.display()).as_ref() == Some(&name) {
                        out.push(name.display());
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ollama models dir with one model `m:latest` of two layers; returns (dir, digests).
    pub(crate) fn ollama_dir(root: &Path) -> Vec<String> {
        let blobs = root.join("blobs");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        let mut digests = Vec::new();
        for content in [&b"config"[..], &b"weights weights"[..]] {
            let d = crate::models::sha256_digest(content);
            std::fs::write(blobs.join(format!("sha256-{}", &d[7..])), content).expect("blob");
            digests.push(d);
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": digests[0], "size": 6},
            "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": digests[1], "size": 15}],
        });
        let dir = root.join("manifests/registry.ollama.ai/library/m");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("latest"), manifest.to_string()).expect("manifest");
        digests
    }

    fn store(root: &Path) -> WeightsStore {
        WeightsStore::new(vec![Weights {
            models_dir: Some(root.to_path_buf()),
            ..Weights::default()
        }])
    }

    #[test]
    fn names_parse_into_plain_components_only() {
        let n = OllamaName::parse("llama3.1:8b").expect("valid");
        assert_eq!((n.namespace.as_str(), n.tag.as_str()), ("library", "8b"));
        assert_eq!(n.display(), "llama3.1:8b");
        assert_eq!(OllamaName::parse("m").expect("valid").display(), "m:latest");
        assert_eq!(
            OllamaName::parse("me/m:q4").expect("valid").display(),
            "me/m:q4"
        );
        for bad in [
            "../m",
            "..",
            "a/../../m",
            "m:../x",
            "a/b/c/d",
            "",
            "m:",
            "/m",
            "m\0",
            "r/n/m:t/x",
        ] {
            assert!(OllamaName::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_model_and_its_layers_are_found_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tmp");
        let digests = ollama_dir(dir.path());
        let s = store(dir.path());
        assert_eq!(s.models(), vec!["m:latest".to_string()]);
        let found = s.find("m").expect("found");
        assert_eq!(found.manifest.layers.len(), 2);
        assert_eq!(found.manifest.total(), 21);
        let (path, size) = s.blob("m:latest", &digests[1]).expect("layer");
        assert_eq!(size, 15);
        assert_eq!(std::fs::read(path).expect("read"), b"weights weights");
        // Uppercase, odd, foreign digests and traversal are all "not found".
        let upper = digests[1].to_uppercase().replace("SHA256", "sha256");
        assert!(matches!(s.blob("m", &upper), Err(StoreError::NotFound(_))));
        assert!(matches!(
            s.blob("m", "sha256:../../x"),
            Err(StoreError::NotFound(_))
        ));
        let other = crate::models::sha256_digest(b"not in the manifest");
        std::fs::write(
            dir.path()
                .join("blobs")
                .join(format!("sha256-{}", &other[7..])),
            b"not in the manifest",
        )
        .expect("write");
        assert!(matches!(s.blob("m", &other), Err(StoreError::NotFound(_))));
        assert!(matches!(s.find("../m"), Err(StoreError::NotFound(_))));
        assert!(matches!(s.find("x"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn symlinks_leading_out_of_the_models_dir_are_not_followed() {
        let dir = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        let digests = ollama_dir(dir.path());
        // The model blob becomes a symlink to a file outside.
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"weights weights").expect("write");
        let blob = dir
            .path()
            .join("blobs")
            .join(format!("sha256-{}", &digests[1][7..]));
        std::fs::remove_file(&blob).expect("rm");
        std::os::unix::fs::symlink(&secret, &blob).expect("symlink");
        let s = store(dir.path());
        assert!(matches!(
            s.blob("m", &digests[1]),
            Err(StoreError::NotFound(_))
        ));
        // A manifest directory symlinked out is not followed either.
        let evil = outside
            .path()
            .join("manifests/registry.ollama.ai/library/e");
        std::fs::create_dir_all(&evil).expect("mkdir");
        std::fs::copy(
            dir.path()
                .join("manifests/registry.ollama.ai/library/m/latest"),
            evil.join("latest"),
        )
        .expect("copy");
        std::os::unix::fs::symlink(
            &evil,
            dir.path().join("manifests/registry.ollama.ai/library/e"),
        )
        .expect("symlink");
        assert!(matches!(s.find("e"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn gguf_models_are_hashed_once_and_served_by_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("tiny.gguf");
        std::fs::write(&file, b"GGUF....").expect("write");
        let s = WeightsStore::new(vec![Weights {
            gguf: [("tiny".to_string(), vec![file.clone()])].into(),
            ..Weights::default()
        }]);
        let found = s.find("tiny").expect("found");
        assert_eq!(found.manifest.format, Format::Gguf);
        assert_eq!(found.manifest.layers[0].file.as_deref(), Some("tiny.gguf"));
        let digest = crate::models::sha256_digest(b"GGUF....");
        assert_eq!(found.manifest.layers[0].digest, digest);
        assert_eq!(s.blob("tiny", &digest).expect("blob").0, file);
        assert!(
            s.find("tiny:latest").is_ok(),
            "untagged name covers :latest"
        );
    }
}
