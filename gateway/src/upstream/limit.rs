//! Concurrency limits (per upstream and per route): at most `max` requests
//! in flight; up to `queue` more wait at most `queue_timeout` for a slot;
//! beyond either, 503 with `Retry-After`. A slot is held until the
//! response body has been passed on (see `proxy::body::Body::Upstream`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;
use http::header::RETRY_AFTER;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::config::ConcurrencySettings;
use crate::error::{ErrorKind, ProxyError};

pub struct Limiter {
    name: Arc<str>,
    settings: ConcurrencySettings,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    rejected: metrics::Counter,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("name", &self.name)
            .field("max", &self.settings.max)
            .finish_non_exhaustive()
    }
}

impl Limiter {
    pub fn new(name: Arc<str>, s: &ConcurrencySettings) -> Limiter {
        Limiter {
            rejected: metrics::counter!("gateway_upstream_overloaded_total", "upstream" => name.to_string()),
            name,
            settings: s.clone(),
            slots: Arc::new(Semaphore::new(s.max)),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Whether `other` runs with the same settings (so a reload may keep
    /// this one in its place, with the slots its requests in flight hold).
    pub fn same_settings(&self, other: &Limiter) -> bool {
        self.settings == other.settings
    }

    /// A slot, at once or after queueing; 503 `Overloaded` otherwise.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        // The place in the queue is given back however the wait ends,
        // also when the request is dropped while waiting (a client that
        // hangs up or resets its stream).
        struct Place<'a>(&'a AtomicUsize);
        impl Drop for Place<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let place = Place(&self.waiting);
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.settings.queue {
            drop(place);
            return Err(self.overloaded("and its queue is full"));
        }
        let r = tokio::time::timeout(
            self.settings.queue_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await;
        drop(place);
        match r {
            Ok(Ok(p)) => Ok(p),
            _ => Err(self.overloaded("and no slot freed up in time")),
        }
    }

    fn overloaded(&self, why: &str) -> ProxyError {
        self.rejected.increment(1);
        let secs = self.settings.queue_timeout.as_secs().max(1);
        let mut e = ProxyError::new(
            ErrorKind::Overloaded,
            format!(
                "{} has {} requests in flight {why}",
                self.name, self.settings.max
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            e = e.with_header(RETRY_AFTER, v);
        }
        e
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "max": self.settings.max,
            "in_flight": self.settings.max - self.slots.available_permits().min(self.settings.max),
            "queued": self.waiting.load(Ordering::Relaxed),
            "queue": self.settings.queue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiter_dropped_in_the_queue_gives_its_place_back() {
        let l = Limiter::new(
            "t".into(),
            &ConcurrencySettings {
                max: 1,
                queue: 1,
                queue_timeout: Duration::from_secs(10),
            },
        );
        let _held = l.acquire().await.unwrap();
        for _ in 0..3 {
            let wait = l.acquire();
            // Polled once (queued), then dropped, as hyper drops a handler.
            assert!(
                tokio::time::timeout(Duration::from_millis(10), wait)
                    .await
                    .is_err()
            );
            assert_eq!(l.status()["queued"], 0);
        }
    }

    #[tokio::test]
    async fn queue_then_reject() {
        let l = Limiter::new(
            "t".into(),
            &ConcurrencySettings {
                max: 1,
                queue: 1,
                queue_timeout: Duration::from_millis(50),
            },
        );
        let first = l.acquire().await.unwrap();
        // One may wait; it times out.
        let e = l.acquire().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        assert!(e.headers.iter().any(|(n, _)| n == RETRY_AFTER));
        drop(first);
        let _second = l.acquire().await.unwrap();
    }
}
