//! HTTP/2 connections, served by hyper: the connection builder with the
//! listener's limits, and the driver that bounds what a connection may hold
//! without progress. It owns:
//!
//! - the idle timeout: a connection with no stream in flight is closed
//!   gracefully (GOAWAY) after `idle_timeout`, and on shutdown;
//! - the send timeout (`send_timeout`, as HTTP/1.1's): a socket write the
//!   client takes nothing of for that long ends the connection (hyper
//!   cannot end a single stream from outside, and a client that reads
//!   nothing stalls all of them anyway);
//! - response stalls: an upstream body that yields nothing for
//!   `send_timeout` ends its stream (RST_STREAM), not the connection.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio::time::Sleep;

use super::Settings;
use crate::proxy::body::{Body, BodyError};
use crate::proxy::{self, Conn, Shared};

/// hyper's HTTP/2 connection builder with our limits.
fn builder(s: &Settings) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(s.max_head()).unwrap_or(u32::MAX));
    b
}

/// Activity on one connection, for the idle and send timeouts.
struct Activity {
    started: Instant,
    /// Milliseconds since `started` of the last request start or end.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// 1 + milliseconds since `started` of the first write, of those the
    /// socket has not taken since, that found it full; 0 while writes go
    /// through.
    blocked_ms: AtomicU64,
    /// Told when a write first finds the socket full.
    blocked: Notify,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Notes how a write went: `taken` if the socket took some of it.
    fn wrote(&self, taken: bool) {
        if taken {
            if self.blocked_ms.load(Ordering::Relaxed) != 0 {
                self.blocked_ms.store(0, Ordering::Relaxed);
            }
        } else if self.blocked_ms.load(Ordering::Relaxed) == 0 {
            self.blocked_ms.store(self.now_ms() + 1, Ordering::Relaxed);
            self.blocked.notify_one();
        }
    }
}

/// Serves an HTTP/2 connection with hyper.
pub(super) async fn serve<T>(
    io: T,
    conn: Arc<Conn>,
    s: &Settings,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        started: Instant::now(),
        last_ms: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        blocked_ms: AtomicU64::new(0),
        blocked: Notify::new(),
    });
    let send_timeout = s.send_timeout;
    let svc = {
        let activity = activity.clone();
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let shared = shared.clone();
            let conn = conn.clone();
            let activity = activity.clone();
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            async move {
                let req = req.map(proxy::body::Incoming::Hyper);
                let resp = proxy::handle(&shared, &conn, req).await;
                activity.touch();
                activity.in_flight.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(resp.map(|body| Stalls::new(body, send_timeout)))
            }
        })
    };
    let io = Watched {
        io,
        activity: activity.clone(),
    };
    drive(
        builder(s).serve_connection(TokioIo::new(io), svc),
        |c| c.graceful_shutdown(),
        &activity,
        s.idle_timeout,
        send_timeout,
        shutdown,
    )
    .await;
}

/// Runs a connection to completion, closing it gracefully when it has been
/// idle for `idle` or when the gateway shuts down, and at once when a write
/// has found the socket full for `send`.
async fn drive<C, T, E>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    activity: &Activity,
    idle: Duration,
    send: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    C: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        let deadline = if activity.in_flight.load(Ordering::Relaxed) > 0 {
            tokio::time::Instant::now() + idle
        } else {
            tokio::time::Instant::from_std(activity.started + last + idle)
        };
        let blocked = activity.blocked_ms.load(Ordering::Relaxed);
        let cut_at = tokio::time::Instant::from_std(
            activity.started + Duration::from_millis(blocked.saturating_sub(1)) + send,
        );
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            () = activity.blocked.notified(), if blocked == 0 => {}
            () = tokio::time::sleep_until(cut_at), if blocked != 0 => {
                if activity.blocked_ms.load(Ordering::Relaxed) == blocked {
                    metrics::counter!("gateway_send_timeouts_total").increment(1);
                    tracing::debug!("the client took nothing for {send:?}; connection closed");
                    return;
                }
            }
            _ = tokio::time::sleep_until(deadline), if !closing => {
                let idle_for = activity.now_ms().saturating_sub(activity.last_ms.load(Ordering::Relaxed));
                if activity.in_flight.load(Ordering::Relaxed) == 0 && u128::from(idle_for) >= idle.as_millis() {
                    graceful(conn.as_mut());
                    closing = true;
                }
            }
            _ = shutdown.changed(), if !closing => {
                graceful(conn.as_mut());
                closing = true;
            }
        }
    }
}

/// A connection's socket, telling its `Activity` whether writes go
/// through.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> Watched<T> {
    fn note<R>(&self, r: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        match &r {
            Poll::Pending => self.activity.wrote(false),
            Poll::Ready(_) => self.activity.wrote(true),
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body on an HTTP/2 stream, ended with an error (which resets
/// the stream) when it yields nothing for its limit: an upstream that stops
/// mid-body holds its slots as a slow reader would.
pub struct Stalls {
    inner: Body,
    limit: Duration,
    /// Armed while the body has nothing ready; made on the first wait.
    deadline: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl Stalls {
    fn new(inner: Body, limit: Duration) -> Self {
        Stalls {
            inner,
            limit,
            deadline: None,
            waiting: false,
        }
    }
}

impl http_body::Body for Stalls {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let me = self.get_mut();
        match Pin::new(&mut me.inner).poll_frame(cx) {
            Poll::Pending => {
                let at = tokio::time::Instant::now() + me.limit;
                let sleep = me
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if !me.waiting {
                    me.waiting = true;
                    sleep.as_mut().reset(at);
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        metrics::counter!("gateway_response_stalls_total").increment(1);
                        tracing::debug!(
                            "the response body made no progress for {:?}; stream reset",
                            me.limit
                        );
                        Poll::Ready(Some(Err(BodyError::Stalled(me.limit))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => {
                me.waiting = false;
                ready
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
