//! A process-wide millisecond clock and a lock-free rolling window of two
//! counters, shared by the circuit breaker, the retry budget and the
//! per-target error counts.
//!
//! The window is approximate by design: a bucket is reset by whichever
//! thread first sees it stale, and an increment racing with that reset can
//! be lost. For rates over hundreds of requests this does not matter, and it
//! keeps the hot path to a few relaxed atomics.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static START: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the first call in this process (never 0 after it).
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// `now_ms()` as it was at `at`, for a caller that has read the clock
/// already (an instant before the first call counts as the first
/// millisecond).
pub fn ms_at(at: Instant) -> u64 {
    let start = START.get_or_init(|| at);
    u64::try_from(at.saturating_duration_since(*start).as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Milliseconds in `d`, saturating.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Bucket {
    epoch: AtomicU64,
    a: AtomicU64,
    b: AtomicU64,
}

/// Two counters (say, requests and failures) over the last `span`.
pub struct Window {
    buckets: Box<[Bucket]>,
    width: u64,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = self.sum(now_ms());
        f.debug_struct("Window")
            .field("a", &a)
            .field("b", &b)
            .finish()
    }
}

const BUCKETS: u64 = 10;

impl Window {
    pub fn new(span: Duration) -> Window {
        let width = (ms(span) / BUCKETS).max(1);
        Window {
            buckets: (0..BUCKETS)
                .map(|_| Bucket {
                    epoch: AtomicU64::new(0),
                    a: AtomicU64::new(0),
                    b: AtomicU64::new(0),
                })
                .collect(),
            width,
        }
    }

    fn bucket(&self, now: u64) -> &Bucket {
        let epoch = now / self.width;
        let i = usize::try_from(epoch % BUCKETS).unwrap_or(0);
        let bucket = &self.buckets[i];
        if bucket.epoch.load(Ordering::Relaxed) != epoch
            && bucket.epoch.swap(epoch, Ordering::Relaxed) != epoch
        {
            bucket.a.store(0, Ordering::Relaxed);
            bucket.b.store(0, Ordering::Relaxed);
        }
        bucket
    }

    pub fn add(&self, now: u64, a: u64, b: u64) {
        let bucket = self.bucket(now);
        if a > 0 {
            bucket.a.fetch_add(a, Ordering::Relaxed);
        }
        if b > 0 {
            bucket.b.fetch_add(b, Ordering::Relaxed);
        }
    }

    /// Totals over the window ending at `now`.
    pub fn sum(&self, now: u64) -> (u64, u64) {
        let epoch = now / self.width;
        let oldest = epoch.saturating_sub(BUCKETS - 1);
        self.buckets
            .iter()
            .filter(|b| {
                let e = b.epoch.load(Ordering::Relaxed);
                e >= oldest && e <= epoch
            })
            .fold((0, 0), |(a, b), k| {
                (
                    a + k.a.load(Ordering::Relaxed),
                    b + k.b.load(Ordering::Relaxed),
                )
            })
    }

    /// Forgets everything.
    pub fn clear(&self) {
        for b in self.buckets.iter() {
            b.epoch.store(0, Ordering::Relaxed);
            b.a.store(0, Ordering::Relaxed);
            b.b.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_expire_after_the_span() {
        let w = Window::new(Duration::from_millis(1000));
        w.add(1_000, 3, 1);
        w.add(1_500, 2, 0);
        assert_eq!(w.sum(1_900), (5, 1));
        assert_eq!(w.sum(2_450), (2, 0));
        assert_eq!(w.sum(3_000), (0, 0));
    }
}
