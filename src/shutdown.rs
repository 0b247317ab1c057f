//! Prompt shutdown: on SIGTERM the listeners stop accepting at once (Pingora), and the process
//! exits as soon as nothing is in flight (and the mDNS goodbye went out) instead of sleeping
//! through the whole grace period; requests still running get the grace period, as before.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::server::ExecutionPhase;
use tokio::sync::broadcast;

/// How often the drain watcher looks at the in-flight count during the grace period.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Requests being served by any listener of this node.
#[derive(Debug, Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    /// Counts a request until the returned guard is dropped (however the handler ends).
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    /// Requests in flight now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One request in flight; dropping it ends the count.
#[derive(Debug)]
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Time the goodbyes (the mDNS goodbye, the registry withdrawal with its 3 s timeout) get at
/// shutdown, whatever the request grace period says: with `shutdown_grace_secs = 0` Pingora
/// dropped the runtimes at once and a registry record stayed listed until its TTL ran out.
pub const GOODBYE_BUDGET: Duration = Duration::from_secs(4);

/// The grace period to give Pingora: the request grace, or the goodbye budget when a
/// background service has a goodbye to send. The drain watcher ends the process as soon as
/// everything is done, so a longer bound costs nothing when the goodbyes are quick.
pub fn pingora_grace(request_grace: Duration, has_goodbyes: bool) -> Duration {
    if has_goodbyes {
        request_grace.max(GOODBYE_BUDGET)
    } else {
        request_grace
    }
}

/// Whether the process may exit now: every goodbye was sent, and no request is in flight
/// unless the request grace period is over.
fn drained(in_flight: usize, requests_over: bool, background_done: &[Arc<AtomicBool>]) -> bool {
    (in_flight == 0 || requests_over) && background_done.iter().all(|d| d.load(Ordering::SeqCst))
}

/// Watches Pingora's execution phases from its own thread; once the grace period starts, ends
/// the process as soon as `in_flight` is zero (or `request_grace` is over) and every
/// `background_done` flag (the mDNS goodbye, the registry withdrawal) is set, or leaves it to
/// Pingora when its grace period ([`pingora_grace`]) runs out first.
///
/// `before_exit` (writing out the buffered audit lines) runs right before this thread ends the
/// process. When the grace period runs out first, Pingora's `run` returns and the node writes
/// them out itself before it exits (see `Node::run`).
pub fn exit_when_drained(
    mut phases: broadcast::Receiver<ExecutionPhase>,
    in_flight: Arc<InFlight>,
    background_done: Vec<Arc<AtomicBool>>,
    request_grace: Duration,
    before_exit: impl FnOnce() + Send + 'static,
) {
    let has_goodbyes = background_done.iter().any(|d| !d.load(Ordering::SeqCst));
    let grace = pingora_grace(request_grace, has_goodbyes);
    let spawned = std::thread::Builder::new()
        .name("arknet drain".to_string())
        .spawn(move || {
            loop {
                match phases.blocking_recv() {
                    Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
            let start = Instant::now();
            let deadline = start + grace;
            let requests_over = start + request_grace;
            loop {
                let now = Instant::now();
                if drained(in_flight.count(), now >= requests_over, &background_done) {
                    tracing::info!(
                        "nothing in flight; exiting without waiting for the grace period"
                    );
                    before_exit();
                    std::process::exit(0);
                }
                if now >= deadline {
                    return;
                }
                std::thread::sleep(DRAIN_POLL);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no drain watcher; shutdown waits the whole grace period");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goodbyes_get_their_budget_even_with_no_request_grace() {
        assert_eq!(pingora_grace(Duration::ZERO, true), GOODBYE_BUDGET);
        assert_eq!(pingora_grace(Duration::ZERO, false), Duration::ZERO);
        let long = Duration::from_secs(30);
        assert_eq!(pingora_grace(long, true), long);
    }

    #[test]
    fn exit_waits_for_every_goodbye_and_for_requests_within_their_grace() {
        let pending = vec![
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(false)),
        ];
        assert!(!drained(0, false, &pending), "a goodbye is still pending");
        assert!(
            !drained(0, true, &pending),
            "request grace over, goodbye still pending"
        );
        pending[1].store(true, Ordering::SeqCst);
        assert!(drained(0, false, &pending));
        assert!(
            !drained(2, false, &pending),
            "requests in flight within their grace"
        );
        assert!(
            drained(2, true, &pending),
            "request grace over: they are cut"
        );
        assert!(drained(0, false, &[]));
    }
}
