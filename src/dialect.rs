//! The two API dialects, OpenAI (`/v1/*`, SSE) and Ollama (`/api/*`, NDJSON), as a library for
//! the listeners above it: what a request asks for ([`request`]), the allow-listed body a peer
//! receives ([`sanitize`]), translation between the dialects ([`translate`]) and token
//! accounting of a response as it streams past ([`meter`]).
//!
//! The lowest floor of the request path: nothing here opens a socket or imports the gateway,
//! the grid, the mesh or the relay.

pub mod lines;
pub mod meter;
pub mod request;
pub mod sanitize;
pub mod translate;
