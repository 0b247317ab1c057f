//! Discovery: sources that find other nodes and *report* them to the peer table. A sighting
//! grants nothing: a node found here is listed as pending until its owner is approved, and is
//! listed at all only once a hello over mutual TLS proved the key it advertised.
//!
//! Sources: static endpoints (`discovery.static`, in [`crate::mesh::client::MeshPoller`]),
//! connect attempts (in [`crate::mesh`]), mDNS on the LAN ([`mdns`]) and WireGuard tunnel peers
//! ([`wireguard`]).

pub mod mdns;
pub mod wireguard;

/// The mDNS service type every node advertises and browses.
pub const SERVICE_TYPE: &str = "_arknet._tcp.local.";
