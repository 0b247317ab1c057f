//! Token accounting of a response as it streams past, for the audit log and metrics.
//!
//! Reads SSE (`data: {...}`) and NDJSON lines, and plain JSON bodies, without holding the
//! stream back: chunks are inspected after they have been forwarded. Counts come from the
//! backend's own figures (`usage`, `prompt_eval_count`/`eval_count`); when a stream carries none,
//! generated tokens are the number of content events, and prompt tokens are estimated from the
//! request (about four characters a token) and marked as estimated.

use serde_json::Value;

/// Longest partial line kept between chunks; longer lines are not accounted.
const MAX_PENDING: usize = 256 * 1024;

/// Characters per token assumed when a prompt's tokens must be estimated: the usual figure
/// for English text with BPE tokenizers.
const CHARS_PER_TOKEN: usize = 4;
/// Longest error message kept from a stream's error event.
const MAX_ERROR_LEN: usize = 200;

/// Running token counts of one response.
#[derive(Debug, Default)]
pub struct TokenMeter {
    pending: Vec<u8>,
    prompt: Option<u64>,
    generated: Option<u64>,
    content_events: u64,
    prompt_estimate: Option<u64>,
    stream_error: Option<String>,
}

/// Token counts of a finished response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    /// Prompt tokens: the backend's figure, else the estimate.
    pub prompt: Option<u64>,
    /// Generated tokens.
    pub completion: Option<u64>,
    /// `prompt` is an estimate from the request text, not the backend's count.
    pub prompt_estimated: bool,
}

impl TokenMeter {
    /// A meter for the response to `request_body`: should the response carry no prompt count
    /// (an OpenAI stream without `include_usage`), the prompt is estimated from the request's
    /// text.
    pub fn for_request(request_body: &[u8]) -> Self {
        TokenMeter {
            prompt_estimate: estimate_prompt(request_body),
            ..TokenMeter::default()
        }
    }

    /// The message of an error event the stream carried (a peer or backend that broke off
    /// mid-stream says so in the stream itself), if any.
    pub fn stream_error(&self) -> Option<&str> {
        self.stream_error.as_deref()
    }

    /// Inspects the next piece of the response body.
    pub fn observe(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
        while let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            self.line(&line);
        }
        if self.pending.len() > MAX_PENDING {
            self.pending.clear();
        }
    }

    /// Prompt and generated token counts, once the body has ended.
    pub fn finish(mut self) -> Tokens {
        let rest = std::mem::take(&mut self.pending);
        self.line(&rest);
        let completion = self
            .generated
            .or((self.content_events > 0).then_some(self.content_events));
        match (self.prompt, self.prompt_estimate) {
            (Some(n), _) => Tokens {
                prompt: Some(n),
                completion,
                prompt_estimated: false,
            },
            (None, estimate) => Tokens {
                prompt: estimate,
                completion,
                prompt_estimated: estimate.is_some(),
            },
        }
    }

    fn line(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        let json = text.strip_prefix("data:").map_or(text, str::trim_start);
        if json.is_empty() || json == "[DONE]" || !json.starts_with('{') {
            return;
        }
        if json.starts_with("{\"error\"") {
            self.error_event(json);
            return;
        }
        // Most events carry one token and no counts: count them without building a JSON tree
        // (parsing every event was a third of a relaying node's CPU on long streams).
        if !json.contains("usage") && !json.contains("eval_count") {
            if has_content(json) {
                self.content_events += 1;
            }
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            return;
        };
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.prompt = u["prompt_tokens"].as_u64().or(self.prompt);
            self.generated = u["completion_tokens"].as_u64().or(self.generated);
        }
        if let Some(n) = v["prompt_eval_count"].as_u64() {
            self.prompt = Some(n);
        }
        if let Some(n) = v["eval_count"].as_u64() {
            self.generated = Some(n);
        }
        let content = v["choices"][0]["delta"]["content"]
            .as_str()
            .or_else(|| v["choices"][0]["text"].as_str())
            .or_else(|| v["message"]["content"].as_str())
            .or_else(|| v["response"].as_str());
        if content.is_some_and(|c| !c.is_empty()) {
            self.content_events += 1;
        }
    }
}

impl TokenMeter {
    /// Records an error event: OpenAI `{"error":{"message":..}}` or Ollama `{"error":".."}`.
    fn error_event(&mut self, json: &str) {
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            return;
        };
        let message = v["error"]["message"]
            .as_str()
            .or_else(|| v["error"].as_str())
            .unwrap_or("error event");
        self.stream_error = Some(message.chars().take(MAX_ERROR_LEN).collect());
    }
}

/// Estimated prompt tokens of a request body: the characters of its text (`messages` contents,
/// `prompt`, `input`, `system`) divided by [`CHARS_PER_TOKEN`], rounded up; `None` when it is
/// not JSON or has no text.
fn estimate_prompt(body: &[u8]) -> Option<u64> {
    fn text_len(v: &Value) -> usize {
        match v {
            Value::String(s) => s.chars().count(),
            Value::Array(items) => items.iter().map(text_len).sum(),
            // OpenAI content parts: {"type":"text","text":".."}.
            Value::Object(o) => o.get("text").map_or(0, text_len),
            _ => 0,
        }
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    let mut chars = 0;
    for m in v["messages"].as_array().into_iter().flatten() {
        chars += text_len(&m["content"]);
    }
    for key in ["prompt", "input", "system"] {
        chars += v.get(key).map_or(0, text_len);
    }
    (chars > 0).then(|| chars.div_ceil(CHARS_PER_TOKEN) as u64)
}

/// Whether an event carries generated text: a non-empty `content`, `text` or `response` string.
fn has_content(json: &str) -> bool {
    ["\"content\":\"", "\"text\":\"", "\"response\":\""]
        .iter()
        .any(|key| {
            json.match_indices(key).any(|(i, _)| {
                json.as_bytes()
                    .get(i + key.len())
                    .is_some_and(|b| *b != b'"')
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(m: TokenMeter) -> (Option<u64>, Option<u64>) {
        let t = m.finish();
        assert!(!t.prompt_estimated);
        (t.prompt, t.completion)
    }

    #[test]
    fn a_stream_without_usage_gets_an_estimated_prompt_marked_as_such() {
        let body = br#"{"model":"m","stream":true,"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hello there"}]}]}"#;
        let mut m = TokenMeter::for_request(body);
        m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n");
        let t = m.finish();
        // "be brief" + "hello there" = 19 characters: 5 tokens at four characters a token.
        assert_eq!(t.prompt, Some(5));
        assert!(t.prompt_estimated);
        assert_eq!(t.completion, Some(1));
    }

    #[test]
    fn a_reported_prompt_count_beats_the_estimate() {
        let mut m = TokenMeter::for_request(br#"{"prompt":"a long long prompt"}"#);
        m.observe(b"{\"response\":\"a\",\"done\":false}\n{\"done\":true,\"prompt_eval_count\":11,\"eval_count\":1}\n");
        let t = m.finish();
        assert_eq!((t.prompt, t.prompt_estimated), (Some(11), false));
    }

    #[test]
    fn an_error_event_is_remembered_in_both_dialects() {
        let mut m = TokenMeter::default();
        m.observe(b"data: {\"error\":{\"message\":\"access to this node was revoked\",\"type\":\"api_error\",\"code\":\"backend_unreachable\"}}\n\n");
        assert_eq!(m.stream_error(), Some("access to this node was revoked"));
        let mut m = TokenMeter::default();
        m.observe(b"{\"response\":\"a\"}\n{\"error\":\"the backend stopped\"}\n");
        assert_eq!(m.stream_error(), Some("the backend stopped"));
        assert_eq!(m.finish().completion, Some(1));
    }

    #[test]
    fn sse_usage_wins_over_counting_events() {
        let mut m = TokenMeter::default();
        m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choi");
        m.observe(b"ces\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
        assert_eq!(counts(m), (Some(7), Some(2)));
    }

    #[test]
    fn sse_without_usage_counts_content_events() {
        let mut m = TokenMeter::default();
        for _ in 0..5 {
            m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        }
        m.observe(b"data: [DONE]\n\n");
        assert_eq!(counts(m), (None, Some(5)));
    }

    #[test]
    fn empty_content_and_role_only_events_are_not_tokens() {
        let mut m = TokenMeter::default();
        m.observe(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        );
        m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        m.observe(b"{\"response\":\"\",\"done\":false}\n{\"response\":\"b\",\"done\":false}\n");
        assert_eq!(counts(m), (None, Some(2)));
    }

    #[test]
    fn ndjson_final_line_carries_eval_counts() {
        let mut m = TokenMeter::default();
        m.observe(b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"done\":true,\"prompt_eval_count\":3,\"eval_count\":9}\n");
        assert_eq!(counts(m), (Some(3), Some(9)));
    }

    #[test]
    fn a_plain_json_body_without_newline_is_read_at_the_end() {
        let mut m = TokenMeter::default();
        m.observe(b"{\"object\":\"chat.completion\",\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":6}}");
        assert_eq!(counts(m), (Some(4), Some(6)));
    }
}
