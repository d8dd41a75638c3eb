//! Upstream pools: targets and how one is chosen (`balance`), their health
//! (`health` active checks, `outlier` passive ejection), where they come
//! from (`discovery`: static, DNS, a watched file), what protects them
//! (`breaker`, `limit`, the retry budget in `retry`), and the clients that
//! talk to them: the gateway's own HTTP/1.1 client on pooled keep-alive
//! connections (`h1`, `conn`), and one multiplexed HTTP/2 connection per
//! target and worker (`h2`).
//!
//! The data path (`Pool::try_once`) reads the current target set through
//! `arc-swap`, picks with a few atomics, and records the outcome in
//! atomics; it takes no lock (HTTP/2: two short ones to find the target's
//! connection, and an async one only while one is being dialed). Health checks, re-resolution, file watching
//! and metric export run as tasks on one background runtime thread
//! (`runtime`); each holds only a `Weak` reference to its pool and ends
//! when the pool is dropped (a reload that changed the pool's settings).

pub mod balance;
pub mod breaker;
pub mod config;
pub mod conn;
pub mod discovery;
pub mod dns;
pub mod file;
pub mod h1;
pub mod h2;
pub mod health;
pub mod limit;
pub mod outlier;
pub mod retry;
pub mod runtime;
pub mod target;
pub mod tls;
pub mod window;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use crate::config::UpstreamConfig;
use crate::config::file::UpstreamProtocol;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::proxy::body::{Body, BodyError};
use balance::TargetSet;
use breaker::Breaker;
use config::Discovery;
use limit::Limiter;
use retry::{Budget, Reason};
use target::{InFlight, Outcome, Target};
use window::now_ms;

/// A live upstream pool.
pub struct Pool {
    pub config: UpstreamConfig,
    set: ArcSwap<TargetSet>,
    next: AtomicUsize,
    /// HTTP/2 upstreams: multiplexed connections per target and worker
    /// (`h2`).
    /// HTTP/1.1 upstreams use `conn`'s per-target pools.
    h2: Option<h2::Conns>,
    h1: conn::Settings,
    pub breaker: Option<Breaker>,
    pub limiter: Option<Limiter>,
    pub budget: Budget,
    /// What discovery last did, for the admin API (never held across await).
    discovery: Mutex<discovery::Status>,
    metrics: PoolMetrics,
}

struct PoolMetrics {
    retries: [metrics::Counter; 4],
    budget_exhausted: metrics::Counter,
    targets: metrics::Gauge,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.config.name)
            .field("targets", &self.set.load().len())
            .finish_non_exhaustive()
    }
}

/// What a request holds until its response body has been passed on: its
/// target's in-flight count and connection slot, and concurrency slots.
#[derive(Debug, Default)]
pub struct Held {
    pub in_flight: Option<InFlight>,
    pub route_slot: Option<OwnedSemaphorePermit>,
    pub pool_slot: Option<OwnedSemaphorePermit>,
}

/// An upstream response body: hyper's (HTTP/2, holding its stream's place
/// on the connection), or read by the gateway's own HTTP/1.1 client (which
/// gives its connection back when done).
#[derive(Debug)]
pub enum UpstreamBody {
    H2(Incoming, h2::Stream),
    H1(h1::H1Body),
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::H2(b, _) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map_err(BodyError::from),
            UpstreamBody::H1(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H2(b, _) => b.is_end_stream(),
            UpstreamBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::H2(b, _) => b.size_hint(),
            UpstreamBody::H1(b) => b.size_hint(),
        }
    }
}

/// A successful try.
#[derive(Debug)]
pub struct Tried {
    pub response: Response<UpstreamBody>,
    pub in_flight: InFlight,
    pub target: usize,
}

/// A failed try: the error, and whether (and why) it may be retried.
#[derive(Debug)]
pub struct Failed {
    pub error: ProxyError,
    pub retry: Option<Reason>,
    pub target: Option<usize>,
}

impl Pool {
    /// Builds the pool, its client and its background tasks. Static
    /// targets were validated at load; a file source is read now; a DNS
    /// source is resolved now, waiting at most a few seconds.
    pub fn new(config: &UpstreamConfig) -> Arc<Pool> {
        Self::replacing(config, None)
    }

    /// A pool for `config` that replaces `previous` (the pool of the same
    /// name in the last generation). When both discover their targets the
    /// same way, the new pool starts from the targets the old one found, so
    /// a reload that changes another setting does not leave it empty while
    /// discovery answers again (or if it cannot).
    pub fn replacing(config: &UpstreamConfig, previous: Option<&Pool>) -> Arc<Pool> {
        let s = &config.settings;
        let h2 = (config.protocol == UpstreamProtocol::Http2).then(|| h2::Conns::new(config));
        let h1 = conn::Settings {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_idle: config.pool_max_idle_per_target,
        };
        let name = config.name.to_string();
        let targets: Vec<Arc<Target>> = config
            .targets
            .iter()
            .filter_map(|t| {
                let addr = t.address.parse().ok()?;
                Some(Arc::new(Target::new(
                    &name,
                    addr,
                    t.weight,
                    s.max_connections_per_target,
                )))
            })
            .collect();
        let retries = ["connect", "status", "timeout", "reset"]
            .map(|r| metrics::counter!("gateway_upstream_retries_total", "upstream" => name.clone(), "reason" => r));
        let pool = Arc::new(Pool {
            set: ArcSwap::from_pointee(TargetSet::new(targets, s.balance)),
            next: AtomicUsize::new(0),
            h2,
            h1,
            breaker: s
                .breaker
                .as_ref()
                .map(|b| Breaker::new(config.name.clone(), b.clone())),
            limiter: s
                .concurrency
                .as_ref()
                .map(|c| Limiter::new(config.name.clone(), c)),
            budget: Budget::new(&s.budget),
            discovery: Mutex::new(discovery::Status::default()),
            metrics: PoolMetrics {
                retries,
                budget_exhausted: metrics::counter!("gateway_upstream_retry_budget_exhausted_total", "upstream" => name.clone()),
                targets: metrics::gauge!("gateway_upstream_targets", "upstream" => name),
            },
            config: config.clone(),
        });
        if s.discovery != Discovery::Static
            && let Some(prev) = previous
            && prev.config.settings.discovery == s.discovery
        {
            let found: Vec<(Authority, u32)> = prev
                .targets()
                .targets
                .iter()
                .map(|t| (t.addr.clone(), t.weight))
                .collect();
            let _ = pool.set_targets(found);
        }
        pool.metrics.targets.set(pool.set.load().len() as f64);
        if s.discovery != Discovery::Static {
            discovery::start(&pool);
        }
        if s.health.is_some() {
            runtime::spawn(health::run(Arc::downgrade(&pool)));
        }
        runtime::spawn(export(Arc::downgrade(&pool)));
        pool
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The current target set.
    pub fn targets(&self) -> arc_swap::Guard<Arc<TargetSet>> {
        self.set.load()
    }

    /// Replaces the target set with `found` (from discovery), keeping the
    /// state of targets that stay. An empty list is refused: the last good
    /// set is kept. Requests in flight keep their targets until they end.
    pub fn set_targets(&self, found: Vec<(Authority, u32)>) -> Result<(), String> {
        if found.is_empty() {
            return Err("no targets found; keeping the last good set".into());
        }
        let current = self.set.load();
        let same = current.len() == found.len()
            && found.iter().all(|(a, w)| {
                current
                    .targets
                    .iter()
                    .any(|t| t.addr == *a && t.weight == *w)
            });
        if same {
            return Ok(());
        }
        let name = self.name();
        let targets: Vec<Arc<Target>> = found
            .iter()
            .map(|(addr, w)| {
                current
                    .targets
                    .iter()
                    .find(|t| t.addr == *addr && t.weight == *w)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Target::new(
                            name,
                            addr.clone(),
                            *w,
                            self.config.settings.max_connections_per_target,
                        ))
                    })
            })
            .collect();
        for t in &targets {
            if !current.targets.iter().any(|c| Arc::ptr_eq(c, t)) {
                tracing::info!(upstream = name, target = %t.addr, weight = t.weight, "target added");
            }
        }
        for c in &current.targets {
            if !targets.iter().any(|t| Arc::ptr_eq(c, t)) {
                tracing::info!(upstream = name, target = %c.addr, "target removed");
                c.metrics.healthy.set(0.0);
                c.metrics.in_flight.set(0.0);
            }
        }
        self.metrics.targets.set(targets.len() as f64);
        if let Some(h2) = &self.h2 {
            h2.keep_only(&targets);
        }
        self.set.store(Arc::new(TargetSet::new(
            targets,
            self.config.settings.balance,
        )));
        Ok(())
    }

    /// The consistent-hashing key of a request, if the pool hashes.
    pub fn request_hash(&self, client: std::net::IpAddr, headers: &HeaderMap) -> Option<u64> {
        self.config
            .settings
            .hash_key
            .as_ref()
            .and_then(|k| balance::request_hash(k, client, headers))
    }

    /// Counts a retry of kind `reason` against the budget; false when the
    /// budget is spent.
    pub fn take_retry(&self, reason: Reason) -> bool {
        if !self.budget.withdraw() {
            self.metrics.budget_exhausted.increment(1);
            return false;
        }
        let i = match reason {
            Reason::Connect => 0,
            Reason::Status => 1,
            Reason::Timeout => 2,
            Reason::Reset => 3,
        };
        self.metrics.retries[i].increment(1);
        true
    }

    /// One try: breaker admission, a target (avoiding `avoid` if another is
    /// available), its connection slot, the exchange until the response
    /// head (at most `timeout`, or, with a streamed request body, at most
    /// `timeout` after it has been sent: see `uploading`), and the outcome
    /// recorded for outlier detection and the breakers.
    pub async fn try_once(
        &self,
        req: &mut Request<Body>,
        route_breaker: Option<&Breaker>,
        hash: Option<u64>,
        avoid: Option<usize>,
        now: std::time::Instant,
        timeout: Duration,
    ) -> Result<Tried, Failed> {
        let refused = |error| Failed {
            error,
            retry: None,
            target: None,
        };
        let route_adm = match route_breaker {
            Some(b) => Some(b.admit().map_err(refused)?),
            None => None,
        };
        let pool_adm = match &self.breaker {
            Some(b) => Some(b.admit().map_err(refused)?),
            None => None,
        };
        let set = self.set.load();
        let now_ms = window::ms_at(now);
        let now = tokio::time::Instant::from_std(now);
        let Some(index) = set.pick(
            self.config.settings.balance,
            &self.next,
            hash,
            avoid,
            now_ms,
        ) else {
            let detail = if set.is_empty() {
                format!("upstream {:?} has no targets", self.config.name)
            } else {
                format!("upstream {:?} has no healthy targets", self.config.name)
            };
            return Err(refused(ProxyError::new(ErrorKind::NoUpstream, detail)));
        };
        let target = set.targets[index].clone();
        let deadline = now + timeout;
        // A streamed body's upload is not the upstream's time: the try's
        // clock runs while the upstream has the next move.
        let upload = req.body_mut().watch_upload();
        let conn = match &target.conns {
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    match tokio::time::timeout_at(deadline, sem.clone().acquire_owned()).await {
                        Ok(Ok(p)) => Some(p),
                        _ => {
                            return Err(Failed {
                                // Like every overload answer, with a hint
                                // of when to come back.
                                error: ProxyError::new(
                                    ErrorKind::Overloaded,
                                    format!(
                                        "target {} of upstream {:?} is at max_connections_per_target",
                                        target.addr, self.config.name
                                    ),
                                )
                                .with_header(
                                    http::header::RETRY_AFTER,
                                    http::HeaderValue::from_static("1"),
                                ),
                                retry: Some(Reason::Connect),
                                target: Some(index),
                            });
                        }
                    }
                }
            },
            None => None,
        };
        let in_flight = InFlight::new(target.clone(), conn);
        let slow = self
            .config
            .settings
            .outlier
            .as_ref()
            .and_then(|o| o.slow)
            .map(|(t, _)| (t, now + t));
        // A streamed upload is the client's time: slowness counts from its
        // end; and a failure of it is the client's.
        let uploaded = upload.clone();
        let result = match &self.h2 {
            Some(conns) => {
                let path = req
                    .uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"));
                // hyper's client takes the request: a copy of the head, so
                // that the caller keeps one for another try. Its host goes
                // as `:authority`, not as a second, possibly different
                // `Host` (RFC 9113 §8.3.1); the target's address only for a
                // request without one.
                let mut headers = req.headers().clone();
                let authority = headers
                    .remove(http::header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                    .unwrap_or_else(|| target.addr.clone());
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(conns.scheme());
                parts.authority = Some(authority);
                parts.path_and_query = Some(path);
                let mut r = Request::new(std::mem::replace(req.body_mut(), Body::empty()));
                *r.method_mut() = req.method().clone();
                *r.headers_mut() = headers;
                *r.uri_mut() = Uri::from_parts(parts).map_err(|e| {
                    refused(ProxyError::new(ErrorKind::Internal, "bad upstream URI").with_source(e))
                })?;
                *r.version_mut() = http::Version::HTTP_2;
                match upload {
                    None => tokio::time::timeout_at(deadline, conns.send(&target.addr, r))
                        .await
                        .map_err(|_| Expired::Answer),
                    Some(u) => uploading(timeout, u, conns.send(&target.addr, r)).await,
                }
                .map(|r| {
                    r.map(|(resp, stream)| resp.map(|b| UpstreamBody::H2(b, stream)))
                        .map_err(TryError::H2)
                })
            }
            // Origin form and HTTP/1.1 on the wire, Host as the client sent
            // it or the target's (`h1::encode_head`); the head is not
            // changed, so another try may go to another target.
            // The future is made in each arm: moved into a wrapper of
            // ours first, it would be copied once more (measured: ~270
            // instructions per request).
            None => match upload {
                None => tokio::time::timeout_at(
                    deadline,
                    send_h1(&target, req, self.h1, self.config.tls.as_ref()),
                )
                .await
                .map_err(|_| Expired::Answer),
                Some(u) => {
                    uploading(
                        timeout,
                        u,
                        send_h1(&target, req, self.h1, self.config.tls.as_ref()),
                    )
                    .await
                }
            },
        };
        let (outcome, out) = match result {
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                let o = if status >= 500 {
                    Outcome::Status5xx
                } else if slow.is_some_and(|(t, at)| {
                    let at = match uploaded.as_ref().map(|u| *u.borrow()) {
                        None => at,
                        Some(crate::proxy::body::Upload::Done(end)) => end.max(now) + t,
                        // Answered before the whole body was sent.
                        Some(_) => return false,
                    };
                    tokio::time::Instant::now() > at
                }) {
                    Outcome::Slow
                } else {
                    Outcome::Success
                };
                (
                    Some((o, status)),
                    Ok(Tried {
                        response,
                        in_flight,
                        target: index,
                    }),
                )
            }
            Ok(Err(e)) => {
                let client_fault = uploaded.as_ref().and_then(|u| match *u.borrow() {
                    crate::proxy::body::Upload::Failed(f) => Some(f),
                    _ => None,
                });
                let (error, reason) = match client_fault {
                    Some(f) => (f.error(), None),
                    None => classify(&self.config.name, &target.addr, e),
                };
                // A client-side body problem says nothing about the target.
                let o = (error.kind.side() != Side::Downstream).then_some((Outcome::Failure, 0));
                (
                    o,
                    Err(Failed {
                        error,
                        retry: reason,
                        target: Some(index),
                    }),
                )
            }
            Err(expired) => (
                Some((Outcome::Failure, 0)),
                Err(Failed {
                    error: ProxyError::new(
                        ErrorKind::UpstreamTimeout,
                        match expired {
                            Expired::Answer => format!(
                                "upstream {:?} ({}) did not answer within {timeout:?}",
                                self.config.name, target.addr
                            ),
                            Expired::Upload => format!(
                                "upstream {:?} ({}) took none of the request body for {timeout:?}",
                                self.config.name, target.addr
                            ),
                        },
                    ),
                    retry: Some(Reason::Timeout),
                    target: Some(index),
                }),
            ),
        };
        if let Some((o, status)) = outcome {
            outlier::record(
                &self.config.name,
                self.config.settings.outlier.as_ref(),
                &target,
                &set.targets,
                o,
                // Counted at the try's start; a failure, at its end.
                if o == Outcome::Success {
                    now_ms
                } else {
                    window::now_ms()
                },
            );
            for (b, adm) in [
                (route_breaker, route_adm),
                (self.breaker.as_ref(), pool_adm),
            ] {
                if let (Some(b), Some(adm)) = (b, adm) {
                    let failed =
                        o == Outcome::Failure || (o == Outcome::Status5xx && b.counts(status));
                    b.record(adm, failed);
                }
            }
        }
        out
    }

    /// The pool's state for `/admin/upstreams`.
    pub fn status(&self) -> serde_json::Value {
        let now = now_ms();
        let set = self.set.load();
        let s = &self.config.settings;
        let discovery = match self.discovery.lock() {
            Ok(d) => d.to_json(&s.discovery),
            Err(p) => p.into_inner().to_json(&s.discovery),
        };
        serde_json::json!({
            "name": &*self.config.name,
            "balance": s.balance.as_str(),
            "protocol": match self.config.protocol {
                UpstreamProtocol::Http1 => "http1",
                UpstreamProtocol::Http2 => "http2",
            },
            "tls": self.config.tls.as_ref().map(tls::Tls::status),
            "targets": set.targets.iter().map(|t| t.status(now)).collect::<Vec<_>>(),
            "healthy_targets": set.targets.iter().filter(|t| t.available(now)).count(),
            "circuit": self.breaker.as_ref().map(Breaker::status),
            "concurrency": self.limiter.as_ref().map(Limiter::status),
            "retry_budget": self.budget.status(),
            "discovery": discovery,
        })
    }

    pub(crate) fn discovery_status(&self) -> std::sync::MutexGuard<'_, discovery::Status> {
        self.discovery.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Describes the metrics this module exports (see docs/upstreams.md).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "gateway_upstream_target_healthy",
        "1 while active health checks pass for the target, by upstream and target."
    );
    describe_gauge!(
        "gateway_upstream_target_ejected",
        "1 while outlier detection has the target ejected."
    );
    describe_gauge!(
        "gateway_upstream_target_in_flight",
        "Requests in flight to the target (refreshed every second)."
    );
    describe_counter!(
        "gateway_upstream_ejections_total",
        "Outlier ejections by upstream and target."
    );
    describe_counter!(
        "gateway_upstream_health_checks_total",
        "Active health checks by upstream and result."
    );
    describe_gauge!("gateway_upstream_targets", "Targets in the pool.");
    describe_gauge!(
        "gateway_circuit_state",
        "Circuit breaker state: 0 closed, 1 open, 2 half-open."
    );
    describe_counter!(
        "gateway_circuit_transitions_total",
        "Circuit breaker transitions by upstream and new state."
    );
    describe_counter!(
        "gateway_upstream_retries_total",
        "Retries by upstream and reason (connect, status, timeout, reset)."
    );
    describe_counter!(
        "gateway_upstream_retry_budget_exhausted_total",
        "Retries refused because the pool's retry budget was spent."
    );
    describe_counter!(
        "gateway_upstream_overloaded_total",
        "Requests refused with 503 by a concurrency limit."
    );
    describe_counter!(
        "gateway_discovery_updates_total",
        "Service discovery rounds by upstream and result."
    );
}

/// Exports per-target gauges, and drops expired idle connections, once a
/// second until the pool is dropped.
async fn export(pool: std::sync::Weak<Pool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = now_ms();
        for t in pool.set.load().targets.iter() {
            conn::sweep(t, pool.h1.idle_timeout);
            t.metrics.in_flight.set(t.in_flight() as f64);
            t.metrics
                .healthy
                .set(if t.is_healthy() { 1.0 } else { 0.0 });
            t.metrics
                .ejected
                .set(if t.is_ejected(now) { 1.0 } else { 0.0 });
        }
    }
}

/// Why a try got no response.
#[derive(Debug)]
enum TryError {
    /// The HTTP/2 exchange failed (`h2`).
    H2(h2::Error),
    /// No HTTP/1.1 connection could be made.
    Connect(conn::ConnectError),
    /// The HTTP/1.1 exchange failed.
    Send(h1::Error),
}

/// Sends `req` on a pooled HTTP/1.1 connection to `target`. When an idle
/// connection fails before any of the request was written (the target
/// closed it: the race with its keep-alive timeout), the request goes out
/// on a new connection, once.
async fn send_h1(
    target: &Arc<Target>,
    req: &mut Request<Body>,
    settings: conn::Settings,
    tls: Option<&tls::Tls>,
) -> Result<Response<UpstreamBody>, TryError> {
    let home = || conn::ReturnTo {
        target: target.clone(),
        settings,
    };
    let done = |(head, body): (Response<()>, h1::H1Body)| head.map(|()| UpstreamBody::H1(body));
    if let Some(c) = conn::checkout(target, settings) {
        match h1::exchange(c, req, home()).await {
            Ok(r) => return Ok(done(r)),
            // A stale pooled connection: the request goes on a new one.
            Err((_, true)) => {}
            Err((e, false)) => return Err(TryError::Send(e)),
        }
    }
    let c = conn::connect(target, settings, tls)
        .await
        .map_err(TryError::Connect)?;
    h1::exchange(c, req, home())
        .await
        .map(done)
        .map_err(|(e, _)| TryError::Send(e))
}

/// Maps a failed try to the error kind it means and whether it may be
/// retried.
fn classify(name: &str, target: &Authority, e: TryError) -> (ProxyError, Option<Reason>) {
    // The client's body failing (over its limit, too slow, broken off) is
    // the client's problem: the own client says so directly, hyper's in its
    // source chain. Any body error here is the request's (the response has
    // not begun).
    if let TryError::Send(h1::Error::Body(b)) = &e {
        return (b.request_error(), None);
    }
    if let TryError::H2(e) = &e
        && e.unprocessed()
    {
        return (
            ProxyError::new(
                ErrorKind::UpstreamProtocol,
                format!("upstream {name:?} ({target}) refused the request unprocessed"),
            )
            .with_source(e.to_string()),
            // Nothing was processed: as safe to retry as a failed connect.
            Some(Reason::Connect),
        );
    }
    let (is_connect, source): (bool, Box<dyn std::error::Error + Send + Sync>) = match e {
        TryError::H2(e) => (e.is_connect(), Box::new(e)),
        TryError::Connect(e) => (true, Box::new(e)),
        TryError::Send(e) => (false, Box::new(e)),
    };
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&*source);
    while let Some(s) = src {
        if let Some(b) = s.downcast_ref::<BodyError>() {
            return (b.request_error(), None);
        }
        src = s.source();
    }
    if is_connect {
        let what = if tls::is_tls_failure(&*source) {
            "TLS handshake failed with"
        } else {
            "cannot connect to"
        };
        (
            ProxyError::new(
                ErrorKind::UpstreamConnect,
                format!("{what} upstream {name:?} ({target})"),
            )
            .with_source(source),
            Some(Reason::Connect),
        )
    } else {
        // TLS 1.3 servers refuse a client certificate (or its absence)
        // after the client has finished its handshake: the alert arrives
        // with the first read.
        let what = if tls::is_tls_failure(&*source) {
            "TLS failed with upstream"
        } else {
            "upstream"
        };
        (
            ProxyError::new(
                ErrorKind::UpstreamProtocol,
                format!("{what} {name:?} ({target}) failed"),
            )
            .with_source(source),
            Some(Reason::Reset),
        )
    }
}

/// What a try ran out of time waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// The response head.
    Answer,
    /// The upstream to take more of a streamed request body.
    Upload,
}

/// Runs a try's exchange `f` with a streamed request body (`upload`) until
/// `timeout` after the body has been sent; while it is being sent, the
/// clock runs only while the upstream holds it up (from the try's start, or
/// since it last took a chunk) and restarts with each chunk; waits for the
/// client's next chunk are the body's own timeout's. (A try without one
/// runs until its deadline.)
fn uploading<F: std::future::Future>(
    timeout: Duration,
    upload: tokio::sync::watch::Receiver<crate::proxy::body::Upload>,
    f: F,
) -> Uploading<F, impl std::future::Future<Output = Expired>> {
    Uploading {
        f,
        clock: upload_clock(timeout, upload),
    }
}

pin_project_lite::pin_project! {
    /// `uploading`'s future: the exchange, then the clock, polled in that
    /// order. A struct, not an `async fn` around `select!`, which kept the
    /// exchange's state twice (as the argument and inside the select):
    /// 2 KiB more in every request's pipeline.
    struct Uploading<F, C> {
        #[pin]
        f: F,
        #[pin]
        clock: C,
    }
}

impl<F: std::future::Future, C: std::future::Future<Output = Expired>> std::future::Future
    for Uploading<F, C>
{
    type Output = Result<F::Output, Expired>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(out) = this.f.poll(cx) {
            return std::task::Poll::Ready(Ok(out));
        }
        this.clock.poll(cx).map(Err)
    }
}

/// Resolves when a try with a streamed body is out of time (see
/// `uploading`).
async fn upload_clock(
    timeout: Duration,
    mut upload: tokio::sync::watch::Receiver<crate::proxy::body::Upload>,
) -> Expired {
    use crate::proxy::body::Upload;
    loop {
        let now = *upload.borrow_and_update();
        match now {
            // A body dropped unfinished is not being sent any more either.
            Upload::Done(_) | Upload::Failed(_) => break,
            Upload::Client => {
                if upload.changed().await.is_err() {
                    break;
                }
            }
            Upload::Upstream => {
                tokio::select! {
                    changed = upload.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(timeout) => return Expired::Upload,
                }
            }
        }
    }
    tokio::time::sleep(timeout).await;
    Expired::Answer
}
