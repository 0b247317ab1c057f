//! Hellos run concurrently: a peer that takes the connection and then never answers (a hung
//! process, a half-dead host) costs only its own hello its timeout. Hellos to live peers keep
//! their period meanwhile, and a static endpoint listed after the dead one is found at once.

mod support;

use std::collections::HashSet;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{assert_eventually, loopback_ip, BackendSpec, NodeProc, NodeSpec};

/// Accepts TCP connections and holds them open without ever sending a byte.
struct DeadPeer {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DeadPeer {
    fn start() -> DeadPeer {
        let listener = TcpListener::bind((loopback_ip(), 0)).expect("bind dead peer");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            // Bounded: stops when the test ends or after two minutes, whichever comes first.
            let until = Instant::now() + Duration::from_secs(120);
            while !halt.load(Ordering::Relaxed) && Instant::now() < until {
                match listener.accept() {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        held.push(stream);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        DeadPeer {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DeadPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn node(backend: &FakeBackend, static_peers: &[std::net::SocketAddr]) -> NodeProc {
    let mut spec = NodeSpec::with_backend(BackendSpec::ollama(backend.url()));
    if !static_peers.is_empty() {
        let list: Vec<String> = static_peers.iter().map(|a| format!("\"{a}\"")).collect();
        // The harness writes `extra_toml` right after the `[api]` keys; a table header here
        // opens `[discovery]` and the harness's next header closes it.
        spec.extra_toml
            .push_str(&format!("[discovery]\nstatic = [{}]\n", list.join(", ")));
    }
    NodeProc::start(&spec)
}

#[test]
fn a_dead_peer_does_not_delay_hellos_to_live_ones() {
    let backend = FakeBackend::start_in_thread(
        IpAddr::V4(loopback_ip()),
        FakeConfig::ollama(&["llama3.1:8b"]),
    );
    let dead = DeadPeer::start();
    let live = node(&backend, &[]);
    // The dead endpoint is listed first: a poller that waits for it would reach no one else.
    let a = node(&backend, &[dead.addr, live.mesh]);
    a.approve(&live, &[], 1);

    let started = Instant::now();
    assert_eventually(
        Duration::from_secs(5),
        "the live static endpoint is sighted while the dead one hangs",
        || {
            a.get("/peers/discovered").json()["peers"]
                .as_array()
                .is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["public_key"] == live.public_key().as_str()
                            && p["sources"]
                                .as_array()
                                .is_some_and(|s| s.iter().any(|x| x == "static"))
                    })
                })
        },
    );
    assert!(
        dead.accepted.load(Ordering::Relaxed) >= 1,
        "the dead peer was dialed too"
    );

    // Hellos to the approved live peer keep their one-second period (jittered) although the
    // dead peer's hello cannot end before its 10 s timeout.
    let mut seen = HashSet::new();
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(6) {
        let status = a.get("/peers/status").json();
        if let Some(last) = status["peers"][0]["last_hello"].as_str() {
            seen.insert(last.to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen.len() >= 4,
        "hellos to the live peer stalled behind the dead one: last_hello took {seen:?} in 6 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the dead peer's hello timeout (10 s) must not have been waited for"
    );
}
