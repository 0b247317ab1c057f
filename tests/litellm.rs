//! The real LiteLLM proxy in front of ArkNet, configured by the shipped `conf/litellm.yaml`
//! (api_base pointed at node A): a model that only peer B has is listed by LiteLLM and answered,
//! plain and streamed, along client -> LiteLLM -> A -> mesh (mTLS) -> B -> B's backend.
//!
//! tests/python/setup_litellm.sh installs `litellm[proxy]` (pinned, wheels only) into
//! `<target>/litellm-venv` once. It needs PyPI the first time; without it this test fails, it
//! never skips. LiteLLM runs with no database, no telemetry and the bundled cost map, on a
//! loopback address, and talks to nothing but node A.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fake_backend::FakeConfig;
use support::grid::{assert_eventually, free_port, loopback_ip, share, Ark, NodeProc};
use support::http;
use support::process::{run_bounded, Daemon};
use support::python::Venv;

/// What clients send LiteLLM (`general_settings.master_key` in conf/litellm.yaml).
const MASTER_KEY: &str = "sk-arknet-litellm-test";
/// The api_base in the shipped config, replaced by node A's address.
const SHIPPED_API_BASE: &str = "http://127.0.0.1:8910/v1";
const PEER_MODEL: &str = "qwen3.5:35b";
const LOCAL_MODEL: &str = "llama3.1:8b";
/// Content chunks per reply from B's fake backend.
const CHUNKS: usize = 6;

/// Runs setup_litellm.sh once per test binary; fails the test (never skips) if it failed.
fn venv() -> &'static Venv {
    static VENV: OnceLock<Result<Venv, String>> = OnceLock::new();
    match VENV.get_or_init(|| Venv::setup("setup_litellm.sh", "litellm-venv", "LITELLM_VENV")) {
        Ok(venv) => venv,
        Err(e) => panic!("{e}"),
    }
}

/// LiteLLM and its clients talk to loopback only: no proxy from the environment, no provider
/// keys or database picked up from it, nothing fetched at start (bundled cost map, offline
/// Hugging Face hub, no telemetry).
fn offline_env(cmd: &mut Command) {
    support::process::loopback_only_env(cmd);
    for var in ["DATABASE_URL", "LITELLM_LICENSE", "REDIS_HOST", "REDIS_URL"] {
        cmd.env_remove(var);
    }
    cmd.env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_TELEMETRY", "False")
        .env("LITELLM_DONT_SHOW_FEEDBACK_BOX", "True")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("PYTHONUNBUFFERED", "1");
}

/// conf/litellm.yaml with every api_base pointed at `node`'s API.
fn config_for(node: SocketAddr) -> String {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/litellm.yaml"))
            .expect("conf/litellm.yaml");
    assert!(
        shipped.contains(SHIPPED_API_BASE),
        "conf/litellm.yaml points at {SHIPPED_API_BASE}"
    );
    shipped.replace(SHIPPED_API_BASE, &format!("http://{node}/v1"))
}

/// A `litellm` proxy child, killed by its own PID when dropped (also on panic).
struct LiteLlm {
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl LiteLlm {
    fn start(venv: &Venv, config: &str) -> LiteLlm {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("litellm.yaml");
        std::fs::write(&config_path, config).expect("write litellm.yaml");
        let ip = loopback_ip();
        let addr = SocketAddr::from((ip, free_port(ip)));
        let mut cmd = Command::new(venv.bin("litellm"));
        cmd.arg("--config")
            .arg(&config_path)
            .args([
                "--host",
                &ip.to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .args(["--telemetry", "False", "--num_workers", "1"])
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .env("LITELLM_MASTER_KEY", MASTER_KEY);
        offline_env(&mut cmd);
        let mut daemon = Daemon::spawn("litellm", cmd, addr, dir.path().join("litellm.log"));
        let started = Instant::now();
        // /health/liveliness answers 200 once the app has started.
        daemon.wait_http_ok("/health/liveliness", Duration::from_secs(180), "");
        eprintln!(
            "litellm: ready in {:.1} s on {addr}",
            started.elapsed().as_secs_f64()
        );
        LiteLlm { daemon, _dir: dir }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.daemon.addr)
    }
}

/// The official openai client (a dependency of litellm, so in the same venv) against LiteLLM:
/// model list, a chat with the plain name (the `*` route), a streamed chat with the listed
/// `arknet/` name. Prints a JSON summary.
const CLIENT: &str = r#"
import json, sys
import openai

base, key, plain, listed = sys.argv[1:5]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
messages = [{"role": "user", "content": "hello through litellm"}]
models = sorted(m.id for m in client.models.list())
rsp = client.chat.completions.create(model=plain, messages=messages)
pieces = []
for chunk in client.chat.completions.create(model=listed, messages=messages, stream=True):
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
print(json.dumps({
    "models": models,
    "chat": rsp.choices[0].message.content,
    "chat_object": rsp.object,
    "chat_finish": rsp.choices[0].finish_reason,
    "stream_pieces": pieces,
}))
"#;

fn run_client(venv: &Venv, litellm: &LiteLlm, plain: &str, listed: &str) -> Value {
    let mut cmd = Command::new(venv.bin("python"));
    cmd.args(["-c", CLIENT])
        .arg(litellm.base_url())
        .args([MASTER_KEY, plain, listed]);
    offline_env(&mut cmd);
    let out = run_bounded(cmd, Duration::from_secs(180));
    assert!(
        out.status.success(),
        "openai client via litellm failed ({}):\n{}\nstdout:\n{}\nlitellm log:\n{}",
        out.status,
        out.stderr,
        out.stdout,
        litellm.daemon.log_text()
    );
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("client summary is not JSON ({e}): {}", out.stdout))
}

/// A node with one fake backend serving `models`, paced so streams are visibly incremental.
fn ark(models: &[&str]) -> Ark {
    Ark::start(
        FakeConfig::both(models)
            .chunks(CHUNKS)
            .chunk_delay(Duration::from_millis(40)),
        4,
    )
}

fn audit(node: &NodeProc) -> Vec<Value> {
    node.get("/audit?limit=100").json()["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The `data:` payloads of an SSE body.
fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect()
}

#[test]
fn litellm_with_the_shipped_config_serves_a_model_only_a_peer_has() {
    let venv = venv();
    let a = ark(&[LOCAL_MODEL]);
    let b = ark(&[PEER_MODEL]);
    share(&b, &a, &[PEER_MODEL], 4);
    assert_eventually(
        Duration::from_secs(10),
        "the peer's model in A's /v1/models",
        || {
            a.node.get("/v1/models").json()["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|m| m["id"] == PEER_MODEL))
        },
    );

    let litellm = LiteLlm::start(venv, &config_for(a.node.api));

    // Official client: list, chat (plain name, `*` route), streamed chat (`arknet/` name).
    let listed = format!("arknet/{PEER_MODEL}");
    let started = Instant::now();
    let summary = run_client(venv, &litellm, PEER_MODEL, &listed);
    eprintln!(
        "openai client via litellm: {:.1} s; summary: {summary}",
        started.elapsed().as_secs_f64()
    );
    let models: Vec<&str> = summary["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        models.contains(&listed.as_str()) && models.contains(&"arknet/llama3.1:8b"),
        "LiteLLM lists the grid's models (the peer's and A's own) under arknet/: {models:?}"
    );
    let expected: String = (0..CHUNKS).map(|i| format!("tok{i} ")).collect();
    assert_eq!(summary["chat"], expected.as_str(), "{summary}");
    assert_eq!(summary["chat_object"], "chat.completion", "{summary}");
    assert_eq!(summary["chat_finish"], "stop", "{summary}");
    let pieces: Vec<&str> = summary["stream_pieces"]
        .as_array()
        .expect("stream_pieces")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        pieces.len(),
        CHUNKS,
        "one streamed piece per token: {summary}"
    );
    assert_eq!(pieces.concat(), expected, "{summary}");
    assert_eq!((a.backend.hits(), b.backend.hits()), (0, 2));

    // The same stream as raw SSE, timed: LiteLLM relays B's tokens as they come.
    let body = json!({"model": listed, "stream": true,
        "messages": [{"role": "user", "content": "stream through litellm"}]});
    let auth = format!("Bearer {MASTER_KEY}");
    let rsp = http::request(
        litellm.daemon.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(
        rsp.status,
        200,
        "{}\nlitellm log:\n{}",
        rsp.text(),
        litellm.daemon.log_text()
    );
    assert!(
        rsp.header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "{:?}",
        rsp.headers
    );
    let events = sse_events(&rsp.text());
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    for event in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(event)
            .unwrap_or_else(|e| panic!("SSE event is not JSON ({e}): {event}"));
        assert_eq!(v["object"], "chat.completion.chunk", "{v}");
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(text, expected, "{events:?}");
    let first = rsp.arrivals.iter().find(|(_, n)| *n > 0).expect("body").0;
    let last = rsp.arrivals.last().expect("arrivals").0;
    assert!(
        last - first >= Duration::from_millis(100),
        "the stream was buffered somewhere: body arrived within {first:?}..{last:?}"
    );
    assert_eq!((a.backend.hits(), b.backend.hits()), (0, 3));

    // B's backend got the peer model under its own name, with nothing of LiteLLM's or the
    // client's keys.
    let seen: Vec<_> = b
        .backend
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (i, r) in seen.iter().enumerate() {
        let sent = r.json().expect("json body");
        assert_eq!(sent["model"], PEER_MODEL, "{sent}");
        assert_eq!(
            sent["stream"] == true,
            i > 0,
            "only the last two stream: {sent}"
        );
        assert_eq!(sent["messages"][0]["role"], "user", "{sent}");
        for (name, value) in &r.headers {
            assert!(
                !name.eq_ignore_ascii_case("authorization")
                    && !value.contains(MASTER_KEY)
                    && !value.contains("unused"),
                "a key reached the peer's backend: {name}: {value}"
            );
        }
    }

    // Both ends audited each of the three as a peer request.
    assert_eventually(Duration::from_secs(5), "audit lines on both ends", || {
        audit(&a.node).len() == 3 && audit(&b.node).len() == 3
    });
    let b_id = b.node.node_id();
    for entry in audit(&a.node) {
        assert_eq!(entry["direction"], "outbound", "{entry}");
        assert_eq!(entry["peer"], b_id.as_str(), "{entry}");
        assert_eq!(entry["model"], PEER_MODEL, "{entry}");
        assert_eq!(entry["status"], 200, "{entry}");
    }
    drop(litellm);
}
