//! Token accounting of a response as it streams past, for the audit log and metrics.
//!
//! Reads SSE (`data: {...}`) and NDJSON lines, and plain JSON bodies, without holding the
//! stream back: chunks are inspected after they have been forwarded. Counts come from the
//! backend's own figures (`usage`, `prompt_eval_count`/`eval_count`); when a stream carries none,
//! generated tokens are the number of content events.

use serde_json::Value;

/// Longest partial line kept between chunks; longer lines are not accounted.
const MAX_PENDING: usize = 256 * 1024;

/// Running token counts of one response.
#[derive(Debug, Default)]
pub struct TokenMeter {
    pending: Vec<u8>,
    prompt: Option<u64>,
    generated: Option<u64>,
    content_events: u64,
}

impl TokenMeter {
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
    pub fn finish(mut self) -> (Option<u64>, Option<u64>) {
        let rest = std::mem::take(&mut self.pending);
        self.line(&rest);
        let generated = self
            .generated
            .or((self.content_events > 0).then_some(self.content_events));
        (self.prompt, generated)
    }

    fn line(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        let json = text.strip_prefix("data:").map_or(text, str::trim_start);
        if json.is_empty() || json == "[DONE]" || !json.starts_with('{') {
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

    #[test]
    fn sse_usage_wins_over_counting_events() {
        let mut m = TokenMeter::default();
        m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choi");
        m.observe(b"ces\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
        assert_eq!(m.finish(), (Some(7), Some(2)));
    }

    #[test]
    fn sse_without_usage_counts_content_events() {
        let mut m = TokenMeter::default();
        for _ in 0..5 {
            m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        }
        m.observe(b"data: [DONE]\n\n");
        assert_eq!(m.finish(), (None, Some(5)));
    }

    #[test]
    fn empty_content_and_role_only_events_are_not_tokens() {
        let mut m = TokenMeter::default();
        m.observe(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        );
        m.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        m.observe(b"{\"response\":\"\",\"done\":false}\n{\"response\":\"b\",\"done\":false}\n");
        assert_eq!(m.finish(), (None, Some(2)));
    }

    #[test]
    fn ndjson_final_line_carries_eval_counts() {
        let mut m = TokenMeter::default();
        m.observe(b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"done\":true,\"prompt_eval_count\":3,\"eval_count\":9}\n");
        assert_eq!(m.finish(), (Some(3), Some(9)));
    }

    #[test]
    fn a_plain_json_body_without_newline_is_read_at_the_end() {
        let mut m = TokenMeter::default();
        m.observe(b"{\"object\":\"chat.completion\",\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":6}}");
        assert_eq!(m.finish(), (Some(4), Some(6)));
    }
}
