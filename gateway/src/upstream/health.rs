//! Active health checks: every `interval`, each target of the pool gets an
//! HTTP GET of `path` (on a fresh connection, HTTP/1.1 or HTTP/2, plain or
//! TLS, like the pool's traffic) or a bare connect (with the TLS handshake
//! when the pool speaks TLS), bounded by `timeout`. A status in
//! `expected_statuses` (200–399 when empty) is a success.
//! `unhealthy_threshold` failures in a row take a target out of rotation;
//! `healthy_threshold` successes in a row bring it back. Checks of one
//! round run concurrently, so one hanging target does not delay the others.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Pool;
use super::config::{HealthKind, HealthSettings};
use super::target::Target;
use super::tls::Tls;
use crate::config::file::UpstreamProtocol;

/// Runs the checks until the pool is dropped.
pub async fn run(pool: Weak<Pool>) {
    let Some(settings) = pool
        .upgrade()
        .and_then(|p| p.config.settings.health.clone())
    else {
        return;
    };
    let settings = Arc::new(settings);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (name, protocol, tls, targets) = match pool.upgrade() {
            Some(p) => (
                p.config.name.clone(),
                p.config.protocol,
                p.config.tls.clone(),
                p.targets().targets.clone(),
            ),
            None => return,
        };
        let mut round = tokio::task::JoinSet::new();
        for t in targets {
            let s = settings.clone();
            let name = name.clone();
            let tls = tls.clone();
            round.spawn(async move {
                let ok = tokio::time::timeout(s.timeout, check(&s, protocol, tls.as_ref(), &t))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                apply(&name, &s, &t, ok);
            });
        }
        while round.join_next().await.is_some() {}
    }
}

/// One check of one target.
async fn check(
    s: &HealthSettings,
    protocol: UpstreamProtocol,
    tls: Option<&Tls>,
    t: &Target,
) -> Result<(), String> {
    let addr = t.addr.as_str();
    // The caller's timeout bounds the whole check.
    let stream = super::conn::dial(&t.addr, tls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if s.kind == HealthKind::Tcp {
        return Ok(());
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let host = s.host.as_deref().unwrap_or(addr);
    let req = Request::get(s.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "gateway-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let io = TokioIo::new(stream);
    let status = if protocol == UpstreamProtocol::Http2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = format!("{scheme}://{host}{}", s.path)
            .parse()
            .map_err(|e| format!("bad path: {e}"))?;
        send.send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?
            .status()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?
            .status()
    };
    let code = status.as_u16();
    let good = if s.expected_statuses.is_empty() {
        (200..400).contains(&code)
    } else {
        s.expected_statuses.contains(&code)
    };
    if good {
        Ok(())
    } else {
        Err(format!("status {code}"))
    }
}

/// Folds one result into the target's streaks and verdict.
fn apply(upstream: &str, s: &HealthSettings, t: &Target, result: Result<(), String>) {
    let outcome = if result.is_ok() { "success" } else { "failure" };
    metrics::counter!(
        "gateway_upstream_health_checks_total",
        "upstream" => upstream.to_string(),
        "result" => outcome
    )
    .increment(1);
    match result {
        Ok(()) => {
            t.check_failures.store(0, Ordering::Relaxed);
            let n = t.check_successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !t.healthy.load(Ordering::Relaxed) && n >= s.healthy_threshold {
                t.healthy.store(true, Ordering::Relaxed);
                t.metrics.healthy.set(1.0);
                tracing::info!(upstream, target = %t.addr, "target healthy again; back in rotation");
            }
        }
        Err(why) => {
            t.check_successes.store(0, Ordering::Relaxed);
            let n = t.check_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if t.healthy.load(Ordering::Relaxed) && n >= s.unhealthy_threshold {
                t.healthy.store(false, Ordering::Relaxed);
                t.metrics.healthy.set(0.0);
                tracing::warn!(upstream, target = %t.addr, "target unhealthy ({why}); out of rotation");
            } else {
                tracing::debug!(upstream, target = %t.addr, "health check failed: {why}");
            }
        }
    }
}

/// Shortest interval allowed, so a typo cannot turn checks into a flood.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
