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

/// Watches Pingora's execution phases from its own thread; once the grace period starts, ends
/// the process as soon as `in_flight` is zero and every `background_done` flag (the mDNS
/// goodbye, the registry withdrawal) is set,
/// or leaves it to Pingora when the grace period runs out first.
pub fn exit_when_drained(
    mut phases: broadcast::Receiver<ExecutionPhase>,
    in_flight: Arc<InFlight>,
    background_done: Vec<Arc<AtomicBool>>,
    grace: Duration,
) {
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
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if in_flight.count() == 0
                    && background_done.iter().all(|d| d.load(Ordering::SeqCst))
                {
                    tracing::info!(
                        "nothing in flight; exiting without waiting for the grace period"
                    );
                    std::process::exit(0);
                }
                std::thread::sleep(DRAIN_POLL);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no drain watcher; shutdown waits the whole grace period");
    }
}
