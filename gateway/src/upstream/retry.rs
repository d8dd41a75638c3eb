//! Retries: which failures may be tried again, the back-off between tries
//! (exponential with full jitter), and the per-pool retry budget that keeps
//! retries from amplifying an outage.
//!
//! A try may be retried when
//! - the connection could not be made (the request never left, so any
//!   method is safe), or
//! - the connection broke before a response came (reset), the response
//!   status is in `on_status`, or the try hit `per_try_timeout` with
//!   `on_timeout`, and the method is idempotent (or the route opts in with
//!   `non_idempotent`);
//! - and in every case the request body can be sent again (empty, read
//!   whole by an earlier phase, or buffered here up to `buffer_body`), the
//!   budget allows it, and the overall timeout has time left.

use std::time::Duration;

use http::{Method, Request};

use super::config::{BudgetSettings, RetrySettings};
use super::window::{Window, now_ms};
use crate::error::ProxyError;
use crate::proxy::body::{Body, BodyError};

/// Whether `m` is idempotent (RFC 9110 §9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A copy of a request body for another try, if it can be sent again
/// (empty, or read whole by an earlier phase). The head needs no copy: a try
/// takes only the body and leaves the head with the caller.
pub fn replay_body(body: &Body) -> Option<Body> {
    match body {
        Body::Full(b) => Some(Body::Full(b.clone())),
        _ => None,
    }
}

/// With `buffer_body` set, reads a request body of known length up to that
/// size whole, so that a retry can send it again. Other bodies pass as
/// they are. Errors are the client's (too large, too slow, broken).
pub async fn buffer_body(req: Request<Body>, limit: u64) -> Result<Request<Body>, ProxyError> {
    if limit == 0 || matches!(req.body(), Body::Full(_)) {
        return Ok(req);
    }
    let len = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| crate::wire::content_length(v.as_bytes()));
    if len.is_none_or(|l| l > limit) {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    let bytes = http_body_util::BodyExt::collect(body)
        .await
        .map_err(|e: BodyError| e.request_error())?
        .to_bytes();
    Ok(Request::from_parts(parts, Body::full(bytes)))
}

/// Why a try might be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Connect,
    Status,
    Timeout,
    /// The connection broke after the request was (maybe) sent.
    Reset,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Connect => "connect",
            Reason::Status => "status",
            Reason::Timeout => "timeout",
            Reason::Reset => "reset",
        }
    }
}

/// Whether the policy allows retrying a failure of kind `reason` for `method`.
pub fn allowed(policy: &RetrySettings, method: &Method, reason: Reason) -> bool {
    match reason {
        Reason::Connect => true,
        Reason::Status | Reason::Reset => policy.non_idempotent || idempotent(method),
        Reason::Timeout => policy.on_timeout && (policy.non_idempotent || idempotent(method)),
    }
}

/// The pause before retry number `n` (1-based): uniformly random up to
/// `backoff × 2^(n-1)`, capped at `max_backoff` ("full jitter").
pub fn backoff(policy: &RetrySettings, n: u32) -> Duration {
    let cap = policy
        .backoff
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(policy.max_backoff);
    let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
    if cap_us == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(fastrand::u64(0..=cap_us))
}

/// Retries may be at most `percent` % of requests over the last 10 s, plus
/// `min_per_sec` per second so that quiet pools can still retry.
#[derive(Debug)]
pub struct Budget {
    percent: u64,
    min_per_window: u64,
    /// (requests, retries).
    window: Window,
}

const BUDGET_WINDOW: Duration = Duration::from_secs(10);

impl Budget {
    pub fn new(s: &BudgetSettings) -> Budget {
        Budget {
            percent: u64::from(s.percent),
            min_per_window: u64::from(s.min_per_sec) * BUDGET_WINDOW.as_secs(),
            window: Window::new(BUDGET_WINDOW),
        }
    }

    /// Counts one request (not a retry) made at `now` (`window::now_ms`).
    pub fn deposit(&self, now: u64) {
        self.window.add(now, 1, 0);
    }

    /// Takes one retry from the budget if there is one left.
    pub fn withdraw(&self) -> bool {
        let now = now_ms();
        let (requests, retries) = self.window.sum(now);
        let allowed = (requests * self.percent / 100).max(self.min_per_window);
        if retries >= allowed {
            return false;
        }
        self.window.add(now, 0, 1);
        true
    }

    pub fn status(&self) -> serde_json::Value {
        let (requests, retries) = self.window.sum(now_ms());
        serde_json::json!({"window_requests": requests, "window_retries": retries, "percent": self.percent})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetrySettings {
        RetrySettings {
            max_retries: 2,
            on_status: vec![503],
            on_timeout: true,
            non_idempotent: false,
            per_try_timeout: None,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(30),
            buffer_body: 0,
        }
    }

    #[test]
    fn idempotence_rules() {
        let p = policy();
        assert!(allowed(&p, &Method::POST, Reason::Connect));
        assert!(!allowed(&p, &Method::POST, Reason::Status));
        assert!(allowed(&p, &Method::GET, Reason::Timeout));
        let p = RetrySettings {
            non_idempotent: true,
            ..policy()
        };
        assert!(allowed(&p, &Method::POST, Reason::Status));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy();
        for _ in 0..100 {
            assert!(backoff(&p, 1) <= Duration::from_millis(10));
            assert!(backoff(&p, 2) <= Duration::from_millis(20));
            assert!(backoff(&p, 9) <= Duration::from_millis(30));
        }
    }

    /// Retry n waits uniformly in `[0, backoff × 2^(n-1)]`, that bound
    /// capped at `max_backoff`: every sample is within it, and the samples
    /// fill it (near 0, near the bound, mean about half of it), so the
    /// bound really doubles with each retry until the cap.
    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        fastrand::seed(0x5eed);
        let p = RetrySettings {
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(500),
            ..policy()
        };
        let samples = 500;
        for (n, bound_ms) in [
            (1, 10.0),
            (2, 20.0),
            (3, 40.0),
            (4, 80.0),
            (5, 160.0),
            (6, 320.0),
            (7, 500.0),
            (8, 500.0),
            (10, 500.0),
            (u32::MAX, 500.0),
        ] {
            let got: Vec<f64> = (0..samples)
                .map(|_| backoff(&p, n).as_secs_f64() * 1000.0)
                .collect();
            let max = got.iter().copied().fold(0.0, f64::max);
            let min = got.iter().copied().fold(f64::MAX, f64::min);
            let mean = got.iter().sum::<f64>() / f64::from(samples);
            assert!(max <= bound_ms, "retry {n}: {max} ms over {bound_ms} ms");
            assert!(max > 0.9 * bound_ms, "retry {n}: at most {max} ms");
            assert!(min < 0.1 * bound_ms, "retry {n}: at least {min} ms");
            assert!(
                (0.4 * bound_ms..0.6 * bound_ms).contains(&mean),
                "retry {n}: mean {mean} ms of [0, {bound_ms}]"
            );
        }
        // No back-off configured: no pause at all.
        let p = RetrySettings {
            backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            ..policy()
        };
        assert_eq!(backoff(&p, 3), Duration::ZERO);
    }

    #[test]
    fn budget_caps_retries_at_the_share() {
        let b = Budget::new(&BudgetSettings {
            percent: 20,
            min_per_sec: 0,
        });
        let mut granted = 0;
        for _ in 0..1000 {
            b.deposit(now_ms());
            if b.withdraw() {
                granted += 1;
            }
        }
        assert!((190..=200).contains(&granted), "{granted}");
    }
}
