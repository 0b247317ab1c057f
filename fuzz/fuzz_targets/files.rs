//! Files on disk, which another process on the machine (or a bad hand edit) may have written:
//! the node's config, approved_peers.json, the registry's config, `wg show dump` output and an
//! identity certificate. Errors must name the place without panicking.
#![no_main]

use std::path::Path;

use arknet::config::Config;
use arknet::discovery::wireguard::parse_dump;
use arknet::mesh::tls::parse_identity_cert;
use arknet::peers::store::ApprovedPeers;
use arknet::registry::config::RegistryConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/fuzz/file");
    if let Err(e) = Config::parse(text, path) {
        let _ = e.to_string();
    }
    if let Err(e) = ApprovedPeers::parse(text, path) {
        let _ = e.to_string();
    }
    if let Err(e) = RegistryConfig::parse(text, path) {
        let _ = e.to_string();
    }
    let _ = parse_dump(text);
    let _ = parse_identity_cert(text);
});
