//! A tiny blocking HTTP/1.1 client for tests: one request per connection, records when each
//! piece of the body arrived so streaming tests can tell incremental from buffered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A response as the client saw it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// De-chunked body.
    pub body: Vec<u8>,
    /// (time since the request was sent, decoded body bytes so far) at every socket read.
    pub arrivals: Vec<(Duration, usize)>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// Non-empty lines of the body (NDJSON lines, SSE fields).
    pub fn lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Sends one request and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    send_raw(addr, &bytes)
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"")
}

pub fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Response {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// Writes `bytes` verbatim and parses the response (for malformed-request tests too).
pub fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Response {
    try_send_raw(addr, bytes, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("request to {addr}: {e}"))
}

/// Like [`send_raw`], but I/O failures (refused, reset, silence for `patience`) are returned.
pub fn try_send_raw(
    addr: SocketAddr,
    bytes: &[u8],
    patience: Duration,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(patience))?;
    let started = Instant::now();
    stream.write_all(bytes)?;
    let mut parser = Parser::default();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) if parser.done() => break,
            Err(e) => return Err(e),
        };
        parser.feed(&buf[..n], started.elapsed());
        if parser.done() {
            break;
        }
    }
    if parser.head.is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no response header",
        ));
    }
    Ok(parser.finish())
}

/// Status, headers, and where the body starts in the raw bytes.
type Head = (u16, Vec<(String, String)>, usize);

#[derive(Default)]
struct Parser {
    raw: Vec<u8>,
    head: Option<Head>,
    arrivals: Vec<(Duration, usize)>,
}

impl Parser {
    fn feed(&mut self, data: &[u8], at: Duration) {
        self.raw.extend_from_slice(data);
        if self.head.is_none() {
            if let Some(end) = find(&self.raw, b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&self.raw[..end]).into_owned();
                let mut lines = text.split("\r\n");
                let status = lines
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|s| s.parse().ok())
                    .expect("status line");
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                self.head = Some((status, headers, end + 4));
            }
        }
        if self.head.is_some() {
            let len = self.decoded().0.len();
            self.arrivals.push((at, len));
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        let (_, headers, _) = self.head.as_ref()?;
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
    }

    /// (body so far, complete?)
    fn decoded(&self) -> (Vec<u8>, bool) {
        let Some((status, _, start)) = &self.head else {
            return (Vec::new(), false);
        };
        let rest = &self.raw[*start..];
        if *status == 204 || *status == 304 {
            return (Vec::new(), true);
        }
        if self
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            let mut out = Vec::new();
            let mut pos = 0;
            loop {
                let Some(eol) = find(&rest[pos..], b"\r\n") else {
                    return (out, false);
                };
                let size_text = String::from_utf8_lossy(&rest[pos..pos + eol]).into_owned();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
                let data_start = pos + eol + 2;
                if size == 0 {
                    return (out, rest.len() >= data_start + 2);
                }
                if rest.len() < data_start + size + 2 {
                    out.extend_from_slice(&rest[data_start..rest.len().min(data_start + size)]);
                    return (out, false);
                }
                out.extend_from_slice(&rest[data_start..data_start + size]);
                pos = data_start + size + 2;
            }
        }
        match self
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(n) => (rest[..rest.len().min(n)].to_vec(), rest.len() >= n),
            None => (rest.to_vec(), false),
        }
    }

    fn done(&self) -> bool {
        self.decoded().1
    }

    fn finish(self) -> Response {
        let (body, _) = self.decoded();
        let (status, headers, _) = self.head.clone().expect("a response header arrived");
        Response {
            status,
            headers,
            body,
            arrivals: self.arrivals,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
