//! What a forwarded request may carry to a peer: an allow-list, not a deny-list (DESIGN §6).
//!
//! The body sent to a peer is rebuilt from the client's: the model, the messages or prompt and
//! generation parameters survive; anything else (`user`, `metadata`, unknown fields a client
//! library adds, per-message `name`) is dropped. Headers are not copied at all: the peer
//! request carries only what [`crate::grid`] sets itself.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Generation parameters shared by every generating endpoint.
const GENERATION: [&str; 15] = [
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "tools",
    "tool_choice",
    "stream",
    "stream_options",
    "n",
];

/// Top-level fields kept per endpoint, beyond [`GENERATION`] for generating endpoints.
fn allowed(path: &str) -> Option<(&'static [&'static str], bool)> {
    Some(match path {
        "/v1/chat/completions" => (&["model", "messages"][..], true),
        "/v1/completions" => (&["model", "prompt", "suffix", "echo"][..], true),
        "/v1/embeddings" => (
            &["model", "input", "encoding_format", "dimensions"][..],
            false,
        ),
        "/api/chat" => (
            &["model", "messages", "format", "options", "think"][..],
            true,
        ),
        "/api/generate" => (
            &[
                "model", "prompt", "suffix", "system", "images", "format", "options", "raw",
                "think",
            ][..],
            true,
        ),
        "/api/embed" => (
            &["model", "input", "truncate", "options", "dimensions"][..],
            false,
        ),
        "/api/embeddings" => (&["model", "prompt", "options"][..], false),
        "/api/show" => (&["model", "name", "verbose"][..], false),
        _ => return None,
    })
}

/// Fields kept inside each chat message.
const MESSAGE_FIELDS: [&str; 6] = [
    "role",
    "content",
    "images",
    "tool_calls",
    "tool_call_id",
    "thinking",
];

/// The body to send a peer for a client request to `path` (prefix-stripped).
pub fn for_peer(path: &str, body: &[u8]) -> Result<Bytes, ApiError> {
    let (fields, generates) = allowed(path).ok_or_else(|| ApiError::no_route(path))?;
    let Ok(Value::Object(input)) = serde_json::from_slice::<Value>(body) else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let mut out = Map::new();
    for (k, v) in input {
        let keep = fields.contains(&k.as_str()) || (generates && GENERATION.contains(&k.as_str()));
        if !keep {
            continue;
        }
        let v = if k == "messages" {
            scrub_messages(v)
        } else {
            v
        };
        out.insert(k, v);
    }
    Ok(Bytes::from(Value::Object(out).to_string()))
}

fn scrub_messages(messages: Value) -> Value {
    let Value::Array(list) = messages else {
        return messages;
    };
    Value::Array(
        list.into_iter()
            .map(|m| match m {
                Value::Object(fields) => Value::Object(
                    fields
                        .into_iter()
                        .filter(|(k, _)| MESSAGE_FIELDS.contains(&k.as_str()))
                        .collect(),
                ),
                other => other,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scrub(path: &str, v: Value) -> Value {
        serde_json::from_slice(&for_peer(path, v.to_string().as_bytes()).expect("scrubbed"))
            .expect("json")
    }

    #[test]
    fn chat_keeps_content_and_parameters_and_drops_identity() {
        let out = scrub(
            "/v1/chat/completions",
            json!({"model": "m", "temperature": 0.2, "stream": true, "stream_options": {"include_usage": true},
                   "user": "alice@example.com", "metadata": {"session": "s1"}, "x_custom": 1,
                   "messages": [{"role": "user", "content": "hi", "name": "Alice"}]}),
        );
        assert_eq!(
            out,
            json!({"model": "m", "temperature": 0.2, "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "hi"}]})
        );
    }

    #[test]
    fn ollama_generate_keeps_options_and_drops_keep_alive() {
        let out = scrub(
            "/api/generate",
            json!({"model": "m", "prompt": "p", "options": {"num_ctx": 2048}, "keep_alive": "24h", "context": [1, 2]}),
        );
        assert_eq!(
            out,
            json!({"model": "m", "prompt": "p", "options": {"num_ctx": 2048}})
        );
    }

    #[test]
    fn embeddings_do_not_take_generation_parameters() {
        let out = scrub(
            "/v1/embeddings",
            json!({"model": "m", "input": "x", "user": "u", "temperature": 1}),
        );
        assert_eq!(out, json!({"model": "m", "input": "x"}));
    }

    #[test]
    fn non_objects_and_unknown_paths_are_refused() {
        assert_eq!(
            for_peer("/api/chat", b"[1]").map_err(|e| e.status),
            Err(400)
        );
        assert_eq!(for_peer("/api/pull", b"{}").map_err(|e| e.status), Err(404));
    }
}
