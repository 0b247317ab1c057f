//! In-process tests of the relay's header policy: what a backend or peer answers is rebuilt from
//! an allow-list, and hop-by-hop headers stop here. No sockets.

use super::headers::*;
use pingora::http::{RequestHeader, ResponseHeader};

fn upstream(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
    let mut h = ResponseHeader::build(status, None).expect("header");
    for (k, v) in headers {
        h.append_header(k.to_string(), *v).expect("header");
    }
    h
}

fn names(h: &ResponseHeader) -> Vec<String> {
    let mut v: Vec<String> = h.headers.keys().map(|k| k.as_str().to_string()).collect();
    v.sort();
    v
}

#[test]
fn a_hostile_answer_keeps_only_status_type_framing_and_retry_after() {
    let hostile = upstream(
        503,
        &[
            ("content-type", "text/html"),
            ("set-cookie", "arknet_admin=stolen; Path=/"),
            ("access-control-allow-origin", "*"),
            ("location", "http://evil.example/"),
            ("server", "evil"),
            ("x-evil", "1"),
            ("retry-after", "7"),
            ("content-length", "12"),
        ],
    );
    let h = downstream_response(&hostile);
    assert_eq!(h.status.as_u16(), 503);
    assert_eq!(
        names(&h),
        [
            "cache-control",
            "content-length",
            "content-type",
            "retry-after",
            "x-content-type-options"
        ]
    );
    assert_eq!(h.headers["content-type"], "application/json");
    assert_eq!(h.headers["retry-after"], "7");
}

#[test]
fn streams_keep_their_dialects_type_and_go_chunked_without_a_length() {
    let sse = downstream_response(&upstream(
        200,
        &[("content-type", "text/event-stream; charset=utf-8")],
    ));
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["transfer-encoding"], "chunked");
    let ndjson = downstream_response(&upstream(200, &[("content-type", "application/x-ndjson")]));
    assert_eq!(ndjson.headers["content-type"], "application/x-ndjson");
    // Retry-After only means something on 429/503; a bogus length is not passed on.
    let ok = downstream_response(&upstream(
        200,
        &[("retry-after", "5"), ("content-length", "x")],
    ));
    assert!(ok.headers.get("retry-after").is_none());
    assert_eq!(ok.headers["transfer-encoding"], "chunked");
}

#[test]
fn a_status_that_is_not_a_final_answer_becomes_502() {
    assert_eq!(
        downstream_response(&upstream(101, &[("upgrade", "websocket")]))
            .status
            .as_u16(),
        502
    );
    assert_eq!(
        downstream_response(&upstream(103, &[])).status.as_u16(),
        502
    );
}

#[test]
fn headers_named_by_connection_are_hop_by_hop() {
    let mut client = RequestHeader::build("POST", b"/api/chat", None).expect("header");
    client
        .append_header("connection", "keep-alive, X-Secret")
        .expect("h");
    client.append_header("connection", "x-other").expect("h");
    let name = |n: &'static str| http::HeaderName::from_static(n);
    assert!(named_by_connection(&client, &name("x-secret")));
    assert!(named_by_connection(&client, &name("x-other")));
    assert!(!named_by_connection(&client, &name("x-end-to-end")));
}
