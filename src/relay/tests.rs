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

/// A small deterministic generator (xorshift64*): the randomized test below needs no crate and
/// replays the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Header names a hostile client would try (hop-by-hop, credentials, framing, duplicates of what
/// the gateway sets) next to ordinary ones.
const NAMES: [&str; 18] = [
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "proxy-authorization",
    "transfer-encoding",
    "content-length",
    "host",
    "expect",
    "authorization",
    "cookie",
    "accept-encoding",
    "content-type",
    "x-trace",
    "x-user",
    "openai-organization",
    "user-agent",
    "accept",
];

/// Whether the gateway must drop the client's header `name` (given the client's `Connection`).
/// Written out again rather than taken from `headers.rs` on purpose: this is the test's own
/// statement of the policy, so a name lost from the implementation's list fails the test.
fn must_drop(name: &str, connection: &[String]) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
        "accept-encoding",
        "authorization",
        "cookie",
    ]
    .contains(&name)
        || connection.iter().any(|c| c.eq_ignore_ascii_case(name))
}

/// 3,000 random client headers (hostile names, arbitrary value bytes, `Connection` naming other
/// headers), with and without forwarding, with and without a backend key: the request written to
/// the backend always parses as exactly one HTTP/1.1 request of exactly its length, carries one
/// `Host` (the backend's), one `Content-Length` (the body's), the backend's key or no
/// `Authorization` at all, none of the dropped headers, and every kept header byte for byte.
#[test]
fn the_request_written_to_a_backend_is_one_well_formed_request_whatever_the_client_sent() {
    use super::ModelRequest;
    use crate::config::Redacted;
    use crate::error::Dialect;
    use crate::upstream::Backend;

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut checked_values = 0;
    for case in 0..3000 {
        let keyed = rng.below(2) == 0;
        let mut config = crate::testkit::backend("127.0.0.1:11434".parse().expect("addr"), 4);
        config.url.base_path = if rng.below(3) == 0 {
            "/ollama".into()
        } else {
            String::new()
        };
        config.api_key = keyed.then(|| Redacted("sk-backend".to_string()));
        let backend = Backend::new(config, &crate::testkit::upstream_config());

        let path = "/v1/chat/completions";
        let target = if rng.below(2) == 0 {
            "/v1/chat/completions?x=1"
        } else {
            path
        };
        let mut client = RequestHeader::build("POST", target.as_bytes(), None).expect("header");
        let mut connection = Vec::new();
        for _ in 0..rng.below(12) {
            let name = NAMES[rng.below(NAMES.len())];
            let value: Vec<u8> = if name == "connection" {
                let named = NAMES[rng.below(NAMES.len())];
                connection.push(named.to_string());
                format!("keep-alive, {named}").into_bytes()
            } else {
                // Arbitrary bytes: CR, LF, NUL and DEL included; the header type refuses what
                // HTTP does not allow, the rest must come through unchanged.
                (0..rng.below(24)).map(|_| rng.next() as u8).collect()
            };
            let Ok(value) = http::HeaderValue::from_bytes(&value) else {
                continue;
            };
            client.append_header(name, value).expect("append");
        }
        let forward = rng.below(4) != 0;
        let body_len = rng.below(100_000);
        let req = ModelRequest {
            dialect: Dialect::OpenAi,
            path,
            model: "m",
            body: bytes::Bytes::new(),
            started: std::time::Instant::now(),
            forward_client_headers: forward,
            stop: None,
            from_peer: !forward,
        };
        let wire = upstream_request(&client, &backend, &req, path, body_len).expect("written");

        let mut parsed_headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut parsed_headers);
        let status = parsed.parse(&wire).expect("parses");
        assert_eq!(
            status,
            httparse::Status::Complete(wire.len()),
            "case {case}: one request, no trailing bytes"
        );
        assert_eq!(parsed.method, Some("POST"));
        let base = backend.config.url.base_path.clone();
        assert_eq!(
            parsed.path.map(str::to_string),
            Some(format!("{base}{}", target)),
            "case {case}"
        );
        let got: Vec<(String, Vec<u8>)> = parsed
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        let all = |name: &str| -> Vec<Vec<u8>> {
            got.iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect()
        };
        assert_eq!(
            all("host"),
            vec![b"127.0.0.1:11434".to_vec()],
            "case {case}"
        );
        assert_eq!(
            all("content-length"),
            vec![body_len.to_string().into_bytes()],
            "case {case}"
        );
        let auth: Vec<Vec<u8>> = if keyed {
            vec![b"Bearer sk-backend".to_vec()]
        } else {
            vec![]
        };
        assert_eq!(
            all("authorization"),
            auth,
            "case {case}: only the backend's key"
        );
        for dropped in [
            "cookie",
            "accept-encoding",
            "connection",
            "te",
            "upgrade",
            "transfer-encoding",
            "expect",
            "keep-alive",
            "proxy-authorization",
        ] {
            assert!(all(dropped).is_empty(), "case {case}: {dropped} forwarded");
        }

        // What the client sent and the gateway keeps, in order, against what was written
        // (less the three the gateway sets itself).
        let expected: Vec<(String, Vec<u8>)> = if forward {
            client
                .headers
                .iter()
                .filter(|(n, _)| !must_drop(n.as_str(), &connection))
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect()
        } else {
            vec![("content-type".to_string(), b"application/json".to_vec())]
        };
        let written: Vec<(String, Vec<u8>)> = got
            .iter()
            .filter(|(n, _)| !["host", "content-length", "authorization"].contains(&n.as_str()))
            .cloned()
            .collect();
        // httparse trims surrounding white space from values, as any HTTP parser does.
        let trim = |v: &[u8]| v.trim_ascii().to_vec();
        let expected: Vec<(String, Vec<u8>)> =
            expected.into_iter().map(|(n, v)| (n, trim(&v))).collect();
        assert_eq!(written, expected, "case {case}");
        checked_values += written.len();
    }
    // The generator must actually have produced kept headers, not only refused ones.
    assert!(
        checked_values > 2000,
        "only {checked_values} forwarded headers checked"
    );
}
