//! Dialect translation: an Ollama-dialect request served by an OpenAI-compatible backend (ours
//! or a peer's), so a household with Ollama and one with llama.cpp can share.
//!
//! The other direction needs no translation: Ollama serves the OpenAI API itself. Pure
//! functions and a streaming response converter; no sockets.
//!
//! | client (Ollama) | sent (OpenAI) | answered as |
//! |---|---|---|
//! | `/api/chat` | `/v1/chat/completions` | NDJSON `message` lines / one JSON |
//! | `/api/generate` | `/v1/completions` | NDJSON `response` lines / one JSON |
//! | `/api/embed` | `/v1/embeddings` | `{"embeddings": [...]}` |
//! | `/api/embeddings` | `/v1/embeddings` | `{"embedding": [...]}` |

use super::lines::Lines;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// Which Ollama endpoint is being emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/api/chat`.
    Chat,
    /// `/api/generate`.
    Generate,
    /// `/api/embed`.
    Embed,
    /// `/api/embeddings` (legacy).
    Embeddings,
}

/// An Ollama request rewritten for an OpenAI-compatible server.
#[derive(Debug)]
pub struct Translated {
    /// OpenAI path to call.
    pub path: &'static str,
    /// OpenAI request body.
    pub body: Bytes,
    /// How to turn the answer back into Ollama's shape.
    pub response: ResponseTranslator,
}

/// Whether an Ollama path can be translated.
pub fn translatable(path: &str) -> bool {
    kind_of(path).is_some()
}

fn kind_of(path: &str) -> Option<Kind> {
    Some(match path {
        "/api/chat" => Kind::Chat,
        "/api/generate" => Kind::Generate,
        "/api/embed" => Kind::Embed,
        "/api/embeddings" => Kind::Embeddings,
        _ => return None,
    })
}

/// Rewrites an Ollama request for an OpenAI-compatible server.
pub fn ollama_to_openai(path: &str, body: &[u8]) -> Result<Translated, ApiError> {
    let kind = kind_of(path).ok_or_else(|| ApiError::no_route(path))?;
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    // Ollama streams unless told otherwise.
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(true);
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    let path = match kind {
        Kind::Chat | Kind::Generate => {
            if kind == Kind::Chat {
                out.insert("messages".into(), chat_messages(req.get("messages")));
            } else {
                let prompt = req.get("prompt").cloned().unwrap_or(json!(""));
                let prompt = match req.get("system").and_then(Value::as_str) {
                    Some(system) => json!(format!(
                        "{system}\n\n{}",
                        prompt.as_str().unwrap_or_default()
                    )),
                    None => prompt,
                };
                out.insert("prompt".into(), prompt);
            }
            generation_options(&req, &mut out);
            out.insert("stream".into(), json!(stream));
            if stream {
                out.insert("stream_options".into(), json!({"include_usage": true}));
            }
            if kind == Kind::Chat {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            }
        }
        Kind::Embed | Kind::Embeddings => {
            let input = req
                .get("input")
                .or_else(|| req.get("prompt"))
                .cloned()
                .unwrap_or(json!(""));
            out.insert("input".into(), input);
            "/v1/embeddings"
        }
    };
    Ok(Translated {
        path,
        body: Bytes::from(Value::Object(out).to_string()),
        response: ResponseTranslator::new(kind, model, stream),
    })
}

/// Ollama messages to OpenAI messages: role and content; images become image parts.
fn chat_messages(messages: Option<&Value>) -> Value {
    let list = messages
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Value::Array(
        list.into_iter()
            .map(|m| {
                let role = m.get("role").cloned().unwrap_or(json!("user"));
                let text = m.get("content").cloned().unwrap_or(json!(""));
                match m.get("images").and_then(Value::as_array) {
                    Some(images) if !images.is_empty() => {
                        let mut parts = vec![json!({"type": "text", "text": text})];
                        parts.extend(images.iter().filter_map(Value::as_str).map(|b64| {
                            json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}})
                        }));
                        json!({"role": role, "content": parts})
                    }
                    _ => json!({"role": role, "content": text}),
                }
            })
            .collect(),
    )
}

/// Ollama `options` (and top-level `format`) to OpenAI generation parameters.
fn generation_options(req: &Map<String, Value>, out: &mut Map<String, Value>) {
    if let Some(opts) = req.get("options").and_then(Value::as_object) {
        for (from, to) in [
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("seed", "seed"),
            ("stop", "stop"),
            ("num_predict", "max_tokens"),
            ("presence_penalty", "presence_penalty"),
            ("frequency_penalty", "frequency_penalty"),
        ] {
            if let Some(v) = opts.get(from) {
                out.insert(to.into(), v.clone());
            }
        }
    }
    match req.get("format") {
        Some(Value::String(f)) if f == "json" => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(schema @ Value::Object(_)) => {
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}),
            );
        }
        _ => {}
    }
}

/// Largest non-streamed OpenAI answer translated whole (an embedding of a large batch is tens of
/// MiB; a chat answer is kilobytes). A larger one is answered with an error.
const MAX_WHOLE: usize = 64 * 1024 * 1024;

/// Longest event line kept while its end has not arrived: no OpenAI event is this long.
const MAX_LINE: usize = 1024 * 1024;

/// Turns an OpenAI answer (SSE or JSON) into Ollama's (NDJSON or JSON) as it streams.
#[derive(Debug)]
pub struct ResponseTranslator {
    kind: Kind,
    model: String,
    stream: bool,
    /// The event lines of a streamed answer.
    lines: Lines<MAX_LINE>,
    /// A non-streamed answer, gathered to be reshaped at the end.
    whole: Vec<u8>,
    /// The non-streamed answer outgrew [`MAX_WHOLE`] and was dropped.
    oversized: bool,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    finish_reason: Option<String>,
    done_sent: bool,
}

impl ResponseTranslator {
    fn new(kind: Kind, model: String, stream: bool) -> Self {
        ResponseTranslator {
            kind,
            model,
            stream,
            lines: Lines::default(),
            whole: Vec::new(),
            oversized: false,
            prompt_tokens: None,
            completion_tokens: None,
            finish_reason: None,
            done_sent: false,
        }
    }

    /// Tells the translator the status the OpenAI server answered: an error answer is one JSON
    /// body (not an event stream), translated to Ollama's `{"error": ...}`.
    pub fn upstream_status(&mut self, status: u16) {
        if status >= 400 {
            self.stream = false;
        }
    }

    /// Content type of the translated answer.
    pub fn content_type(&self) -> &'static str {
        if self.streams() {
            "application/x-ndjson"
        } else {
            "application/json; charset=utf-8"
        }
    }

    fn streams(&self) -> bool {
        self.stream && matches!(self.kind, Kind::Chat | Kind::Generate)
    }

    /// Translates the next piece of the OpenAI answer; may return nothing until a line is whole.
    pub fn chunk(&mut self, data: &[u8]) -> Bytes {
        if !self.streams() {
            // The answer arrives from a backend or a peer: what it may make us hold is bounded.
            if self.whole.len() + data.len() > MAX_WHOLE {
                self.oversized = true;
                self.whole = Vec::new();
            }
            if !self.oversized {
                self.whole.extend_from_slice(data);
            }
            return Bytes::new();
        }
        let mut out = Vec::new();
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(data, |l| self.sse_line(l, &mut out));
        self.lines = lines;
        Bytes::from(out)
    }

    /// The rest of the answer once the OpenAI body has ended.
    pub fn finish(&mut self) -> Bytes {
        if !self.streams() {
            if self.oversized {
                let message = format!(
                    "the answer was larger than {} MiB, more than the gateway translates",
                    MAX_WHOLE >> 20
                );
                return Bytes::from(json!({ "error": message }).to_string());
            }
            let body: Value = serde_json::from_slice(&self.whole).unwrap_or(Value::Null);
            return Bytes::from(self.whole_answer(&body).to_string());
        }
        let mut out = Vec::new();
        let rest = self.lines.rest();
        self.sse_line(&rest, &mut out);
        if !self.done_sent {
            self.done_line(&mut out);
        }
        Bytes::from(out)
    }

    fn sse_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let text = String::from_utf8_lossy(line);
        let Some(data) = text.trim().strip_prefix("data:").map(str::trim) else {
            return;
        };
        if data == "[DONE]" {
            if !self.done_sent {
                self.done_line(out);
            }
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(err) = v.get("error") {
            let message = err["message"]
                .as_str()
                .map_or_else(|| err.to_string(), str::to_string);
            push_line(out, &json!({"error": message}));
            return;
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.prompt_tokens = u["prompt_tokens"].as_u64();
            self.completion_tokens = u["completion_tokens"].as_u64();
        }
        let choice = &v["choices"][0];
        if let Some(r) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(r.to_string());
        }
        let content = choice["delta"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str());
        if let Some(c) = content.filter(|c| !c.is_empty()) {
            push_line(out, &self.piece(c));
        }
    }

    fn piece(&self, content: &str) -> Value {
        let mut v = json!({"model": self.model, "created_at": crate::timefmt::now_rfc3339(), "done": false});
        match self.kind {
            Kind::Chat => v["message"] = json!({"role": "assistant", "content": content}),
            _ => v["response"] = json!(content),
        }
        v
    }

    fn done_line(&mut self, out: &mut Vec<u8>) {
        self.done_sent = true;
        let mut v = self.piece("");
        v["done"] = json!(true);
        v["done_reason"] = json!(self.finish_reason.clone().unwrap_or_else(|| "stop".into()));
        if let Some(n) = self.prompt_tokens {
            v["prompt_eval_count"] = json!(n);
        }
        if let Some(n) = self.completion_tokens {
            v["eval_count"] = json!(n);
        }
        push_line(out, &v);
    }

    fn whole_answer(&self, body: &Value) -> Value {
        if let Some(err) = body.get("error") {
            return json!({"error": err["message"].as_str().map_or_else(|| err.to_string(), str::to_string)});
        }
        let usage = &body["usage"];
        match self.kind {
            Kind::Chat | Kind::Generate => {
                let choice = &body["choices"][0];
                let text = choice["message"]["content"]
                    .as_str()
                    .or_else(|| choice["text"].as_str())
                    .unwrap_or_default();
                let mut v = self.piece(text);
                v["done"] = json!(true);
                v["done_reason"] = json!(choice["finish_reason"].as_str().unwrap_or("stop"));
                v["prompt_eval_count"] = usage["prompt_tokens"].clone();
                v["eval_count"] = usage["completion_tokens"].clone();
                v
            }
            Kind::Embed => json!({
                "model": self.model,
                "embeddings": body["data"].as_array().map(|d| d.iter().map(|e| e["embedding"].clone()).collect::<Vec<_>>()).unwrap_or_default(),
                "prompt_eval_count": usage["prompt_tokens"].clone(),
            }),
            Kind::Embeddings => json!({ "embedding": body["data"][0]["embedding"].clone() }),
        }
    }
}

fn push_line(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(v.to_string().as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(b: &[u8]) -> Vec<Value> {
        String::from_utf8_lossy(b)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    #[test]
    fn chat_request_maps_messages_options_and_streaming() {
        let t = ollama_to_openai(
            "/api/chat",
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"options":{"temperature":0,"num_predict":5},"format":"json","keep_alive":"1h"}"#,
        )
        .expect("translates");
        assert_eq!(t.path, "/v1/chat/completions");
        let body: Value = serde_json::from_slice(&t.body).expect("json");
        assert_eq!(
            body,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 5,
                   "response_format": {"type": "json_object"}, "stream": true, "stream_options": {"include_usage": true}})
        );
    }

    #[test]
    fn streamed_sse_becomes_ndjson_with_a_final_done_line() {
        let mut t = ollama_to_openai("/api/chat", br#"{"model":"m","messages":[]}"#)
            .expect("ok")
            .response;
        let mut out = Vec::new();
        out.extend_from_slice(&t.chunk(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"He\"}}]}\n\nda"));
        out.extend_from_slice(&t.chunk(
            b"ta: {\"choices\":[{\"delta\":{\"content\":\"llo\"},\"finish_reason\":\"stop\"}]}\n\n",
        ));
        out.extend_from_slice(&t.chunk(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n"));
        out.extend_from_slice(&t.finish());
        let l = lines(&out);
        assert_eq!(l.len(), 3, "{l:?}");
        assert_eq!(l[0]["message"]["content"], "He");
        assert_eq!(l[1]["message"]["content"], "llo");
        assert_eq!(l[2]["done"], true);
        assert_eq!(l[2]["prompt_eval_count"], 3);
        assert_eq!(l[2]["eval_count"], 2);
        assert_eq!(t.content_type(), "application/x-ndjson");
    }

    #[test]
    fn non_streamed_generate_and_embeddings_are_reshaped() {
        let mut t = ollama_to_openai(
            "/api/generate",
            br#"{"model":"m","prompt":"p","stream":false,"system":"s"}"#,
        )
        .expect("ok");
        assert_eq!(t.path, "/v1/completions");
        let sent: Value = serde_json::from_slice(&t.body).expect("json");
        assert_eq!(sent["prompt"], "s\n\np");
        let _ = t.response.chunk(br#"{"choices":[{"text":"answer","finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":4}}"#);
        let v: Value = serde_json::from_slice(&t.response.finish()).expect("json");
        assert_eq!(
            (
                v["response"].as_str(),
                v["done"].as_bool(),
                v["eval_count"].as_u64()
            ),
            (Some("answer"), Some(true), Some(4))
        );
        assert_eq!(v["done_reason"], "length");

        let mut e =
            ollama_to_openai("/api/embed", br#"{"model":"m","input":["a","b"]}"#).expect("ok");
        let _ = e.response.chunk(
            br#"{"data":[{"embedding":[1,2]},{"embedding":[3,4]}],"usage":{"prompt_tokens":2}}"#,
        );
        let v: Value = serde_json::from_slice(&e.response.finish()).expect("json");
        assert_eq!(v["embeddings"], json!([[1, 2], [3, 4]]));
        let mut old =
            ollama_to_openai("/api/embeddings", br#"{"model":"m","prompt":"a"}"#).expect("ok");
        assert_eq!(
            serde_json::from_slice::<Value>(&old.body).expect("json")["input"],
            "a"
        );
        let _ = old.response.chunk(br#"{"data":[{"embedding":[5]}]}"#);
        assert_eq!(
            serde_json::from_slice::<Value>(&old.response.finish()).expect("json"),
            json!({"embedding": [5]})
        );
    }

    #[test]
    fn an_error_event_mid_stream_stays_an_error_line() {
        let mut t = ollama_to_openai("/api/generate", br#"{"model":"m","prompt":"p"}"#)
            .expect("ok")
            .response;
        let out =
            t.chunk(b"data: {\"error\":{\"message\":\"peer died\",\"type\":\"api_error\"}}\n\n");
        assert_eq!(lines(&out), vec![json!({"error": "peer died"})]);
        assert!(!translatable("/api/show"));
    }

    fn contents(out: &[u8]) -> Vec<(String, bool)> {
        lines(out)
            .iter()
            .map(|l| {
                (
                    l["message"]["content"].as_str().unwrap_or("").to_string(),
                    l["done"] == true,
                )
            })
            .collect()
    }

    #[test]
    fn a_stream_translates_the_same_however_it_is_cut() {
        let mut sse = Vec::new();
        for i in 0..40 {
            sse.extend_from_slice(
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"w{i} \"}}}}]}}\n\n")
                    .as_bytes(),
            );
        }
        sse.extend_from_slice(b"\n\n\n: comment\ndata: [DONE]\n\n");
        let translate = |cut: usize| {
            let mut t = ollama_to_openai("/api/chat", br#"{"model":"m","messages":[]}"#)
                .expect("ok")
                .response;
            let mut out = Vec::new();
            for piece in sse.chunks(cut) {
                out.extend_from_slice(&t.chunk(piece));
            }
            out.extend_from_slice(&t.finish());
            contents(&out)
        };
        let whole = translate(sse.len());
        assert_eq!(whole.len(), 41, "{whole:?}");
        assert_eq!(whole[7], ("w7 ".to_string(), false));
        assert_eq!(whole[40], (String::new(), true));
        for cut in [1, 2, 3, 5, 7, 13, 64, 100, 1000] {
            assert_eq!(translate(cut), whole, "cut every {cut} bytes");
        }
    }

    #[test]
    fn what_an_upstream_can_make_the_translator_hold_is_bounded() {
        // A stream that never ends its line: the partial line is dropped past the limit, and
        // the stream goes on translating once lines come again.
        let mut t = ollama_to_openai("/api/chat", br#"{"model":"m","messages":[]}"#)
            .expect("ok")
            .response;
        let junk = vec![b'x'; 64 * 1024];
        for _ in 0..(2 * MAX_LINE / junk.len() + 1) {
            assert!(t.chunk(&junk).is_empty());
            assert!(t.lines.held() <= MAX_LINE, "{}", t.lines.held());
        }
        let out = t.chunk(b"\ndata: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n");
        assert_eq!(contents(&out), vec![("ok".to_string(), false)]);

        // A non-streamed answer beyond the limit: nothing more is kept, and the client gets
        // an error in Ollama's shape instead of a truncated reshaping.
        let mut t = ollama_to_openai("/api/embed", br#"{"model":"m","input":["a"]}"#)
            .expect("ok")
            .response;
        let piece = vec![b' '; 1024 * 1024];
        for _ in 0..(MAX_WHOLE / piece.len() + 2) {
            assert!(t.chunk(&piece).is_empty());
            assert!(t.whole.len() <= MAX_WHOLE);
        }
        let v: Value = serde_json::from_slice(&t.finish()).expect("json");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("larger than 64 MiB")),
            "{v}"
        );
    }
}
