//! HTTP/1.1 connections to targets, pooled per target: a last-in first-out
//! list of idle connections on the `Target` itself, so a request takes the
//! most recently used connection of the target the balancer chose with one
//! short lock, without a pool-wide map keyed by address (HTTP/2 upstreams,
//! which multiplex, go through hyper-util's client instead).
//!
//! A connection goes back to its target when the response body has been
//! read to its end (`Pooled::finish`); a response dropped half-read takes
//! its connection with it. Idle connections older than `pool_idle_timeout`
//! are dropped when found, and by `sweep` once a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::target::Target;
use crate::proxy::body::Body;

/// An idle connection and when it became idle.
pub(super) struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// What checking a connection out can fail with.
#[derive(Debug)]
pub enum ConnectError {
    Io(std::io::Error),
    Timeout(Duration),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::Timeout(t) => write!(f, "connect timed out after {t:?}"),
            ConnectError::Handshake(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Io(e) => Some(e),
            ConnectError::Timeout(_) => None,
            ConnectError::Handshake(e) => Some(e),
        }
    }
}

/// A failed send: hyper's error, and the request if it was never written.
#[derive(Debug)]
pub struct SendError {
    pub error: Option<hyper::Error>,
    pub request: Option<Request<Body>>,
}

/// Pool settings of the upstream a connection belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

/// A connection in use. Goes back to its target's idle list once
/// `finish`ed; dropped unfinished, the connection closes.
pub struct Pooled {
    sender: Option<SendRequest<Body>>,
    target: Arc<Target>,
    settings: Settings,
    /// Taken from the idle list (rather than just made).
    pub reused: bool,
    finished: bool,
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pooled")
            .field("target", &self.target.addr)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl Pooled {
    /// Checks out an idle connection to `target` (waiting until it is ready
    /// for a request), or makes a new one.
    pub async fn get(target: &Arc<Target>, settings: Settings) -> Result<Pooled, ConnectError> {
        loop {
            let idle = target.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(Idle { mut sender, since }) = idle else {
                break;
            };
            if sender.is_closed() || since.elapsed() > settings.idle_timeout {
                continue;
            }
            // Ready at once unless the connection is still finishing the
            // response it was released after; an error means it closed.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Ok(Pooled {
                    sender: Some(sender),
                    target: target.clone(),
                    settings,
                    reused: true,
                    finished: false,
                });
            }
        }
        Self::connect(target, settings).await
    }

    /// A new connection to `target`.
    pub async fn connect(target: &Arc<Target>, settings: Settings) -> Result<Pooled, ConnectError> {
        let stream = tokio::time::timeout(
            settings.connect_timeout,
            tokio::net::TcpStream::connect(target.addr.as_str()),
        )
        .await
        .map_err(|_| ConnectError::Timeout(settings.connect_timeout))?
        .map_err(ConnectError::Io)?;
        stream.set_nodelay(true).map_err(ConnectError::Io)?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        // The connection's I/O runs in its own task on this worker; it ends
        // when the last `SendRequest` is dropped or the peer closes.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(Pooled {
            sender: Some(sender),
            target: target.clone(),
            settings,
            reused: false,
            finished: false,
        })
    }

    /// Sends `req` (origin-form URI). On failure the request comes back if
    /// it was never written, so that it can go out on another connection.
    pub async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<http::Response<Incoming>, SendError> {
        let Some(s) = &mut self.sender else {
            return Err(SendError {
                error: None,
                request: Some(req),
            });
        };
        s.try_send_request(req).await.map_err(|mut e| SendError {
            request: e.take_message(),
            error: Some(e.into_error()),
        })
    }

    /// The response body was read to its end: the connection may serve the
    /// next request.
    pub fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(sender) = self.sender.take() else {
            return;
        };
        if !self.finished || sender.is_closed() {
            return;
        }
        let mut idle = self.target.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.settings.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// Drops `target`'s idle connections that are closed or older than
/// `idle_timeout`.
pub fn sweep(target: &Target, idle_timeout: Duration) {
    let mut idle = target.idle.lock().unwrap_or_else(|e| e.into_inner());
    idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() <= idle_timeout);
}
