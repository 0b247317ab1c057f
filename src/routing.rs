//! Which backend serves a request: a pure function over a snapshot, no sockets, no clocks.
//!
//! The gateway builds a [`BackendView`] per backend from the model catalog and the live slot
//! counts, calls [`rank`], then tries the candidates in order. Taking a slot happens after
//! ranking (it is the only racy part), so a full backend is skipped at that point.

use crate::config::BackendKind;
use crate::error::Dialect;
use serde_json::Value;

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
    // Adding a half and truncating rounds a non-negative value like `round()`, without the
    // libm call `round()` is on x86-64 without SSE4.1 (this runs per peer per request).
    (reliability.clamp(0.0, 1.0) * RELIABILITY_STEPS + 0.5) as u8
}

/// Below this share of answered requests a peer is unreliable: it ranks after every reliable
/// one, hot or not (a failed request costs more than loading a model).
pub const RELIABLE: f64 = 0.9;

/// Indices of the peers worth trying, best first: never one at the concurrency it grants us,
/// nor a peer on probation that already has our probe; then those with free slots before those
/// without, proven peers before those on probation, reliable ones (see [`RELIABLE`]) before
/// unreliable ones, hot (model loaded) before cold, most free slots relative to the grant, more
/// reliable, lower latency, fewer recent failures, then the order given.
///
/// The order is produced lazily: a request tries a handful of peers, so the best few are
/// picked while the keys are built (one pass), and the rest is sorted only if the caller keeps
/// asking.
pub fn rank_peers(peers: &[PeerView]) -> PeerRanking<'_> {
    let mut best = [u64::MAX; BEST];
    let mut candidates = 0;
    for (i, p) in peers.iter().enumerate().take(MAX_RANKED) {
        if !eligible(p) {
            continue;
        }
        candidates += 1;
        let key = rank_key(i, p);
        if key < best[BEST - 1] {
            // Insertion into a sorted array of four: most keys stop at the first comparison.
            let mut at = BEST - 1;
            while at > 0 && best[at - 1] > key {
                best[at] = best[at - 1];
                at -= 1;
            }
            best[at] = key;
        }
    }
    PeerRanking {
        peers,
        candidates,
        keys: Vec::new(),
        best,
        next: 0,
    }
}

/// Whether a peer may be tried at all: it grants us something, we are below that grant, and a
/// peer on probation does not already have our probe.
fn eligible(p: &PeerView) -> bool {
    p.grant > 0 && p.our_in_flight < p.grant && !(p.probation && p.our_in_flight > 0)
}

/// Peers ranked at most (the index has 20 bits of the key); a household has a handful.
pub const MAX_RANKED: usize = 1 << 20;

/// One peer's place in the ranking as a single integer, smaller first: the fields of the rule
/// above from the most significant bits down, at the resolution routing needs, and the index
/// last (so keys are unique and ties keep the given order). One `u64` compare instead of a
/// tuple of nine is what lets a thousand peers be ranked in a few microseconds.
///
/// | bits  | field                                                         |
/// |-------|---------------------------------------------------------------|
/// | 63-60 | no free slot, probation, unreliable, cold                     |
/// | 59-50 | 1000 - free share of the grant in per mille                   |
/// | 49-45 | 20 - reliability step                                         |
/// | 44-25 | latency in 0.1 ms, at most 2^20 - 1 (105 s; unmeasured: last) |
/// | 24-20 | recent failures, at most 31                                   |
/// | 19-0  | index                                                         |
fn rank_key(i: usize, p: &PeerView) -> u64 {
    let free = p.free_slots.saturating_sub(p.our_in_flight).min(p.grant);
    // A float division is several times cheaper than an integer one, and exact here: the
    // quotient of integers this small is never within rounding distance of the next integer.
    // The conversions go through 32 bits: x86-64 converts signed 32/64-bit integers to and
    // from floats in one instruction, while `u64`/`usize` take a branchy sequence each way.
    let small = |n: usize| f64::from(n.min(u32::MAX as usize) as u32);
    let per_mille = u64::from((small(free) * 1000.0 / small(p.grant)) as u32);
    let latency = u64::from((p.latency_ms.max(0.0) * 10.0).min(((1 << 20) - 1) as f64) as u32);
    let flags = (u64::from(free == 0) << 3)
        | (u64::from(p.probation) << 2)
        | (u64::from(p.reliability < RELIABLE) << 1)
        | u64::from(!p.hot);
    flags << 60
        | (1000 - per_mille) << 50
        | u64::from(RELIABILITY_STEPS as u8 - reliability_step(p.reliability)) << 45
        | latency << 25
        | u64::from(p.failures.min(31)) << 20
        | i as u64
}

/// Candidates picked in the building pass; a request tries at most this many peers.
const BEST: usize = 4;

/// Peers in ranked order (see [`rank_peers`]), as indices into the slice that was ranked.
#[derive(Debug, Clone)]
pub struct PeerRanking<'a> {
    /// What was ranked: the keys of the rest are built again only if a fifth is asked for.
    peers: &'a [PeerView],
    /// Eligible peers.
    candidates: usize,
    /// Every candidate's key, sorted; empty until a fifth candidate is asked for (a request
    /// tries at most four, so it never allocates).
    keys: Vec<u64>,
    /// The smallest keys, in order (`u64::MAX` where there are fewer).
    best: [u64; BEST],
    /// Candidates handed out so far.
    next: usize,
}

impl Iterator for PeerRanking<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.next >= self.candidates {
            return None;
        }
        let key = if self.next < BEST {
            self.best[self.next]
        } else {
            if self.keys.is_empty() {
                // Keys are unique, so the sorted keys begin with the ones already handed out.
                self.keys = self
                    .peers
                    .iter()
                    .enumerate()
                    .take(MAX_RANKED)
                    .filter(|(_, p)| eligible(p))
                    .map(|(i, p)| rank_key(i, p))
                    .collect();
                self.keys.sort_unstable();
            }
            self.keys[self.next]
        };
        self.next += 1;
        Some((key & 0xf_ffff) as usize)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.candidates - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for PeerRanking<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;

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

    fn ranked(peers: &[PeerView]) -> Vec<usize> {
        rank_peers(peers).collect()
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
        assert_eq!(ranked(&[flaky_fast, solid_slow, solid_fast]), [2, 1, 0]);
        // Free room still comes first: a reliable peer with none waits behind a flaky one.
        let solid_full = PeerView {
            reliability: 1.0,
            ..peer(0, 0, 2, 1.0, 0)
        };
        assert_eq!(ranked(&[solid_full, flaky_fast]), [1, 0]);
        // An unreliable peer with the model hot ranks after a reliable cold one.
        let flaky_hot = PeerView {
            hot: true,
            ..flaky_fast
        };
        assert_eq!(ranked(&[flaky_hot, solid_slow]), [1, 0]);
    }

    #[test]
    fn a_peer_on_probation_gets_one_probe_after_the_proven_ones() {
        let proven = peer(1, 0, 2, 9.0, 0);
        let probing = PeerView {
            probation: true,
            ..peer(4, 0, 4, 1.0, 0)
        };
        assert_eq!(ranked(&[probing, proven]), [1, 0]);
        let probe_out = PeerView {
            our_in_flight: 1,
            ..probing
        };
        assert_eq!(ranked(&[probe_out, proven]), [1], "one probe at a time");
    }

    #[test]
    fn a_hot_peer_goes_before_a_cold_one_with_more_room() {
        let cold = peer(4, 0, 4, 1.0, 0);
        let hot = PeerView {
            hot: true,
            ..peer(1, 0, 4, 9.0, 0)
        };
        assert_eq!(ranked(&[cold, hot]), vec![1, 0]);
        let busy_hot = PeerView {
            hot: true,
            ..peer(0, 0, 4, 1.0, 0)
        };
        assert_eq!(
            ranked(&[busy_hot, cold]),
            vec![1, 0],
            "a free slot matters more than heat"
        );
    }

    #[test]
    fn peers_at_their_grant_are_never_candidates() {
        assert_eq!(
            ranked(&[peer(4, 2, 2, 1.0, 0), peer(1, 0, 1, 9.0, 0)]),
            vec![1]
        );
        assert_eq!(ranked(&[peer(4, 0, 0, 1.0, 0)]), Vec::<usize>::new());
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
            ranked(&peers),
            vec![3, 2, 1, 0],
            "busy last; equal ratios by latency"
        );
        let peers = [peer(2, 0, 2, 3.0, 2), peer(2, 0, 2, 3.0, 0)];
        assert_eq!(ranked(&peers), vec![1, 0]);
    }

    #[test]
    fn ranking_a_thousand_peers_is_quick_and_total() {
        let peers: Vec<PeerView> = (0..1000)
            .map(|i| peer(i % 5, i % 3, 4, (i % 17) as f64, (i % 4) as u32))
            .collect();
        let order = ranked(&peers);
        assert_eq!(order.len(), 1000);
        let mut seen = order.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 1000);
    }

    /// The ranking rule written the plain way, at the key's resolution: a tuple per peer,
    /// sorted whole.
    fn reference_order(peers: &[PeerView]) -> Vec<usize> {
        let mut keyed: Vec<_> = peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.grant > 0 && p.our_in_flight < p.grant)
            .filter(|(_, p)| !(p.probation && p.our_in_flight > 0))
            .map(|(i, p)| {
                let free = p.free_slots.saturating_sub(p.our_in_flight);
                (
                    free == 0,
                    p.probation,
                    p.reliability < RELIABLE,
                    !p.hot,
                    Reverse(free.min(p.grant) * 1000 / p.grant),
                    Reverse(reliability_step(p.reliability)),
                    (p.latency_ms * 10.0) as u64,
                    p.failures.min(31),
                    i,
                )
            })
            .collect();
        keyed.sort();
        keyed.into_iter().map(|k| k.8).collect()
    }

    #[test]
    fn the_packed_lazy_order_is_the_plain_rule_at_every_length() {
        // A small deterministic generator: varied enough to tie on every field in turn.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for n in [0usize, 1, 3, 4, 5, 9, 64, 1000] {
            let peers: Vec<PeerView> = (0..n)
                .map(|_| PeerView {
                    free_slots: next(6) as usize,
                    hot: next(2) == 0,
                    our_in_flight: next(3) as usize,
                    grant: next(5) as usize,
                    latency_ms: next(40) as f64 * 0.25,
                    failures: next(3) as u32,
                    reliability: 1.0 - next(8) as f64 * 0.04,
                    probation: next(7) == 0,
                })
                .collect();
            let want = reference_order(&peers);
            assert_eq!(ranked(&peers), want, "{n} peers");
            for k in 0..want.len().min(8) {
                let prefix: Vec<usize> = rank_peers(&peers).take(k).collect();
                assert_eq!(prefix, want[..k], "first {k} of {n}");
            }
        }
    }

    #[test]
    fn untagged_name_means_latest() {
        assert!(model_matches("llama3.1:latest", "llama3.1"));
        assert!(!model_matches("llama3.1:8b", "llama3.1"));
        assert!(!model_matches("llama3.1:latest", "llama3.1:8b"));
    }
}
