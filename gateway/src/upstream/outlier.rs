//! Passive health checks (outlier detection): every try's outcome is
//! recorded on its target; `consecutive_failures` connect failures, resets
//! or timeouts in a row, `consecutive_5xx` 5xx responses in a row, or
//! `consecutive_slow` response heads slower than `slow_threshold`, eject
//! the target for `base_ejection × n` (n = ejections in a row, capped at
//! `max_ejection`). At most `max_ejected_percent` of the pool (but at least
//! one target when it is above 0, and never the last target available,
//! whatever took the others out) is ejected at once; an ejection that
//! concurrent ones pushed over the cap is taken back. A target that served requests well for
//! `max_ejection` after its last ejection starts again from n = 1.

use std::sync::atomic::Ordering;

use super::config::OutlierSettings;
use super::target::{Outcome, Target};
use super::window::ms;

/// Records one try's outcome on `target`. Returns true when this outcome
/// ejected the target. `set` is the pool's current targets, for the cap.
pub fn record(
    name: &str,
    settings: Option<&OutlierSettings>,
    target: &Target,
    set: &[std::sync::Arc<Target>],
    outcome: Outcome,
    now: u64,
) -> bool {
    target.requests.fetch_add(1, Ordering::Relaxed);
    let failed = matches!(outcome, Outcome::Failure | Outcome::Status5xx);
    target.recent.add(now, 1, u64::from(failed));
    if !failed {
        // Cheap common case: reset streaks only when they are non-zero.
        if target.consecutive_failures.load(Ordering::Relaxed) != 0 {
            target.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if target.consecutive_5xx.load(Ordering::Relaxed) != 0 {
            target.consecutive_5xx.store(0, Ordering::Relaxed);
        }
        if outcome == Outcome::Success {
            if target.consecutive_slow.load(Ordering::Relaxed) != 0 {
                target.consecutive_slow.store(0, Ordering::Relaxed);
            }
            return false;
        }
    } else {
        target.errors.fetch_add(1, Ordering::Relaxed);
    }
    let Some(s) = settings else {
        return false;
    };
    let trip = match outcome {
        Outcome::Slow => {
            let n = target.consecutive_slow.fetch_add(1, Ordering::Relaxed) + 1;
            s.slow.is_some_and(|(_, count)| n >= count)
        }
        Outcome::Failure => {
            target.consecutive_5xx.store(0, Ordering::Relaxed);
            let n = target.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            s.consecutive_failures > 0 && n >= s.consecutive_failures
        }
        Outcome::Status5xx => {
            target.consecutive_failures.store(0, Ordering::Relaxed);
            let n = target.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            s.consecutive_5xx > 0 && n >= s.consecutive_5xx
        }
        Outcome::Success => false,
    };
    if !trip || target.is_ejected(now) {
        return false;
    }
    // The cap: count the targets ejected now (failure path only).
    let ejected = set.iter().filter(|t| t.is_ejected(now)).count();
    // Like Envoy, any share above 0% lets at least one target go (3
    // targets at 10% would round to none); never the last one.
    let share = set.len() * s.max_ejected_percent as usize / 100;
    let cap = if s.max_ejected_percent > 0 {
        share.max(1)
    } else {
        0
    }
    .min(set.len().saturating_sub(1));
    // Nor the last target available (health checks may have taken the
    // others out).
    let last_available = || set.iter().filter(|t| t.available(now)).count() <= 1;
    if ejected >= cap || last_available() {
        tracing::debug!(upstream = name, target = %target.addr, "outlier not ejected: ejection cap reached");
        return false;
    }
    let previous_until = target.ejected_until.load(Ordering::Relaxed);
    let max = ms(s.max_ejection);
    // Healthy for a whole max_ejection since the last ejection ended: start over.
    if previous_until != 0 && now.saturating_sub(previous_until) > max {
        target.ejections.store(0, Ordering::Relaxed);
    }
    let n = target.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let duration = ms(s.base_ejection).saturating_mul(u64::from(n)).min(max);
    let until = now.saturating_add(duration);
    if target
        .ejected_until
        .compare_exchange(previous_until, until, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        // Another thread ejected it first.
        return false;
    }
    // Workers ejecting other targets at the same moment may each have seen
    // room under the cap: counted again now that this one is out, the
    // ejection is taken back if the pool went over it (or has no target
    // left).
    let ejected = set.iter().filter(|t| t.is_ejected(now)).count();
    if ejected > cap || set.iter().all(|t| !t.available(now)) {
        let _ = target.ejected_until.compare_exchange(
            until,
            previous_until,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        target.ejections.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    target.consecutive_failures.store(0, Ordering::Relaxed);
    target.consecutive_5xx.store(0, Ordering::Relaxed);
    target.consecutive_slow.store(0, Ordering::Relaxed);
    target.metrics.ejections.increment(1);
    target.metrics.ejected.set(1.0);
    tracing::warn!(
        upstream = name,
        target = %target.addr,
        ejection = n,
        for_ms = duration,
        reason = ?outcome,
        "target ejected"
    );
    true
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn settings() -> OutlierSettings {
        OutlierSettings {
            consecutive_failures: 3,
            consecutive_5xx: 2,
            base_ejection: Duration::from_millis(1000),
            max_ejection: Duration::from_millis(2500),
            max_ejected_percent: 50,
            slow: Some((Duration::from_millis(100), 2)),
        }
    }

    fn set(n: usize) -> Vec<Arc<Target>> {
        (0..n)
            .map(|i| {
                Arc::new(Target::new(
                    "t",
                    format!("10.0.0.{i}:80").parse().unwrap(),
                    1,
                    0,
                ))
            })
            .collect()
    }

    #[test]
    fn ejection_grows_on_repeat_and_is_capped() {
        let s = settings();
        let ts = set(4);
        let t = &ts[0];
        let mut now = 1000;
        for _ in 0..2 {
            assert!(!record("u", Some(&s), t, &ts, Outcome::Failure, now));
        }
        // A success resets the streak.
        record("u", Some(&s), t, &ts, Outcome::Success, now);
        for _ in 0..2 {
            assert!(!record("u", Some(&s), t, &ts, Outcome::Failure, now));
        }
        assert!(record("u", Some(&s), t, &ts, Outcome::Failure, now));
        assert!(t.is_ejected(now + 999) && !t.is_ejected(now + 1000));
        now += 1000;
        for _ in 0..3 {
            record("u", Some(&s), t, &ts, Outcome::Failure, now);
        }
        assert!(
            t.is_ejected(now + 1999) && !t.is_ejected(now + 2000),
            "second ejection is twice as long"
        );
        now += 2000;
        for _ in 0..3 {
            record("u", Some(&s), t, &ts, Outcome::Failure, now);
        }
        assert!(
            t.is_ejected(now + 2499) && !t.is_ejected(now + 2500),
            "capped at max_ejection"
        );
        // Long healthy: the multiplier starts over.
        now += 2500 + 2600;
        for _ in 0..3 {
            record("u", Some(&s), t, &ts, Outcome::Failure, now);
        }
        assert!(!t.is_ejected(now + 1000));
    }

    #[test]
    fn slow_responses_eject_too() {
        let s = settings();
        let ts = set(3);
        assert!(!record("u", Some(&s), &ts[0], &ts, Outcome::Slow, 10));
        assert!(!record("u", Some(&s), &ts[0], &ts, Outcome::Success, 10));
        assert!(!record("u", Some(&s), &ts[0], &ts, Outcome::Slow, 10));
        assert!(record("u", Some(&s), &ts[0], &ts, Outcome::Slow, 10));
        assert_eq!(
            ts[0].errors.load(Ordering::Relaxed),
            0,
            "slow is not an error"
        );
    }

    #[test]
    fn at_most_the_share_of_the_pool_is_ejected() {
        let s = settings();
        let ts = set(4);
        for t in &ts {
            for _ in 0..2 {
                record("u", Some(&s), t, &ts, Outcome::Status5xx, 10);
            }
        }
        assert_eq!(ts.iter().filter(|t| t.is_ejected(10)).count(), 2);
        let one = set(1);
        for _ in 0..5 {
            record("u", Some(&s), &one[0], &one, Outcome::Failure, 10);
        }
        assert!(!one[0].is_ejected(10), "the last target is never ejected");

        // A share that rounds to no target still lets one go; 0% none.
        let mut s = settings();
        s.max_ejected_percent = 10;
        let ts = set(3);
        for t in &ts {
            for _ in 0..2 {
                record("u", Some(&s), t, &ts, Outcome::Status5xx, 10);
            }
        }
        assert_eq!(ts.iter().filter(|t| t.is_ejected(10)).count(), 1);
        s.max_ejected_percent = 0;
        let ts = set(3);
        for t in &ts {
            for _ in 0..2 {
                record("u", Some(&s), t, &ts, Outcome::Status5xx, 10);
            }
        }
        assert_eq!(ts.iter().filter(|t| t.is_ejected(10)).count(), 0);
    }

    #[test]
    fn the_last_available_target_is_kept_whatever_took_the_others_out() {
        let s = settings();
        let ts = set(3);
        // Two out by active health checks; under the 50% cap (1) there is
        // room for an ejection, but not of the only target left.
        ts[0].healthy.store(false, Ordering::Relaxed);
        ts[1].healthy.store(false, Ordering::Relaxed);
        for _ in 0..5 {
            record("u", Some(&s), &ts[2], &ts, Outcome::Failure, 10);
        }
        assert!(!ts[2].is_ejected(10));
        assert!(ts[2].available(10));
    }
}
