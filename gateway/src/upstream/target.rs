//! One target of a pool and its shared state. Targets live in `Arc`s that
//! survive discovery updates (a target that stays keeps its state) and that
//! requests in flight hold until they finish, so a target removed from the
//! set is never cut off mid-request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Authority;
use tokio::sync::Semaphore;

use super::window::Window;

/// One backend address.
pub struct Target {
    pub addr: Authority,
    pub weight: u32,
    /// Active health check verdict (true until checks say otherwise).
    pub(super) healthy: AtomicBool,
    /// Consecutive active check results, used by the checker only.
    pub(super) check_successes: AtomicU32,
    pub(super) check_failures: AtomicU32,
    /// Ejected by outlier detection until this `window::now_ms`; 0 = not.
    pub(super) ejected_until: AtomicU64,
    /// Ejections in a row (the back-off multiplier).
    pub(super) ejections: AtomicU32,
    pub(super) consecutive_failures: AtomicU32,
    pub(super) consecutive_5xx: AtomicU32,
    pub(super) consecutive_slow: AtomicU32,
    pub(super) in_flight: AtomicUsize,
    pub(super) requests: AtomicU64,
    pub(super) errors: AtomicU64,
    /// Tries and failed tries over the last 10 s.
    pub(super) recent: Window,
    /// `max_connections_per_target`.
    pub(super) conns: Option<Arc<Semaphore>>,
    /// Idle HTTP/1.1 connections per worker, most recently used last
    /// (`conn`).
    pub(super) idle: super::conn::IdleLists,
    pub(super) metrics: TargetMetrics,
}

/// Metric handles, registered once per target.
pub(super) struct TargetMetrics {
    pub healthy: metrics::Gauge,
    pub ejected: metrics::Gauge,
    pub in_flight: metrics::Gauge,
    pub ejections: metrics::Counter,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

impl Target {
    pub fn new(upstream: &str, addr: Authority, weight: u32, max_conns: usize) -> Target {
        let labels = [
            ("upstream", upstream.to_string()),
            ("target", addr.to_string()),
        ];
        let metrics = TargetMetrics {
            healthy: metrics::gauge!("gateway_upstream_target_healthy", &labels),
            ejected: metrics::gauge!("gateway_upstream_target_ejected", &labels),
            in_flight: metrics::gauge!("gateway_upstream_target_in_flight", &labels),
            ejections: metrics::counter!("gateway_upstream_ejections_total", &labels),
        };
        metrics.healthy.set(1.0);
        metrics.ejected.set(0.0);
        Target {
            addr,
            weight: weight.max(1),
            healthy: AtomicBool::new(true),
            check_successes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_slow: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            recent: Window::new(Duration::from_secs(10)),
            conns: (max_conns > 0).then(|| Arc::new(Semaphore::new(max_conns))),
            idle: super::conn::idle_lists(),
            metrics,
        }
    }

    /// Whether the target may take requests at `now` (ms).
    #[inline]
    pub fn available(&self, now: u64) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.ejected_until.load(Ordering::Relaxed) <= now
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A snapshot for the admin API.
    pub fn status(&self, now: u64) -> serde_json::Value {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let (tries, failures) = self.recent.sum(now);
        serde_json::json!({
            "address": self.addr.as_str(),
            "weight": self.weight,
            "healthy": self.is_healthy(),
            "ejected": until > now,
            "ejected_for_ms": until.saturating_sub(now),
            "ejections": self.ejections.load(Ordering::Relaxed),
            "in_flight": self.in_flight(),
            "requests": self.requests.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "recent_requests": tries,
            "recent_errors": failures,
            "consecutive_failures": self.consecutive_failures.load(Ordering::Relaxed),
            "consecutive_5xx": self.consecutive_5xx.load(Ordering::Relaxed),
        })
    }
}

/// The outcome of one try, as health accounting sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A response below 500 whose head took longer than `slow_threshold`.
    Slow,
    /// A 5xx response.
    Status5xx,
    /// Connect failure, reset, protocol error or timeout.
    Failure,
}

/// Counts one request in flight on a target until dropped.
#[derive(Debug)]
pub struct InFlight {
    pub target: Arc<Target>,
    _conn: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl InFlight {
    pub fn new(target: Arc<Target>, conn: Option<tokio::sync::OwnedSemaphorePermit>) -> InFlight {
        target.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            target,
            _conn: conn,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.target.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
