//! A bare Pingora reverse proxy: the floor reference of `benches/gateway.rs` (target `pingora`).
//!
//! arknet is built on Pingora, so its CPU per request cannot go below what Pingora itself costs
//! for the same hop. This example measures that floor on the same machine, in the same run: the
//! smallest idiomatic Pingora proxy, as in Pingora's own `pingora-proxy/examples` (a `ProxyHttp`
//! whose `upstream_peer` returns one fixed plain-HTTP peer, `http_proxy_service`, one TCP
//! listener, Pingora's default keep-alive upstream pool, no TLS, no logging). It is not part of
//! the product.
//!
//! Usage: `pingora_floor --listen 127.x.y.z:PORT --upstream 127.x.y.z:PORT [--threads N]
//! [--run-dir DIR]`; serves until SIGTERM (graceful, about a second) or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// Command line.
#[derive(Parser)]
#[command(about = "Bare Pingora reverse proxy to one upstream (the gateway bench's floor)")]
struct Args {
    /// Address to accept plain HTTP on.
    #[arg(long)]
    listen: SocketAddr,
    /// The one plain-HTTP upstream every request goes to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads of the proxy service (default: one per CPU core).
    #[arg(long)]
    threads: Option<usize>,
    /// Directory for Pingora's pid file and upgrade socket (default: a directory named after
    /// the listen port under the system temp dir), so that they collide with nothing.
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

/// Every request goes to `upstream`, unchanged.
struct Floor {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(Into::into))
        .unwrap_or(1);
    let run_dir = args.run_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pingora_floor-{}", args.listen.port()))
    });
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("creating run dir {}: {e}", run_dir.display()))?;
    let conf = ServerConf {
        threads,
        // Pingora's defaults (/tmp/pingora.pid, /tmp/pingora_upgrade.sock) are shared by every
        // Pingora process on the host.
        pid_file: run_dir.join("pingora.pid").to_string_lossy().into_owned(),
        upgrade_sock: run_dir.join("upgrade.sock").to_string_lossy().into_owned(),
        // SIGTERM stops accepting at once and ends within about a second, not the default 5 min.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Floor {
            upstream: args.upstream,
        },
    );
    proxy.add_tcp(&args.listen.to_string());
    server.add_service(proxy);
    server.run_forever();
}
