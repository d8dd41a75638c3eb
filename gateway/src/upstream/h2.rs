//! HTTP/2 upstream connections: multiplexed connections per target and
//! worker (hyper's connection-level client over `conn::open`, so plain h2c
//! or TLS with ALPN `h2`; made on the worker's own runtime, as the HTTP/1.1
//! pools are). A request takes the oldest connection with fewer than
//! `http2_max_concurrent_streams` streams in flight, and another connection
//! is dialed when none has room (as Envoy's pool does when a connection is
//! at its stream limit), so long-lived streams (gRPC streaming) cannot keep
//! new requests waiting; a connection is let go once it has closed (the
//! upstream's GOAWAY, an error, a PING unanswered) or no request started on
//! it for `pool_idle_timeout`. Every request names its own host as
//! `:authority` (RFC 9113 §8.3.1): connections are per target and worker,
//! never per host, so clients choosing hosts cannot make the gateway open
//! more of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::conn::{self, ConnectError};
use super::target::Target;
use super::tls::Tls;
use crate::config::UpstreamConfig;
use crate::proxy::body::Body;

/// Why an HTTP/2 exchange got no response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// (Its own error in the source chain, where `tls::is_tls_failure`
    /// looks for a failed handshake.)
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error(transparent)]
    Request(hyper::Error),
}

impl Error {
    /// No connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_) | Error::Handshake(_))
    }

    /// The request was not processed, so another try is safe whatever its
    /// method: the connection was closing before it went out, or the
    /// upstream reset its stream with `REFUSED_STREAM` (RFC 9113 §8.7: a
    /// server draining with GOAWAY, or at its stream limit).
    pub fn unprocessed(&self) -> bool {
        let Error::Request(e) = self else {
            return false;
        };
        e.is_canceled()
            || std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .and_then(h2::Error::reason)
                == Some(h2::Reason::REFUSED_STREAM)
    }
}

/// The HTTP/2 connections of one upstream's targets.
pub struct Conns {
    scheme: Scheme,
    tls: Option<Tls>,
    connect_timeout: Duration,
    /// `pool_idle_timeout`.
    idle_timeout: Duration,
    /// PING interval and timeout (`http2_keepalive_*`).
    keepalive: Option<(Duration, Duration)>,
    /// Streams in flight on one connection before another is dialed.
    max_streams: usize,
    /// By target and worker.
    by_target: Mutex<HashMap<(Authority, usize), Arc<Slot>>>,
}

/// One target's connections on one worker.
#[derive(Default)]
struct Slot {
    /// Its connections, oldest first.
    live: Mutex<Vec<Live>>,
    /// Connections dialed so far (the next one's number).
    dialed: AtomicU64,
    /// Held while dialing, so that requests arriving meanwhile wait for
    /// that connection instead of each dialing its own.
    dialing: tokio::sync::Mutex<()>,
    /// Failed dials so far and how the last one failed: the requests that
    /// waited for it fail with it at once, instead of each dialing in turn
    /// (a target that drops SYNs would hold the n-th for n connect
    /// timeouts).
    failures: Mutex<(u64, Option<Failed>)>,
}

/// One connection of a slot.
struct Live {
    sender: SendRequest<Body>,
    /// When a request last started on it.
    used: Instant,
    /// Its number (`Slot::dialed` when it was made).
    n: u64,
    /// Its streams in flight.
    streams: Arc<AtomicUsize>,
}

/// A stream's place on its connection, given back when dropped (with the
/// response body, or at once when the exchange failed).
#[derive(Debug)]
pub struct Stream(Arc<AtomicUsize>);

impl Stream {
    fn new(streams: &Arc<AtomicUsize>) -> Stream {
        streams.fetch_add(1, Ordering::Relaxed);
        Stream(streams.clone())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a dial failed, kept for the requests that waited on it.
#[derive(Clone, Debug)]
struct Failed {
    timeout: Option<Duration>,
    tls: bool,
    message: String,
}

impl Failed {
    fn of(e: &Error) -> Failed {
        Failed {
            timeout: match e {
                Error::Connect(ConnectError::Timeout(t)) => Some(*t),
                _ => None,
            },
            tls: matches!(e, Error::Connect(ConnectError::Tls(_))),
            message: e.to_string(),
        }
    }

    fn error(&self) -> Error {
        let io = || std::io::Error::other(self.message.clone());
        Error::Connect(match self.timeout {
            Some(t) => ConnectError::Timeout(t),
            None if self.tls => ConnectError::Tls(io()),
            None => ConnectError::Io(io()),
        })
    }
}

impl Slot {
    fn failures(&self) -> (u64, Option<Failed>) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The oldest connection with room for another stream, with that
    /// stream's place taken. Connections that have closed or on which no
    /// request started for `idle` (a firewall or NAT may have forgotten
    /// them silently: a request on one would wait for its timeout) are let
    /// go first; one let go finishes its streams in flight, then closes.
    fn current(
        &self,
        idle: Duration,
        max_streams: usize,
    ) -> Option<(SendRequest<Body>, u64, Stream)> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        live.retain(|l| !l.sender.is_closed() && now.duration_since(l.used) <= idle);
        let l = live
            .iter_mut()
            .find(|l| l.streams.load(Ordering::Relaxed) < max_streams)?;
        l.used = now;
        Some((l.sender.clone(), l.n, Stream::new(&l.streams)))
    }

    /// Lets connection `n` go: it refused a request unprocessed (it is
    /// going away), and the retry must not meet it again.
    fn forget(&self, n: u64) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|l| l.n != n);
    }
}

impl Conns {
    pub fn new(config: &UpstreamConfig) -> Conns {
        Conns {
            scheme: if config.tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            tls: config.tls.clone(),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            keepalive: config.http2_keepalive,
            max_streams: config.http2_max_concurrent_streams,
            by_target: Mutex::new(HashMap::new()),
        }
    }

    /// `http` (h2c) or `https`.
    pub fn scheme(&self) -> Scheme {
        self.scheme.clone()
    }

    /// Sends `req` (its URI absolute: the scheme, the request's host, the
    /// path) to the target at `addr`. The response comes with its stream's
    /// place on the connection, to be kept until its body is done.
    pub async fn send(
        &self,
        addr: &Authority,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Stream), Error> {
        let slot = self.slot(addr);
        let mut req = req;
        let mut first = true;
        loop {
            let (mut sender, n, stream) = match slot.current(self.idle_timeout, self.max_streams) {
                Some(s) => s,
                None => self.dial(&slot, addr).await?,
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, stream)),
                Err(mut e) => {
                    let unsent = e.take_message();
                    let err = Error::Request(e.into_error());
                    if err.unprocessed() {
                        slot.forget(n);
                    }
                    // A connection going away that never sent the request:
                    // it goes out once more on a fresh one at once, as on a
                    // stale HTTP/1.1 connection (not a retry: nothing was
                    // sent).
                    match unsent {
                        Some(r) if first => {
                            req = r;
                            first = false;
                        }
                        _ => return Err(err),
                    }
                }
            }
        }
    }

    /// Forgets the connections of targets not in `set` (discovery dropped
    /// them); requests in flight on them finish.
    pub fn keep_only(&self, set: &[Arc<Target>]) {
        self.by_target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(addr, _), _| set.iter().any(|t| t.addr == *addr));
    }

    fn slot(&self, addr: &Authority) -> Arc<Slot> {
        self.by_target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((addr.clone(), conn::worker()))
            .or_default()
            .clone()
    }

    async fn dial(
        &self,
        slot: &Slot,
        addr: &Authority,
    ) -> Result<(SendRequest<Body>, u64, Stream), Error> {
        let failures_before = slot.failures().0;
        let _one = slot.dialing.lock().await;
        if let Some(s) = slot.current(self.idle_timeout, self.max_streams) {
            return Ok(s);
        }
        if let (n, Some(failed)) = slot.failures()
            && n != failures_before
        {
            return Err(failed.error());
        }
        self.connect(slot, addr).await.inspect_err(|e| {
            let mut f = slot.failures.lock().unwrap_or_else(PoisonError::into_inner);
            *f = (f.0 + 1, Some(Failed::of(e)));
        })
    }

    async fn connect(
        &self,
        slot: &Slot,
        addr: &Authority,
    ) -> Result<(SendRequest<Body>, u64, Stream), Error> {
        let io = conn::open(addr, self.connect_timeout, self.tls.as_ref()).await?;
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        if let Some((interval, timeout)) = self.keepalive {
            // Idle too: a dead peer is found before a request meets it.
            builder
                .keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true);
        }
        let handshake = builder.handshake(TokioIo::new(io));
        let (sender, connection) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| Error::Connect(ConnectError::Timeout(self.connect_timeout)))?
            .map_err(Error::Handshake)?;
        let target = addr.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%target, "HTTP/2 upstream connection ended: {e}");
            }
        });
        let n = slot.dialed.fetch_add(1, Ordering::Relaxed);
        let streams = Arc::new(AtomicUsize::new(0));
        let stream = Stream::new(&streams);
        slot.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Live {
                sender: sender.clone(),
                used: Instant::now(),
                n,
                streams,
            });
        Ok((sender, n, stream))
    }
}
