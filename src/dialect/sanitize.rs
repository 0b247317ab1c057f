//! What a forwarded request may carry to a peer: an allow-list, not a deny-list (DESIGN §6).
//!
//! The body sent to a peer is rebuilt from the client's: the model, the messages or prompt and
//! generation parameters survive; anything else (`user`, `metadata`, unknown fields a client
//! library adds, per-message `name`) is dropped. Headers are not copied at all: the peer
//! request carries only what [`crate::grid`] sets itself.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::value::RawValue;

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

/// A JSON object read for its keys only: each value stays the client's own text, checked as
/// JSON but not decoded. A repeated key keeps its last value, as a parsed object would.
type RawObject<'a> = BTreeMap<Cow<'a, str>, &'a RawValue>;

/// The body to send a peer for a client request to `path` (prefix-stripped).
///
/// Only the top-level keys and, for `messages`, each message's keys are decoded: the values
/// that are kept are copied as the client wrote them (prompts are most of a body, and
/// rebuilding them as a JSON tree was most of the cost), the rest is dropped. Keys come out
/// in sorted order, as before.
pub fn for_peer(path: &str, body: &[u8]) -> Result<Bytes, ApiError> {
    let (fields, generates) = allowed(path).ok_or_else(|| ApiError::no_route(path))?;
    let Ok(input) = serde_json::from_slice::<RawObject<'_>>(body) else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let mut out = Vec::with_capacity(body.len());
    out.push(b'{');
    for (k, v) in &input {
        let keep = fields.contains(&k.as_ref()) || (generates && GENERATION.contains(&k.as_ref()));
        if !keep {
            continue;
        }
        if out.len() > 1 {
            out.push(b',');
        }
        // An allow-listed key needs no escaping.
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
        if k == "messages" {
            scrub_messages(v, &mut out);
        } else {
            out.extend_from_slice(v.get().as_bytes());
        }
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// Writes `messages` with each message object cut down to [`MESSAGE_FIELDS`]; anything that is
/// not a list of objects goes as it is (the peer's backend refuses it, as ours would).
fn scrub_messages(messages: &RawValue, out: &mut Vec<u8>) {
    let Ok(list) = serde_json::from_str::<Vec<&RawValue>>(messages.get()) else {
        out.extend_from_slice(messages.get().as_bytes());
        return;
    };
    out.push(b'[');
    for (i, m) in list.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let Ok(fields) = serde_json::from_str::<RawObject<'_>>(m.get()) else {
            out.extend_from_slice(m.get().as_bytes());
            continue;
        };
        out.push(b'{');
        let mut first = true;
        for (k, v) in fields
            .iter()
            .filter(|(k, _)| MESSAGE_FIELDS.contains(&k.as_ref()))
        {
            if !first {
                out.push(b',');
            }
            first = false;
            out.push(b'"');
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

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
    fn kept_values_go_as_written_and_repeated_keys_keep_the_last() {
        let body = br#"{ "user":"u", "model" : "a", "model":"m", "temperature": 1e2,
            "messages": [ {"role":"user", "name":"Alice", "content":[{"type":"text","text":"h\u00e9"}]}, "odd" ],
            "stop": ["\n"] }"#;
        let out = for_peer("/v1/chat/completions", body).expect("scrubbed");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(
            v,
            json!({"model": "m", "temperature": 100.0, "stop": ["\n"],
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "hé"}]}, "odd"]})
        );
        // An escaped key is still the key it spells.
        let out = for_peer("/api/chat", br#"{"mod\u0065l":"m","k\u0065ep_alive":"1h"}"#)
            .expect("scrubbed");
        assert_eq!(&out[..], br#"{"model":"m"}"#);
        // Messages that are no list pass as they are.
        let out = for_peer("/api/chat", br#"{"messages":{"role":"x"}}"#).expect("scrubbed");
        assert_eq!(&out[..], br#"{"messages":{"role":"x"}}"#);
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
