//! A fake model server for integration tests and benchmarks.
//!
//! It speaks the Ollama API (NDJSON streaming) and the OpenAI-compatible API (SSE streaming, as
//! served by llama.cpp), answers with deterministic content, paces streamed chunks with a
//! configurable delay (each chunk is flushed on its own, so a test can prove that a proxy does not
//! buffer), and records every request it receives.
//!
//! Content is deterministic: a reply has `chunks` tokens, token `i` is `"tok{i} "`. The prompt
//! token count is the number of whitespace-separated words in all message contents (or in the
//! prompt / embedding inputs), at least 1; the completion token count is the number of chunks.
//!
//! Self-contained on purpose: benches include it with
//! `#[path = "../tests/support/fake_backend.rs"] mod fake_backend;`.
//!
//! Only loopback addresses may be bound (`start` panics otherwise).
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::Stream;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Which API families the fake serves. Paths of a family that is not served answer 404.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `/api/*` (real Ollama also serves `/v1/*`; use `Both` for that).
    Ollama,
    /// `/v1/*` and `/health`, like llama.cpp's `llama-server`.
    OpenAi,
    Both,
}

impl Dialect {
    fn ollama(self) -> bool {
        matches!(self, Dialect::Ollama | Dialect::Both)
    }
    fn openai(self) -> bool {
        matches!(self, Dialect::OpenAi | Dialect::Both)
    }
}

#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// Model names served, verbatim. The Ollama dialect also accepts `x` for `x:latest` and back.
    pub models: Vec<String>,
    pub dialects: Dialect,
    /// Tokens (content chunks) per reply.
    pub chunks: usize,
    /// Pause between two content chunks of a streamed reply.
    pub chunk_delay: Duration,
    /// Models answered with their own pause between chunks instead of `chunk_delay` (a bench
    /// serves fast and paced streams from one backend).
    pub paced: Vec<(String, Duration)>,
    /// Pause before the response head of an inference call.
    pub first_byte_delay: Duration,
    /// Answer every inference call with this status and a dialect error body (e.g. 503).
    pub status_override: Option<u16>,
    /// Answer every n-th inference call (the 1st, n+1-th, ...) with 502: a flaky server.
    pub fail_every: Option<usize>,
    /// Record every request (method, path, headers, body). Turn off for load.
    pub record: bool,
    /// Length of the embedding vectors.
    pub embedding_dim: usize,
    /// Models `/api/ps` reports as loaded (`None`: all of them).
    pub loaded: Option<Vec<String>>,
    /// Behave like a hostile server: inference answers carry [`HOSTILE_HEADERS`] (an HTML
    /// content type, a cookie for the node's origin, CORS grants, a redirect) and claim
    /// [`HOSTILE_TOKENS`] prompt and generated tokens.
    pub hostile: bool,
    /// Where `POST /api/blobs/:digest` keeps uploaded blobs (`sha256-<hex>`); `None`: they are
    /// checked and counted, not kept.
    pub blob_dir: Option<std::path::PathBuf>,
}

/// Headers a hostile backend adds to its inference answers.
pub const HOSTILE_HEADERS: [(&str, &str); 7] = [
    ("content-type", "text/html"),
    ("set-cookie", "arknet_admin=stolen; Path=/"),
    ("access-control-allow-origin", "*"),
    ("access-control-allow-credentials", "true"),
    ("location", "http://evil.example/"),
    ("server", "evil/6.6.6"),
    ("x-evil", "1"),
];
/// Token counts a hostile backend claims.
pub const HOSTILE_TOKENS: u64 = 999_999_999;

impl FakeConfig {
    pub fn new(dialects: Dialect, models: &[&str]) -> Self {
        FakeConfig {
            models: models.iter().map(|m| m.to_string()).collect(),
            dialects,
            chunks: 8,
            chunk_delay: Duration::ZERO,
            paced: Vec::new(),
            first_byte_delay: Duration::ZERO,
            status_override: None,
            fail_every: None,
            record: true,
            embedding_dim: 8,
            loaded: None,
            hostile: false,
            blob_dir: None,
        }
    }
    /// Keep uploaded blobs in `dir` (see [`FakeConfig::blob_dir`]).
    pub fn blob_dir(mut self, dir: &std::path::Path) -> Self {
        self.blob_dir = Some(dir.to_path_buf());
        self
    }
    pub fn hostile(mut self) -> Self {
        self.hostile = true;
        self
    }
    pub fn ollama(models: &[&str]) -> Self {
        Self::new(Dialect::Ollama, models)
    }
    pub fn openai(models: &[&str]) -> Self {
        Self::new(Dialect::OpenAi, models)
    }
    pub fn both(models: &[&str]) -> Self {
        Self::new(Dialect::Both, models)
    }
    pub fn dialects(mut self, dialects: Dialect) -> Self {
        self.dialects = dialects;
        self
    }
    pub fn chunks(mut self, n: usize) -> Self {
        self.chunks = n;
        self
    }
    pub fn chunk_delay(mut self, d: Duration) -> Self {
        self.chunk_delay = d;
        self
    }
    /// `model` (which must also be in `models`) streams with `d` between chunks.
    pub fn pace(mut self, model: &str, d: Duration) -> Self {
        self.paced.push((model.to_string(), d));
        self
    }
    /// The pause between chunks for `model`.
    fn delay_for(&self, model: &str) -> Duration {
        self.paced
            .iter()
            .find(|(m, _)| m == model)
            .map_or(self.chunk_delay, |(_, d)| *d)
    }
    pub fn first_byte_delay(mut self, d: Duration) -> Self {
        self.first_byte_delay = d;
        self
    }
    pub fn fail_every(mut self, n: usize) -> Self {
        self.fail_every = Some(n);
        self
    }
    pub fn status_override(mut self, status: u16) -> Self {
        self.status_override = Some(status);
        self
    }
    pub fn record(mut self, on: bool) -> Self {
        self.record = on;
        self
    }
    pub fn loaded(mut self, models: &[&str]) -> Self {
        self.loaded = Some(models.iter().map(|m| m.to_string()).collect());
        self
    }
    pub fn embedding_dim(mut self, n: usize) -> Self {
        self.embedding_dim = n;
        self
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Header names are lowercase, in arrival order; repeated headers appear repeatedly.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Recorded {
    /// First value of a header (name is matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

// ---------------------------------------------------------------------------------------------
// The running server
// ---------------------------------------------------------------------------------------------

/// A running fake backend. Dropping it stops the listener and cuts every open connection.
pub struct FakeBackend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
    thread: Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl FakeBackend {
    /// Binds port 0 on `bind_ip` (must be loopback) and serves on the current tokio runtime.
    pub async fn start(bind_ip: IpAddr, config: FakeConfig) -> FakeBackend {
        let (addr, shared, server) = launch(bind_ip, config).await;
        FakeBackend {
            addr,
            shared,
            server: Some(server),
            thread: None,
        }
    }

    /// Like `start`, on a fixed port (for a backend process inside a network namespace).
    pub async fn start_on(bind_ip: IpAddr, port: u16, config: FakeConfig) -> FakeBackend {
        let (addr, shared, server) = launch_on(bind_ip, port, config).await;
        FakeBackend {
            addr,
            shared,
            server: Some(server),
            thread: None,
        }
    }

    /// Like `start`, but on its own multi-thread runtime in a background thread; usable from
    /// synchronous code. Dropping the backend stops that runtime and joins the thread.
    pub fn start_in_thread(bind_ip: IpAddr, config: FakeConfig) -> FakeBackend {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let thread = std::thread::Builder::new()
            .name(format!("fake-backend-{bind_ip}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .thread_name("fake-backend-worker")
                    .enable_all()
                    .build()
                    .expect("fake backend: build tokio runtime");
                runtime.block_on(async move {
                    let (addr, shared, _server) = launch(bind_ip, config).await;
                    if ready_tx.send((addr, shared)).is_ok() {
                        let _ = stop_rx.await;
                    }
                });
                // Dropping the runtime here cancels the server and every connection task.
            })
            .expect("fake backend: spawn thread");
        let (addr, shared) = ready_rx
            .recv()
            .expect("fake backend: thread failed to start");
        FakeBackend {
            addr,
            shared,
            server: None,
            thread: Some((stop_tx, thread)),
        }
    }

    /// `http://ip:port`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Inference calls received (POST to chat / generate / completions / embeddings paths),
    /// whatever their outcome. Listings and `/api/show` are not counted.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Every request received so far, in arrival order (empty if `record` is off).
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.recorded().clone()
    }

    /// The first recorded request to `path`, if any.
    pub fn request_to(&self, path: &str) -> Option<Recorded> {
        self.shared
            .recorded()
            .iter()
            .find(|r| r.path == path)
            .cloned()
    }

    /// Inference requests currently being answered (a streamed one until its body ends).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Highest `in_flight` seen so far.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far (a pooling client opens few).
    pub fn connections(&self) -> u64 {
        self.shared.conns.lock().next_id
    }

    /// Blobs received by `POST /api/blobs/:digest` and verified: digest -> size.
    pub fn blobs(&self) -> HashMap<String, u64> {
        self.shared
            .blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Models made by `POST /api/create`: name -> the request body.
    pub fn created(&self) -> Vec<(String, Value)> {
        self.shared
            .created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Change the status override while running (`None` answers normally again).
    pub fn set_status_override(&self, status: Option<u16>) {
        self.shared
            .status_override
            .store(status.unwrap_or(0), Ordering::SeqCst);
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.shared.conns.close_all();
        if let Some(server) = self.server.take() {
            server.abort();
        }
        if let Some((stop, thread)) = self.thread.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

async fn launch(bind_ip: IpAddr, config: FakeConfig) -> (SocketAddr, Arc<Shared>, JoinHandle<()>) {
    launch_on(bind_ip, 0, config).await
}

async fn launch_on(
    bind_ip: IpAddr,
    port: u16,
    config: FakeConfig,
) -> (SocketAddr, Arc<Shared>, JoinHandle<()>) {
    assert!(
        bind_ip.is_loopback(),
        "fake backend may only bind loopback, not {bind_ip}"
    );
    let listener = TcpListener::bind((bind_ip, port))
        .await
        .expect("fake backend: bind");
    let addr = listener.local_addr().expect("fake backend: local_addr");
    let shared = Arc::new(Shared {
        status_override: AtomicU16::new(config.status_override.unwrap_or(0)),
        config,
        hits: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        seq: AtomicU64::new(0),
        recorded: Mutex::new(Vec::new()),
        conns: Arc::new(Conns::default()),
        blobs: Mutex::new(HashMap::new()),
        created: Mutex::new(Vec::new()),
    });
    let listener = TrackedListener {
        listener,
        conns: shared.conns.clone(),
    };
    let hostile = shared.config.hostile;
    let router = Router::new()
        .route(
            "/api/blobs/{digest}",
            axum::routing::post(blob_upload).head(blob_head),
        )
        .route("/api/create", axum::routing::post(create_model))
        .route("/api/pull", axum::routing::post(registry_pull))
        .fallback(handle)
        .layer(axum::middleware::map_response(
            move |mut rsp: Response| async move {
                let inference = rsp.status() == StatusCode::OK
                    && rsp.headers().get(CONTENT_TYPE).is_some_and(|ct| {
                        ct.to_str()
                            .is_ok_and(|ct| ct.contains("json") || ct.contains("event-stream"))
                    });
                if hostile && inference {
                    for (name, value) in HOSTILE_HEADERS {
                        rsp.headers_mut()
                            .insert(name, HeaderValue::from_static(value));
                    }
                }
                rsp
            },
        ))
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(shared.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (addr, shared, server)
}

struct Shared {
    config: FakeConfig,
    status_override: AtomicU16,
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    seq: AtomicU64,
    recorded: Mutex<Vec<Recorded>>,
    conns: Arc<Conns>,
    blobs: Mutex<HashMap<String, u64>>,
    created: Mutex<Vec<(String, Value)>>,
}

// ---------------------------------------------------------------------------------------------
// Ollama's model-creation API, as documented: `HEAD /api/blobs/:digest` (200 when the server
// has it, 404 otherwise), `POST /api/blobs/:digest` (the file as body; 201, or 400 when its
// sha256 is not the digest), `POST /api/create` (`files`: name -> digest of an uploaded blob).
// ---------------------------------------------------------------------------------------------

async fn blob_head(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(digest): axum::extract::Path<String>,
) -> StatusCode {
    let has = shared
        .blobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&digest);
    if has {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn blob_upload(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(digest): axum::extract::Path<String>,
    body: Body,
) -> Response {
    use tokio_stream::StreamExt;
    let Some(hex) = digest.strip_prefix("sha256:").filter(|h| h.len() == 64) else {
        return ollama_error(StatusCode::BAD_REQUEST, "invalid digest format");
    };
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    let tmp = shared.config.blob_dir.as_ref().map(|d| {
        d.join(format!(
            "upload-{hex}-{}",
            shared.seq.fetch_add(1, Ordering::SeqCst)
        ))
    });
    let mut file = match &tmp {
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Some(f),
            Err(e) => return ollama_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        None => None,
    };
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return ollama_error(StatusCode::BAD_REQUEST, "body broke off");
        };
        ctx.update(&chunk);
        size += chunk.len() as u64;
        if let Some(f) = file.as_mut() {
            use std::io::Write;
            if let Err(e) = f.write_all(&chunk) {
                return ollama_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
            }
        }
    }
    let got: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != hex {
        if let Some(p) = &tmp {
            let _ = std::fs::remove_file(p);
        }
        return ollama_error(StatusCode::BAD_REQUEST, "digest mismatch");
    }
    if let (Some(p), Some(dir)) = (&tmp, &shared.config.blob_dir) {
        let _ = std::fs::rename(p, dir.join(format!("sha256-{hex}")));
    }
    shared
        .blobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(digest, size);
    respond(StatusCode::CREATED, "text/plain", "")
}

/// `POST /api/pull` as a local Ollama answers it from its registry (here: nothing is fetched;
/// the lines say who answered, so a test can tell a pass-through from a grid pull).
async fn registry_pull(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared.recorded().push(Recorded {
        method: "POST".into(),
        path: "/api/pull".into(),
        query: None,
        headers: Vec::new(),
        body: body.clone(),
    });
    let lines =
        "{\"status\":\"pulling manifest from the fake registry\"}\n{\"status\":\"success\"}\n";
    respond(StatusCode::OK, "application/x-ndjson", lines)
}

async fn create_model(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return ollama_error(StatusCode::BAD_REQUEST, "invalid JSON");
    };
    let Some(model) = req["model"].as_str().filter(|m| !m.is_empty()) else {
        return ollama_error(StatusCode::BAD_REQUEST, "model is required");
    };
    let files = req["files"].as_object().cloned().unwrap_or_default();
    if files.is_empty() {
        return ollama_error(
            StatusCode::BAD_REQUEST,
            "neither 'from' or 'files' was specified",
        );
    }
    {
        let blobs = shared.blobs.lock().unwrap_or_else(|e| e.into_inner());
        for (name, digest) in &files {
            let known = digest.as_str().is_some_and(|d| blobs.contains_key(d));
            if !known {
                return ollama_error(
                    StatusCode::BAD_REQUEST,
                    &format!("file {name}: blob {digest} not found; push it with /api/blobs first"),
                );
            }
        }
    }
    shared
        .created
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((model.to_string(), req.clone()));
    if req["stream"] == false {
        ollama_json(StatusCode::OK, &json!({"status": "success"}))
    } else {
        let lines = "{\"status\":\"parsing GGUF\"}\n{\"status\":\"writing manifest\"}\n{\"status\":\"success\"}\n";
        respond(StatusCode::OK, "application/x-ndjson", lines)
    }
}

impl Shared {
    fn recorded(&self) -> MutexGuard<'_, Vec<Recorded>> {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn knows(&self, model: &str, ollama_names: bool) -> bool {
        self.config.models.iter().any(|m| {
            m == model
                || (ollama_names
                    && (m.strip_suffix(":latest") == Some(model)
                        || model.strip_suffix(":latest") == Some(m.as_str())))
        })
    }
}

/// Counts an inference request as in flight until dropped.
struct FlightGuard(Arc<Shared>);

impl FlightGuard {
    fn enter(shared: &Arc<Shared>) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        FlightGuard(shared.clone())
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Connection tracking, so that dropping the backend really cuts open (keep-alive) connections.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Conns {
    inner: Mutex<ConnsInner>,
}

#[derive(Default)]
struct ConnsInner {
    closed: bool,
    next_id: u64,
    /// A duplicate handle of each open socket, used only to `shutdown` it.
    open: HashMap<u64, std::net::TcpStream>,
}

impl Conns {
    fn lock(&self) -> MutexGuard<'_, ConnsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(self: &Arc<Self>, stream: TcpStream) -> io::Result<TrackedStream> {
        let std_stream = stream.into_std()?;
        let dup = std_stream.try_clone()?;
        let stream = TcpStream::from_std(std_stream)?;
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        if inner.closed {
            let _ = dup.shutdown(Shutdown::Both);
        } else {
            inner.open.insert(id, dup);
        }
        Ok(TrackedStream {
            stream,
            id,
            conns: self.clone(),
        })
    }

    fn close_all(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for (_, s) in inner.open.drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

struct TrackedListener {
    listener: TcpListener,
    conns: Arc<Conns>,
}

impl axum::serve::Listener for TrackedListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TrackedStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    if let Ok(tracked) = self.conns.register(stream) {
                        return (tracked, peer);
                    }
                }
                // e.g. EMFILE: back off a little, as axum does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

struct TrackedStream {
    stream: TcpStream,
    id: u64,
    conns: Arc<Conns>,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.conns.lock().open.remove(&self.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    OllamaRoot,
    OllamaVersion,
    OllamaTags,
    OllamaPs,
    OllamaShow,
    OllamaChat,
    OllamaGenerate,
    OllamaEmbed,
    OllamaEmbeddings,
    OpenAiHealth,
    OpenAiModels,
    OpenAiChat,
    OpenAiCompletions,
    OpenAiEmbeddings,
}

impl Route {
    fn find(path: &str, dialects: Dialect) -> Option<Route> {
        let ollama = match path {
            "/" => Some(Route::OllamaRoot),
            "/api/version" => Some(Route::OllamaVersion),
            "/api/tags" => Some(Route::OllamaTags),
            "/api/ps" => Some(Route::OllamaPs),
            "/api/show" => Some(Route::OllamaShow),
            "/api/chat" => Some(Route::OllamaChat),
            "/api/generate" => Some(Route::OllamaGenerate),
            "/api/embed" => Some(Route::OllamaEmbed),
            "/api/embeddings" => Some(Route::OllamaEmbeddings),
            _ => None,
        };
        let openai = match path {
            "/health" => Some(Route::OpenAiHealth),
            "/v1/models" => Some(Route::OpenAiModels),
            "/v1/chat/completions" => Some(Route::OpenAiChat),
            "/v1/completions" => Some(Route::OpenAiCompletions),
            "/v1/embeddings" => Some(Route::OpenAiEmbeddings),
            _ => None,
        };
        ollama
            .filter(|_| dialects.ollama())
            .or(openai.filter(|_| dialects.openai()))
    }

    fn is_post(self) -> bool {
        !matches!(
            self,
            Route::OllamaRoot
                | Route::OllamaVersion
                | Route::OllamaTags
                | Route::OllamaPs
                | Route::OpenAiHealth
                | Route::OpenAiModels
        )
    }

    fn is_inference(self) -> bool {
        self.is_post() && self != Route::OllamaShow
    }

    fn is_ollama(self) -> bool {
        matches!(
            self,
            Route::OllamaRoot
                | Route::OllamaVersion
                | Route::OllamaTags
                | Route::OllamaPs
                | Route::OllamaShow
                | Route::OllamaChat
                | Route::OllamaGenerate
                | Route::OllamaEmbed
                | Route::OllamaEmbeddings
        )
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if shared.config.record {
        let recorded = Recorded {
            method: method.to_string(),
            path: uri.path().to_string(),
            query: uri.query().map(str::to_string),
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        };
        shared.recorded().push(recorded);
    }

    let Some(route) = Route::find(uri.path(), shared.config.dialects) else {
        return respond(StatusCode::NOT_FOUND, "text/plain", "404 page not found");
    };
    let method_ok = if route.is_post() {
        method == Method::POST
    } else {
        method == Method::GET || method == Method::HEAD
    };
    if !method_ok {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "405 method not allowed",
        );
    }
    let cfg = &shared.config;
    match route {
        Route::OllamaRoot => {
            return respond(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "Ollama is running",
            );
        }
        Route::OllamaVersion => return ollama_json(StatusCode::OK, &json!({"version": "0.6.0"})),
        Route::OllamaTags => {
            let created: Vec<String> = shared
                .created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(m, _)| m.clone())
                .collect();
            let models: Vec<Value> = cfg
                .models
                .iter()
                .chain(created.iter())
                .map(|m| {
                    json!({"name": m, "model": m, "modified_at": rfc3339(SystemTime::now()),
                           "size": model_size(m), "digest": digest(m), "details": details()})
                })
                .collect();
            return ollama_json(StatusCode::OK, &json!({ "models": models }));
        }
        Route::OllamaPs => {
            let expires = rfc3339(SystemTime::now() + Duration::from_secs(300));
            let models: Vec<Value> = cfg
                .models
                .iter()
                .filter(|m| cfg.loaded.as_ref().is_none_or(|l| l.contains(m)))
                .map(|m| {
                    json!({"name": m, "model": m, "size": model_size(m), "size_vram": model_size(m),
                           "digest": digest(m), "details": details(), "expires_at": expires,
                           "context_length": 4096})
                })
                .collect();
            return ollama_json(StatusCode::OK, &json!({ "models": models }));
        }
        Route::OpenAiHealth => return openai_json(StatusCode::OK, &json!({"status": "ok"})),
        Route::OpenAiModels => {
            let created = unix_secs();
            let data: Vec<Value> = cfg
                .models
                .iter()
                .map(
                    |m| json!({"id": m, "object": "model", "created": created, "owned_by": "fake"}),
                )
                .collect();
            return openai_json(StatusCode::OK, &json!({"object": "list", "data": data}));
        }
        _ => {}
    }

    // POST: model calls.
    let ollama = route.is_ollama();
    let hit = route
        .is_inference()
        .then(|| shared.hits.fetch_add(1, Ordering::SeqCst));
    let guard = hit.map(|_| FlightGuard::enter(&shared));
    if route.is_inference() {
        let flaky = shared
            .config
            .fail_every
            .zip(hit)
            .is_some_and(|(n, hit)| n > 0 && hit % n == 0);
        let status = if flaky {
            502
        } else {
            shared.status_override.load(Ordering::SeqCst)
        };
        if status != 0 {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let msg = format!("fake backend: injected status {status}");
            return if ollama {
                ollama_error(code, &msg)
            } else {
                let kind = if code.is_client_error() {
                    "invalid_request_error"
                } else {
                    "server_error"
                };
                openai_error(code, &msg, kind, None)
            };
        }
    }
    let req = match serde_json::from_slice::<Value>(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return bad_request(ollama, "request body must be a JSON object"),
        Err(e) => return bad_request(ollama, &format!("invalid JSON: {e}")),
    };
    let model = req
        .get("model")
        .or_else(|| {
            if route == Route::OllamaShow {
                req.get("name")
            } else {
                None
            }
        })
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if model.is_empty() {
        return if ollama {
            ollama_error(StatusCode::BAD_REQUEST, "model is required")
        } else {
            openai_error(
                StatusCode::BAD_REQUEST,
                "you must provide a model parameter",
                "invalid_request_error",
                None,
            )
        };
    }
    if !shared.knows(&model, ollama) {
        return if ollama {
            ollama_error(
                StatusCode::NOT_FOUND,
                &format!("model \"{model}\" not found, try pulling it first"),
            )
        } else {
            openai_error(
                StatusCode::NOT_FOUND,
                &format!("The model `{model}` does not exist or you do not have access to it."),
                "invalid_request_error",
                Some("model_not_found"),
            )
        };
    }

    match route {
        Route::OllamaShow => ollama_show(cfg, &model),
        Route::OllamaChat => ollama_generation(&shared, guard, &req, &model, true).await,
        Route::OllamaGenerate => ollama_generation(&shared, guard, &req, &model, false).await,
        Route::OllamaEmbed => {
            let inputs = match &req["input"] {
                Value::Null => Vec::new(),
                v => match embedding_inputs(v) {
                    Some(inputs) => inputs,
                    None => return ollama_error(StatusCode::BAD_REQUEST, "invalid input type"),
                },
            };
            pause(cfg.first_byte_delay).await;
            let embeddings: Vec<Vec<f32>> =
                inputs.iter().map(|t| embed(t, cfg.embedding_dim)).collect();
            let tokens: usize = inputs.iter().map(|t| word_count(t)).sum();
            ollama_json(
                StatusCode::OK,
                &json!({"model": model, "embeddings": embeddings, "total_duration": 1_000_000,
                        "load_duration": 1_000, "prompt_eval_count": tokens.max(1)}),
            )
        }
        Route::OllamaEmbeddings => {
            let prompt = req["prompt"].as_str().unwrap_or_default();
            pause(cfg.first_byte_delay).await;
            let embedding = if prompt.is_empty() {
                Vec::new()
            } else {
                embed(prompt, cfg.embedding_dim)
            };
            ollama_json(StatusCode::OK, &json!({ "embedding": embedding }))
        }
        Route::OpenAiChat => openai_generation(&shared, guard, &req, &model, true).await,
        Route::OpenAiCompletions => openai_generation(&shared, guard, &req, &model, false).await,
        Route::OpenAiEmbeddings => {
            let Some(inputs) = embedding_inputs(&req["input"]).filter(|i| !i.is_empty()) else {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    "'input' must be a string or an array",
                    "invalid_request_error",
                    None,
                );
            };
            pause(cfg.first_byte_delay).await;
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": embed(t, cfg.embedding_dim)}))
                .collect();
            let tokens = inputs.iter().map(|t| word_count(t)).sum::<usize>().max(1);
            openai_json(
                StatusCode::OK,
                &json!({"object": "list", "data": data, "model": model,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
            )
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "404 page not found"),
    }
}

// ---------------------------------------------------------------------------------------------
// Ollama
// ---------------------------------------------------------------------------------------------

async fn ollama_generation(
    shared: &Shared,
    guard: Option<FlightGuard>,
    req: &Value,
    model: &str,
    chat: bool,
) -> Response {
    let cfg = &shared.config;
    let chunk_delay = cfg.delay_for(model);
    let n = cfg.chunks;
    let prompt_tokens = if chat {
        message_words(&req["messages"])
    } else {
        value_words(&req["prompt"])
    }
    .max(1);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(true);
    let created_at = rfc3339(SystemTime::now());
    let line = |content: &str, done: bool| {
        let mut v = json!({"model": model, "created_at": created_at});
        if chat {
            v["message"] = json!({"role": "assistant", "content": content});
        } else {
            v["response"] = json!(content);
        }
        v["done"] = json!(done);
        if done {
            let eval = nanos(chunk_delay.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX)));
            let prompt_eval = nanos(cfg.first_byte_delay);
            v["done_reason"] = json!("stop");
            v["total_duration"] = json!(eval + prompt_eval + 1_000);
            v["load_duration"] = json!(1_000);
            v["prompt_eval_count"] = json!(claim(cfg, prompt_tokens as u64));
            v["prompt_eval_duration"] = json!(prompt_eval);
            v["eval_count"] = json!(claim(cfg, n as u64));
            v["eval_duration"] = json!(eval);
            if !chat {
                v["context"] = json!([1, 2, 3]);
            }
        }
        v
    };
    if stream {
        pause(cfg.first_byte_delay).await;
        let mut pieces = VecDeque::with_capacity(n + 1);
        for i in 0..n {
            let delay = if i == 0 { Duration::ZERO } else { chunk_delay };
            pieces.push_back((delay, ndjson(&line(&token(i), false))));
        }
        pieces.push_back((Duration::ZERO, ndjson(&line("", true))));
        return streaming("application/x-ndjson", pieces, guard);
    }
    pause(generation_time(cfg, chunk_delay)).await;
    let text: String = (0..n).map(token).collect();
    let reply = line(&text, true);
    drop(guard);
    ollama_json(StatusCode::OK, &reply)
}

fn ollama_show(cfg: &FakeConfig, model: &str) -> Response {
    ollama_json(
        StatusCode::OK,
        &json!({
            "license": "",
            "modelfile": format!("# Modelfile generated by the fake backend\nFROM {model}\n"),
            "parameters": "stop \"<|end|>\"",
            "template": "{{ .Prompt }}",
            "details": details(),
            "model_info": {
                "general.architecture": "llama",
                "general.parameter_count": 1_000_000_000u64,
                "general.file_type": 2,
                "llama.context_length": 4096,
                "llama.embedding_length": cfg.embedding_dim,
                "llama.block_count": 16,
            },
            "capabilities": ["completion"],
            "modified_at": rfc3339(SystemTime::now()),
        }),
    )
}

fn details() -> Value {
    json!({"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
           "parameter_size": "1B", "quantization_level": "Q4_0"})
}

fn model_size(model: &str) -> u64 {
    700_000_000 + fnv1a(model.as_bytes()) % 100_000_000
}

fn digest(model: &str) -> String {
    (0..4u8)
        .map(|i| {
            let mut bytes = model.as_bytes().to_vec();
            bytes.push(i);
            format!("{:016x}", fnv1a(&bytes))
        })
        .collect()
}

fn ndjson(v: &Value) -> Bytes {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

fn ollama_json(status: StatusCode, v: &Value) -> Response {
    respond(
        status,
        "application/json; charset=utf-8",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

fn ollama_error(status: StatusCode, msg: &str) -> Response {
    ollama_json(status, &json!({ "error": msg }))
}

// ---------------------------------------------------------------------------------------------
// OpenAI
// ---------------------------------------------------------------------------------------------

async fn openai_generation(
    shared: &Shared,
    guard: Option<FlightGuard>,
    req: &Value,
    model: &str,
    chat: bool,
) -> Response {
    let cfg = &shared.config;
    let chunk_delay = cfg.delay_for(model);
    let n = cfg.chunks;
    let prompt_tokens = if chat {
        message_words(&req["messages"])
    } else {
        value_words(&req["prompt"])
    }
    .max(1);
    let (p, c) = (claim(cfg, prompt_tokens as u64), claim(cfg, n as u64));
    let usage = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
    let id = format!(
        "{}-fake{}",
        if chat { "chatcmpl" } else { "cmpl" },
        shared.seq.fetch_add(1, Ordering::Relaxed)
    );
    let created = unix_secs();
    let stream = req["stream"].as_bool().unwrap_or(false);

    if stream {
        let include_usage = req["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |choices: Value| {
            json!({"id": id, "object": object, "created": created, "model": model,
                   "system_fingerprint": "fake", "choices": choices})
        };
        pause(cfg.first_byte_delay).await;
        let count = n.max(1); // with 0 tokens, still one chunk carrying finish_reason
        let mut pieces = VecDeque::with_capacity(count + 2);
        for i in 0..count {
            let text = if i < n { token(i) } else { String::new() };
            let finish = if i + 1 == count {
                json!("stop")
            } else {
                Value::Null
            };
            let choice = if chat {
                let mut delta = json!({ "content": text });
                if i == 0 {
                    delta["role"] = json!("assistant");
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            };
            let mut v = chunk(json!([choice]));
            if include_usage {
                v["usage"] = Value::Null;
            }
            let delay = if i == 0 { Duration::ZERO } else { chunk_delay };
            pieces.push_back((delay, sse(&v)));
        }
        if include_usage {
            let mut v = chunk(json!([]));
            v["usage"] = usage;
            pieces.push_back((Duration::ZERO, sse(&v)));
        }
        pieces.push_back((Duration::ZERO, Bytes::from_static(b"data: [DONE]\n\n")));
        return streaming("text/event-stream", pieces, guard);
    }

    pause(generation_time(cfg, chunk_delay)).await;
    let text: String = (0..n).map(token).collect();
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"})
    } else {
        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"})
    };
    let reply = json!({
        "id": id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "system_fingerprint": "fake",
        "choices": [choice],
        "usage": usage,
    });
    drop(guard);
    openai_json(StatusCode::OK, &reply)
}

fn sse(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend(serde_json::to_vec(v).unwrap_or_default());
    out.extend(b"\n\n");
    Bytes::from(out)
}

fn openai_json(status: StatusCode, v: &Value) -> Response {
    respond(
        status,
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

fn openai_error(status: StatusCode, msg: &str, kind: &str, code: Option<&str>) -> Response {
    openai_json(
        status,
        &json!({"error": {"message": msg, "type": kind, "param": null, "code": code}}),
    )
}

fn bad_request(ollama: bool, msg: &str) -> Response {
    if ollama {
        ollama_error(StatusCode::BAD_REQUEST, msg)
    } else {
        openai_error(StatusCode::BAD_REQUEST, msg, "invalid_request_error", None)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A token count as this backend reports it: the real one, or an inflated claim when hostile.
fn claim(cfg: &FakeConfig, real: u64) -> u64 {
    if cfg.hostile {
        HOSTILE_TOKENS
    } else {
        real
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A streamed response: each piece is sent as its own chunk, after its delay.
fn streaming(
    content_type: &'static str,
    pieces: VecDeque<(Duration, Bytes)>,
    guard: Option<FlightGuard>,
) -> Response {
    let mut response = respond(
        StatusCode::OK,
        content_type,
        Body::from_stream(Paced {
            pieces,
            sleep: None,
            _guard: guard,
        }),
    );
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    response
}

struct Paced {
    pieces: VecDeque<(Duration, Bytes)>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Keeps the request counted as in flight until the body ends or is dropped.
    _guard: Option<FlightGuard>,
}

impl Stream for Paced {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        } else if let Some((delay, _)) = this.pieces.front() {
            if !delay.is_zero() {
                let mut sleep = Box::pin(tokio::time::sleep(*delay));
                if sleep.as_mut().poll(cx).is_pending() {
                    this.sleep = Some(sleep);
                    return Poll::Pending;
                }
            }
        }
        match this.pieces.pop_front() {
            Some((_, bytes)) => Poll::Ready(Some(Ok(bytes))),
            None => {
                this._guard = None;
                Poll::Ready(None)
            }
        }
    }
}

async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// How long a non-streamed reply takes: as long as the streamed one would.
fn generation_time(cfg: &FakeConfig, chunk_delay: Duration) -> Duration {
    let gaps = u32::try_from(cfg.chunks.saturating_sub(1)).unwrap_or(u32::MAX);
    cfg.first_byte_delay + chunk_delay.saturating_mul(gaps)
}

fn token(i: usize) -> String {
    format!("tok{i} ")
}

fn word_count(s: &str) -> usize {
    s.split_whitespace().count()
}

/// Words in a prompt: a string, an array of strings, or token ids (one token each).
fn value_words(v: &Value) -> usize {
    match v {
        Value::String(s) => word_count(s),
        Value::Array(items) => items.iter().map(value_words).sum(),
        Value::Number(_) => 1,
        _ => 0,
    }
}

/// Words in all message contents (a string, or OpenAI content parts with `text`).
fn message_words(messages: &Value) -> usize {
    let Some(messages) = messages.as_array() else {
        return 0;
    };
    messages
        .iter()
        .map(|m| match &m["content"] {
            Value::String(s) => word_count(s),
            Value::Array(parts) => parts.iter().map(|p| value_words(&p["text"])).sum(),
            _ => 0,
        })
        .sum()
}

/// Embedding inputs: a string, an array of strings, token ids, or arrays of token ids.
fn embedding_inputs(v: &Value) -> Option<Vec<String>> {
    fn tokens(items: &[Value]) -> Option<String> {
        let ids: Option<Vec<String>> = items
            .iter()
            .map(|t| t.as_u64().map(|t| t.to_string()))
            .collect();
        ids.map(|ids| ids.join(" "))
    }
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => {
            tokens(items).map(|t| vec![t])
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Some(s.clone()),
                Value::Array(ids) => tokens(ids),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// A deterministic unit vector derived from the text.
fn embed(text: &str, dim: usize) -> Vec<f32> {
    let mut state = fnv1a(text.as_bytes()) | 1;
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2024-05-01T12:34:56.123456789Z`
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}
