//! Which backend serves a request: a pure function over a snapshot, no sockets, no clocks.
//!
//! The gateway builds a [`BackendView`] per backend from the model catalog and the live slot
//! counts, calls [`rank`], then tries the candidates in order. Taking a slot happens after
//! ranking (it is the only racy part), so a full backend is skipped at that point.

use crate::config::BackendKind;
use crate::error::Dialect;
use serde_json::Value;
use std::cmp::Reverse;

/// A model as one backend listed it.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedModel {
    /// The name clients use.
    pub name: String,
    /// The backend's own listing entry (Ollama `/api/tags` or OpenAI `/v1/models` shape).
    pub entry: Value,
}

impl ListedModel {
    /// A model known only by name.
    pub fn named(name: &str) -> Self {
        ListedModel {
            name: name.to_string(),
            entry: Value::Null,
        }
    }
}

/// What routing needs to know about one backend.
#[derive(Debug, Clone, Copy)]
pub struct BackendView<'a> {
    /// API family it speaks.
    pub kind: BackendKind,
    /// Models it listed at the last refresh; `None` when it never answered a listing.
    pub models: Option<&'a [ListedModel]>,
    /// Requests in flight to it.
    pub in_flight: usize,
    /// Its concurrency limit.
    pub capacity: usize,
}

/// Why no backend can take a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// No backend lists the model.
    UnknownModel,
    /// Only backends of another dialect list it (index of the first such backend).
    OtherDialect(usize),
}

/// Whether a listed model name answers a requested one; Ollama treats a name without a tag as
/// `:latest`, and so do we.
pub fn model_matches(listed: &str, requested: &str) -> bool {
    listed == requested
        || (!requested.contains(':') && listed.strip_suffix(":latest") == Some(requested))
}

/// Indices of the backends that may serve `model` in `dialect`, best first: backends that list
/// the model before backends whose listing is unknown, then the least loaded relative to its
/// capacity, then configuration order.
pub fn rank(
    model: &str,
    dialect: Dialect,
    backends: &[BackendView<'_>],
) -> Result<Vec<usize>, NoRoute> {
    let mut ranked: Vec<(u8, u64, usize)> = Vec::with_capacity(backends.len());
    let mut other_dialect = None;
    for (i, b) in backends.iter().enumerate() {
        let tier = match b.models {
            Some(models) if models.iter().any(|m| model_matches(&m.name, model)) => 0,
            Some(_) => continue,
            None => 1,
        };
        if dialect == Dialect::Ollama && b.kind != BackendKind::Ollama {
            if tier == 0 {
                other_dialect.get_or_insert(i);
            }
            continue;
        }
        // Load as a fraction of capacity, in parts per million, to compare without floats.
        let load = (b.in_flight as u64 * 1_000_000) / b.capacity.max(1) as u64;
        ranked.push((tier, load, i));
    }
    if ranked.is_empty() {
        return Err(other_dialect.map_or(NoRoute::UnknownModel, NoRoute::OtherDialect));
    }
    ranked.sort_unstable();
    Ok(ranked.into_iter().map(|(_, _, i)| i).collect())
}

/// What routing needs to know about one approved peer that shares the model with us.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerView {
    /// Free slots for us it reported in its last hello.
    pub free_slots: usize,
    /// The model is loaded in memory there (hot): no load time before the first token.
    pub hot: bool,
    /// Requests we have in flight to it now.
    pub our_in_flight: usize,
    /// Requests it lets us have in flight.
    pub grant: usize,
    /// Round trip of its last hello, in milliseconds.
    pub latency_ms: f64,
    /// Consecutive recent failures talking to it.
    pub failures: u32,
    /// Share of our requests it answered (moving average; 1.0 before any).
    pub reliability: f64,
    /// Its ejection is over but not yet proven: one probe at a time, after the others.
    pub probation: bool,
}

/// Steps in which reliability is compared: peers within one step are equally reliable, so
/// that noise in the average does not reorder them.
const RELIABILITY_STEPS: f64 = 20.0;
/// Reliability as the ranking compares it: one of [`RELIABILITY_STEPS`] steps.
pub fn reliability_step(reliability: f64) -> u8 {
    (reliability.clamp(0.0, 1.0) * RELIABILITY_STEPS).round() as u8
}

/// Below this share of answered requests a peer is unreliable: it ranks after every reliable
/// one, hot or not (a failed request costs more than loading a model).
pub const RELIABLE: f64 = 0.9;

/// Indices of the peers worth trying, best first: never one at the concurrency it grants us,
/// nor a peer on probation that already has our probe; then those with free slots before those
/// without, proven peers before those on probation, reliable ones (see [`RELIABLE`]) before
/// unreliable ones, hot (model loaded) before cold, most free slots relative to the grant, more
/// reliable, lower latency, fewer recent failures.
pub fn rank_peers(peers: &[PeerView]) -> Vec<usize> {
    type Key = (
        bool,
        bool,
        bool,
        bool,
        Reverse<u64>,
        Reverse<u8>,
        u64,
        u32,
        usize,
    );
    let mut ranked: Vec<Key> = peers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.grant > 0 && p.our_in_flight < p.grant)
        .filter(|(_, p)| !(p.probation && p.our_in_flight > 0))
        .map(|(i, p)| {
            let free = p.free_slots.saturating_sub(p.our_in_flight);
            let ratio = (free as u64 * 1_000_000) / p.grant as u64;
            let latency_us = (p.latency_ms.max(0.0) * 1000.0) as u64;
            let reliability = reliability_step(p.reliability);
            (
                free == 0,
                p.probation,
                p.reliability < RELIABLE,
                !p.hot,
                Reverse(ratio),
                Reverse(reliability),
                latency_us,
                p.failures,
                i,
            )
        })
        .collect();
    ranked.sort_unstable();
    ranked.into_iter().map(|r| r.8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(names: &[&str]) -> Vec<ListedModel> {
        names.iter().map(|n| ListedModel::named(n)).collect()
    }

    fn view(
        kind: BackendKind,
        models: Option<&[ListedModel]>,
        in_flight: usize,
        capacity: usize,
    ) -> BackendView<'_> {
        BackendView {
            kind,
            models,
            in_flight,
            capacity,
        }
    }

    #[test]
    fn backend_that_lists_the_model_wins_over_unknown_listing() {
        let a = listed(&["llama3.1:8b"]);
        let backends = [
            view(BackendKind::Ollama, None, 0, 4),
            view(BackendKind::Ollama, Some(&a), 3, 4),
        ];
        assert_eq!(
            rank("llama3.1:8b", Dialect::Ollama, &backends),
            Ok(vec![1, 0])
        );
    }

    #[test]
    fn least_loaded_relative_to_capacity_goes_first() {
        let a = listed(&["m"]);
        let backends = [
            view(BackendKind::Ollama, Some(&a), 2, 4),
            view(BackendKind::Openai, Some(&a), 1, 4),
        ];
        assert_eq!(rank("m", Dialect::OpenAi, &backends), Ok(vec![1, 0]));
        let backends = [
            view(BackendKind::Ollama, Some(&a), 2, 8),
            view(BackendKind::Openai, Some(&a), 1, 2),
        ];
        assert_eq!(rank("m", Dialect::OpenAi, &backends), Ok(vec![0, 1]));
    }

    #[test]
    fn ollama_dialect_never_goes_to_an_openai_backend() {
        let a = listed(&["smollm2"]);
        let backends = [view(BackendKind::Openai, Some(&a), 0, 4)];
        assert_eq!(
            rank("smollm2", Dialect::Ollama, &backends),
            Err(NoRoute::OtherDialect(0))
        );
        assert_eq!(rank("smollm2", Dialect::OpenAi, &backends), Ok(vec![0]));
    }

    #[test]
    fn unknown_model_is_no_route() {
        let a = listed(&["m"]);
        let backends = [view(BackendKind::Ollama, Some(&a), 0, 4)];
        assert_eq!(
            rank("other", Dialect::OpenAi, &backends),
            Err(NoRoute::UnknownModel)
        );
        assert_eq!(
            rank("other", Dialect::OpenAi, &[]),
            Err(NoRoute::UnknownModel)
        );
    }

    fn peer(free: usize, ours: usize, grant: usize, latency_ms: f64, failures: u32) -> PeerView {
        PeerView {
            free_slots: free,
            hot: false,
            our_in_flight: ours,
            grant,
            latency_ms,
            failures,
            reliability: 1.0,
            probation: false,
        }
    }

    #[test]
    fn among_equally_free_peers_the_reliable_one_goes_first_then_the_fast_one() {
        let flaky_fast = PeerView {
            reliability: 0.6,
            ..peer(2, 0, 2, 1.0, 0)
        };
        let solid_slow = PeerView {
            reliability: 0.99,
            ..peer(2, 0, 2, 50.0, 0)
        };
        let solid_fast = PeerView {
            reliability: 0.98,
            ..peer(2, 0, 2, 5.0, 0)
        };
        assert_eq!(rank_peers(&[flaky_fast, solid_slow, solid_fast]), [2, 1, 0]);
        // Free room still comes first: a reliable peer with none waits behind a flaky one.
        let solid_full = PeerView {
            reliability: 1.0,
            ..peer(0, 0, 2, 1.0, 0)
        };
        assert_eq!(rank_peers(&[solid_full, flaky_fast]), [1, 0]);
        // An unreliable peer with the model hot ranks after a reliable cold one.
        let flaky_hot = PeerView {
            hot: true,
            ..flaky_fast
        };
        assert_eq!(rank_peers(&[flaky_hot, solid_slow]), [1, 0]);
    }

    #[test]
    fn a_peer_on_probation_gets_one_probe_after_the_proven_ones() {
        let proven = peer(1, 0, 2, 9.0, 0);
        let probing = PeerView {
            probation: true,
            ..peer(4, 0, 4, 1.0, 0)
        };
        assert_eq!(rank_peers(&[probing, proven]), [1, 0]);
        let probe_out = PeerView {
            our_in_flight: 1,
            ..probing
        };
        assert_eq!(rank_peers(&[probe_out, proven]), [1], "one probe at a time");
    }

    #[test]
    fn a_hot_peer_goes_before_a_cold_one_with_more_room() {
        let cold = peer(4, 0, 4, 1.0, 0);
        let hot = PeerView {
            hot: true,
            ..peer(1, 0, 4, 9.0, 0)
        };
        assert_eq!(rank_peers(&[cold, hot]), vec![1, 0]);
        let busy_hot = PeerView {
            hot: true,
            ..peer(0, 0, 4, 1.0, 0)
        };
        assert_eq!(
            rank_peers(&[busy_hot, cold]),
            vec![1, 0],
            "a free slot matters more than heat"
        );
    }

    #[test]
    fn peers_at_their_grant_are_never_candidates() {
        assert_eq!(
            rank_peers(&[peer(4, 2, 2, 1.0, 0), peer(1, 0, 1, 9.0, 0)]),
            vec![1]
        );
        assert_eq!(rank_peers(&[peer(4, 0, 0, 1.0, 0)]), Vec::<usize>::new());
    }

    #[test]
    fn free_capacity_then_latency_then_failures_decide() {
        let peers = [
            peer(0, 0, 2, 0.1, 0),
            peer(1, 0, 2, 5.0, 0),
            peer(2, 0, 2, 9.0, 0),
            peer(2, 0, 2, 3.0, 0),
        ];
        assert_eq!(
            rank_peers(&peers),
            vec![3, 2, 1, 0],
            "busy last; equal ratios by latency"
        );
        let peers = [peer(2, 0, 2, 3.0, 2), peer(2, 0, 2, 3.0, 0)];
        assert_eq!(rank_peers(&peers), vec![1, 0]);
    }

    #[test]
    fn ranking_a_thousand_peers_is_quick_and_total() {
        let peers: Vec<PeerView> = (0..1000)
            .map(|i| peer(i % 5, i % 3, 4, (i % 17) as f64, (i % 4) as u32))
            .collect();
        let ranked = rank_peers(&peers);
        assert_eq!(ranked.len(), 1000);
        let mut seen = ranked.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 1000);
    }

    #[test]
    fn untagged_name_means_latest() {
        assert!(model_matches("llama3.1:latest", "llama3.1"));
        assert!(!model_matches("llama3.1:8b", "llama3.1"));
        assert!(!model_matches("llama3.1:latest", "llama3.1:8b"));
    }
}
