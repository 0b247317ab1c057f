//! The tests' fake model server as a standalone process, for tests that need a backend inside a
//! network namespace (where the test process itself cannot listen).
//!
//! Usage: `fake_backend <ip> <port> <model>[,<model>...]`; serves until killed.

#[path = "../tests/support/fake_backend.rs"]
mod fake_backend;

use std::net::IpAddr;
use std::time::Duration;

use fake_backend::{FakeBackend, FakeConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(ip), Some(port), Some(models)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: fake_backend <ip> <port> <model>[,<model>...]");
        std::process::exit(64);
    };
    let ip: IpAddr = ip.parse().expect("ip address");
    let port: u16 = port.parse().expect("port");
    let models: Vec<&str> = models.split(',').collect();
    let backend = FakeBackend::start_on(ip, port, FakeConfig::both(&models)).await;
    eprintln!("fake backend on {}", backend.url());
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
