//! HTTP/2 connections, served by hyper: the connection builder with the
//! listener's limits, and the driver that bounds what a connection may hold
//! without progress. It owns:
//!
//! - the idle timeout: a connection with no stream in flight is closed
//!   gracefully (GOAWAY) after `idle_timeout`, and on shutdown; once
//!   nothing is in flight, a client that does not finish the close within
//!   `idle_timeout` (at most 5 s) is cut off;
//! - the send timeout (`send_timeout`, as HTTP/1.1's): a socket write the
//!   client takes nothing of for that long ends the connection; a stream
//!   whose client grants it no flow-control window for that long (its last
//!   frame given to hyper and not sent) has its response body dropped,
//!   which frees what it holds upstream, and is reset when hyper next asks
//!   for data (hyper offers no way to reset a stream from outside);
//! - response stalls: an upstream body that yields nothing for
//!   `send_timeout` ends its stream (RST_STREAM), not the connection.
//! - `max_requests_per_connection` (GOAWAY after the last), and hyper's own
//!   stream limit and keep-alive PINGs as the listener sets them.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio::time::Sleep;

use super::Settings;
use crate::proxy::body::{Body, BodyError};
use crate::proxy::{self, Conn, Shared};
use crate::upstream::window::{ms, now_ms};

/// The instant the process clock reads `at`.
fn at_ms(at: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()))
}

/// The longest a connection with nothing in flight waits, after GOAWAY,
/// for the client to finish the graceful close (as Envoy's `drain_timeout`).
const MAX_DRAIN: Duration = Duration::from_secs(5);

/// hyper's HTTP/2 connection builder with our limits.
fn builder(s: &Settings) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(s.max_head()).unwrap_or(u32::MAX))
        .max_concurrent_streams(s.http2_max_concurrent_streams);
    if let Some((interval, timeout)) = s.http2_keepalive {
        b.keep_alive_interval(interval).keep_alive_timeout(timeout);
    }
    b
}

/// Activity on one connection, for the idle and send timeouts. Times are
/// the process's millisecond clock (`window::now_ms`, never 0).
struct Activity {
    /// When a request last started or ended.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// When a write first found the socket full, of those the socket has
    /// not taken since; 0 while writes go through.
    blocked_ms: AtomicU64,
    /// Told when a write first finds the socket full.
    blocked: Notify,
    /// Told when the connection has taken its last request
    /// (`max_requests_per_connection`).
    retire: Notify,
    /// The response bodies of this connection that hold something
    /// upstream, for the sweep.
    bodies: Mutex<Vec<Weak<Slot>>>,
}

/// A response body shared between its stream and the connection's sweep.
struct Slot {
    body: Mutex<Option<Body>>,
    /// When the body last gave hyper a frame that hyper has not asked past
    /// since (it waits for the client's window); 0 otherwise.
    given_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether a response body of this connection is still being sent.
    fn streaming(&self) -> bool {
        self.bodies
            .lock()
            .map(|b| b.iter().any(|w| w.strong_count() > 0))
            .unwrap_or(false)
    }

    /// Drops the response bodies whose last frame has waited `limit` for
    /// the client's window, freeing what they hold upstream.
    fn sweep(&self, limit: Duration) {
        let now = now_ms();
        let limit_ms = ms(limit);
        let mut cut = Vec::new();
        if let Ok(mut bodies) = self.bodies.lock() {
            bodies.retain(|w| {
                let Some(slot) = w.upgrade() else {
                    return false;
                };
                let given = slot.given_ms.load(Ordering::Relaxed);
                if given != 0 && now.saturating_sub(given) >= limit_ms {
                    cut.push(slot);
                    return false;
                }
                true
            });
        }
        for slot in cut {
            let body = slot.body.lock().ok().and_then(|mut b| b.take());
            if body.is_some() {
                metrics::counter!("gateway_send_timeouts_total").increment(1);
                tracing::debug!(
                    "an HTTP/2 stream's client granted no window for {limit:?}; its response is dropped"
                );
            }
            drop(body);
        }
    }

    /// Notes how a write went: `taken` if the socket took some of it.
    fn wrote(&self, taken: bool) {
        if taken {
            if self.blocked_ms.load(Ordering::Relaxed) != 0 {
                self.blocked_ms.store(0, Ordering::Relaxed);
            }
        } else if self.blocked_ms.load(Ordering::Relaxed) == 0 {
            self.blocked_ms.store(now_ms(), Ordering::Relaxed);
            self.blocked.notify_one();
        }
    }
}

/// Serves an HTTP/2 connection with hyper.
///
/// Not an `async fn`: its arguments would stay in its state for the
/// connection's life beside the hyper connection they are moved into (the
/// stream is 1.2 KiB over TLS). The connection is boxed for `drive`, which
/// would otherwise keep it twice as well (argument and pinned local).
pub(super) fn serve<T>(
    io: T,
    conn: Arc<Conn>,
    s: &Settings,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> impl Future<Output = ()>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        last_ms: AtomicU64::new(now_ms()),
        in_flight: AtomicUsize::new(0),
        blocked_ms: AtomicU64::new(0),
        blocked: Notify::new(),
        retire: Notify::new(),
        bodies: Mutex::new(Vec::new()),
    });
    let send_timeout = s.send_timeout;
    let max_requests = s.max_requests;
    let served = AtomicU64::new(0);
    let svc = {
        let activity = activity.clone();
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let shared = shared.clone();
            let conn = conn.clone();
            let activity = activity.clone();
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            // The last request a connection takes: GOAWAY lets the streams
            // open finish and refuses new ones.
            if served.fetch_add(1, Ordering::Relaxed) + 1 == max_requests {
                activity.retire.notify_one();
            }
            // Boxed where it is built: hyper spawns each stream as a task,
            // and tokio moves a task's future several times on its way
            // into the task and writes its whole stage when it finishes;
            // with the pipeline's state (about 10 KiB) inline, those copies
            // cost more than the rest of the stream (callgrind: 6k
            // instructions of memcpy per request).
            boxed_in_place(move || async move {
                let req = req.map(proxy::body::Incoming::Hyper);
                let resp = proxy::handle(&shared, &conn, req, None).await;
                activity.touch();
                activity.in_flight.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(resp.map(|body| Stalls::new(body, send_timeout, &activity)))
            })
        })
    };
    let io = Watched {
        io,
        activity: activity.clone(),
    };
    drive(
        Box::pin(builder(s).serve_connection(TokioIo::new(io), svc)),
        |c| c.graceful_shutdown(),
        activity,
        s.idle_timeout,
        send_timeout,
        shutdown,
    )
}

/// Runs a connection to completion, closing it gracefully when it has been
/// idle for `idle` or when the gateway shuts down, and at once when a write
/// has found the socket full for `send`; every `send / 2` it sweeps the
/// response bodies whose client has granted no window for `send`.
async fn drive<C, T, E>(
    mut conn: Pin<Box<C>>,
    graceful: impl Fn(Pin<&mut C>),
    activity: Arc<Activity>,
    idle: Duration,
    send: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    C: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut closing = false;
    // Once GOAWAY is sent, how long a connection with nothing in flight
    // may wait for the client's side of the graceful close (hyper's second
    // GOAWAY waits for a PING answer that a client may never send).
    let drain = idle.min(MAX_DRAIN);
    let mut drain_at = tokio::time::Instant::now();
    // Not more often than every 10 ms, whatever `send_timeout` says.
    let sweep_every = (send / 2).max(Duration::from_millis(10));
    let mut sweep_at = tokio::time::Instant::now() + sweep_every;
    loop {
        let deadline = if activity.in_flight.load(Ordering::Relaxed) > 0 {
            tokio::time::Instant::now() + idle
        } else {
            at_ms(activity.last_ms.load(Ordering::Relaxed) + ms(idle))
        };
        let blocked = activity.blocked_ms.load(Ordering::Relaxed);
        let cut_at = at_ms(blocked.saturating_add(ms(send)));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            () = activity.blocked.notified(), if blocked == 0 => {}
            () = tokio::time::sleep_until(sweep_at) => {
                activity.sweep(send);
                sweep_at = tokio::time::Instant::now() + sweep_every;
            }
            () = tokio::time::sleep_until(cut_at), if blocked != 0 => {
                if activity.blocked_ms.load(Ordering::Relaxed) == blocked {
                    metrics::counter!("gateway_send_timeouts_total").increment(1);
                    tracing::debug!("the client took nothing for {send:?}; connection closed");
                    return;
                }
            }
            () = tokio::time::sleep_until(drain_at), if closing => {
                if activity.in_flight.load(Ordering::Relaxed) == 0 && !activity.streaming() {
                    tracing::debug!("the client did not finish closing within {drain:?}; connection closed");
                    return;
                }
                drain_at = tokio::time::Instant::now() + drain;
            }
            _ = tokio::time::sleep_until(deadline), if !closing => {
                let idle_for = now_ms().saturating_sub(activity.last_ms.load(Ordering::Relaxed));
                if activity.in_flight.load(Ordering::Relaxed) == 0 && idle_for >= ms(idle) {
                    graceful(conn.as_mut());
                    closing = true;
                    drain_at = tokio::time::Instant::now() + drain;
                }
            }
            () = activity.retire.notified(), if !closing => {
                graceful(conn.as_mut());
                closing = true;
                drain_at = tokio::time::Instant::now() + drain;
            }
            _ = shutdown.changed(), if !closing => {
                graceful(conn.as_mut());
                closing = true;
                drain_at = tokio::time::Instant::now() + drain;
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
/// mid-body holds its slots as a slow reader would. A body that holds
/// something upstream is shared with the connection's sweep, which drops
/// it when the client grants no window for it (`Activity::sweep`).
pub struct Stalls {
    inner: Inner,
    limit: Duration,
    /// Armed while the body has nothing ready; made on the first wait.
    deadline: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

enum Inner {
    /// A complete body: nothing held upstream.
    Own(Body),
    Shared(Arc<Slot>),
}

impl Stalls {
    fn new(inner: Body, limit: Duration, activity: &Activity) -> Self {
        let inner = if matches!(inner, Body::Full(_)) {
            Inner::Own(inner)
        } else {
            let slot = Arc::new(Slot {
                body: Mutex::new(Some(inner)),
                given_ms: AtomicU64::new(0),
            });
            if let Ok(mut bodies) = activity.bodies.lock() {
                // Ended bodies leave their entries behind: cleared whenever
                // the list is full, so it stays within about twice the
                // streams in flight however many the connection serves.
                if bodies.len() == bodies.capacity() {
                    bodies.retain(|w| w.strong_count() > 0);
                }
                bodies.push(Arc::downgrade(&slot));
            }
            Inner::Shared(slot)
        };
        Stalls {
            inner,
            limit,
            deadline: None,
            waiting: false,
        }
    }

    /// `f` of the body, if the sweep has not dropped it.
    fn with_body<R>(&self, f: impl FnOnce(&Body) -> R) -> Option<R> {
        match &self.inner {
            Inner::Own(b) => Some(f(b)),
            Inner::Shared(slot) => slot.body.lock().ok()?.as_ref().map(f),
        }
    }

    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.inner {
            Inner::Own(b) => Pin::new(b).poll_frame(cx),
            Inner::Shared(slot) => {
                let mut body = match slot.body.lock() {
                    Ok(b) => b,
                    Err(_) => return Poll::Ready(Some(Err(BodyError::NotTaken(self.limit)))),
                };
                // Dropped by the sweep: the client took too long.
                let Some(b) = body.as_mut() else {
                    return Poll::Ready(Some(Err(BodyError::NotTaken(self.limit))));
                };
                let r = Pin::new(b).poll_frame(cx);
                let given = match &r {
                    Poll::Ready(Some(Ok(_))) => now_ms(),
                    _ => 0,
                };
                slot.given_ms.store(given, Ordering::Relaxed);
                r
            }
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
        match me.poll_inner(cx) {
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
        self.with_body(Body::is_end_stream).unwrap_or(false)
    }

    fn size_hint(&self) -> SizeHint {
        self.with_body(Body::size_hint).unwrap_or_default()
    }
}

/// `Box::pin(make())` without building the future on the stack first and
/// copying it into the box (as `Box::pin` of a large future does).
fn boxed_in_place<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}
