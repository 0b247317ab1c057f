//! Discovery: sources that find other nodes and *report* them to the peer table. A sighting
//! grants nothing: a node found here is listed as pending until its owner is approved, and is
//! listed at all only once a hello over mutual TLS proved the key it advertised.
//!
//! Sources: static endpoints (`discovery.static`, in [`crate::mesh::client::MeshPoller`]),
//! connect attempts (in [`crate::mesh`]), mDNS on the LAN ([`mdns`]) and WireGuard tunnel peers
//! ([`wireguard`]). Every source dials its candidates concurrently, each on its own jittered
//! schedule: one silent address never holds up the others.

pub mod mdns;
pub mod registry;
pub mod wireguard;

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

/// The mDNS service type every node advertises and browses.
pub const SERVICE_TYPE: &str = "_arknet._tcp.local.";

/// Share of a period by which [`jittered`] moves it, either way.
pub const JITTER_SHARE: f64 = 0.2;

/// `period` moved at random by up to ±[`JITTER_SHARE`] of itself. Nodes started together (a
/// power cut ending, a test grid) would otherwise probe in lockstep forever, and their bursts
/// would collide on the LAN every period.
pub fn jittered(period: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    // Without randomness the period is kept as is: jitter spreads load, it guards nothing.
    let unit = match SystemRandom::new().fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX),
        Err(_) => 0.5,
    };
    period.mul_f64(1.0 - JITTER_SHARE + 2.0 * JITTER_SHARE * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jittered_periods_stay_within_the_share_and_differ() {
        let period = Duration::from_secs(10);
        let low = period.mul_f64(1.0 - JITTER_SHARE);
        let high = period.mul_f64(1.0 + JITTER_SHARE);
        let draws: Vec<Duration> = (0..200).map(|_| jittered(period)).collect();
        assert!(draws.iter().all(|d| *d >= low && *d <= high), "{draws:?}");
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 150, "jitter hardly varies: {distinct:?}");
    }
}
