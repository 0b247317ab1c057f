//! Installing verified layers where this node's backends load them: an Ollama backend gets
//! each blob by `POST /api/blobs/:digest` and the model by `POST /api/create` (`files` map, as
//! Ollama documents it), so `ollama list` shows it; an OpenAI-compatible backend (llama.cpp)
//! gets the GGUF file at the path its config names, moved into place whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use super::{Format, Layer, ModelManifest};
use crate::config::{BackendConfig, BackendKind};

/// Ollama media types whose bytes are weights (everything else is small text or JSON).
const WEIGHT_MEDIA: [&str; 3] = [
    "application/vnd.ollama.image.model",
    "application/vnd.ollama.image.projector",
    "application/vnd.ollama.image.adapter",
];
/// Longest a backend may take to answer one install call (a create copies gigabytes).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Upload piece size.
const UPLOAD_CHUNK: usize = 1024 * 1024;

/// Where a pulled model goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// An Ollama backend, through its API.
    Ollama(Box<BackendConfig>),
    /// GGUF files at these paths, by layer digest.
    Files(HashMap<String, PathBuf>),
}

/// Installs pulled models into the node's backends.
pub struct Installer {
    backends: Vec<BackendConfig>,
    connector: Connector,
}

fn is_weights(layer: &Layer) -> bool {
    layer.media_type == super::GGUF_MEDIA_TYPE || WEIGHT_MEDIA.contains(&layer.media_type.as_str())
}

impl Installer {
    /// An installer over the node's backends (first fitting one wins).
    pub fn new(backends: Vec<BackendConfig>) -> Self {
        Installer {
            backends,
            connector: Connector::new(None),
        }
    }

    /// Where `model` would go: the first backend that can take it.
    pub fn target(&self, model: &str, manifest: &ModelManifest) -> Result<Target, String> {
        let weights: Vec<&Layer> = manifest.layers.iter().filter(|l| is_weights(l)).collect();
        for b in &self.backends {
            match b.kind {
                BackendKind::Ollama => return Ok(Target::Ollama(Box::new(b.clone()))),
                BackendKind::Openai => {
                    let configured = b.weights.gguf.iter().find(|(k, _)| {
                        *k == model
                            || crate::routing::model_matches(k, model)
                            || crate::routing::model_matches(model, k)
                    });
                    if let Some((_, paths)) = configured {
                        if paths.len() != weights.len() {
                            return Err(format!(
                                "backend {}: `gguf` names {} file(s) for {model}, the model has {}",
                                b.name,
                                paths.len(),
                                weights.len()
                            ));
                        }
                        let map = weights
                            .iter()
                            .zip(paths)
                            .map(|(l, p)| (l.digest.clone(), p.clone()))
                            .collect();
                        return Ok(Target::Files(map));
                    }
                    if let Some(dir) = &b.weights.gguf_dir {
                        let base = safe_file_name(model);
                        let map = weights
                            .iter()
                            .enumerate()
                            .map(|(i, l)| {
                                let name = match (&l.file, manifest.format, i) {
                                    (Some(f), Format::Gguf, _) => safe_file_name(f),
                                    (_, _, 0) => format!("{base}.gguf"),
                                    (_, _, i) => format!("{base}-{i}.gguf"),
                                };
                                (l.digest.clone(), dir.join(name))
                            })
                            .collect();
                        return Ok(Target::Files(map));
                    }
                }
            }
        }
        Err(format!(
            "no backend of this node can take \"{model}\": an ollama backend, or an openai one with `gguf` naming it or a `gguf_dir`"
        ))
    }

    /// Whether `layer` is already where `target` keeps it (then it is not fetched).
    pub async fn has(&self, target: &Target, layer: &Layer) -> bool {
        match target {
            // Only weights are skipped: the small text layers are read to build the create
            // request, so they are fetched anyway.
            Target::Ollama(b) => {
                is_weights(layer)
                    && matches!(
                        self.call(
                            b,
                            "HEAD",
                            &format!("/api/blobs/{}", layer.digest),
                            Body::None
                        )
                        .await,
                        Ok((200, _))
                    )
            }
            Target::Files(map) => {
                let Some(path) = map.get(&layer.digest).cloned() else {
                    // Not a weights layer: nothing to place.
                    return true;
                };
                if !std::fs::metadata(&path).is_ok_and(|m| m.len() == layer.size) {
                    return false;
                }
                let digest = layer.digest.clone();
                tokio::task::spawn_blocking(move || {
                    super::sha256_file(&path).is_ok_and(|d| d == digest)
                })
                .await
                .unwrap_or(false)
            }
        }
    }

    /// Installs `model`: `files[i]` is the verified file of `manifest.layers[i]`, or `None`
    /// when the target already has it. Returns where it went.
    pub async fn install(
        &self,
        target: &Target,
        model: &str,
        manifest: &ModelManifest,
        files: &[Option<PathBuf>],
    ) -> Result<String, String> {
        match target {
            Target::Ollama(b) => self.install_ollama(b, model, manifest, files).await,
            Target::Files(map) => {
                let mut placed = Vec::new();
                for (layer, file) in manifest.layers.iter().zip(files) {
                    let (Some(dest), Some(src)) = (map.get(&layer.digest), file) else {
                        continue;
                    };
                    let (src, dest) = (src.clone(), dest.clone());
                    let shown = dest.display().to_string();
                    tokio::task::spawn_blocking(move || place(&src, &dest))
                        .await
                        .map_err(|e| e.to_string())??;
                    placed.push(shown);
                }
                Ok(placed.join(", "))
            }
        }
    }

    async fn install_ollama(
        &self,
        b: &BackendConfig,
        model: &str,
        manifest: &ModelManifest,
        files: &[Option<PathBuf>],
    ) -> Result<String, String> {
        let mut create = json!({ "model": model, "stream": false });
        let mut gguf: BTreeMap<String, String> = BTreeMap::new();
        let mut adapters: BTreeMap<String, String> = BTreeMap::new();
        for (i, (layer, file)) in manifest.layers.iter().zip(files).enumerate() {
            if let Some(path) = file {
                let (status, body) = self
                    .call(
                        b,
                        "POST",
                        &format!("/api/blobs/{}", layer.digest),
                        Body::File(path),
                    )
                    .await?;
                if !(200..300).contains(&status) {
                    return Err(format!(
                        "{} refused blob {} ({status}): {}",
                        b.name,
                        layer.digest,
                        String::from_utf8_lossy(&body)
                    ));
                }
            }
            let text = || -> Result<String, String> {
                let path = file.as_ref().ok_or("a text layer was not fetched")?;
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
            };
            match layer.media_type.as_str() {
                "application/vnd.ollama.image.model" | super::GGUF_MEDIA_TYPE => {
                    let name = match (&layer.file, gguf.len()) {
                        (Some(f), _) => safe_file_name(f),
                        (None, 0) => "model.gguf".to_string(),
                        (None, n) => format!("model-{n}.gguf"),
                    };
                    gguf.insert(name, layer.digest.clone());
                }
                "application/vnd.ollama.image.projector" => {
                    gguf.insert(format!("projector-{i}.gguf"), layer.digest.clone());
                }
                "application/vnd.ollama.image.adapter" => {
                    adapters.insert(format!("adapter-{i}.gguf"), layer.digest.clone());
                }
                "application/vnd.ollama.image.template" => create["template"] = text()?.into(),
                "application/vnd.ollama.image.system" => create["system"] = text()?.into(),
                "application/vnd.ollama.image.license" => create["license"] = text()?.into(),
                "application/vnd.ollama.image.params" => {
                    create["parameters"] = serde_json::from_str::<Value>(&text()?)
                        .map_err(|e| format!("params layer: {e}"))?;
                }
                "application/vnd.ollama.image.messages" => {
                    create["messages"] = serde_json::from_str::<Value>(&text()?)
                        .map_err(|e| format!("messages layer: {e}"))?;
                }
                // The config blob is Ollama's own summary; create writes a new one.
                _ => {}
            }
        }
        create["files"] = json!(gguf);
        if !adapters.is_empty() {
            create["adapters"] = json!(adapters);
        }
        let body = Bytes::from(create.to_string());
        let (status, answer) = self
            .call(b, "POST", "/api/create", Body::Json(body))
            .await?;
        let text = String::from_utf8_lossy(&answer);
        // Even with stream=false an error can come as a JSON object with `error`.
        let failed = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| v["error"].as_str().map(str::to_string));
        match (status, failed) {
            (200..=299, None) => Ok(format!("ollama backend {} as {model}", b.name)),
            (s, e) => Err(format!(
                "{} refused to create {model} ({s}): {}",
                b.name,
                e.unwrap_or_else(|| text.into_owned())
            )),
        }
    }

    /// One request to a backend, with a streamed file or a small body; the status and body.
    async fn call(
        &self,
        b: &BackendConfig,
        method: &str,
        path: &str,
        body: Body<'_>,
    ) -> Result<(u16, Vec<u8>), String> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(b, method, path, body))
            .await
            .unwrap_or_else(|_| Err(format!("{}: no answer within {CALL_TIMEOUT:?}", b.name)))
    }

    async fn call_inner(
        &self,
        b: &BackendConfig,
        method: &str,
        path: &str,
        body: Body<'_>,
    ) -> Result<(u16, Vec<u8>), String> {
        let err = |e: &dyn std::fmt::Display| format!("{} ({}): {e}", b.name, b.url);
        let full = format!("{}{path}", b.url.base_path);
        let mut req =
            RequestHeader::build(method, full.as_bytes(), Some(4)).map_err(|e| err(&e))?;
        req.insert_header("host", b.url.authority.as_str())
            .map_err(|e| err(&e))?;
        if let Some(k) = &b.api_key {
            req.insert_header("authorization", format!("Bearer {}", k.0))
                .map_err(|e| err(&e))?;
        }
        let mut file = None;
        let length = match &body {
            Body::None => 0,
            Body::Json(bytes) => {
                req.insert_header("content-type", "application/json")
                    .map_err(|e| err(&e))?;
                bytes.len() as u64
            }
            Body::File(path) => {
                let f = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let len = f
                    .metadata()
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .len();
                file = Some(f);
                req.insert_header("content-type", "application/octet-stream")
                    .map_err(|e| err(&e))?;
                len
            }
        };
        if method != "GET" && method != "HEAD" {
            req.insert_header("content-length", length.to_string())
                .map_err(|e| err(&e))?;
        }
        let mut peer = HttpPeer::new(b.url.addr, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        let (mut session, _) = self
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|e| err(&e))?;
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| err(&e))?;
        match body {
            Body::None => {}
            Body::Json(bytes) => session
                .write_request_body(bytes, true)
                .await
                .map_err(|e| err(&e))?,
            Body::File(path) => {
                let mut f = file.ok_or("file not open")?;
                let mut left = length;
                let mut buf = vec![0u8; UPLOAD_CHUNK];
                while left > 0 {
                    let n = f
                        .read(&mut buf)
                        .await
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    if n == 0 {
                        return Err(format!("{}: shorter than it was", path.display()));
                    }
                    left = left.saturating_sub(n as u64);
                    session
                        .write_request_body(Bytes::copy_from_slice(&buf[..n]), left == 0)
                        .await
                        .map_err(|e| err(&e))?;
                }
            }
        }
        session.finish_request_body().await.map_err(|e| err(&e))?;
        session.read_response_header().await.map_err(|e| err(&e))?;
        let status = session
            .response_header()
            .map(|h| h.status.as_u16())
            .unwrap_or(0);
        let mut out = Vec::new();
        if method != "HEAD" {
            while let Some(chunk) = session.read_response_body().await.map_err(|e| err(&e))? {
                if out.len() < 1024 * 1024 {
                    out.extend_from_slice(&chunk);
                }
            }
        }
        Ok((status, out))
    }
}

/// A request body.
enum Body<'a> {
    None,
    Json(Bytes),
    File(&'a Path),
}

/// A name safe as one file name: letters, digits, `.`, `-`, `_`; anything else becomes `_`.
fn safe_file_name(s: &str) -> String {
    let name: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = name.trim_start_matches('.').to_string();
    if name.is_empty() {
        "model".to_string()
    } else {
        name
    }
}

/// Moves `src` to `dest` whole: a rename when they share a filesystem, else a copy to a
/// temporary name next to `dest`, fsync, rename. `dest` is never seen half written.
pub fn place(src: &Path, dest: &Path) -> Result<(), String> {
    let ctx =
        |what: &str, p: &Path, e: std::io::Error| format!("cannot {what} {}: {e}", p.display());
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ctx("create", dir, e))?;
    }
    match std::fs::rename(src, dest) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {}
        Err(e) => return Err(ctx("place the model at", dest, e)),
    }
    let tmp = dest.with_extension("arknet-tmp");
    let copied = std::fs::copy(src, &tmp)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, dest));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(ctx("place the model at", dest, e));
    }
    let _ = std::fs::remove_file(src);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_stay_file_names() {
        assert_eq!(safe_file_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(safe_file_name("me/m:q4"), "me_m_q4");
        assert_eq!(safe_file_name(".."), "model");
        assert_eq!(safe_file_name("SmolLM2.gguf"), "SmolLM2.gguf");
    }

    #[test]
    fn a_placed_file_appears_whole_and_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("a.blob");
        std::fs::write(&src, b"weights").expect("write");
        let dest = dir.path().join("sub/m.gguf");
        place(&src, &dest).expect("placed");
        assert_eq!(std::fs::read(&dest).expect("read"), b"weights");
        assert!(!src.exists());
        std::fs::write(&src, b"weights").expect("write");
        let err = place(&src, Path::new("/proc/arknet-no/m.gguf")).expect_err("refused");
        assert!(err.contains("/proc/arknet-no"), "{err}");
        assert!(
            src.exists(),
            "the verified file is kept when it cannot be placed"
        );
    }
}
