//! Token accounting of a response as it streams past, for the audit log and metrics.
//!
//! Reads SSE (`data: {...}`) and NDJSON lines, and plain JSON bodies, without holding the
//! stream back: chunks are inspected after they have been forwarded. Counts come from the
//! backend's own figures (`usage`, `prompt_eval_count`/`eval_count`); when a stream carries none,
//! generated tokens are the number of content events, and prompt tokens are estimated from the
//! request (about four characters a token) and marked as estimated.
//!
//! A peer's figures are only its claim: [`TokenMeter::finish_claimed`] bounds them by what was
//! actually relayed (content events and body bytes) and by the size of the request we sent,
//! and falls back to our own count when a claim cannot be true.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Slack for tokens that produce no visible output (end-of-turn and other special tokens).
const SPECIAL_TOKEN_SLACK: u64 = 16;
/// Most tokens a single stream event may carry (servers that batch under load send several).
const TOKENS_PER_EVENT: u64 = 8;
/// Prompt tokens a chat template may add beyond the request's own bytes.
const TEMPLATE_SLACK: u64 = 1024;

/// Where the token counts of an audited request come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// Our own backend's figures (`usage`, `eval_count`).
    #[default]
    Backend,
    /// The peer's figures, within what the relayed bytes make possible.
    PeerClaim,
    /// Counted here from the relayed stream (no figures, or a claim that could not be true).
    Counted,
}

/// Token counts of one response and where they come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    /// Prompt tokens.
    pub prompt: Option<u64>,
    /// Generated tokens.
    pub completion: Option<u64>,
    /// Where the figures come from.
    pub source: TokenSource,
    /// A peer claimed counts that what it relayed cannot back; they were replaced.
    pub claim_refused: bool,
    /// `prompt` is an estimate from the request text: the response carried no prompt count.
    pub prompt_estimated: bool,
}

impl Tokens {
    /// Fills a missing prompt count with `estimate`, marked as estimated.
    fn or_estimated_prompt(mut self, estimate: Option<u64>) -> Self {
        if self.prompt.is_none() && estimate.is_some() {
            self.prompt = estimate;
            self.prompt_estimated = true;
        }
        self
    }
}

/// Characters per token assumed when a prompt's tokens must be estimated: the usual figure
/// for English text with BPE tokenizers.
const CHARS_PER_TOKEN: usize = 4;
/// Longest error message kept from a stream's error event.
const MAX_ERROR_LEN: usize = 200;

/// Longest partial line kept between chunks; longer lines are not accounted.
const MAX_PENDING: usize = 256 * 1024;

/// Running token counts of one response.
#[derive(Debug, Default)]
pub struct TokenMeter {
    pending: Vec<u8>,
    prompt: Option<u64>,
    generated: Option<u64>,
    content_events: u64,
    relayed_bytes: u64,
    prompt_estimate: Option<u64>,
    stream_error: Option<String>,
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
        self.relayed_bytes += chunk.len() as u64;
        self.pending.extend_from_slice(chunk);
        while let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            self.line(&line);
        }
        if self.pending.len() > MAX_PENDING {
            self.pending.clear();
        }
    }

    /// Our own backend's counts, once the body has ended; a missing prompt count is estimated
    /// from the request (see [`TokenMeter::for_request`]).
    pub fn finish(self) -> Tokens {
        let estimate = self.prompt_estimate;
        self.own_counts().or_estimated_prompt(estimate)
    }

    /// A peer's counts, once the body has ended, checked against what it relayed and the
    /// `request_bytes` we sent it: a claim no output could produce is replaced by our count.
    /// A missing prompt count is estimated from the request.
    pub fn finish_claimed(self, request_bytes: usize) -> Tokens {
        let estimate = self.prompt_estimate;
        self.claimed_counts(request_bytes)
            .or_estimated_prompt(estimate)
    }

    fn own_counts(self) -> Tokens {
        let (prompt, completion, reported) = self.counts();
        Tokens {
            prompt,
            completion,
            source: if reported {
                TokenSource::Backend
            } else {
                TokenSource::Counted
            },
            claim_refused: false,
            prompt_estimated: false,
        }
    }

    fn claimed_counts(self, request_bytes: usize) -> Tokens {
        let events = self.content_events;
        let relayed = self.relayed_bytes;
        let (prompt, completion, reported) = self.counts();
        if !reported {
            return Tokens {
                prompt,
                completion,
                source: TokenSource::Counted,
                claim_refused: false,
                prompt_estimated: false,
            };
        }
        // Every generated token shows up as at least one byte of the body; a stream carries a
        // bounded number per event.
        let mut completion_cap = relayed + SPECIAL_TOKEN_SLACK;
        if events > 0 {
            completion_cap = completion_cap.min(events * TOKENS_PER_EVENT + SPECIAL_TOKEN_SLACK);
        }
        let prompt_cap = request_bytes as u64 + TEMPLATE_SLACK;
        let believable = completion.is_none_or(|n| n <= completion_cap)
            && prompt.is_none_or(|n| n <= prompt_cap);
        if believable {
            return Tokens {
                prompt,
                completion,
                source: TokenSource::PeerClaim,
                claim_refused: false,
                prompt_estimated: false,
            };
        }
        Tokens {
            prompt: None,
            completion: (events > 0).then_some(events),
            source: TokenSource::Counted,
            claim_refused: true,
            prompt_estimated: false,
        }
    }

    /// Prompt and generated counts, and whether they are the backend's own figures.
    fn counts(mut self) -> (Option<u64>, Option<u64>, bool) {
        let rest = std::mem::take(&mut self.pending);
        self.line(&rest);
        let reported = self.generated.is_some() || self.prompt.is_some();
        let generated = self
            .generated
            .or((self.content_events > 0).then_some(self.content_events));
        (self.prompt, generated, reported)
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

    fn pair(t: Tokens) -> (Option<u64>, Option<u64>) {
        (t.prompt, t.completion)
    }

    #[test]
    fn a_peer_claim_that_the_stream_backs_is_kept_as_its_claim() {
        let mut m = TokenMeter::default();
        for _ in 0..5 {
            m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        }
        m.observe(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":5}}\n\n",
        );
        let t = m.finish_claimed(200);
        assert_eq!(
            (t.prompt, t.completion, t.source, t.claim_refused),
            (Some(30), Some(5), TokenSource::PeerClaim, false)
        );
    }

    #[test]
    fn an_inflated_peer_claim_is_replaced_by_our_count() {
        let mut m = TokenMeter::default();
        for _ in 0..3 {
            m.observe(b"{\"message\":{\"content\":\"a\"},\"done\":false}\n");
        }
        m.observe(b"{\"done\":true,\"prompt_eval_count\":999999999,\"eval_count\":999999999}\n");
        let t = m.finish_claimed(120);
        assert_eq!(
            (t.prompt, t.completion, t.source, t.claim_refused),
            (None, Some(3), TokenSource::Counted, true)
        );
        // The prompt alone can give a claim away too.
        let mut m = TokenMeter::default();
        m.observe(b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"done\":true,\"prompt_eval_count\":5000,\"eval_count\":1}\n");
        assert!(m.finish_claimed(100).claim_refused);
    }

    #[test]
    fn a_non_streamed_claim_is_bounded_by_the_body() {
        let body = b"{\"choices\":[{\"message\":{\"content\":\"hi\"}}],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":100000}}";
        let mut m = TokenMeter::default();
        m.observe(body);
        let t = m.finish_claimed(500);
        assert!(t.claim_refused);
        let mut m = TokenMeter::default();
        m.observe(b"{\"choices\":[{\"message\":{\"content\":\"hi\"}}],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2}}");
        assert_eq!(m.finish_claimed(500).source, TokenSource::PeerClaim);
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
        assert_eq!(pair(m.finish()), (Some(7), Some(2)));
    }

    #[test]
    fn sse_without_usage_counts_content_events() {
        let mut m = TokenMeter::default();
        for _ in 0..5 {
            m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        }
        m.observe(b"data: [DONE]\n\n");
        assert_eq!(pair(m.finish()), (None, Some(5)));
    }

    #[test]
    fn empty_content_and_role_only_events_are_not_tokens() {
        let mut m = TokenMeter::default();
        m.observe(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        );
        m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        m.observe(b"{\"response\":\"\",\"done\":false}\n{\"response\":\"b\",\"done\":false}\n");
        assert_eq!(pair(m.finish()), (None, Some(2)));
    }

    #[test]
    fn ndjson_final_line_carries_eval_counts() {
        let mut m = TokenMeter::default();
        m.observe(b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"done\":true,\"prompt_eval_count\":3,\"eval_count\":9}\n");
        assert_eq!(pair(m.finish()), (Some(3), Some(9)));
    }

    #[test]
    fn a_plain_json_body_without_newline_is_read_at_the_end() {
        let mut m = TokenMeter::default();
        m.observe(b"{\"object\":\"chat.completion\",\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":6}}");
        assert_eq!(pair(m.finish()), (Some(4), Some(6)));
    }
}
