//! Circuit breaker: closed → open when the share of failed tries over a
//! rolling window reaches `error_rate` with at least `min_requests` tries
//! (or after `consecutive_failures` in a row); open answers at once with
//! 503 `upstream circuit open` and `Retry-After`, without touching the
//! backend; after `open_for` it is half-open and lets `half_open_probes`
//! tries through; that many successes close it, one failure opens it again.
//!
//! State lives in atomics; admission is a load and a compare in the closed
//! state. Transitions are logged, counted
//! (`gateway_circuit_transitions_total`) and exported as the gauge
//! `gateway_circuit_state` (0 closed, 1 open, 2 half-open).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use http::HeaderValue;
use http::header::RETRY_AFTER;

use super::config::BreakerSettings;
use super::window::{Window, ms, now_ms};
use crate::error::{ErrorKind, ProxyError};

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// One breaker (per upstream, or per route).
pub struct Breaker {
    name: Arc<str>,
    settings: BreakerSettings,
    state: AtomicU8,
    opened_at: AtomicU64,
    probes: AtomicU32,
    probe_successes: AtomicU32,
    consecutive: AtomicU32,
    /// (tries, failures).
    window: Window,
    gauge: metrics::Gauge,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.name)
            .field("state", &self.state_name())
            .finish_non_exhaustive()
    }
}

/// Whether a try was let through as a normal request or as a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

impl Breaker {
    /// Whether `other` runs with the same settings (so a reload may keep
    /// this one, with its state, in its place).
    pub fn same_settings(&self, other: &Breaker) -> bool {
        self.settings == other.settings
    }

    pub fn new(name: Arc<str>, settings: BreakerSettings) -> Breaker {
        let gauge = metrics::gauge!("gateway_circuit_state", "upstream" => name.to_string());
        gauge.set(0.0);
        Breaker {
            window: Window::new(settings.window),
            name,
            settings,
            state: AtomicU8::new(CLOSED),
            opened_at: AtomicU64::new(0),
            probes: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            consecutive: AtomicU32::new(0),
            gauge,
        }
    }

    pub fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Relaxed) {
            CLOSED => "closed",
            OPEN => "open",
            _ => "half_open",
        }
    }

    /// Lets a try through, or refuses it with a 503.
    pub fn admit(&self) -> Result<Admission, ProxyError> {
        let state = self.state.load(Ordering::Acquire);
        if state == CLOSED {
            return Ok(Admission::Normal);
        }
        let now = now_ms();
        if state == OPEN {
            let opened = self.opened_at.load(Ordering::Acquire);
            let open_for = ms(self.settings.open_for);
            if now < opened.saturating_add(open_for) {
                return Err(self.refusal(opened.saturating_add(open_for) - now));
            }
            if self
                .state
                .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.probes.store(0, Ordering::Relaxed);
                self.probe_successes.store(0, Ordering::Relaxed);
                // From now on, when the half-open state began.
                self.opened_at.store(now, Ordering::Release);
                self.transition("half_open", 2.0);
            }
        }
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(Admission::Normal),
            HALF_OPEN => {
                let n = self.probes.fetch_add(1, Ordering::AcqRel);
                if n < self.settings.half_open_probes {
                    return Ok(Admission::Probe);
                }
                self.probes.fetch_sub(1, Ordering::AcqRel);
                // Probes that never report back (the client went away, the
                // try was refused later on) must not keep it half-open
                // forever: after `open_for` without a verdict, probe anew.
                let since = self.opened_at.load(Ordering::Acquire);
                if now > since.saturating_add(ms(self.settings.open_for))
                    && self
                        .opened_at
                        .compare_exchange(since, now, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.probes.store(1, Ordering::Release);
                    self.probe_successes.store(0, Ordering::Release);
                    return Ok(Admission::Probe);
                }
                Err(self.refusal(1000))
            }
            _ => Err(self.refusal(ms(self.settings.open_for))),
        }
    }

    fn refusal(&self, remaining_ms: u64) -> ProxyError {
        let secs = remaining_ms.div_ceil(1000).max(1);
        let mut e = ProxyError::new(
            ErrorKind::CircuitOpen,
            format!("upstream circuit open ({})", self.name),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            e = e.with_header(RETRY_AFTER, v);
        }
        e
    }

    /// Records the outcome of a try let through by `admit`. `failed` is the
    /// breaker's view: gateway-side failures, and 5xx when `count_5xx`.
    pub fn record(&self, admission: Admission, failed: bool) {
        match admission {
            Admission::Probe => {
                if self.state.load(Ordering::Acquire) != HALF_OPEN {
                    return;
                }
                if failed {
                    self.open("a half-open probe failed");
                } else {
                    let ok = self.probe_successes.fetch_add(1, Ordering::AcqRel) + 1;
                    if ok >= self.settings.half_open_probes
                        && self
                            .state
                            .compare_exchange(
                                HALF_OPEN,
                                CLOSED,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            )
                            .is_ok()
                    {
                        self.window.clear();
                        self.consecutive.store(0, Ordering::Relaxed);
                        self.transition("closed", 0.0);
                    }
                }
            }
            Admission::Normal => {
                if self.state.load(Ordering::Relaxed) != CLOSED {
                    return;
                }
                let now = now_ms();
                self.window.add(now, 1, u64::from(failed));
                if !failed {
                    if self.consecutive.load(Ordering::Relaxed) != 0 {
                        self.consecutive.store(0, Ordering::Relaxed);
                    }
                    return;
                }
                let run = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                let s = &self.settings;
                if s.consecutive_failures > 0 && run >= s.consecutive_failures {
                    self.open("consecutive failures");
                    return;
                }
                let (tries, failures) = self.window.sum(now);
                if tries >= u64::from(s.min_requests)
                    && failures as f64 >= s.error_rate * tries as f64
                {
                    self.open("error rate over the threshold");
                }
            }
        }
    }

    /// Whether a response status counts as a failure for this breaker.
    pub fn counts(&self, status: u16) -> bool {
        self.settings.count_5xx && status >= 500
    }

    fn open(&self, why: &str) {
        let prev = self.state.swap(OPEN, Ordering::AcqRel);
        self.opened_at.store(now_ms(), Ordering::Release);
        if prev != OPEN {
            tracing::warn!(breaker = %self.name, "circuit opened: {why}");
            self.transition("open", 1.0);
        }
    }

    fn transition(&self, to: &'static str, gauge: f64) {
        if to != "open" {
            tracing::info!(breaker = %self.name, "circuit {to}");
        }
        self.gauge.set(gauge);
        metrics::counter!(
            "gateway_circuit_transitions_total",
            "upstream" => self.name.to_string(),
            "to" => to
        )
        .increment(1);
    }

    /// A snapshot for the admin API.
    pub fn status(&self) -> serde_json::Value {
        let now = now_ms();
        let (tries, failures) = self.window.sum(now);
        let open_left = if self.state.load(Ordering::Relaxed) == OPEN {
            (self.opened_at.load(Ordering::Relaxed) + ms(self.settings.open_for))
                .saturating_sub(now)
        } else {
            0
        };
        serde_json::json!({
            "state": self.state_name(),
            "window_requests": tries,
            "window_failures": failures,
            "open_for_ms": open_left,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker(open_for: Duration) -> Breaker {
        Breaker::new(
            "t".into(),
            BreakerSettings {
                error_rate: 0.5,
                min_requests: 10,
                window: Duration::from_secs(10),
                consecutive_failures: 0,
                open_for,
                half_open_probes: 2,
                count_5xx: true,
            },
        )
    }

    #[test]
    fn opens_on_error_rate_then_half_opens_and_closes() {
        let b = breaker(Duration::from_millis(50));
        for i in 0..9 {
            b.record(b.admit().unwrap(), i % 2 == 0);
        }
        assert_eq!(b.state_name(), "closed", "below min_requests");
        b.record(b.admit().unwrap(), true);
        assert_eq!(b.state_name(), "open");
        let e = b.admit().unwrap_err();
        assert_eq!(e.kind, ErrorKind::CircuitOpen);
        assert!(e.headers.iter().any(|(n, _)| n == RETRY_AFTER));
        std::thread::sleep(Duration::from_millis(60));
        let p1 = b.admit().unwrap();
        let p2 = b.admit().unwrap();
        assert_eq!((p1, p2), (Admission::Probe, Admission::Probe));
        assert!(b.admit().is_err(), "only two probes at once");
        b.record(p1, false);
        b.record(p2, false);
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn lost_probes_do_not_keep_it_half_open() {
        let b = breaker(Duration::from_millis(30));
        for _ in 0..10 {
            b.record(Admission::Normal, true);
        }
        std::thread::sleep(Duration::from_millis(40));
        // Two probes let through, never recorded.
        let _ = (b.admit().unwrap(), b.admit().unwrap());
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(40));
        let p = b.admit().unwrap();
        assert_eq!(p, Admission::Probe);
        b.record(p, false);
        b.record(b.admit().unwrap(), false);
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let b = breaker(Duration::from_millis(30));
        for _ in 0..10 {
            b.record(Admission::Normal, true);
        }
        assert_eq!(b.state_name(), "open");
        std::thread::sleep(Duration::from_millis(40));
        let p = b.admit().unwrap();
        b.record(p, true);
        assert_eq!(b.state_name(), "open");
        assert!(b.admit().is_err());
    }
}
