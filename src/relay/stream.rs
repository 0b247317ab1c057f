//! The streaming relay: a backend's or peer's answer goes to the client as it arrives, chunk
//! by chunk (already-arrived chunks coalesced into one write), until it ends, the client leaves,
//! the upstream breaks, or the peer it serves is revoked.

use bytes::Bytes;
use http::header;
use pingora::protocols::http::ServerSession;
use tokio::sync::watch;

use super::headers::{downstream_response, stream_dialect};
use super::REVOKED_MESSAGE;
use crate::dialect::meter::TokenMeter;
use crate::dialect::translate::ResponseTranslator;
use crate::error::{ApiError, Dialect};
use crate::session::{Cut, Outcome};
use crate::upstream::{Upstream, UpstreamResponse};
use std::time::Instant;

/// Relays a backend (or peer) response to the client as it arrives, until it ends, the client
/// leaves, the backend breaks, or `stop` flips.
pub async fn relay_response(
    upstream: &Upstream,
    s: &mut ServerSession,
    mut rsp: UpstreamResponse,
    mut stop: Option<watch::Receiver<bool>>,
    mut meter: Option<&mut TokenMeter>,
    mut translate: Option<ResponseTranslator>,
) -> Outcome {
    let status = rsp.header().status.as_u16();
    let mut header = downstream_response(rsp.header());
    let stream_dialect = match translate.as_mut() {
        Some(t) => {
            t.upstream_status(status);
            // The body changes length and shape: chunked, in the client's dialect.
            header.remove_header(&header::CONTENT_LENGTH);
            let _ = header.insert_header(header::CONTENT_TYPE, t.content_type());
            let _ = header.insert_header(header::TRANSFER_ENCODING, "chunked");
            Some(Dialect::Ollama)
        }
        None => stream_dialect(rsp.header()),
    };
    let chunked = !header.headers.contains_key(header::CONTENT_LENGTH);
    let mut outcome = Outcome {
        status,
        model: None,
        first_byte: None,
        reusable: false,
        cut: None,
    };
    if s.write_response_header(Box::new(header)).await.is_err() {
        return outcome;
    }
    outcome.first_byte = Some(Instant::now());
    // What a gathering pass read past its batch (the end, or an error), handled next.
    let mut pending = None;
    loop {
        let next = tokio::select! {
            next = async { match pending.take() { Some(p) => p, None => rsp.next_chunk().await } } => next,
            () = stopped(&mut stop) => {
                end_with_error(s, stream_dialect, chunked, REVOKED_MESSAGE).await;
                outcome.cut = Some(Cut::Revoked);
                return outcome;
            }
        };
        match next {
            Ok(Some(chunk)) => {
                let chunk = gather(&mut rsp, chunk, &mut pending);
                if let Some(m) = meter.as_deref_mut() {
                    m.observe(&chunk);
                }
                let chunk = match translate.as_mut() {
                    Some(t) => t.chunk(&chunk),
                    None => chunk,
                };
                if s.write_response_body(chunk, false).await.is_err() {
                    // The client left; dropping `rsp` closes the backend connection, which
                    // makes the backend stop generating.
                    tracing::debug!("client went away mid-response");
                    outcome.cut = Some(Cut::ClientLeft);
                    return outcome;
                }
            }
            Ok(None) => {
                // A peer that cut a stream ended it with an error event and a clean end: the
                // event, not the framing, says how the request went. (An error *answer*, say a
                // 400 with a JSON error body, is no cut: its status already tells.)
                let streamed_ok = (200..300).contains(&status) && stream_dialect.is_some();
                if let Some(error) = meter
                    .as_deref()
                    .filter(|_| streamed_ok)
                    .and_then(TokenMeter::stream_error)
                {
                    outcome.cut = Some(if error.contains(REVOKED_MESSAGE) {
                        Cut::Revoked
                    } else {
                        Cut::UpstreamBroke
                    });
                }
                let tail = translate
                    .as_mut()
                    .map_or_else(Bytes::new, ResponseTranslator::finish);
                outcome.reusable = s.write_response_body(tail, true).await.is_ok();
                upstream.release(rsp).await;
                return outcome;
            }
            Err(e) => {
                tracing::warn!(error = %e, "backend stream broke mid-response");
                let why = format!("the backend stopped mid-response: {e}");
                end_with_error(s, stream_dialect, chunked, &why).await;
                outcome.cut = Some(Cut::UpstreamBroke);
                return outcome;
            }
        }
    }
}

/// Largest batch of already-arrived chunks written to the client in one go.
const GATHER_LIMIT: usize = 64 * 1024;

/// Appends to `first` whatever further chunks have already arrived, without waiting, so that a
/// burst of small events costs one write to the client instead of one each (every body write
/// is flushed). Stops at the limit, at the first chunk not yet here, or at the end or an error,
/// which it leaves in `pending`.
fn gather(
    rsp: &mut UpstreamResponse,
    first: Bytes,
    pending: &mut Option<pingora::Result<Option<Bytes>>>,
) -> Bytes {
    let mut batch: Option<bytes::BytesMut> = None;
    let mut len = first.len();
    while len < GATHER_LIMIT {
        match poll_now(rsp.next_chunk()) {
            Some(Ok(Some(more))) => {
                let b = batch.get_or_insert_with(|| bytes::BytesMut::from(&first[..]));
                b.extend_from_slice(&more);
                len = b.len();
            }
            Some(end_or_error) => {
                *pending = Some(end_or_error);
                break;
            }
            None => break,
        }
    }
    batch.map_or(first, bytes::BytesMut::freeze)
}

/// Polls `f` once. Pingora's body reads keep their progress in the session, so dropping a read
/// that is not ready loses nothing (its own proxy cancels them in `select!` the same way).
fn poll_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Resolves when `stop` flips to true; never when there is no stop signal.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        Some(rx) => {
            if rx.wait_for(|s| *s).await.is_err() {
                // The sender is gone with its peer entry: that is a stop too.
            }
        }
        None => std::future::pending().await,
    }
}

/// Ends a response already under way: a last error event when it is a stream in a known
/// dialect, then the end of the chunked body. Unframed bodies are just cut.
async fn end_with_error(s: &mut ServerSession, dialect: Option<Dialect>, chunked: bool, why: &str) {
    if let (Some(d), true) = (dialect, chunked) {
        let event = ApiError::backend_unreachable(why).stream_event(d);
        let _ = s.write_response_body(event, false).await;
        let _ = s.write_response_body(Bytes::new(), true).await;
    }
}
