//! A request body from a client or a peer, through everything that reads it before a backend
//! does: routing by path, the model name, the allow-list rebuild for peers, the Ollama -> OpenAI
//! translation; then the rest of the input as the answer, cut into chunks, through the
//! translator back and the token meter.
#![no_main]

use arknet::dialect::{meter::TokenMeter, request, sanitize, translate};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 10] = [
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/arknet/api/chat",
    "/v1/models",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let path = PATHS[data[0] as usize % PATHS.len()];
    let status = [200u16, 200, 400, 500][data[1] as usize % 4];
    let split = (data[2] as usize * 8).min(data.len() - 3);
    let (body, answer) = data[3..].split_at(split);
    let chunk_len = 1 + data[3] as usize % 97;

    let _ = request::classify(&http::Method::POST, path);
    let _ = request::classify(&http::Method::GET, path);
    let _ = request::strip_prefix(path, "/arknet");
    let _ = request::model_of(body);
    let _ = sanitize::for_peer(path, body);

    let request_body = Bytes::copy_from_slice(body);
    let mut meter = TokenMeter::for_request(&request_body);
    let mut claimed = TokenMeter::for_request(&request_body);
    for chunk in answer.chunks(chunk_len) {
        meter.observe(chunk);
        claimed.observe(chunk);
    }
    let _ = meter.stream_error();
    let _ = meter.finish();
    let _ = claimed.finish_claimed(body.len());

    if translate::translatable(path) {
        if let Ok(mut translated) = translate::ollama_to_openai(path, body) {
            let _ = request::model_of(&translated.body);
            translated.response.upstream_status(status);
            let _ = translated.response.content_type();
            for chunk in answer.chunks(chunk_len) {
                let _ = translated.response.chunk(chunk);
            }
            let _ = translated.response.finish();
        }
    }
});
