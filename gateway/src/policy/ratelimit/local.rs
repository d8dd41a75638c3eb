//! In-process GCRA limits with `governor`: one keyed limiter per window,
//! keys pre-hashed to `u64` so a check allocates nothing.
//!
//! Several windows: all must admit. They are checked from the shortest
//! period to the longest and the first refusal stops the check, so a burst
//! refused by the per-second window does not spend the hourly budget. A
//! request refused by a longer window has spent one cell of the shorter
//! windows checked before it; those refill within their (short) period, so
//! the cost is bounded by one short-window cell per refused request.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use super::{Decision, WindowSpec};
use crate::policy::shared::{self, Sweep};
use crate::prehashed::PreHashed;

/// Keys are already keyed hashes (`RateLimit::check`): the map takes their
/// bits as they are.
type Keyed =
    RateLimiter<u64, DashMapStateStore<u64, PreHashed>, DefaultClock, StateInformationMiddleware>;

/// The windows of one route's limit.
pub struct Local {
    /// Sorted by period, shortest first.
    windows: Vec<(WindowSpec, Keyed)>,
    swept: AtomicBool,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field(
                "windows",
                &self.windows.iter().map(|w| w.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Local {
    pub fn new(specs: &[WindowSpec]) -> Local {
        let mut specs = specs.to_vec();
        specs.sort_by_key(|w| w.per);
        let windows = specs
            .into_iter()
            .map(|w| {
                let quota = Quota::with_period(w.emission_interval())
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                    .allow_burst(NonZeroU32::new(w.burst).unwrap_or(NonZeroU32::MIN));
                let limiter = RateLimiter::dashmap_with_clock_and_hasher(
                    quota,
                    DefaultClock::default(),
                    PreHashed::default(),
                )
                .with_middleware::<StateInformationMiddleware>();
                (w, limiter)
            })
            .collect();
        Local {
            windows,
            swept: AtomicBool::new(false),
        }
    }

    /// Takes one cell for `key` from every window, or reports the window
    /// that refuses.
    pub fn check(self: &Arc<Self>, key: u64) -> Decision {
        if !self.swept.load(Ordering::Relaxed) && !self.swept.swap(true, Ordering::Relaxed) {
            let weak: std::sync::Weak<dyn Sweep> = Arc::downgrade(self) as _;
            shared::sweep_later(weak);
        }
        let mut best: Option<Decision> = None;
        for (spec, limiter) in &self.windows {
            match limiter.check_key(&key) {
                Ok(snap) => {
                    let remaining = snap.remaining_burst_capacity();
                    let used = spec.burst.saturating_sub(remaining);
                    let d = Decision {
                        allowed: true,
                        limit: u64::from(spec.burst),
                        remaining: u64::from(remaining),
                        reset: spec.emission_interval() * used,
                        retry_after: Duration::ZERO,
                        quota: false,
                    };
                    best = Some(best.map_or(d, |b| b.tighter(d)));
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(limiter.clock().now());
                    return Decision {
                        allowed: false,
                        limit: u64::from(spec.burst),
                        remaining: 0,
                        reset: spec.emission_interval() * spec.burst,
                        retry_after: wait,
                        quota: false,
                    };
                }
            }
        }
        best.unwrap_or(Decision::UNLIMITED)
    }
}

impl Sweep for Local {
    fn sweep(&self) {
        for (_, l) in &self.windows {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(requests: u32, per_ms: u64, burst: u32) -> WindowSpec {
        WindowSpec {
            requests,
            per: Duration::from_millis(per_ms),
            burst,
        }
    }

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let l = Arc::new(Local::new(&[spec(10, 10_000, 3)]));
        for left in [2, 1, 0] {
            let d = l.check(1);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
            assert_eq!(d.limit, 3);
        }
        let d = l.check(1);
        assert!(!d.allowed);
        assert!(d.retry_after > Duration::from_millis(900), "{d:?}");
        assert!(d.retry_after <= Duration::from_millis(1000), "{d:?}");
        // Another key has its own bucket.
        assert!(l.check(2).allowed);
    }

    #[test]
    fn every_window_must_admit_and_short_refusals_spare_long_windows() {
        // 2 per 100 ms, 5 per hour.
        let l = Arc::new(Local::new(&[spec(5, 3_600_000, 5), spec(2, 100, 2)]));
        assert!(l.check(7).allowed);
        assert!(l.check(7).allowed);
        // Refused by the short window: the hourly one keeps its 3 cells.
        for _ in 0..10 {
            assert!(!l.check(7).allowed);
        }
        std::thread::sleep(Duration::from_millis(120));
        let d = l.check(7);
        assert!(d.allowed);
        assert_eq!(d.remaining, 1, "the short window reports (1 left)");
    }

    #[test]
    fn check_is_cheap() {
        let l = Arc::new(Local::new(&[spec(1_000_000_000, 1_000, 1_000_000_000)]));
        let n = 200_000u64;
        let start = std::time::Instant::now();
        for i in 0..n {
            std::hint::black_box(l.check(i % 1024));
        }
        let per = start.elapsed() / u32::try_from(n).unwrap();
        eprintln!("local rate-limit check: {per:?}");
        // Well under a microsecond in release builds; debug builds and a
        // busy machine get generous slack.
        assert!(per < Duration::from_micros(20), "{per:?} per check");
    }
}
