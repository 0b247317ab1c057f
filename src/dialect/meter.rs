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

use super::lines::Lines;
use bytes::Bytes;
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
    /// Fills a missing prompt count with an estimate from `request`, marked as estimated.
    fn or_estimated_prompt(mut self, request: Option<Bytes>) -> Self {
        if self.prompt.is_none() {
            if let Some(estimate) = request.as_deref().and_then(estimate_prompt) {
                self.prompt = Some(estimate);
                self.prompt_estimated = true;
            }
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
    lines: Lines<MAX_PENDING>,
    prompt: Option<u64>,
    generated: Option<u64>,
    content_events: u64,
    relayed_bytes: u64,
    /// The request, kept (a reference, not a copy) to estimate its prompt only if the response
    /// carries no count: most do, and the estimate parses the whole body.
    request: Option<Bytes>,
    stream_error: Option<String>,
}

impl TokenMeter {
    /// A meter for the response to `request_body`: should the response carry no prompt count
    /// (an OpenAI stream without `include_usage`), the prompt is estimated from the request's
    /// text.
    pub fn for_request(request_body: &Bytes) -> Self {
        TokenMeter {
            request: Some(request_body.clone()),
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
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(chunk, |l| self.line(l));
        self.lines = lines;
    }

    /// Our own backend's counts, once the body has ended; a missing prompt count is estimated
    /// from the request (see [`TokenMeter::for_request`]).
    pub fn finish(mut self) -> Tokens {
        let request = self.request.take();
        self.own_counts().or_estimated_prompt(request)
    }

    /// A peer's counts, once the body has ended, checked against what it relayed and the
    /// `request_bytes` we sent it: a claim no output could produce is replaced by our count.
    /// A missing prompt count is estimated from the request.
    pub fn finish_claimed(mut self, request_bytes: usize) -> Tokens {
        let request = self.request.take();
        self.claimed_counts(request_bytes)
            .or_estimated_prompt(request)
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
        let rest = self.lines.rest();
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
        // Only the fields read here are decoded; the rest of the event (a whole non-streamed
        // answer, say) is skipped without building a tree of it.
        let Ok(event) = serde_json::from_str::<CountedEvent>(json) else {
            return;
        };
        if let Lenient(Some(u)) = event.usage {
            self.prompt = u.prompt_tokens.0.or(self.prompt);
            self.generated = u.completion_tokens.0.or(self.generated);
        }
        if let Lenient(Some(n)) = event.prompt_eval_count {
            self.prompt = Some(n);
        }
        if let Lenient(Some(n)) = event.eval_count {
            self.generated = Some(n);
        }
        let first = event
            .choices
            .0
            .and_then(|c| c.into_iter().next())
            .and_then(|c| c.0);
        // The first of these that is a string decides, as `Value` indexing did before.
        let content = first
            .as_ref()
            .and_then(|c| c.delta.0.as_ref().and_then(|d| d.content.0))
            .or_else(|| first.as_ref().and_then(|c| c.text.0))
            .or_else(|| event.message.0.and_then(|m| m.content.0))
            .or(event.response.0);
        if content == Some(true) {
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

/// The fields of an event that carry counts or generated text. Every field is [`Lenient`]: a
/// field of an unexpected type reads as absent instead of failing the whole event.
#[derive(Deserialize)]
struct CountedEvent {
    #[serde(default)]
    usage: Lenient<Usage>,
    #[serde(default)]
    prompt_eval_count: Lenient<u64>,
    #[serde(default)]
    eval_count: Lenient<u64>,
    #[serde(default)]
    choices: Lenient<Vec<Lenient<Choice>>>,
    #[serde(default)]
    message: Lenient<Message>,
    /// Whether `response` is a non-empty string.
    #[serde(default)]
    response: Lenient<bool>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Lenient<u64>,
    #[serde(default)]
    completion_tokens: Lenient<u64>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Lenient<Message>,
    #[serde(default)]
    text: Lenient<bool>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Lenient<bool>,
}

/// A value read only when it has the expected shape, `None` otherwise (the value is skipped):
/// `u64` from a non-negative integer, `bool` from a string (whether it is non-empty), a struct
/// from an object, a `Vec` from an array.
struct Lenient<T>(Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

/// What a [`Lenient`] value is decoded from.
trait LenientShape<'de>: Sized {
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_str(_: &str) -> Option<Self> {
        None
    }
    fn from_map<A: serde::de::MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        skip_map(map)
    }
    fn from_seq<A: serde::de::SeqAccess<'de>>(seq: A) -> Result<Option<Self>, A::Error> {
        skip_seq(seq)
    }
}

fn skip_map<'de, T, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<Option<T>, A::Error> {
    while map
        .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
        .is_some()
    {}
    Ok(None)
}

fn skip_seq<'de, T, A: serde::de::SeqAccess<'de>>(mut seq: A) -> Result<Option<T>, A::Error> {
    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
    Ok(None)
}

impl LenientShape<'_> for u64 {
    fn from_u64(n: u64) -> Option<Self> {
        Some(n)
    }
}

impl LenientShape<'_> for bool {
    fn from_str(s: &str) -> Option<Self> {
        Some(!s.is_empty())
    }
}

macro_rules! lenient_struct {
    ($($t:ty),*) => {$(
        impl<'de> LenientShape<'de> for $t {
            fn from_map<A: serde::de::MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
                Self::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
            }
        }
    )*};
}
lenient_struct!(Usage, Choice, Message);

impl<'de, T: Deserialize<'de>> LenientShape<'de> for Vec<T> {
    fn from_seq<A: serde::de::SeqAccess<'de>>(seq: A) -> Result<Option<Self>, A::Error> {
        Self::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(Some)
    }
}

impl<'de, T: LenientShape<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: LenientShape<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_u64(n)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
                Ok(Lenient(u64::try_from(n).ok().and_then(T::from_u64)))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_str(s)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::from_map(map).map(Lenient)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                T::from_seq(seq).map(Lenient)
            }
        }
        d.deserialize_any(Visit(std::marker::PhantomData))
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
        let mut m = TokenMeter::for_request(&Bytes::from_static(body));
        m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n");
        let t = m.finish();
        // "be brief" + "hello there" = 19 characters: 5 tokens at four characters a token.
        assert_eq!(t.prompt, Some(5));
        assert!(t.prompt_estimated);
        assert_eq!(t.completion, Some(1));
    }

    #[test]
    fn a_reported_prompt_count_beats_the_estimate() {
        let mut m =
            TokenMeter::for_request(&Bytes::from_static(br#"{"prompt":"a long long prompt"}"#));
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
    fn fields_of_an_unexpected_type_read_as_absent_without_losing_the_others() {
        let mut m = TokenMeter::default();
        m.observe(br#"{"usage":"lots","choices":7,"prompt_eval_count":-3,"eval_count":4,"message":{"content":["x"]},"response":"y","extra":{"deep":[1,{"usage":{"prompt_tokens":99}}]}}"#);
        m.observe(b"\n");
        let t = m.finish();
        assert_eq!(pair(t), (None, Some(4)));
        let mut m = TokenMeter::default();
        m.observe(br#"{"choices":[{"text":"","delta":{"content":"a"}}],"usage":{"prompt_tokens":2.5,"completion_tokens":1}}"#);
        let t = m.finish_claimed(100);
        assert_eq!((t.prompt, t.completion), (None, Some(1)));
    }

    #[test]
    fn a_non_streamed_answer_is_read_for_its_usage() {
        let mut m = TokenMeter::for_request(&Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"hello there"}]}"#,
        ));
        m.observe(br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi \"there\""},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#);
        let t = m.finish();
        assert_eq!((pair(t), t.prompt_estimated), ((Some(4), Some(6)), false));
    }

    #[test]
    fn a_plain_json_body_without_newline_is_read_at_the_end() {
        let mut m = TokenMeter::default();
        m.observe(b"{\"object\":\"chat.completion\",\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":6}}");
        assert_eq!(pair(m.finish()), (Some(4), Some(6)));
    }
}
