//! What another machine answers: a peer's hello, a backend's model listing, a puller's Range
//! header and model name.
#![no_main]

use arknet::catalog::parse_listing;
use arknet::config::BackendKind;
use arknet::mesh::protocol::parse_hello;
use arknet::models::{serve::parse_range, store::OllamaName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = [200u16, 403, 409, 426, 500, 101][data[0] as usize % 6];
    let body = &data[1..];
    let _ = parse_hello(status, body);

    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let _ = parse_listing(BackendKind::Ollama, &value);
        let _ = parse_listing(BackendKind::Openai, &value);
    }
    if let Ok(text) = std::str::from_utf8(body) {
        let size = u64::from(data[0]) * 1_000_003;
        let _ = parse_range(Some(text), size);
        let _ = parse_range(Some(text), u64::MAX);
        let _ = parse_range(Some(text), 0);
        let _ = OllamaName::parse(text);
    }
});
