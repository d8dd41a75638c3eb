//! Quotas: a number of requests per key per calendar day or month (UTC),
//! the metering basis for billing. Locally a counter per key and period; in
//! Redis the same counter, shared (see `redis.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Deserialize;

use super::Decision;
use crate::policy::shared::{self, Sweep};

/// A quota period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
}

/// The period containing `unix` seconds: (period id, end of the period in
/// unix seconds).
pub fn period_of(p: Period, unix: u64) -> (u64, u64) {
    let day = unix / 86_400;
    match p {
        Period::Day => (day, (day + 1) * 86_400),
        Period::Month => {
            let (y, m, _) = civil_from_days(i64::try_from(day).unwrap_or(i64::MAX));
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let end = u64::try_from(days_from_civil(ny, nm, 1)).unwrap_or(0) * 86_400;
            (u64::try_from(y * 12 + i64::from(m) - 1).unwrap_or(0), end)
        }
    }
}

/// Seconds since the epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// Howard Hinnant's civil calendar algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// In-process quota counters. The limit is not part of the state, so
/// changing it on reload keeps the period's counts (they meter usage).
#[derive(Debug)]
pub struct LocalQuota {
    pub period: Period,
    /// key → (period id, used)
    used: DashMap<u64, (u64, u64), crate::prehashed::PreHashed>,
    /// Entries in `used` (kept by `take` and the sweep; `DashMap::len`
    /// would lock every shard).
    keys: std::sync::atomic::AtomicUsize,
    max_keys: usize,
    swept: AtomicBool,
}

/// Distinct keys one quota counts per gateway (about 50 MB). A quota keyed
/// by something clients choose (`ip` over IPv6, a header) would otherwise
/// grow without bound until its period ends; beyond this, new keys are
/// refused until the sweep finds room.
pub const MAX_KEYS: usize = 1_000_000;

impl LocalQuota {
    pub fn new(period: Period) -> LocalQuota {
        LocalQuota {
            period,
            used: DashMap::default(),
            keys: std::sync::atomic::AtomicUsize::new(0),
            max_keys: MAX_KEYS,
            swept: AtomicBool::new(false),
        }
    }

    /// Counts one request for `key` if fewer than `limit` were counted in
    /// this period.
    pub fn take(self: &Arc<Self>, key: u64, limit: u64) -> Decision {
        if !self.swept.load(Ordering::Relaxed) && !self.swept.swap(true, Ordering::Relaxed) {
            let weak: std::sync::Weak<dyn Sweep> = Arc::downgrade(self) as _;
            shared::sweep_later(weak);
        }
        let now = unix_now();
        let (id, end) = period_of(self.period, now);
        let reset = Duration::from_secs(end.saturating_sub(now));
        let mut e = match self.used.entry(key) {
            dashmap::Entry::Occupied(e) => e.into_ref(),
            dashmap::Entry::Vacant(v) => {
                if self.keys.load(Ordering::Relaxed) >= self.max_keys {
                    drop(v);
                    full_once();
                    return Decision {
                        allowed: false,
                        limit,
                        remaining: 0,
                        reset,
                        retry_after: reset.min(Duration::from_secs(60)),
                        quota: true,
                    };
                }
                self.keys.fetch_add(1, Ordering::Relaxed);
                v.insert((id, 0))
            }
        };
        if e.0 != id {
            *e = (id, 0);
        }
        if e.1 >= limit {
            return Decision {
                allowed: false,
                limit,
                remaining: 0,
                reset,
                retry_after: reset,
                quota: true,
            };
        }
        e.1 += 1;
        Decision {
            allowed: true,
            limit,
            remaining: limit - e.1,
            reset,
            retry_after: Duration::ZERO,
            quota: true,
        }
    }

    /// Gives back a request counted by `take` that another limit refused.
    pub fn refund(&self, key: u64) {
        if let Some(mut e) = self.used.get_mut(&key) {
            e.1 = e.1.saturating_sub(1);
        }
    }
}

impl Sweep for LocalQuota {
    fn sweep(&self) {
        let (id, _) = period_of(self.period, unix_now());
        // Past periods, and keys that used nothing (every request refunded).
        self.used.retain(|_, v| v.0 == id && v.1 > 0);
        self.used.shrink_to_fit();
        self.keys.store(self.used.len(), Ordering::Relaxed);
    }
}

/// Counts a refusal for lack of room, and says so in the log once a minute.
fn full_once() {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    metrics::counter!("gateway_quota_keys_full_total").increment(1);
    let now = unix_now();
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            max = MAX_KEYS,
            "a quota counts as many keys as it may; new keys are refused until its period ends"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_keys_are_refused_when_the_table_is_full_and_sweeps_make_room() {
        let mut q = LocalQuota::new(Period::Day);
        q.max_keys = 2;
        let q = Arc::new(q);
        assert!(q.take(1, 10).allowed);
        assert!(q.take(2, 10).allowed);
        let d = q.take(3, 10);
        assert!(!d.allowed && d.quota, "{d:?}");
        assert!(q.take(1, 10).allowed, "known keys still count");
        // A key whose requests were all refunded frees its place.
        q.refund(2);
        q.sweep();
        assert!(q.take(3, 10).allowed);
    }

    #[test]
    fn calendar_periods() {
        // 2024-02-29T12:00:00Z
        let t = 1_709_208_000;
        let (d, end) = period_of(Period::Day, t);
        assert_eq!(d, 19_782);
        assert_eq!(end, 1_709_251_200); // 2024-03-01T00:00:00Z
        let (m, end) = period_of(Period::Month, t);
        assert_eq!(m, 2024 * 12 + 1);
        assert_eq!(end, 1_709_251_200);
        // December rolls into the next year.
        let (m, end) = period_of(Period::Month, 1_734_000_000); // 2024-12-12
        assert_eq!(m, 2024 * 12 + 11);
        assert_eq!(end, 1_735_689_600); // 2025-01-01
    }

    #[test]
    fn counts_refunds_and_refuses() {
        let q = Arc::new(LocalQuota::new(Period::Day));
        assert_eq!(q.take(1, 2).remaining, 1);
        q.refund(1);
        assert_eq!(q.take(1, 2).remaining, 1);
        assert_eq!(q.take(1, 2).remaining, 0);
        let d = q.take(1, 2);
        assert!(!d.allowed && d.quota);
        assert!(d.retry_after > Duration::ZERO);
        assert!(q.take(2, 2).allowed);
        // A raised limit keeps the count.
        assert_eq!(q.take(1, 3).remaining, 0);
    }
}
