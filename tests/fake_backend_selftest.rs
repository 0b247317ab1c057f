//! Checks that the fake model server used by the other tests and the benches behaves like the
//! real servers it imitates.

#[path = "support/fake_backend.rs"]
mod fake_backend;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fake_backend::{Dialect, FakeBackend, FakeConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A reply read off the wire, with the arrival time of every body line.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// (time since the request was sent, line without its trailing newline)
    lines: Vec<(Duration, String)>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("reply body is JSON")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Non-empty body lines, without their arrival times.
    fn line_texts(&self) -> Vec<&str> {
        self.lines
            .iter()
            .map(|(_, l)| l.as_str())
            .filter(|l| !l.is_empty())
            .collect()
    }
}

/// Status, headers, and whether the body is chunked.
type Head = (u16, Vec<(String, String)>, bool);

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A minimal HTTP/1.1 client (Connection: close) that decodes chunked bodies as they arrive.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to fake backend");
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nX-Test: selftest\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let start = Instant::now();
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");

    let mut raw = Vec::new();
    let mut head: Option<Head> = None;
    let mut body = Vec::new();
    let mut lines = Vec::new();
    let mut line_start = 0;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("reply within 10 s")
            .expect("read reply");
        let now = start.elapsed();
        raw.extend_from_slice(&buf[..n]);
        if head.is_none() {
            if let Some(end) = find(&raw, b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&raw[..end]).into_owned();
                let mut rows = text.split("\r\n");
                let status = rows
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|s| s.parse().ok())
                    .expect("status line");
                let headers: Vec<(String, String)> = rows
                    .filter_map(|r| r.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let chunked = headers
                    .iter()
                    .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
                head = Some((status, headers, chunked));
                raw.drain(..end + 4);
            }
        }
        let mut finished = n == 0;
        if let Some((_, _, chunked)) = &head {
            if *chunked {
                while let Some(eol) = find(&raw, b"\r\n") {
                    let size_text = String::from_utf8_lossy(&raw[..eol]).into_owned();
                    let size_hex = size_text.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size_hex, 16).expect("chunk size");
                    if size == 0 {
                        finished = true;
                        break;
                    }
                    if raw.len() < eol + 2 + size + 2 {
                        break;
                    }
                    body.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
                    raw.drain(..eol + 2 + size + 2);
                }
            } else {
                body.append(&mut raw);
            }
        }
        while let Some(nl) = body[line_start..].iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&body[line_start..line_start + nl]).into_owned();
            lines.push((now, line));
            line_start += nl + 1;
        }
        if finished {
            break;
        }
    }
    let (status, headers, _) = head.expect("a response head");
    if line_start < body.len() {
        lines.push((
            start.elapsed(),
            String::from_utf8_lossy(&body[line_start..]).into_owned(),
        ));
    }
    Reply {
        status,
        headers,
        body,
        lines,
    }
}

async fn post(backend: &FakeBackend, path: &str, body: &Value) -> Reply {
    http(backend.addr, "POST", path, Some(&body.to_string())).await
}

async fn get(backend: &FakeBackend, path: &str) -> Reply {
    http(backend.addr, "GET", path, None).await
}

#[tokio::test]
async fn ollama_tags_lists_the_configured_models_with_details() {
    let backend = FakeBackend::start(
        LOCALHOST,
        FakeConfig::ollama(&["llama3.2:1b", "qwen2.5:0.5b"]),
    )
    .await;
    let reply = get(&backend, "/api/tags").await;
    assert_eq!(reply.status, 200);
    let tags = reply.json();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .expect("models array")
        .iter()
        .map(|m| m["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["llama3.2:1b", "qwen2.5:0.5b"]);
    let first = &tags["models"][0];
    assert_eq!(first["model"], "llama3.2:1b");
    assert_eq!(first["digest"].as_str().unwrap_or_default().len(), 64);
    assert!(first["size"].as_u64().unwrap_or_default() > 0);
    assert_eq!(first["details"]["format"], "gguf");
    assert!(first["modified_at"]
        .as_str()
        .unwrap_or_default()
        .ends_with('Z'));
    assert_eq!(backend.hits(), 0, "listings are not inference calls");
    assert!(backend.url().starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn ollama_listing_endpoints_answer_like_ollama() {
    let backend = FakeBackend::start(LOCALHOST, FakeConfig::ollama(&["m1"])).await;
    assert_eq!(
        get(&backend, "/api/version").await.json(),
        json!({"version": "0.6.0"})
    );
    let ps = get(&backend, "/api/ps").await.json();
    assert_eq!(ps["models"][0]["name"], "m1");
    assert!(ps["models"][0]["size_vram"].as_u64().is_some());
    assert!(ps["models"][0]["expires_at"].is_string());
    let show = post(&backend, "/api/show", &json!({"model": "m1"})).await;
    assert_eq!(show.status, 200);
    assert_eq!(show.json()["details"]["family"], "llama");
    assert!(show.json()["model_info"]["llama.context_length"].is_number());
    let legacy_show = post(&backend, "/api/show", &json!({"name": "m1:latest"})).await;
    assert_eq!(
        legacy_show.status, 200,
        "the Ollama dialect accepts the :latest tag"
    );
    assert_eq!(get(&backend, "/").await.text(), "Ollama is running");
    assert_eq!(
        get(&backend, "/v1/models").await.status,
        404,
        "an Ollama-only fake has no /v1"
    );
}

#[tokio::test]
async fn streamed_ollama_chat_sends_ndjson_lines_spread_by_the_chunk_delay_and_ends_with_done() {
    let delay = Duration::from_millis(80);
    let backend = FakeBackend::start(
        LOCALHOST,
        FakeConfig::ollama(&["m1"]).chunks(5).chunk_delay(delay),
    )
    .await;
    let reply = post(
        &backend,
        "/api/chat",
        &json!({"model": "m1", "messages": [{"role": "user", "content": "say three words"}]}),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = reply
        .line_texts()
        .iter()
        .map(|l| serde_json::from_str(l).expect("NDJSON"))
        .collect();
    assert_eq!(lines.len(), 6, "5 tokens and a final line");
    for (i, line) in lines[..5].iter().enumerate() {
        assert_eq!(line["message"]["content"], format!("tok{i} "));
        assert_eq!(line["message"]["role"], "assistant");
        assert_eq!(line["done"], false);
        assert_eq!(line["model"], "m1");
    }
    let last = &lines[5];
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["prompt_eval_count"], 3);
    assert_eq!(last["eval_count"], 5);
    assert!(last["total_duration"].is_u64());

    let times: Vec<Duration> = reply.lines.iter().map(|(t, _)| *t).collect();
    for pair in times[..5].windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= delay * 3 / 4,
            "chunks arrive one by one, gap was {gap:?}"
        );
    }
    assert!(times[4] - times[0] >= delay * 4 * 9 / 10);
}

#[tokio::test]
async fn ollama_chat_streams_by_default_and_answers_one_object_when_stream_is_false() {
    let backend = FakeBackend::start(LOCALHOST, FakeConfig::ollama(&["m1"]).chunks(3)).await;
    let one = post(
        &backend,
        "/api/chat",
        &json!({"model": "m1", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(one.status, 200);
    assert!(one
        .header("content-type")
        .unwrap_or_default()
        .starts_with("application/json"));
    let v = one.json();
    assert_eq!(v["message"]["content"], "tok0 tok1 tok2 ");
    assert_eq!(v["done"], true);
    assert_eq!(v["eval_count"], 3);
    assert_eq!(v["prompt_eval_count"], 1);

    let generated = post(
        &backend,
        "/api/generate",
        &json!({"model": "m1", "prompt": "why is the sky blue"}),
    )
    .await;
    let lines = generated.line_texts();
    assert_eq!(lines.len(), 4);
    let first: Value = serde_json::from_str(lines[0]).expect("NDJSON");
    assert_eq!(first["response"], "tok0 ");
    let last: Value = serde_json::from_str(lines[3]).expect("NDJSON");
    assert_eq!(last["done"], true);
    assert_eq!(last["prompt_eval_count"], 5);
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn openai_chat_streams_sse_with_a_usage_chunk_and_done_marker_when_asked() {
    let backend = FakeBackend::start(LOCALHOST, FakeConfig::openai(&["smollm2"]).chunks(4)).await;
    let body = json!({"model": "smollm2", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]});
    let reply = post(&backend, "/v1/chat/completions", &body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let events: Vec<&str> = reply.line_texts();
    assert!(events.iter().all(|e| e.starts_with("data: ")));
    assert_eq!(events.last().copied().unwrap_or_default(), "data: [DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e["data: ".len()..]).expect("SSE data is JSON"))
        .collect();
    assert_eq!(chunks.len(), 5, "4 content chunks and a usage chunk");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[..4]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 ");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(
        chunks[4]["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8})
    );
    // SSE events are separated by a blank line.
    assert!(reply.text().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn openai_chat_sends_no_usage_chunk_unless_asked_and_non_streamed_replies_carry_usage() {
    let backend = FakeBackend::start(LOCALHOST, FakeConfig::openai(&["smollm2"]).chunks(2)).await;
    let streamed = post(
        &backend,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert!(!streamed.text().contains("usage"));
    assert_eq!(streamed.line_texts().len(), 3);

    let whole = post(
        &backend,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "text", "text": "two words"}]}]}),
    )
    .await;
    let v = whole.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    assert_eq!(v["usage"]["completion_tokens"], 2);

    let completion = post(
        &backend,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "once upon"}),
    )
    .await;
    assert_eq!(completion.json()["object"], "text_completion");
    assert_eq!(completion.json()["choices"][0]["text"], "tok0 tok1 ");
    let models = get(&backend, "/v1/models").await.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smollm2");
    assert_eq!(models["data"][0]["object"], "model");
}

#[tokio::test]
async fn embeddings_answer_in_both_dialects_with_token_counts() {
    let backend =
        FakeBackend::start(LOCALHOST, FakeConfig::both(&["embedder"]).embedding_dim(16)).await;
    let embed = post(
        &backend,
        "/api/embed",
        &json!({"model": "embedder", "input": ["a b", "c"]}),
    )
    .await
    .json();
    assert_eq!(embed["embeddings"].as_array().map(Vec::len), Some(2));
    assert_eq!(embed["embeddings"][0].as_array().map(Vec::len), Some(16));
    assert_eq!(embed["prompt_eval_count"], 3);
    let single = post(
        &backend,
        "/api/embed",
        &json!({"model": "embedder", "input": "a b"}),
    )
    .await
    .json();
    assert_eq!(
        single["embeddings"][0], embed["embeddings"][0],
        "deterministic"
    );
    let legacy = post(
        &backend,
        "/api/embeddings",
        &json!({"model": "embedder", "prompt": "a b"}),
    )
    .await
    .json();
    assert_eq!(legacy["embedding"].as_array().map(Vec::len), Some(16));

    let openai = post(
        &backend,
        "/v1/embeddings",
        &json!({"model": "embedder", "input": "hello world"}),
    )
    .await
    .json();
    assert_eq!(openai["object"], "list");
    assert_eq!(openai["data"][0]["object"], "embedding");
    assert_eq!(openai["data"][0]["index"], 0);
    assert_eq!(
        openai["data"][0]["embedding"].as_array().map(Vec::len),
        Some(16)
    );
    assert_eq!(
        openai["usage"],
        json!({"prompt_tokens": 2, "total_tokens": 2})
    );
}

#[tokio::test]
async fn unknown_models_get_404_in_each_dialects_error_shape_and_bad_json_gets_400() {
    let backend = FakeBackend::start(LOCALHOST, FakeConfig::both(&["m1"])).await;
    let ollama = post(
        &backend,
        "/api/chat",
        &json!({"model": "nope", "messages": []}),
    )
    .await;
    assert_eq!(ollama.status, 404);
    assert_eq!(
        ollama.json(),
        json!({"error": "model \"nope\" not found, try pulling it first"})
    );

    let openai = post(
        &backend,
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": []}),
    )
    .await;
    assert_eq!(openai.status, 404);
    let error = &openai.json()["error"];
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "model_not_found");
    assert!(error["message"]
        .as_str()
        .unwrap_or_default()
        .contains("nope"));

    let bad = http(backend.addr, "POST", "/api/chat", Some("{not json")).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].is_string());
    let bad = http(
        backend.addr,
        "POST",
        "/v1/chat/completions",
        Some("{not json"),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]["message"].is_string());
    assert_eq!(get(&backend, "/api/nothing-here").await.status, 404);
    assert_eq!(get(&backend, "/api/chat").await.status, 405);
}

#[tokio::test]
async fn a_status_override_answers_every_inference_call_with_that_status() {
    let backend =
        FakeBackend::start(LOCALHOST, FakeConfig::both(&["m1"]).status_override(503)).await;
    let ollama = post(
        &backend,
        "/api/chat",
        &json!({"model": "m1", "messages": []}),
    )
    .await;
    assert_eq!(ollama.status, 503);
    assert!(ollama.json()["error"].is_string());
    let openai = post(
        &backend,
        "/v1/chat/completions",
        &json!({"model": "m1", "messages": []}),
    )
    .await;
    assert_eq!(openai.status, 503);
    assert_eq!(openai.json()["error"]["type"], "server_error");
    assert_eq!(
        get(&backend, "/api/tags").await.status,
        200,
        "listings still work"
    );
    assert_eq!(backend.hits(), 2);

    backend.set_status_override(None);
    let healed = post(
        &backend,
        "/api/chat",
        &json!({"model": "m1", "stream": false, "messages": []}),
    )
    .await;
    assert_eq!(healed.status, 200);
}

#[tokio::test]
async fn the_backend_records_requests_and_counts_concurrent_inference_calls() {
    let backend = FakeBackend::start(
        LOCALHOST,
        FakeConfig::ollama(&["m1"])
            .chunks(3)
            .chunk_delay(Duration::from_millis(100)),
    )
    .await;
    let body = json!({"model": "m1", "messages": [{"role": "user", "content": "hi"}]});
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (addr, body) = (backend.addr, body.to_string());
        tasks.spawn(async move { http(addr, "POST", "/api/chat", Some(&body)).await.status });
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        backend.in_flight(),
        4,
        "streams are in flight until their bodies end"
    );
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("request task"), 200);
    }
    assert_eq!(backend.max_in_flight(), 4);
    assert_eq!(backend.in_flight(), 0);
    assert_eq!(backend.hits(), 4);

    let requests = backend.requests();
    assert_eq!(requests.len(), 4);
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/api/chat");
    assert_eq!(first.header("x-test"), Some("selftest"));
    assert!(first.headers.iter().any(|(n, _)| n == "content-type"));
    assert_eq!(first.json().expect("recorded body is JSON"), body);
}

#[tokio::test]
async fn recording_can_be_turned_off_for_load() {
    let backend = FakeBackend::start(LOCALHOST, FakeConfig::openai(&["m1"]).record(false)).await;
    let reply = post(
        &backend,
        "/v1/chat/completions",
        &json!({"model": "m1", "messages": []}),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(backend.hits(), 1);
    assert!(backend.requests().is_empty());
}

#[tokio::test]
async fn any_loopback_address_can_be_used_and_dialects_can_be_combined() {
    let ip: IpAddr = "127.0.0.7".parse().expect("an IP");
    let backend = FakeBackend::start(ip, FakeConfig::ollama(&["m1"]).dialects(Dialect::Both)).await;
    assert_eq!(backend.addr.ip(), ip);
    assert_eq!(get(&backend, "/api/tags").await.status, 200);
    assert_eq!(get(&backend, "/v1/models").await.status, 200);
}

/// Plain blocking HTTP for the threaded flavour.
fn blocking_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut out = String::new();
    stream.read_to_string(&mut out).expect("read reply");
    out
}

#[test]
fn the_threaded_backend_serves_sync_callers_and_dropping_it_closes_port_and_open_connections() {
    let backend = FakeBackend::start_in_thread(LOCALHOST, FakeConfig::ollama(&["m1"]));
    let addr = backend.addr;
    let reply = blocking_get(addr, "/api/tags");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"name\":\"m1\""));

    // A keep-alive connection that has been served and is now idle.
    let mut idle = std::net::TcpStream::connect(addr).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set timeout");
    write!(idle, "GET /api/version HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).expect("read reply");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("0.6.0"));

    drop(backend);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "port is closed once dropped"
    );
    let after = idle.read(&mut buf);
    assert!(
        matches!(after, Ok(0) | Err(_)),
        "open connections are cut: {after:?}"
    );
}

#[tokio::test]
async fn dropping_the_async_backend_cuts_a_stream_in_progress() {
    let backend = FakeBackend::start(
        LOCALHOST,
        FakeConfig::ollama(&["m1"])
            .chunks(50)
            .chunk_delay(Duration::from_millis(50)),
    )
    .await;
    let mut stream = TcpStream::connect(backend.addr).await.expect("connect");
    let body = json!({"model": "m1", "messages": []}).to_string();
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut buf = [0u8; 4096];
    assert!(stream.read(&mut buf).await.expect("first bytes") > 0);
    drop(backend);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => assert!(Instant::now() < deadline, "stream kept going after drop"),
            Err(_) => panic!("connection neither closed nor progressing after drop"),
        }
    }
}
