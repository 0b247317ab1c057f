//! The pulling side: a model's weights from approved peers that offer it, in parallel Range
//! parts, resumable, every layer checked against its sha256 before it is used.
//!
//! ```text
//! offers (hellos' `pullable`) -> manifest (first peer that answers)
//!   per layer: already installed? -> skip
//!              <data_dir>/pulls/<hex>.part + <hex>.state (parts done, synced first)
//!              parts queue <- workers (streams_per_peer per peer); a peer that fails
//!              mid-part leaves the rest of that part, from the same offset, to the others
//!              sha256 of the whole file -> <hex>.blob (or the partial is dropped: corrupt)
//!   install (install.rs) -> partials removed
//! ```

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::install::{Installer, Target};
use super::serve::{record_transfer, TransferMetrics, TransferRecord};
use super::{digest_hex, valid_digest, ModelManifest, SharingConfig, BLOB_PATH, MANIFEST_PATH};
use crate::audit::{AuditLog, Direction};
use crate::identity::PublicKey;
use crate::mesh::client::MeshClient;
use crate::mesh::tls::MESH_SNI;
use crate::peers::PeerTable;
use crate::routing::model_matches;
use crate::upstream::Upstream;

/// How often progress is reported while bytes move.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// The longest a peer may stay silent in the middle of a part before another peer takes over.
const STALL: Duration = Duration::from_secs(30);

/// A peer that offers a model to us.
#[derive(Debug, Clone)]
pub struct Offer {
    /// Its approved node id.
    pub node_id: String,
    /// Its key.
    pub key: PublicKey,
    /// Its mesh endpoint.
    pub addr: SocketAddr,
}

/// What a pull reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A step: `pulling manifest`, `verifying sha256 digest`, `writing manifest`, ...
    Status(String),
    /// Bytes of one layer so far.
    Layer {
        /// The layer's digest.
        digest: String,
        /// Its size.
        total: u64,
        /// Bytes there (resumed ones included).
        completed: u64,
        /// Bytes received in this pull, by peer.
        peers: BTreeMap<String, u64>,
    },
}

/// How a pull ended well.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The model.
    pub model: String,
    /// All layers' bytes.
    pub total: u64,
    /// Bytes received from peers in this pull.
    pub downloaded: u64,
    /// Bytes that were already there (installed, verified, or parts of an earlier pull).
    pub reused: u64,
    /// Bytes received by peer.
    pub peers: BTreeMap<String, u64>,
    /// Where it went (`ollama backend <name>` or the GGUF path).
    pub installed: String,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// No approved peer offers the model to us.
    #[error("no approved peer offers model \"{0}\" for pulling (they list it in their hello when they approved us with can_pull_models and share it)")]
    NotOffered(String),
    /// No peer gave a usable manifest.
    #[error("no peer gave a manifest for \"{model}\": {why}")]
    Manifest {
        /// The model.
        model: String,
        /// The last peer's failure.
        why: String,
    },
    /// Every peer failed before the layer was whole; what was received is kept for resume.
    #[error("layer {digest}: every peer failed ({why}); {have} of {size} bytes kept, pull again to resume")]
    Peers {
        /// The layer.
        digest: String,
        /// Bytes kept.
        have: u64,
        /// Its size.
        size: u64,
        /// The last failure.
        why: String,
    },
    /// The bytes do not hash to the digest: refused, never installed, the partial dropped.
    #[error("layer {digest} from {peers} does not match its sha256 (got {got}): refused, nothing installed")]
    Corrupt {
        /// The layer.
        digest: String,
        /// What its bytes hash to.
        got: String,
        /// The peers that sent it.
        peers: String,
    },
    /// A file could not be written or read here.
    #[error("{0}")]
    Disk(String),
    /// The backend would not take it.
    #[error("install: {0}")]
    Install(String),
    /// The same model is already being pulled.
    #[error("model \"{0}\" is already being pulled")]
    Busy(String),
}

/// On-disk resume state of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PartState {
    digest: String,
    size: u64,
    part_bytes: u64,
    done: Vec<u64>,
}

/// Pulls models from peers for this node.
pub struct Puller {
    client: Arc<MeshClient>,
    peers: Arc<PeerTable>,
    upstream: Arc<Upstream>,
    installer: Installer,
    dir: PathBuf,
    config: SharingConfig,
    audit: Arc<AuditLog>,
    metrics: Arc<TransferMetrics>,
    running: Mutex<HashSet<String>>,
}

/// Marks a model as being pulled until dropped.
struct Running<'a> {
    set: &'a Mutex<HashSet<String>>,
    model: &'a str,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.model);
    }
}

/// One unit of work: bytes `from..to` of part `idx`.
#[derive(Debug, Clone, Copy)]
struct Work {
    idx: u64,
    from: u64,
    to: u64,
}

/// What the workers of one layer share.
struct LayerJob {
    digest: String,
    model: String,
    size: u64,
    file: std::fs::File,
    queue: Mutex<VecDeque<Work>>,
    /// Bytes still missing per part; a part at 0 is synced and written to the state.
    missing: Mutex<HashMap<u64, u64>>,
    state: Mutex<PartState>,
    state_path: PathBuf,
    completed: AtomicU64,
    by_peer: Mutex<BTreeMap<String, u64>>,
    last_error: Mutex<String>,
    /// Work items being fetched now: a worker that finds the queue empty waits while others
    /// are busy, since a failing peer puts the rest of its part back.
    active: std::sync::atomic::AtomicUsize,
    /// Peers that failed during this pull (they get no further layers).
    failed: Arc<Mutex<HashSet<String>>>,
}

impl Puller {
    /// A puller for this node (partials under `<data_dir>/pulls`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Arc<MeshClient>,
        peers: Arc<PeerTable>,
        upstream: Arc<Upstream>,
        installer: Installer,
        data_dir: &Path,
        config: SharingConfig,
        audit: Arc<AuditLog>,
        metrics: Arc<TransferMetrics>,
    ) -> Self {
        Puller {
            client,
            peers,
            upstream,
            installer,
            dir: data_dir.join("pulls"),
            config,
            audit,
            metrics,
            running: Mutex::new(HashSet::new()),
        }
    }

    /// The approved, reachable peers offering `model` to us (only `from` when given).
    pub fn offers(&self, model: &str, from: Option<&str>) -> Vec<Offer> {
        let approvals = self.peers.approvals();
        approvals
            .file
            .peers
            .iter()
            .filter(|p| from.is_none_or(|f| p.node_id == f || p.public_key.to_string() == f))
            .filter_map(|p| {
                let status = self.peers.status(&p.public_key);
                let offered = status
                    .pullable
                    .iter()
                    .any(|m| m == model || model_matches(m, model) || model_matches(model, m));
                if !status.reachable || !offered {
                    return None;
                }
                let addr = self.peers.endpoint_of(&p.public_key)?.parse().ok()?;
                Some(Offer {
                    node_id: p.node_id.clone(),
                    key: p.public_key,
                    addr,
                })
            })
            .collect()
    }

    /// Pulls `model` from `offers` and installs it, reporting progress to `events`.
    pub async fn pull(
        &self,
        model: &str,
        offers: Vec<Offer>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Summary, PullError> {
        if offers.is_empty() {
            return Err(PullError::NotOffered(model.to_string()));
        }
        if !self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(model.to_string())
        {
            return Err(PullError::Busy(model.to_string()));
        }
        // Cleared on drop: a pull whose client left is cancelled mid-await, and the model
        // must be pullable again afterwards.
        let _running = Running {
            set: &self.running,
            model,
        };
        self.pull_inner(model, offers, &events).await
    }

    async fn pull_inner(
        &self,
        model: &str,
        offers: Vec<Offer>,
        events: &mpsc::UnboundedSender<Event>,
    ) -> Result<Summary, PullError> {
        let _ = events.send(Event::Status("pulling manifest".into()));
        let manifest = self.manifest(model, &offers).await?;
        let target = self
            .installer
            .target(model, &manifest)
            .map_err(PullError::Install)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| PullError::Disk(format!("{}: {e}", self.dir.display())))?;
        let mut files = Vec::with_capacity(manifest.layers.len());
        let mut summary = Summary {
            model: model.to_string(),
            total: manifest.total(),
            downloaded: 0,
            reused: 0,
            peers: BTreeMap::new(),
            installed: String::new(),
        };
        let failed = Arc::new(Mutex::new(HashSet::new()));
        let missing = self.missing_bytes(&manifest, &target).await;
        self.check_space(missing)?;
        for layer in &manifest.layers {
            let blob = self.dir.join(format!("{}.blob", digest_hex(&layer.digest)));
            if self.installer.has(&target, layer).await {
                let _ = events.send(Event::Layer {
                    digest: layer.digest.clone(),
                    total: layer.size,
                    completed: layer.size,
                    peers: BTreeMap::new(),
                });
                summary.reused += layer.size;
                files.push(None);
                continue;
            }
            if std::fs::metadata(&blob).is_ok_and(|m| m.len() == layer.size) {
                summary.reused += layer.size;
                files.push(Some(blob));
                continue;
            }
            let (got, reused) = self
                .layer(model, &layer.digest, layer.size, &offers, &failed, events)
                .await?;
            summary.reused += reused;
            for (peer, n) in got {
                summary.downloaded += n;
                *summary.peers.entry(peer).or_default() += n;
            }
            files.push(Some(blob));
        }
        let _ = events.send(Event::Status("writing manifest".into()));
        summary.installed = self
            .installer
            .install(&target, model, &manifest, &files)
            .await
            .map_err(PullError::Install)?;
        for f in files.into_iter().flatten() {
            let _ = std::fs::remove_file(f);
        }
        Ok(summary)
    }

    /// Bytes this pull still has to fetch (for the free-space check).
    async fn missing_bytes(&self, manifest: &ModelManifest, target: &Target) -> u64 {
        let mut missing = 0;
        for l in &manifest.layers {
            let blob = self.dir.join(format!("{}.blob", digest_hex(&l.digest)));
            if !std::fs::metadata(&blob).is_ok_and(|m| m.len() == l.size)
                && !self.installer.has(target, l).await
            {
                missing += l.size;
            }
        }
        missing
    }

    /// Refuses up front a pull the data dir's filesystem cannot hold (the partials live
    /// there), rather than failing half way with a full disk.
    fn check_space(&self, need: u64) -> Result<(), PullError> {
        let Ok(st) = nix::sys::statvfs::statvfs(&self.dir) else {
            return Ok(());
        };
        let free = st.blocks_available().saturating_mul(st.fragment_size());
        if need > free {
            return Err(PullError::Disk(format!(
                "{} has {} MB free, the pull needs {} MB: free some space and pull again",
                self.dir.display(),
                free / 1_000_000,
                need.div_ceil(1_000_000)
            )));
        }
        Ok(())
    }

    async fn manifest(&self, model: &str, offers: &[Offer]) -> Result<ModelManifest, PullError> {
        let mut why = String::from("no peer answered");
        for offer in offers {
            let Some(peer) = self.client.pinned_peer(offer.addr, &offer.key) else {
                why = format!("{}: identity not yet known", offer.node_id);
                continue;
            };
            let path = format!(
                "{MANIFEST_PATH}?model={}",
                crate::upstream::query_value(model)
            );
            match self
                .upstream
                .get_raw(&peer, MESH_SNI, &path, self.client.own_headers())
                .await
            {
                Ok((200, Ok(body))) => match serde_json::from_slice::<ModelManifest>(&body) {
                    Ok(m) if m.layers.iter().all(|l| valid_digest(&l.digest)) => return Ok(m),
                    Ok(_) => why = format!("{}: a layer digest is not sha256", offer.node_id),
                    Err(e) => why = format!("{}: bad manifest: {e}", offer.node_id),
                },
                Ok((status, body)) => {
                    let text = body.map(|b| String::from_utf8_lossy(&b).into_owned());
                    why = format!(
                        "{} answered {status}: {}",
                        offer.node_id,
                        text.unwrap_or_default()
                    );
                }
                Err(e) => why = format!("{}: {e}", offer.node_id),
            }
        }
        Err(PullError::Manifest {
            model: model.to_string(),
            why,
        })
    }

    /// Fetches one layer into `<hex>.blob`, verified. Returns bytes received by peer and the
    /// bytes an earlier pull had already fetched.
    async fn layer(
        &self,
        model: &str,
        digest: &str,
        size: u64,
        offers: &[Offer],
        failed: &Arc<Mutex<HashSet<String>>>,
        events: &mpsc::UnboundedSender<Event>,
    ) -> Result<(BTreeMap<String, u64>, u64), PullError> {
        let hex = digest_hex(digest);
        let part_path = self.dir.join(format!("{hex}.part"));
        let state_path = self.dir.join(format!("{hex}.state"));
        let blob_path = self.dir.join(format!("{hex}.blob"));
        let disk = |p: &Path, e: std::io::Error| PullError::Disk(format!("{}: {e}", p.display()));
        let part_bytes = self.config.part_bytes;
        let state = std::fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<PartState>(&b).ok())
            .filter(|s| s.digest == digest && s.size == size && s.part_bytes == part_bytes)
            .filter(|_| std::fs::metadata(&part_path).is_ok_and(|m| m.len() == size))
            .unwrap_or(PartState {
                digest: digest.to_string(),
                size,
                part_bytes,
                done: Vec::new(),
            });
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part_path)
            .map_err(|e| disk(&part_path, e))?;
        file.set_len(size).map_err(|e| disk(&part_path, e))?;
        let parts = size.div_ceil(part_bytes).max(1);
        let mut queue = VecDeque::new();
        let mut missing = HashMap::new();
        let mut reused = 0;
        for idx in 0..parts {
            let from = idx * part_bytes;
            let to = (from + part_bytes).min(size);
            if state.done.contains(&idx) {
                reused += to - from;
            } else if to > from {
                queue.push_back(Work { idx, from, to });
                missing.insert(idx, to - from);
            }
        }
        let job = Arc::new(LayerJob {
            digest: digest.to_string(),
            model: model.to_string(),
            size,
            file,
            queue: Mutex::new(queue),
            missing: Mutex::new(missing),
            state: Mutex::new(state),
            state_path: state_path.clone(),
            completed: AtomicU64::new(reused),
            by_peer: Mutex::new(BTreeMap::new()),
            last_error: Mutex::new(String::new()),
            active: std::sync::atomic::AtomicUsize::new(0),
            failed: failed.clone(),
        });
        let mut workers = tokio::task::JoinSet::new();
        let dead = failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        *job.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            "no peer left to ask (their identity is learnt by hello)".to_string();
        for offer in offers.iter().filter(|o| !dead.contains(&o.node_id)) {
            let Some(peer) = self.client.pinned_peer(offer.addr, &offer.key) else {
                continue;
            };
            for _ in 0..self.config.streams_per_peer {
                let ctx = WorkerCtx {
                    job: job.clone(),
                    peer: peer.clone(),
                    node_id: offer.node_id.clone(),
                    upstream: self.upstream.clone(),
                    headers: self.client.own_headers().to_vec(),
                    audit: self.audit.clone(),
                    metrics: self.metrics.clone(),
                };
                workers.spawn(ctx.run());
            }
        }
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let report = |job: &LayerJob| Event::Layer {
            digest: job.digest.clone(),
            total: job.size,
            completed: job.completed.load(Ordering::Relaxed),
            peers: job
                .by_peer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        loop {
            tokio::select! {
                done = workers.join_next() => {
                    if done.is_none() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    let _ = events.send(report(&job));
                }
            }
        }
        let _ = events.send(report(&job));
        let got = job
            .by_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let left: u64 = job
            .missing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum();
        if left > 0 {
            let why = job
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            return Err(PullError::Peers {
                digest: digest.to_string(),
                have: size - left,
                size,
                why,
            });
        }
        let _ = events.send(Event::Status("verifying sha256 digest".into()));
        let path = part_path.clone();
        let hashed = tokio::task::spawn_blocking(move || super::sha256_file(&path))
            .await
            .map_err(|e| PullError::Disk(e.to_string()))?
            .map_err(|e| disk(&part_path, e))?;
        if hashed != digest {
            // Which part is bad cannot be told from a whole-file hash: start this layer over.
            let _ = std::fs::remove_file(&part_path);
            let _ = std::fs::remove_file(&state_path);
            let peers: Vec<String> = got.keys().cloned().collect();
            tracing::warn!(digest, got = %hashed, peers = %peers.join(", "), "pulled layer does not match its digest; refused");
            return Err(PullError::Corrupt {
                digest: digest.to_string(),
                got: hashed,
                peers: if peers.is_empty() {
                    "an earlier pull".to_string()
                } else {
                    peers.join(", ")
                },
            });
        }
        std::fs::rename(&part_path, &blob_path).map_err(|e| disk(&blob_path, e))?;
        let _ = std::fs::remove_file(&state_path);
        Ok((got, reused))
    }
}

/// One worker: parts of one layer from one peer.
struct WorkerCtx {
    job: Arc<LayerJob>,
    peer: HttpPeer,
    node_id: String,
    upstream: Arc<Upstream>,
    headers: Vec<(&'static str, String)>,
    audit: Arc<AuditLog>,
    metrics: Arc<TransferMetrics>,
}

/// How fetching a range from a peer ended.
enum Fetch {
    /// All of it.
    Done,
    /// The peer is busy (429): try again later.
    Busy,
    /// The peer failed; `at` is where the next attempt resumes.
    Failed { at: u64, why: String },
}

impl WorkerCtx {
    async fn run(self) {
        loop {
            let next = self
                .job
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            let Some(work) = next else {
                if self.job.active.load(Ordering::SeqCst) == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            self.job.active.fetch_add(1, Ordering::SeqCst);
            let fetched = self.fetch(work).await;
            match fetched {
                Fetch::Done => {}
                Fetch::Busy => {
                    self.requeue(work);
                    tokio::time::sleep(super::BUSY_BACKOFF).await;
                }
                Fetch::Failed { at, why } => {
                    tracing::info!(peer = %self.node_id, digest = %self.job.digest, offset = at, error = %why, "peer failed mid-part; the rest goes to the other peers");
                    *self
                        .job
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) =
                        format!("{}: {why}", self.node_id);
                    if at < work.to {
                        self.requeue(Work { from: at, ..work });
                    }
                    self.job
                        .failed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(self.node_id.clone());
                    self.job.active.fetch_sub(1, Ordering::SeqCst);
                    // This peer is done for this pull; the others carry on.
                    return;
                }
            }
            self.job.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn requeue(&self, work: Work) {
        self.job
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_front(work);
    }

    async fn fetch(&self, work: Work) -> Fetch {
        let started = Instant::now();
        let started_at = SystemTime::now();
        let (fetch, got) = self.fetch_inner(work).await;
        let (status, error) = match &fetch {
            Fetch::Done => (206, None),
            Fetch::Busy => (429, Some("busy".to_string())),
            Fetch::Failed { why, .. } => (502, Some(why.clone())),
        };
        if !matches!(fetch, Fetch::Busy) {
            record_transfer(
                &self.audit,
                &self.metrics,
                TransferRecord {
                    peer: &self.node_id,
                    model: &self.job.model,
                    status,
                    bytes: got,
                    error,
                    started,
                    started_at,
                    direction: Direction::Outbound,
                },
            );
        }
        fetch
    }

    async fn fetch_inner(&self, work: Work) -> (Fetch, u64) {
        let failed = |at: u64, why: String| Fetch::Failed { at, why };
        let path = format!(
            "{BLOB_PATH}?model={}&digest={}",
            crate::upstream::query_value(&self.job.model),
            self.job.digest
        );
        let Ok(mut req) =
            RequestHeader::build("GET", path.as_bytes(), Some(4 + self.headers.len()))
        else {
            return (failed(work.from, "bad request path".into()), 0);
        };
        let range = format!("bytes={}-{}", work.from, work.to - 1);
        let mut ok = req.insert_header("host", MESH_SNI).is_ok()
            && req.insert_header("range", range.as_str()).is_ok();
        for (n, v) in &self.headers {
            ok = ok && req.insert_header(*n, v.as_str()).is_ok();
        }
        if !ok {
            return (failed(work.from, "bad request header".into()), 0);
        }
        let mut rsp = match self.upstream.send(&self.peer, &req, &Bytes::new()).await {
            Ok(r) => r,
            Err(e) => return (failed(work.from, e.to_string()), 0),
        };
        let status = rsp.header().status.as_u16();
        if status == 429 {
            return (Fetch::Busy, 0);
        }
        let expected_range = format!("bytes {}-{}/{}", work.from, work.to - 1, self.job.size);
        let content_range = rsp
            .header()
            .headers
            .get(http::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let whole = status == 200 && work.from == 0 && work.to == self.job.size;
        if !(whole || (status == 206 && content_range.as_deref() == Some(&expected_range))) {
            return (
                failed(
                    work.from,
                    format!("answered {status} {}", content_range.unwrap_or_default()),
                ),
                0,
            );
        }
        let mut at = work.from;
        loop {
            let chunk = match tokio::time::timeout(STALL, rsp.next_chunk()).await {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => return (failed(at, e.to_string()), at - work.from),
                Err(_) => return (failed(at, format!("silent for {STALL:?}")), at - work.from),
            };
            let n = chunk.len() as u64;
            if at + n > work.to {
                return (
                    failed(at, "sent more bytes than asked".into()),
                    at - work.from,
                );
            }
            if let Err(e) = self.job.file.write_at(&chunk, at) {
                // The disk, not the peer: no other peer can help. Empty the queue so the pull
                // ends with this error at once.
                self.job
                    .queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
                return (
                    failed(at, format!("writing the partial file: {e}")),
                    at - work.from,
                );
            }
            at += n;
            self.job.completed.fetch_add(n, Ordering::Relaxed);
            *self
                .job
                .by_peer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(self.node_id.clone())
                .or_default() += n;
            self.metrics
                .bytes
                .with_label_values(&[&self.node_id, "outbound"])
                .inc_by(n);
            self.part_progress(work.idx, n);
        }
        if at < work.to {
            return (
                failed(at, "the response ended early".into()),
                at - work.from,
            );
        }
        self.upstream.release(rsp).await;
        (Fetch::Done, at - work.from)
    }

    /// Counts `n` bytes of part `idx`; a part now whole is synced to disk and only then
    /// recorded in the state file, so a kill never leaves a part marked done that is not.
    fn part_progress(&self, idx: u64, n: u64) {
        let whole = {
            let mut missing = self
                .job
                .missing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let left = missing.entry(idx).or_default();
            *left = left.saturating_sub(n);
            *left == 0
        };
        if !whole {
            return;
        }
        if self.job.file.sync_data().is_err() {
            return;
        }
        let mut state = self
            .job
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.done.push(idx);
        if let Ok(bytes) = serde_json::to_vec(&*state) {
            if let Err(e) = crate::fsutil::write_atomic(&self.job.state_path, &bytes, 0o600) {
                tracing::warn!(error = %e, "pull state not saved; an interrupted pull refetches more");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_round_trip() {
        let e = crate::upstream::query_value("me/m:q4 x");
        assert_eq!(e, "me%2Fm%3Aq4%20x");
        assert_eq!(
            super::super::serve::query_param(Some(&format!("model={e}")), "model").as_deref(),
            Some("me/m:q4 x")
        );
    }
}
