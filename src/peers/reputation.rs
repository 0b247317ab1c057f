//! Reputation of approved peers (DESIGN §9): how reliably and how fast each one served us,
//! kept across restarts, and the outlier ejection that routing applies.
//!
//! Per peer: hello success per hour for the last week (uptime over the last hour, day and
//! week), time to first byte (EWMA and p95 of the last [`TTFB_SAMPLES`]), request success
//! (EWMA and totals), generated tokens per second (EWMA) and consecutive failures.
//!
//! Ejection follows Envoy's outlier detection: [`EJECT_AFTER`] consecutive failures eject a peer
//! for a backoff that doubles with each ejection ([`BASE_EJECTION`] up to [`MAX_EJECTION`]);
//! never more than [`MAX_EJECTED_SHARE`] of the peers are ejected at once; when its time is up
//! one probe request decides: success clears it, failure ejects it again for longer.
//!
//! The state is pure data with pure methods (time is an argument); [`Reputations`] holds it for
//! the node and writes it to `<data_dir>/reputation.json` atomically.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::identity::PublicKey;

/// File name in the data dir.
pub const FILE_NAME: &str = "reputation.json";
/// Consecutive failures that eject a peer.
pub const EJECT_AFTER: u32 = 3;
/// First ejection, in seconds; doubles with each further ejection.
pub const BASE_EJECTION: u64 = 10;
/// Longest ejection, in seconds.
pub const MAX_EJECTION: u64 = 300;
/// Largest share of the approved peers ejected at once.
pub const MAX_EJECTED_SHARE: f64 = 0.5;
/// Time-to-first-byte samples kept for the p95.
pub const TTFB_SAMPLES: usize = 64;
/// Weight of the newest sample in the moving averages.
const EWMA_ALPHA: f64 = 0.2;
/// Hours of hello history kept (a week).
const HOURS_KEPT: u64 = 24 * 7;

/// Hello outcomes within one hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourBucket {
    /// Hours since the Unix epoch.
    pub hour: u64,
    /// Hellos answered.
    pub ok: u32,
    /// Hellos sent.
    pub total: u32,
}

/// Everything remembered about one peer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerRecord {
    /// Hello outcomes per hour, oldest first.
    pub hellos: VecDeque<HourBucket>,
    /// Time to first byte, moving average (ms).
    pub ttfb_ewma_ms: Option<f64>,
    /// Recent times to first byte (ms), for the p95.
    pub ttfb_recent: VecDeque<f64>,
    /// Request success, moving average (1 = every request answered).
    pub success_ewma: Option<f64>,
    /// Requests that were answered.
    pub requests_ok: u64,
    /// Requests that failed (connect, timeout, refusal, broken stream).
    pub requests_failed: u64,
    /// Generated tokens per second, moving average.
    pub tokens_per_sec_ewma: Option<f64>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Times ejected so far (sets the next backoff); cleared by a successful probe.
    pub ejections: u32,
    /// Unix seconds until which the peer is ejected.
    pub ejected_until: Option<u64>,
}

/// How one request to a peer went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestOutcome {
    /// The peer answered and the response was relayed whole.
    pub ok: bool,
    /// Time to the first response byte (ms), when one came.
    pub ttfb_ms: Option<f64>,
    /// Generated tokens relayed.
    pub tokens: Option<u64>,
    /// Seconds from the first byte to the end.
    pub generation_secs: f64,
}

impl RequestOutcome {
    /// A request the peer did not answer (connect failure, timeout, refusal).
    pub fn failed() -> Self {
        RequestOutcome {
            ok: false,
            ttfb_ms: None,
            tokens: None,
            generation_secs: 0.0,
        }
    }
}

/// Whether routing may use a peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// In good standing.
    Good,
    /// Ejected: not tried until its time is up.
    Ejected,
    /// Its ejection is over: one probe request may go.
    Probation,
}

/// What the owner sees (`/peers/status`, CLI, admin page).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Share of hellos answered in the last hour, day and week (`None`: no hello yet).
    pub uptime_hour: Option<f64>,
    /// Over the last day.
    pub uptime_day: Option<f64>,
    /// Over the last week.
    pub uptime_week: Option<f64>,
    /// Time to first byte, moving average (ms).
    pub ttfb_ewma_ms: Option<f64>,
    /// Time to first byte, 95th percentile of recent requests (ms).
    pub ttfb_p95_ms: Option<f64>,
    /// Share of requests answered, moving average.
    pub success_rate: Option<f64>,
    /// Requests answered and failed, all time.
    pub requests_ok: u64,
    /// Requests failed, all time.
    pub requests_failed: u64,
    /// Generated tokens per second served to us, moving average.
    pub tokens_per_sec: Option<f64>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// `good`, `ejected` or `probation`.
    pub standing: &'static str,
    /// Seconds until an ejection ends.
    pub ejected_for_secs: Option<u64>,
}

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    old.map_or(sample, |o| o + EWMA_ALPHA * (sample - o))
}

impl PeerRecord {
    /// Records a hello at `now` (Unix seconds).
    pub fn hello(&mut self, ok: bool, now: u64) {
        let hour = now / 3600;
        match self.hellos.back_mut() {
            Some(b) if b.hour == hour => {
                b.total += 1;
                b.ok += u32::from(ok);
            }
            _ => self.hellos.push_back(HourBucket {
                hour,
                ok: u32::from(ok),
                total: 1,
            }),
        }
        while self
            .hellos
            .front()
            .is_some_and(|b| b.hour + HOURS_KEPT <= hour)
        {
            self.hellos.pop_front();
        }
    }

    /// Records a request at `now`; returns true when this failure ejects the peer (the caller
    /// decides with [`may_eject`] whether the share of ejected peers allows it).
    pub fn request(&mut self, outcome: RequestOutcome, now: u64, may_eject: bool) -> bool {
        self.success_ewma = Some(ewma(self.success_ewma, f64::from(u8::from(outcome.ok))));
        if let Some(t) = outcome.ttfb_ms {
            self.ttfb_ewma_ms = Some(ewma(self.ttfb_ewma_ms, t));
            self.ttfb_recent.push_back(t);
            while self.ttfb_recent.len() > TTFB_SAMPLES {
                self.ttfb_recent.pop_front();
            }
        }
        if outcome.ok {
            self.requests_ok += 1;
            self.consecutive_failures = 0;
            // A successful request (the probe, after an ejection) clears the record.
            self.ejections = 0;
            self.ejected_until = None;
            if let (Some(n), true) = (outcome.tokens, outcome.generation_secs > 0.05) {
                let rate = n as f64 / outcome.generation_secs;
                self.tokens_per_sec_ewma = Some(ewma(self.tokens_per_sec_ewma, rate));
            }
            return false;
        }
        self.requests_failed += 1;
        self.consecutive_failures += 1;
        let on_probation = self.ejected_until.is_some_and(|t| t <= now);
        let eject = on_probation || self.consecutive_failures >= EJECT_AFTER;
        if !(eject && may_eject) {
            return false;
        }
        self.ejections += 1;
        let backoff = BASE_EJECTION
            .saturating_mul(1 << (self.ejections - 1).min(16))
            .min(MAX_EJECTION);
        self.ejected_until = Some(now + backoff);
        true
    }

    /// Whether routing may use the peer at `now`.
    pub fn standing(&self, now: u64) -> Standing {
        standing(self.ejected_until, now)
    }

    /// Share of requests answered, 1.0 before any request (innocent until proven flaky).
    pub fn reliability(&self) -> f64 {
        self.success_ewma.unwrap_or(1.0)
    }

    fn uptime(&self, now: u64, hours: u64) -> Option<f64> {
        let since = (now / 3600).saturating_sub(hours - 1);
        let (ok, total) = self
            .hellos
            .iter()
            .filter(|b| b.hour >= since)
            .fold((0u64, 0u64), |(o, t), b| {
                (o + u64::from(b.ok), t + u64::from(b.total))
            });
        (total > 0).then(|| ok as f64 / total as f64)
    }

    fn ttfb_p95(&self) -> Option<f64> {
        if self.ttfb_recent.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.ttfb_recent.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let i = ((v.len() as f64) * 0.95).ceil() as usize;
        v.get(i.saturating_sub(1)).copied()
    }

    /// What the owner sees at `now`.
    pub fn summary(&self, now: u64) -> Summary {
        let standing = self.standing(now);
        Summary {
            uptime_hour: self.uptime(now, 1),
            uptime_day: self.uptime(now, 24),
            uptime_week: self.uptime(now, HOURS_KEPT),
            ttfb_ewma_ms: self.ttfb_ewma_ms,
            ttfb_p95_ms: self.ttfb_p95(),
            success_rate: self.success_ewma,
            requests_ok: self.requests_ok,
            requests_failed: self.requests_failed,
            tokens_per_sec: self.tokens_per_sec_ewma,
            consecutive_failures: self.consecutive_failures,
            standing: match standing {
                Standing::Good => "good",
                Standing::Ejected => "ejected",
                Standing::Probation => "probation",
            },
            ejected_for_secs: self
                .ejected_until
                .filter(|_| standing == Standing::Ejected)
                .map(|t| t - now),
        }
    }
}

/// Standing at `now` of a peer ejected until `ejected_until`.
pub fn standing(ejected_until: Option<u64>, now: u64) -> Standing {
    match ejected_until {
        Some(t) if t > now => Standing::Ejected,
        Some(_) => Standing::Probation,
        None => Standing::Good,
    }
}

/// What routing reads of a record: TTFB average (ms), reliability, ejected until.
pub type RoutingFacts = (Option<f64>, f64, Option<u64>);

/// Share by which the TTFB average must move before the ranking is worth republishing.
const TTFB_MOVE: f64 = 0.2;

/// Whether a record changed in a way the ranking can see: ejection, a reliability step, or the
/// TTFB average moving by more than [`TTFB_MOVE`]. Smaller moves wait for the next hello's
/// republish, so a steady peer does not cost a snapshot rebuild per request.
pub fn ranking_moved(before: RoutingFacts, after: RoutingFacts) -> bool {
    let step = crate::routing::reliability_step;
    let ttfb_moved = match (before.0, after.0) {
        (Some(b), Some(a)) => (a - b).abs() > b.abs() * TTFB_MOVE,
        (b, a) => b.is_some() != a.is_some(),
    };
    before.2 != after.2 || step(before.1) != step(after.1) || ttfb_moved
}

/// Whether one more peer may be ejected when `ejected` of `peers` are already.
pub fn may_eject(ejected: usize, peers: usize) -> bool {
    let cap = ((peers as f64) * MAX_EJECTED_SHARE).floor() as usize;
    ejected < cap.max(1)
}

/// The node's reputation records, by peer key, persisted in the data dir.
pub struct Reputations {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: BTreeMap<PublicKey, PeerRecord>,
    dirty: bool,
    flushed_at: u64,
}

/// Seconds between two writes of the file while records change (a crash loses at most this).
const FLUSH_EVERY: u64 = 5;

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Reputations {
    /// Loads `<data_dir>/reputation.json` (a missing or unreadable file starts afresh; an
    /// unreadable one is logged and kept aside, never silently overwritten).
    pub fn open(data_dir: &Path) -> Self {
        let path = data_dir.join(FILE_NAME);
        let records = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<BTreeMap<String, PeerRecord>>(&bytes) {
                Ok(by_key) => by_key
                    .into_iter()
                    .filter_map(|(k, r)| Some((k.parse().ok()?, r)))
                    .collect(),
                Err(e) => {
                    let aside = path.with_extension("json.corrupt");
                    tracing::warn!(file = %path.display(), error = %e, aside = %aside.display(), "reputation file unreadable; starting afresh and keeping it aside");
                    let _ = std::fs::rename(&path, &aside);
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
        Reputations {
            path,
            inner: Mutex::new(Inner {
                records,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a hello to `key`.
    pub fn hello(&self, key: &PublicKey, ok: bool, now: u64) {
        let mut inner = self.lock();
        inner.records.entry(*key).or_default().hello(ok, now);
        inner.dirty = true;
    }

    /// Records a request to `key`, ejecting it when the rules say so and the share of ejected
    /// peers among `peers` allows it; returns whether it was ejected.
    pub fn request(
        &self,
        key: &PublicKey,
        outcome: RequestOutcome,
        now: u64,
        peers: usize,
    ) -> bool {
        let mut inner = self.lock();
        let ejected = inner
            .records
            .iter()
            .filter(|(k, r)| *k != key && r.standing(now) == Standing::Ejected)
            .count();
        let allowed = may_eject(ejected, peers);
        inner.dirty = true;
        inner
            .records
            .entry(*key)
            .or_default()
            .request(outcome, now, allowed)
    }

    /// What routing needs of `key`'s record (TTFB average, reliability, ejection), without
    /// copying its history.
    pub fn routing_facts(&self, key: &PublicKey) -> RoutingFacts {
        self.lock().records.get(key).map_or((None, 1.0, None), |r| {
            (r.ttfb_ewma_ms, r.reliability(), r.ejected_until)
        })
    }

    /// A copy of `key`'s record.
    pub fn get(&self, key: &PublicKey) -> PeerRecord {
        self.lock().records.get(key).cloned().unwrap_or_default()
    }

    /// [`Self::flush`], at most every [`FLUSH_EVERY`] seconds.
    pub fn flush_if_due(&self, now: u64) -> std::io::Result<()> {
        if self.lock().flushed_at + FLUSH_EVERY > now {
            return Ok(());
        }
        self.flush_at(now)
    }

    /// Writes the records when they changed since the last write (temp file, fsync, rename).
    pub fn flush(&self) -> std::io::Result<()> {
        self.flush_at(unix_now())
    }

    fn flush_at(&self, now: u64) -> std::io::Result<()> {
        let bytes = {
            let mut inner = self.lock();
            if !inner.dirty {
                return Ok(());
            }
            inner.dirty = false;
            inner.flushed_at = now;
            let by_key: BTreeMap<String, &PeerRecord> = inner
                .records
                .iter()
                .map(|(k, r)| (k.to_string(), r))
                .collect();
            serde_json::to_vec_pretty(&by_key).map_err(std::io::Error::other)?
        };
        crate::fsutil::write_atomic(&self.path, &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn failed() -> RequestOutcome {
        RequestOutcome::failed()
    }

    fn served(ttfb_ms: f64) -> RequestOutcome {
        RequestOutcome {
            ok: true,
            ttfb_ms: Some(ttfb_ms),
            tokens: Some(100),
            generation_secs: 2.0,
        }
    }

    #[test]
    fn consecutive_failures_eject_with_a_backoff_that_grows() {
        let mut r = PeerRecord::default();
        assert!(!r.request(failed(), NOW, true));
        assert!(!r.request(failed(), NOW, true));
        assert!(r.request(failed(), NOW, true), "the third failure ejects");
        assert_eq!(r.standing(NOW + BASE_EJECTION - 1), Standing::Ejected);
        assert_eq!(r.standing(NOW + BASE_EJECTION), Standing::Probation);
        // The probe fails: ejected again, for twice as long.
        let later = NOW + BASE_EJECTION;
        assert!(r.request(failed(), later, true));
        assert_eq!(r.ejected_until, Some(later + 2 * BASE_EJECTION));
        // Backoff is capped.
        r.ejections = 30;
        let t = later + 1000;
        assert!(r.request(failed(), t, true));
        assert_eq!(r.ejected_until, Some(t + MAX_EJECTION));
    }

    #[test]
    fn a_successful_probe_returns_the_peer_to_good_standing() {
        let mut r = PeerRecord::default();
        for _ in 0..EJECT_AFTER {
            r.request(failed(), NOW, true);
        }
        let later = NOW + BASE_EJECTION;
        assert_eq!(r.standing(later), Standing::Probation);
        assert!(!r.request(served(50.0), later, true));
        assert_eq!(r.standing(later), Standing::Good);
        assert_eq!((r.ejections, r.consecutive_failures), (0, 0));
    }

    #[test]
    fn never_more_than_half_of_the_peers_are_ejected() {
        assert!(may_eject(0, 1), "a lone peer may be ejected");
        assert!(may_eject(0, 4) && may_eject(1, 4));
        assert!(!may_eject(2, 4), "two of four already out");
        let mut r = PeerRecord::default();
        for _ in 0..5 {
            assert!(!r.request(failed(), NOW, false));
        }
        assert_eq!(
            r.standing(NOW),
            Standing::Good,
            "not ejected when the share is used up"
        );
        assert_eq!(r.consecutive_failures, 5);
    }

    #[test]
    fn uptime_covers_the_hour_the_day_and_the_week() {
        let mut r = PeerRecord::default();
        // A week ago: all down. Yesterday: half. This hour: all up.
        for _ in 0..4 {
            r.hello(false, NOW - 6 * 24 * 3600);
        }
        r.hello(true, NOW - 20 * 3600);
        r.hello(false, NOW - 20 * 3600);
        for _ in 0..2 {
            r.hello(true, NOW);
        }
        let s = r.summary(NOW);
        assert_eq!(s.uptime_hour, Some(1.0));
        assert_eq!(s.uptime_day, Some(0.75));
        assert_eq!(s.uptime_week, Some(3.0 / 8.0));
        // Older than a week is forgotten.
        r.hello(true, NOW + 7 * 24 * 3600);
        assert!(r
            .hellos
            .iter()
            .all(|b| b.hour + HOURS_KEPT > (NOW + 7 * 24 * 3600) / 3600));
    }

    #[test]
    fn latency_rate_and_p95_follow_the_samples() {
        let mut r = PeerRecord::default();
        for i in 1..=100 {
            r.request(served(f64::from(i)), NOW, true);
        }
        let s = r.summary(NOW);
        assert_eq!(r.ttfb_recent.len(), TTFB_SAMPLES);
        assert_eq!(s.ttfb_p95_ms, Some(97.0));
        assert!(s.ttfb_ewma_ms.is_some_and(|t| t > 90.0 && t < 100.0));
        assert_eq!(s.tokens_per_sec, Some(50.0));
        assert_eq!(s.success_rate, Some(1.0));
        r.request(failed(), NOW, true);
        assert!(r.reliability() < 1.0);
    }

    #[test]
    fn only_changes_the_ranking_can_see_republish_the_snapshot() {
        let steady = (Some(100.0), 1.0, None);
        assert!(!ranking_moved(steady, (Some(110.0), 0.99, None)), "noise");
        assert!(
            ranking_moved(steady, (Some(130.0), 1.0, None)),
            "TTFB moved by 30%"
        );
        assert!(
            ranking_moved((None, 1.0, None), steady),
            "first measurement"
        );
        assert!(
            ranking_moved(steady, (Some(100.0), 0.8, None)),
            "a reliability step"
        );
        assert!(
            ranking_moved(steady, (Some(100.0), 1.0, Some(NOW))),
            "ejected"
        );
    }

    #[test]
    fn records_survive_a_restart_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = PublicKey::from_bytes([7; 32]);
        let reps = Reputations::open(dir.path());
        reps.hello(&key, true, NOW);
        reps.request(&key, served(12.0), NOW, 1);
        reps.flush().expect("flush");
        let again = Reputations::open(dir.path());
        assert_eq!(again.get(&key), reps.get(&key));
        std::fs::write(dir.path().join(FILE_NAME), b"{torn").expect("write");
        let fresh = Reputations::open(dir.path());
        assert_eq!(fresh.get(&key), PeerRecord::default());
        assert!(
            dir.path().join("reputation.json.corrupt").exists(),
            "kept aside"
        );
    }
}
