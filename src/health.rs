//! Health of the node's own backends, and quiet logs about failures that repeat.
//!
//! A backend that refused a connection is *down*: requests skip it (going straight to the
//! next backend or to the peers) until a background probe (a model listing) answers again.
//! Probes back off from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], so a dead backend costs one
//! probe per backoff period instead of a connect attempt and a log line per request.
//!
//! [`WarnLimiter`] turns a flood of identical warnings into the first one plus, at most once
//! per [`REPEAT_WINDOW`], one line that says how many were suppressed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::catalog::listing_path;
use crate::upstream::{Backend, Upstream};

/// Down time after the first failure; it doubles with each failed probe.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between two probes of a down backend: its owner restarting it should not wait
/// long for the node to notice.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often the probe loop looks for a down backend whose probe is due.
const PROBE_TICK: Duration = Duration::from_millis(200);
/// Window in which identical warnings after the first are counted instead of logged.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(10);

/// Up or down, and until when a down backend is left alone.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `Some` while down: when the next probe (or request) may try it.
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Health {
    /// Whether requests may use the backend now: it is up.
    pub fn is_up(&self) -> bool {
        self.lock().retry_at.is_none()
    }

    /// Notes a failure to reach the backend; it is down for the (growing) backoff. Returns
    /// the backoff when the backend was up until now, so that only that transition is logged.
    pub fn failed(&self) -> Option<Duration> {
        let mut s = self.lock();
        let was_up = s.retry_at.is_none();
        s.backoff = if was_up {
            FIRST_BACKOFF
        } else {
            (s.backoff * 2).min(MAX_BACKOFF)
        };
        s.retry_at = Some(Instant::now() + s.backoff);
        was_up.then_some(s.backoff)
    }

    /// Notes that the backend answered; returns true when it was down until now.
    pub fn succeeded(&self) -> bool {
        let mut s = self.lock();
        let was_down = s.retry_at.is_some();
        *s = State::default();
        was_down
    }

    /// Whether the backend is down and its next probe is due.
    fn probe_due(&self) -> bool {
        self.lock().retry_at.is_some_and(|t| Instant::now() >= t)
    }

    /// Time left until the next probe, when down.
    pub fn retry_in(&self) -> Option<Duration> {
        self.lock()
            .retry_at
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Background probes of down backends: a model listing that answers brings one back up.
pub struct BackendProbe {
    /// The node's backends (shared with the relays, so they see the same health).
    pub backends: Arc<Vec<Backend>>,
    /// A client of its own: the probe runs on its own runtime.
    pub upstream: Arc<Upstream>,
}

#[async_trait]
impl BackgroundService for BackendProbe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            for b in self.backends.iter().filter(|b| b.health.probe_due()) {
                let path = b.upstream_path(listing_path(b.config.kind));
                match self
                    .upstream
                    .get_json(b.peer(), &b.config.url.authority, &path)
                    .await
                {
                    Ok(_) => {
                        if b.health.succeeded() {
                            tracing::info!(backend = %b.config.name, "backend is up again; using it");
                        }
                    }
                    Err(e) => {
                        b.health.failed();
                        tracing::debug!(backend = %b.config.name, error = %e, "backend still down");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(PROBE_TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Rate limit for identical warnings (same key): the first is logged, later ones within
/// [`REPEAT_WINDOW`] are counted, and the next one after the window is logged with that count.
#[derive(Debug, Default)]
pub struct WarnLimiter {
    seen: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug)]
struct Seen {
    logged_at: Instant,
    suppressed: u64,
}

/// Keys remembered at most; a flood of distinct keys must not grow memory without bound.
const MAX_KEYS: usize = 1024;

impl WarnLimiter {
    /// Whether a warning with `key` should be logged now; `Some(n)` with the number of
    /// identical warnings suppressed since the last one logged, `None` to stay silent.
    pub fn check(&self, key: &str) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(s) = seen.get_mut(key) {
            if now.duration_since(s.logged_at) < REPEAT_WINDOW {
                s.suppressed += 1;
                return None;
            }
            let n = s.suppressed;
            *s = Seen {
                logged_at: now,
                suppressed: 0,
            };
            return Some(n);
        }
        if seen.len() >= MAX_KEYS {
            seen.retain(|_, s| now.duration_since(s.logged_at) < REPEAT_WINDOW);
        }
        seen.insert(
            key.to_string(),
            Seen {
                logged_at: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// Logs a warning through `limiter`: the first of a kind at once, repeats as one line with a
/// count (`repeated` = how many identical ones were not logged).
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $key:expr, $($arg:tt)+) => {
        if let Some(repeated) = $limiter.check($key) {
            if repeated == 0 {
                tracing::warn!($($arg)+);
            } else {
                tracing::warn!(repeated, $($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_backend_is_down_with_a_growing_backoff_until_it_answers() {
        let h = Health::default();
        assert!(h.is_up());
        assert_eq!(h.failed(), Some(FIRST_BACKOFF));
        assert!(!h.is_up());
        assert!(!h.probe_due(), "not before the backoff passed");
        assert_eq!(h.failed(), None, "already down: not a transition");
        assert!(h.retry_in().is_some_and(|d| d > FIRST_BACKOFF));
        for _ in 0..10 {
            h.failed();
        }
        assert!(h.retry_in().is_some_and(|d| d <= MAX_BACKOFF));
        assert!(h.succeeded());
        assert!(h.is_up());
        assert!(!h.succeeded(), "already up: not a transition");
    }

    #[test]
    fn identical_warnings_are_counted_not_repeated() {
        let l = WarnLimiter::default();
        assert_eq!(l.check("a"), Some(0));
        for _ in 0..100 {
            assert_eq!(l.check("a"), None);
        }
        assert_eq!(l.check("b"), Some(0), "other keys are independent");
        l.seen
            .lock()
            .expect("lock")
            .get_mut("a")
            .expect("a")
            .logged_at -= REPEAT_WINDOW;
        assert_eq!(l.check("a"), Some(100));
        assert_eq!(l.check("a"), None);
    }
}
