//! In-process tests of the upstream client against a scripted HTTP/1.1 server on loopback, in
//! the test's own runtime: no child process, no root, no namespace. Each test proves one
//! promise of the module: bodies arrive as sent, silence is a timeout, connections are pooled,
//! and a pooled connection the server dropped is retried once.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

fn config(first_byte: Duration) -> UpstreamConfig {
    UpstreamConfig {
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout: first_byte,
        idle_chunk_timeout: Duration::from_secs(5),
        pool_idle: Duration::from_secs(30),
        models_refresh: Duration::from_secs(60),
    }
}

fn peer(addr: SocketAddr) -> HttpPeer {
    HttpPeer::new(addr, false, String::new())
}

fn request() -> RequestHeader {
    let mut h = RequestHeader::build("POST", b"/v1/chat/completions", None).expect("header");
    h.insert_header("host", "backend").expect("host");
    h.insert_header("content-length", "2").expect("length");
    h
}

/// Reads one request (header and a 2-byte body) off `conn`; `false` when the client closed.
async fn read_request(conn: &mut TcpStream) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            if seen.len() >= end + 4 + 2 {
                return true;
            }
        }
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// A loopback listener and a count of the connections it accepted.
async fn listener() -> (TcpListener, SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    (l, addr, Arc::new(AtomicUsize::new(0)))
}

const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

#[tokio::test]
async fn a_streamed_body_reaches_the_caller_chunk_by_chunk_as_the_server_sends_it() {
    let (l, addr, _) = listener().await;
    let (next_tx, mut next_rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let (mut c, _) = l.accept().await.expect("accept");
        assert!(read_request(&mut c).await);
        c.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
            .await
            .expect("write");
        // The second chunk is sent only after the caller has the first: a client that waited
        // for more before handing anything over would hang here.
        next_rx.recv().await;
        c.write_all(b"7\r\nsecond\n\r\n0\r\n\r\n")
            .await
            .expect("write");
    });
    let up = Upstream::new(&config(Duration::from_secs(5)));
    let mut rsp = up
        .send(&peer(addr), &request(), &Bytes::from_static(b"{}"))
        .await
        .expect("header");
    assert_eq!(rsp.header().status.as_u16(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), rsp.next_chunk())
        .await
        .expect("the first chunk arrives before the second is sent")
        .expect("read");
    assert_eq!(first.as_deref(), Some(&b"first\n"[..]));
    next_tx.send(()).await.expect("server waits");
    let second = rsp.next_chunk().await.expect("read");
    assert_eq!(second.as_deref(), Some(&b"second\n"[..]));
    assert_eq!(rsp.next_chunk().await.expect("read"), None);
}

#[tokio::test]
async fn a_server_that_takes_the_request_and_stays_silent_is_a_timeout() {
    let (l, addr, _) = listener().await;
    tokio::spawn(async move {
        let (mut c, _) = l.accept().await.expect("accept");
        read_request(&mut c).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(c);
    });
    let up = Upstream::new(&config(Duration::from_millis(300)));
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        up.send(&peer(addr), &request(), &Bytes::from_static(b"{}")),
    )
    .await
    .expect("bounded by the first-byte timeout")
    .err()
    .expect("no header");
    assert!(matches!(err, SendError::Timeout { .. }), "{err}");
    assert!(!err.is_tls_rejection());
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error_that_is_safe_to_retry_elsewhere() {
    let (l, addr, _) = listener().await;
    drop(l);
    let up = Upstream::new(&config(Duration::from_secs(2)));
    let err = up
        .send(&peer(addr), &request(), &Bytes::from_static(b"{}"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, SendError::Connect { .. }), "{err}");
}

/// Serves every request on every connection with [`OK`]; after `close_after` answers on a
/// connection, closes it (as a backend with a short keep-alive does).
fn serve_ok(l: TcpListener, accepted: Arc<AtomicUsize>, close_after: usize) {
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                for _ in 0..close_after {
                    if !read_request(&mut c).await || c.write_all(OK).await.is_err() {
                        return;
                    }
                }
                // Let the client read the last answer and pool the connection, then close it.
                tokio::time::sleep(Duration::from_millis(100)).await;
            });
        }
    });
}

async fn exchange(up: &Upstream, addr: SocketAddr) {
    let mut rsp = up
        .send(&peer(addr), &request(), &Bytes::from_static(b"{}"))
        .await
        .expect("header");
    assert_eq!(rsp.header().status.as_u16(), 200);
    while rsp.next_chunk().await.expect("body").is_some() {}
    up.release(rsp).await;
}

#[tokio::test]
async fn a_fully_read_response_returns_its_connection_to_the_pool() {
    let (l, addr, accepted) = listener().await;
    serve_ok(l, accepted.clone(), 100);
    let up = Upstream::new(&config(Duration::from_secs(5)));
    for _ in 0..5 {
        exchange(&up, addr).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "five requests, one connection"
    );
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_retried_once_on_a_fresh_one() {
    let (l, addr, accepted) = listener().await;
    serve_ok(l, accepted.clone(), 1);
    let up = Upstream::new(&config(Duration::from_secs(5)));
    exchange(&up, addr).await;
    // The server has closed the pooled connection by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    exchange(&up, addr).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the second request went out on a new connection, and succeeded"
    );
}
