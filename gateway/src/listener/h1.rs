//! The gateway's own HTTP/1.1 server side, used on every HTTP/1 connection
//! (plain, and TLS without `h2` by ALPN). It owns the connection loop:
//!
//! 1. wait for the next request head (the idle timeout runs while nothing
//!    is buffered; graceful shutdown ends an idle connection);
//! 2. read the head (the header read timeout runs from its first byte) and
//!    parse it once with httparse; malformed heads, oversized heads and
//!    ambiguous body framing (`Content-Length` with `Transfer-Encoding`,
//!    conflicting or malformed lengths, codings other than one `chunked`)
//!    are answered `400`/`431`/`408` problem+json here, before any request
//!    exists, and the connection is closed;
//! 3. hand the request to the pipeline (`proxy::handle`) with a body that
//!    reads from the connection (`Content-Length` or chunked, sending
//!    `100 Continue` first when the client asked for it);
//! 4. write the response: head and the body's first frames in one write,
//!    `Content-Length` or chunked framing, `Date`, keep-alive or close;
//! 5. keep the connection when the request body was read to its end and
//!    neither side asked to close, and go on with the next (possibly
//!    already buffered, pipelined) head.
//!
//! An h2c preface on a plain listener hands the connection back to the
//! caller, which serves it with hyper's HTTP/2.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::chunked;
use crate::error::ErrorKind;
use crate::proxy::body::{Body, Incoming};
use crate::proxy::{self, Conn, Shared};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Body data up to this size is copied next to the head (or the previous
/// chunk) to go out in the same write.
const COALESCE: usize = 16 * 1024;
/// Header fields parsed on the stack; more need a heap array.
const STACK_HEADERS: usize = 256;

/// A connection's limits, from its listener.
pub(super) struct Limits {
    /// A head longer than this is refused with `431` before it is parsed
    /// (twice the listener's limit: between the two, the pipeline answers
    /// `431` with the request's id and the exact size).
    pub max_head: usize,
    /// The listener's limit, for the message.
    pub max_header_bytes: usize,
    /// More header fields than this are refused with `431` (the
    /// listener's exact limit is checked by the pipeline).
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Longest a response write may wait for the client to take data.
    pub send_timeout: Duration,
    /// Give a request up when its client closes its side of the connection
    /// while the request waits for its response or its response for the
    /// upstream (not `ignore_client_abort`).
    pub watch_client: bool,
    /// Requests served before the connection is closed; 0: no limit.
    pub max_requests: u64,
    /// Hand an h2c prior-knowledge connection back to the caller.
    pub h2c: bool,
}

/// How a connection ended.
pub(super) enum End<T> {
    Closed,
    /// The client sent the HTTP/2 preface: serve `stream` as HTTP/2, replaying
    /// `read` (the bytes already read) first.
    H2c {
        stream: T,
        read: Bytes,
    },
}

/// The connection, shared by the serve loop and the body of the request
/// being served (locked only inside polls, never across an await).
struct Io<T> {
    stream: T,
    /// Bytes read and not consumed yet: the rest of a head, body bytes, or
    /// pipelined requests.
    buf: BytesMut,
    eof: bool,
    /// The current request's body.
    body: Framing,
    /// `100 Continue` bytes still to write before the body is read.
    continue_owed: &'static [u8],
    /// The interim response is written but not flushed yet.
    flush_owed: bool,
    /// The client closed its side (or the connection failed) while its
    /// request was being served: the request was given up.
    aborted: bool,
    /// The socket is being watched for the client leaving (`poll_gone`),
    /// with `watch`'s waker.
    armed: bool,
    /// Made on the first watch and kept for the connection, with the waker
    /// made of it.
    watch: Option<(Arc<ClientWatch>, std::task::Waker)>,
}

/// The waker `poll_gone` leaves with the client socket: it notes that the
/// socket had an event, then wakes the connection's task. Polls of the task
/// for other reasons (the upstream) then cost `poll_gone` one atomic swap
/// instead of another pass through tokio's registration.
struct ClientWatch {
    fired: std::sync::atomic::AtomicBool,
    task: Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for ClientWatch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, std::sync::atomic::Ordering::Release);
        if let Some(w) = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            w.wake_by_ref();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body, or all of it read.
    Done,
    Fixed(u64),
    Chunked(chunked::Decoder),
    /// The body's framing was malformed or the client went away: the
    /// connection cannot be reused.
    Failed,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the client closed the connection before the end of the request body")]
    Incomplete,
    #[error("malformed chunked request body: {0}")]
    Framing(&'static str),
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a request body reads from.
trait Source: Send + Sync {
    fn poll_data(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ReadError>>>;
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Source for Mutex<Io<T>> {
    fn poll_data(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ReadError>>> {
        let mut g = lock(self);
        let io = &mut *g;
        while !io.continue_owed.is_empty() {
            match Pin::new(&mut io.stream).poll_write(cx, io.continue_owed) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Some(Err(ReadError::Incomplete))),
                Poll::Ready(Ok(n)) => {
                    io.continue_owed = &io.continue_owed[n.min(io.continue_owed.len())..];
                    io.flush_owed = io.continue_owed.is_empty();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Pending => return Poll::Pending,
            }
        }
        if io.flush_owed {
            match Pin::new(&mut io.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => io.flush_owed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Pending => return Poll::Pending,
            }
        }
        loop {
            match io.body {
                Framing::Done => return Poll::Ready(None),
                Framing::Failed => return Poll::Ready(Some(Err(ReadError::Incomplete))),
                Framing::Fixed(rem) if !io.buf.is_empty() => {
                    let n = usize::try_from(rem).unwrap_or(usize::MAX).min(io.buf.len());
                    io.body = if n as u64 == rem {
                        Framing::Done
                    } else {
                        Framing::Fixed(rem - n as u64)
                    };
                    return Poll::Ready(Some(Ok(io.buf.split_to(n).freeze())));
                }
                Framing::Chunked(mut d) if !io.buf.is_empty() => {
                    let step = match d.advance(&io.buf) {
                        Ok(s) => s,
                        Err(why) => {
                            io.body = Framing::Failed;
                            return Poll::Ready(Some(Err(ReadError::Framing(why))));
                        }
                    };
                    if step.framing + step.data == 0 && !d.is_done() {
                        io.body = Framing::Failed;
                        return Poll::Ready(Some(Err(ReadError::Framing("no progress"))));
                    }
                    io.buf.advance(step.framing);
                    io.body = if d.is_done() {
                        Framing::Done
                    } else {
                        Framing::Chunked(d)
                    };
                    if step.data > 0 {
                        return Poll::Ready(Some(Ok(io.buf.split_to(step.data).freeze())));
                    }
                    continue;
                }
                Framing::Fixed(_) | Framing::Chunked(_) => {}
            }
            // The buffer is empty: read more.
            if io.eof {
                io.body = Framing::Failed;
                return Poll::Ready(Some(Err(ReadError::Incomplete)));
            }
            match poll_fill(io, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    io.body = Framing::Failed;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Reads what the socket has into `io.buf`; sets `io.eof` at the end.
///
/// A connection waiting for its next request holds no buffer (`serve`
/// gives it back to `wire`'s list): that first read lands on the stack and
/// only the bytes that arrived move to a buffer from the list, so an idle
/// keep-alive connection costs no read buffer.
fn poll_fill<T: AsyncRead + Unpin>(io: &mut Io<T>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    if io.buf.capacity() == 0 {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut rb = tokio::io::ReadBuf::uninit(&mut stack);
        match Pin::new(&mut io.stream).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let got = rb.filled();
        if got.is_empty() {
            io.eof = true;
        } else {
            io.buf = crate::wire::read_buffer();
            io.buf.extend_from_slice(got);
        }
        return Poll::Ready(Ok(()));
    }
    if io.buf.capacity() - io.buf.len() < 1024 {
        io.buf.reserve(READ_CHUNK);
    }
    match tokio_util::io::poll_read_buf(Pin::new(&mut io.stream), cx, &mut io.buf) {
        Poll::Ready(Ok(0)) => {
            io.eof = true;
            Poll::Ready(Ok(()))
        }
        Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// A request body read from an HTTP/1.1 connection.
pub struct RequestBody {
    src: Option<Arc<dyn Source>>,
    /// Bytes still to come, when the length is known.
    remaining: Option<u64>,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("done", &self.src.is_none())
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        let Some(src) = &self.src else {
            return Poll::Ready(None);
        };
        match src.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if let Some(r) = &mut self.remaining {
                    *r = r.saturating_sub(data.len() as u64);
                    if *r == 0 {
                        self.src = None;
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(None) => {
                self.src = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.src = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.src.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (self.remaining, &self.src) {
            (_, None) => SizeHint::with_exact(0),
            (Some(n), _) => SizeHint::with_exact(n),
            (None, _) => SizeHint::default(),
        }
    }
}

/// Serves HTTP/1.1 requests on `stream` until either side closes it.
///
/// Not an `async fn`: an async fn's arguments stay in its state for its
/// whole life, so the stream (1.2 KiB over TLS) would be kept twice, once
/// dead beside the one moved into `Io`.
pub(super) fn serve<T>(
    stream: T,
    conn: Arc<Conn>,
    lim: Limits,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> impl Future<Output = End<T>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Arc::new(Mutex::new(Io {
        stream,
        buf: BytesMut::new(),
        eof: false,
        body: Framing::Done,
        continue_owed: &[],
        flush_owed: false,
        aborted: false,
        armed: false,
        watch: None,
    }));
    serve_io(io, conn, lim, shared, shutdown)
}

async fn serve_io<T>(
    io: Arc<Mutex<Io<T>>>,
    conn: Arc<Conn>,
    lim: Limits,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> End<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut indices: Vec<Indices> = Vec::new();
    let mut first = true;
    let mut served: u64 = 0;
    // One timer for the connection's life, re-armed only when it fires
    // early (a timer per request would cost two timer-wheel updates).
    let mut idle = std::pin::pin!(tokio::time::sleep(lim.idle_timeout));
    let mut idle_since = Instant::now();
    // Shutdown is watched by one future for the connection's life: a
    // `changed()` per request would join and leave the watch's waiter list
    // every time.
    let mut watcher = shutdown.clone();
    let mut shut = std::pin::pin!(async move { watcher.changed().await });
    loop {
        // 1. Idle until the first byte of the next head, holding no read
        // buffer meanwhile (`poll_fill` takes one when bytes arrive).
        {
            let mut g = lock(&io);
            if g.buf.is_empty() {
                crate::wire::recycle_read_buffer(&mut g.buf);
            }
        }
        while lock(&io).buf.is_empty() {
            let read = std::future::poll_fn(|cx| poll_fill(&mut lock(&io), cx));
            tokio::select! {
                biased;
                r = read => {
                    if r.is_err() || lock(&io).eof {
                        return End::Closed;
                    }
                }
                () = idle.as_mut() => {
                    let due = idle_since + lim.idle_timeout;
                    if Instant::now() >= due {
                        return linger(&io).await;
                    }
                    idle.as_mut().reset(due);
                }
                _ = shut.as_mut() => return linger(&io).await,
            }
        }
        // 2. The head, within the header read timeout (from when the head
        // is first seen incomplete).
        let mut deadline = None;
        // After a partial head: how far the buffer has been searched for
        // its end. Parsing again only once new bytes may end it keeps a head
        // sent a byte at a time from costing a parse per byte (quadratic).
        let mut searched: Option<usize> = None;
        let head = loop {
            let parsed = {
                let mut g = lock(&io);
                if first && lim.h2c && PREFACE.starts_with(&g.buf[..g.buf.len().min(PREFACE.len())])
                {
                    if g.buf.len() >= PREFACE.len() {
                        drop(g);
                        return hand_over(io);
                    }
                    Ok(None)
                } else if let Some(from) = searched
                    && g.buf.len() <= lim.max_head
                    && !may_end_head(&g.buf, from)
                {
                    searched = Some(g.buf.len());
                    Ok(None)
                } else {
                    let r = parse(&mut g.buf, &lim, &mut indices);
                    searched = Some(g.buf.len());
                    r
                }
            };
            match parsed {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(refusal) => {
                    refusal.count();
                    let resp = crate::respond::raw_error(refusal.kind, &refusal.detail);
                    let _ = write_all(&io, lim.send_timeout, &[&resp[..]]).await;
                    return linger(&io).await;
                }
            }
            let read = std::future::poll_fn(|cx| poll_fill(&mut lock(&io), cx));
            let deadline =
                *deadline.get_or_insert_with(|| Instant::now() + lim.header_read_timeout);
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Ok(())) if !lock(&io).eof => {}
                Ok(_) => return End::Closed,
                Err(_) => {
                    metrics::counter!("gateway_header_timeouts_total").increment(1);
                    let resp = crate::respond::raw_error(
                        ErrorKind::RequestTimeout,
                        &format!(
                            "the request head was not received within {:?}",
                            lim.header_read_timeout
                        ),
                    );
                    let _ = write_all(&io, lim.send_timeout, &[&resp[..]]).await;
                    return linger(&io).await;
                }
            }
        };
        first = false;

        // 3. The pipeline.
        let meta = head.meta;
        let body = {
            let mut g = lock(&io);
            g.armed = false;
            g.body = head.framing;
            if head.framing != Framing::Done && meta.expect_continue {
                g.continue_owed = b"HTTP/1.1 100 Continue\r\n\r\n";
            }
            RequestBody {
                src: (head.framing != Framing::Done).then(|| io.clone() as Arc<dyn Source>),
                remaining: match head.framing {
                    Framing::Fixed(n) => Some(n),
                    _ => None,
                },
            }
        };
        let mut req = Request::new(Incoming::H1(body));
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = meta.version;
        *req.headers_mut() = head.headers;
        // Not boxed: a box would let an idle connection hold nothing of
        // the pipeline's state (some 10 KiB, about half of what one costs
        // idle), but measured 3 to 8% more CPU per request (allocator churn
        // on blocks that size).
        let resp = if lim.watch_client {
            let gone = std::pin::pin!(std::future::poll_fn(|cx| poll_gone(&io, cx)));
            proxy::handle(&shared, &conn, req, Some(gone)).await
        } else {
            proxy::handle(&shared, &conn, req, None).await
        };
        served += 1;
        if lock(&io).aborted {
            // Given up (`499` in the log): nobody is left to answer.
            metrics::counter!("gateway_client_aborts_total", "phase" => "waiting").increment(1);
            return End::Closed;
        }

        // 4. The response.
        // A request body not read to its end by now (answered without it,
        // or the upstream answered early) ends the connection: say so.
        let closing = {
            let mut g = lock(&io);
            // Once the response starts, a `100 Continue` would land inside
            // it: a body still unread is not asked for any more.
            g.continue_owed = &[];
            !meta.keep_alive
                || shutdown.has_changed().unwrap_or(true)
                || g.body != Framing::Done
                || served == lim.max_requests
        };
        let keep = match respond(&io, &mut out, resp, &meta, closing, &lim).await {
            Ok(keep) => keep,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, "writing a response failed: {e}");
                return End::Closed;
            }
        };
        // 5. Keep the connection only when the request body was read whole.
        let reusable = {
            let mut g = lock(&io);
            g.continue_owed = &[];
            g.body == Framing::Done && !g.eof
        };
        if !keep || !reusable {
            return linger(&io).await;
        }
        idle_since = Instant::now();
    }
}

/// Ready once the client has closed its side of the connection (or the
/// connection failed) while its request is served: then the request is
/// given up, as nginx does unless `proxy_ignore_client_abort`. Watched only
/// once the request body has been read whole and while nothing else is
/// buffered: bytes that arrive meanwhile (a pipelined request) are kept for
/// the next turn of the loop and end the watch. After the short read that
/// took the request, tokio has cleared the socket's readiness, so watching
/// costs no system call until something arrives.
///
/// The socket is polled with a `ClientWatch` waker: until the socket has an
/// event, later polls of the task (for the upstream's sake) find the watch
/// armed and not fired, and return at once.
fn poll_gone<T: AsyncRead + Unpin>(io: &Mutex<Io<T>>, cx: &mut Context<'_>) -> Poll<()> {
    use std::sync::atomic::Ordering;
    let mut g = lock(io);
    if g.body != Framing::Done || !g.buf.is_empty() || !g.continue_owed.is_empty() {
        return Poll::Pending;
    }
    if g.armed
        && let Some((w, _)) = &g.watch
        && !w.fired.load(Ordering::Acquire)
    {
        return Poll::Pending;
    }
    let gone = g.eof || {
        let (watch, waker) = g.watch.take().unwrap_or_else(|| {
            let w = Arc::new(ClientWatch {
                fired: std::sync::atomic::AtomicBool::new(false),
                task: Mutex::new(None),
            });
            (w.clone(), std::task::Waker::from(w))
        });
        {
            let mut task = watch.task.lock().unwrap_or_else(PoisonError::into_inner);
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        watch.fired.store(false, Ordering::Release);
        let polled = poll_fill(&mut g, &mut Context::from_waker(&waker));
        g.watch = Some((watch, waker));
        match polled {
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => g.eof,
            Poll::Pending => {
                g.armed = true;
                return Poll::Pending;
            }
        }
    };
    g.armed = false;
    if gone {
        g.aborted = true;
        return Poll::Ready(());
    }
    // Bytes arrived (a pipelined request): kept; the watch ends.
    Poll::Pending
}

/// Gives the stream back for HTTP/2, with what was read of it.
fn hand_over<T>(io: Arc<Mutex<Io<T>>>) -> End<T> {
    match Arc::try_unwrap(io) {
        Ok(m) => {
            let io = m.into_inner().unwrap_or_else(PoisonError::into_inner);
            End::H2c {
                stream: io.stream,
                read: io.buf.freeze(),
            }
        }
        // No request exists before the preface, so nothing else holds it.
        Err(_) => End::Closed,
    }
}

/// Closes the write side, then reads and drops what the client still sends
/// for a moment, so that a response written just before is not destroyed by
/// a reset (closing with unread data sends RST).
async fn linger<T: AsyncRead + AsyncWrite + Unpin>(io: &Mutex<Io<T>>) -> End<T> {
    if tokio::time::timeout(Duration::from_millis(500), Locked(io).shutdown())
        .await
        .is_err()
    {
        return End::Closed;
    }
    let drain = async {
        let mut left = 256 * 1024usize;
        loop {
            let r = std::future::poll_fn(|cx| {
                let mut g = lock(io);
                g.buf.clear();
                poll_fill(&mut g, cx)
            })
            .await;
            let g = lock(io);
            if r.is_err() || g.eof || g.buf.len() >= left {
                return;
            }
            left -= g.buf.len();
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
    End::Closed
}

/// What the connection loop needs from a request after handing it on.
#[derive(Debug, Clone, Copy)]
struct Meta {
    version: Version,
    is_head: bool,
    keep_alive: bool,
    expect_continue: bool,
}

/// A parsed request head.
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    framing: Framing,
    meta: Meta,
}

/// Where a header field's name and value are in the head.
#[derive(Clone, Copy)]
struct Indices {
    name: (usize, usize),
    value: (usize, usize),
}

/// A head refused before any request exists.
#[derive(Debug)]
struct Refusal {
    kind: ErrorKind,
    detail: String,
    smuggling: bool,
}

impl Refusal {
    fn bad(detail: impl Into<String>) -> Self {
        Refusal {
            kind: ErrorKind::BadRequest,
            detail: detail.into(),
            smuggling: false,
        }
    }
    fn framing(detail: &str) -> Self {
        Refusal {
            smuggling: true,
            ..Refusal::bad(detail)
        }
    }
    fn too_large(detail: String) -> Self {
        Refusal {
            kind: ErrorKind::HeadersTooLarge,
            detail,
            smuggling: false,
        }
    }
    fn count(&self) {
        if self.smuggling {
            metrics::counter!("gateway_smuggling_rejected_total").increment(1);
        }
    }
}

/// Parses a complete head off the front of `buf` (`None`: not complete
/// yet).
fn parse(
    buf: &mut BytesMut,
    lim: &Limits,
    indices: &mut Vec<Indices>,
) -> Result<Option<Head>, Refusal> {
    let parse_limit = lim.max_headers.max(1);
    let mut stack =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [std::mem::MaybeUninit<httparse::Header<'_>>] = if parse_limit <= STACK_HEADERS
    {
        &mut stack[..parse_limit]
    } else {
        heap.resize_with(parse_limit, std::mem::MaybeUninit::uninit);
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    let base = buf.as_ptr() as usize;
    let status = match req.parse_with_uninit_headers(buf, slots) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::too_large(format!(
                "request has more than {} header fields",
                lim.max_headers
            )));
        }
        Err(e) => {
            if buf.len() > lim.max_head {
                return Err(head_too_large(lim));
            }
            return Err(Refusal::bad(format!("malformed request head: {e}")));
        }
    };
    let len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            if buf.len() > lim.max_head {
                return Err(head_too_large(lim));
            }
            return Ok(None);
        }
    };
    if len > lim.max_head {
        return Err(head_too_large(lim));
    }
    let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    let method = req.method.unwrap_or("");
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| Refusal::bad(format!("invalid method {method:?}")))?;
    let path = at(req.path.unwrap_or("").as_bytes());
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut cl: Option<u64> = None;
    let mut te = 0u32;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expect_continue = false;
    indices.clear();
    for h in req.headers.iter() {
        let v = h.value;
        if h.name.eq_ignore_ascii_case("content-length") {
            match (crate::wire::content_length(v), cl) {
                (None, _) => return Err(Refusal::framing("invalid Content-Length")),
                (Some(n), Some(prev)) if n != prev => {
                    return Err(Refusal::framing("conflicting Content-Length values"));
                }
                (Some(n), _) => cl = Some(n),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te += 1;
            if te > 1 || !v.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(Refusal::framing(
                    "unsupported Transfer-Encoding (only a single \"chunked\" is accepted)",
                ));
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            let t = crate::wire::connection_tokens(v);
            connection_close |= t.close;
            connection_keep_alive |= t.keep_alive;
            // Hop-by-hop, and used up here (`Meta::keep_alive`): the
            // pipeline would only strip it again. One naming other fields
            // stays for the pipeline to strip those.
            if !t.other {
                continue;
            }
        } else if matches!(h.name.len(), 14 | 17)
            && h.name.contains('_')
            && ["content-length", "transfer-encoding"].iter().any(|f| {
                h.name
                    .bytes()
                    .zip(f.bytes())
                    .all(|(a, b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
                    && h.name.len() == f.len()
            })
        {
            // `Content_Length`: servers that read `_` as `-` (CGI-style)
            // would frame the message by it, the gateway would not.
            return Err(Refusal::framing(
                "a framing header spelled with '_' (Content_Length, Transfer_Encoding)",
            ));
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = v.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        indices.push(Indices {
            name: at(h.name.as_bytes()),
            value: at(v),
        });
    }
    if cl.is_some() && te > 0 {
        return Err(Refusal::framing(
            "request has both Content-Length and Transfer-Encoding",
        ));
    }
    let framing = match (te, cl) {
        (0, Some(n)) if n > 0 => Framing::Fixed(n),
        (0, _) => Framing::Done,
        _ => Framing::Chunked(chunked::Decoder::default()),
    };

    let head = buf.split_to(len).freeze();
    let slice = |(at, n): (usize, usize)| head.slice(at..at + n);
    let uri = Uri::from_maybe_shared(slice(path))
        .map_err(|e| Refusal::bad(format!("invalid request target: {e}")))?;
    // Room for the forwarding headers and the request id added upstream.
    let mut headers = crate::wire::header_map(indices.len() + 6);
    for (pos, i) in indices.iter().enumerate() {
        let (at, n) = i.name;
        let name = crate::wire::request_header_name(pos, &head[at..at + n])
            .map_err(|_| Refusal::bad("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(slice(i.value))
            .map_err(|_| Refusal::bad(format!("invalid value in header {name}")))?;
        headers.append(name, value);
    }
    let keep_alive = match version {
        // HTTP/1.0 has no chunked framing: a 1.0 message that uses it may
        // be read differently by another hop, so its connection ends after
        // it (RFC 9112 §6.1).
        Version::HTTP_10 => connection_keep_alive && !connection_close && te == 0,
        _ => !connection_close,
    };
    Ok(Some(Head {
        meta: Meta {
            version,
            is_head: method == Method::HEAD,
            keep_alive,
            expect_continue: expect_continue && version == Version::HTTP_11,
        },
        method,
        uri,
        headers,
        framing,
    }))
}

/// Whether `buf` holds an empty line (`\n\r\n` or `\n\n`) that starts
/// at or after `from - 2` (the bytes before were searched already).
fn may_end_head(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(2);
    memchr::memchr_iter(b'\n', &buf[start.min(buf.len())..]).any(|i| {
        let rest = &buf[start + i + 1..];
        rest.first() == Some(&b'\n') || rest.starts_with(b"\r\n")
    })
}

fn head_too_large(lim: &Limits) -> Refusal {
    Refusal::too_large(format!(
        "request head exceeds {} bytes",
        lim.max_header_bytes
    ))
}

/// How a response body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body is sent (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 without a length).
    Close,
}

/// Writes `resp`; says whether the connection may serve another request.
async fn respond<T: AsyncRead + AsyncWrite + Unpin>(
    io: &Mutex<Io<T>>,
    out: &mut Vec<u8>,
    resp: Response<Body>,
    meta: &Meta,
    closing: bool,
    lim: &Limits,
) -> io::Result<bool> {
    let send_timeout = lim.send_timeout;
    let (parts, body) = resp.into_parts();
    // A body the gateway made itself: for HEAD, its length is the one a
    // GET would get (an upstream's HEAD answer has no body to measure).
    let generated = matches!(body, Body::Full(_));
    let mut body = std::pin::pin!(body);
    let status = parts.status;
    let h = &parts.headers;
    let mut keep = !closing
        && !h
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| crate::wire::content_length(v.as_bytes()));
    let no_body_status = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if meta.is_head || no_body_status {
        Out::None
    } else if let Some(n) = declared.or(body.size_hint().exact()) {
        Out::Length(n)
    } else if meta.version == Version::HTTP_11 {
        Out::Chunked
    } else {
        keep = false;
        Out::Close
    };

    out.clear();
    out.extend_from_slice(if meta.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    for (name, value) in h {
        if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            // Kept for HEAD and 304 as the upstream sent it; otherwise
            // written below from the framing.
            if !(meta.is_head || status == StatusCode::NOT_MODIFIED) || declared.is_none() {
                continue;
            }
        }
        has_date |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Out::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Out::None if meta.is_head && generated && declared.is_none() && !no_body_status => {
            if let Some(n) = body.size_hint().exact() {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        Out::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Out::None | Out::Close => {}
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::append(out);
        out.extend_from_slice(b"\r\n");
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if meta.version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    crate::wire::recycle_header_map(parts.headers);

    if framing == Out::None {
        write_all(io, send_timeout, &[&out[..]]).await?;
        return Ok(keep);
    }
    let mut sent: u64 = 0;
    loop {
        // Take what the body has ready now; write before waiting for more.
        let frame = match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await
        {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    write_all(io, send_timeout, &[&out[..]]).await?;
                    out.clear();
                }
                // An upstream that stops mid-body holds its slots as a slow
                // reader would: the same bound on no progress applies. A
                // client that leaves meanwhile ends it at once (SSE, long
                // polls: the upstream exchange is given up with it).
                let next = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                    Poll::Ready(f) => Poll::Ready(Ok(f)),
                    Poll::Pending if lim.watch_client => poll_gone(io, cx).map(Err),
                    Poll::Pending => Poll::Pending,
                });
                match tokio::time::timeout(send_timeout, next).await {
                    Ok(Ok(f)) => f,
                    Ok(Err(())) => {
                        metrics::counter!("gateway_client_aborts_total", "phase" => "response")
                            .increment(1);
                        tracing::debug!("the client left during the response; given up");
                        return Ok(false);
                    }
                    Err(_) => {
                        metrics::counter!("gateway_response_stalls_total").increment(1);
                        tracing::debug!(
                            "the response body made no progress for {send_timeout:?}; cut off"
                        );
                        return Ok(false);
                    }
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                // The response cannot be completed: cut it off.
                tracing::debug!("response body failed: {e}");
                if !out.is_empty() {
                    let _ = write_all(io, send_timeout, &[&out[..]]).await;
                }
                return Ok(false);
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if !d.is_empty() => d,
                // Trailers are not passed on over HTTP/1.1.
                _ => continue,
            },
        };
        let data = match framing {
            Out::Length(n) => {
                let room = n - sent;
                if data.len() as u64 > room {
                    // More than declared: send what was declared, then close.
                    let cut = data.slice(..usize::try_from(room).unwrap_or(0));
                    write_all(io, send_timeout, &[&out[..], &cut[..]]).await?;
                    return Ok(false);
                }
                data
            }
            _ => data,
        };
        sent += data.len() as u64;
        if framing == Out::Chunked {
            let mut size = [0u8; 18];
            let line = crate::chunked::size_line(data.len(), &mut size);
            if data.len() <= COALESCE {
                out.extend_from_slice(line);
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            } else {
                write_all(io, send_timeout, &[&out[..], line, &data[..], &b"\r\n"[..]]).await?;
                out.clear();
            }
        } else if data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            write_all(io, send_timeout, &[&out[..], &data[..]]).await?;
            out.clear();
        }
        // A body whose frames are always ready (HTTP/2 upstream data in
        // hyper's buffer) is still written as it goes, not gathered whole.
        if out.len() >= COALESCE {
            write_all(io, send_timeout, &[&out[..]]).await?;
            out.clear();
        }
    }
    if framing == Out::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        write_all(io, send_timeout, &[&out[..]]).await?;
    }
    if let Out::Length(n) = framing
        && sent < n
    {
        // Shorter than declared: the client must see the connection end.
        return Ok(false);
    }
    Ok(keep && framing != Out::Close)
}

/// Writes all of `bufs` (vectored; at most four), then flushes.
/// A client that takes none of it for `limit` (a zero receive window: a
/// slow-read attack, or a client gone without a word) is cut off, as by
/// nginx's `send_timeout`, so it cannot hold the upstream slots its
/// response keeps.
async fn write_all<T: AsyncWrite + Unpin>(
    io: &Mutex<Io<T>>,
    limit: Duration,
    bufs: &[&[u8]],
) -> io::Result<()> {
    let mut slices = [IoSlice::new(&[]); 4];
    for (s, b) in slices.iter_mut().zip(bufs) {
        *s = IoSlice::new(b);
    }
    let mut w = Locked(io);
    let write = async {
        crate::wire::write_all_vectored(&mut w, &mut slices[..bufs.len().min(4)]).await?;
        w.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r,
        Err(_) => {
            metrics::counter!("gateway_send_timeouts_total").increment(1);
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took no response data for {limit:?}"),
            ))
        }
    }
}

/// The connection's write side, locked for each poll only.
struct Locked<'a, T>(&'a Mutex<Io<T>>);

impl<T: AsyncWrite + Unpin> AsyncWrite for Locked<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut lock(self.0).stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut lock(self.0).stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        lock(self.0).stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(self.0).stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(self.0).stream).poll_shutdown(cx)
    }
}

/// The `Date` header value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }

    pub fn append(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let s = httpdate::fmt_http_date(now);
                if s.len() == 29 {
                    c.1.copy_from_slice(s.as_bytes());
                    c.0 = secs;
                } else {
                    out.extend_from_slice(s.as_bytes());
                    return;
                }
            }
            out.extend_from_slice(&c.1);
        });
    }
}

/// A stream with bytes already read from it put back in front (the h2c
/// preface, for hyper's HTTP/2).
pub(super) struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(pre: Bytes, inner: T) -> Self {
        Rewind { pre, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_head: 8192,
            max_header_bytes: 4096,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            send_timeout: Duration::from_secs(5),
            watch_client: true,
            max_requests: 0,
            h2c: true,
        }
    }

    /// Parses `bytes` as they would sit in the read buffer.
    fn parse_all(bytes: &[u8]) -> (Result<Option<Head>, Refusal>, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let r = parse(&mut buf, &limits(), &mut Vec::new());
        (r, buf)
    }

    fn refusal(bytes: &[u8]) -> String {
        match parse_all(bytes).0 {
            Err(r) => r.detail,
            Ok(h) => panic!(
                "{:?} accepted (complete: {})",
                String::from_utf8_lossy(bytes),
                h.is_some()
            ),
        }
    }

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        // Not before it has arrived; then, with at least its last byte new,
        // whatever was searched before.
        assert!(!may_end_head(&head[..head.len() - 1], 0));
        for from in 0..head.len() {
            assert!(may_end_head(head, from), "from {from}");
        }
        assert!(may_end_head(b"GET / HTTP/1.0\n\n", 15));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nX: a\r\n", 0));
        assert!(!may_end_head(b"", 0));
        assert!(!may_end_head(b"\n", 5));
    }

    #[test]
    fn refuses_ambiguous_framing() {
        let cases: [(&[u8], &str); 9] = [
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            (b"\r\nPOST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n", "both"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n", "conflicting"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 5\r\n\r\n", "invalid"),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "invalid"),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", "invalid"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n", "Transfer-Encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", "Transfer-Encoding"),
        ];
        for (head, want) in cases {
            let got = refusal(head);
            assert!(
                got.contains(want),
                "{:?}: {got}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn accepts_plain_framing_and_reads_the_head_once_complete() {
        let cases: [(&[u8], Framing); 4] = [
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked \r\n\r\n",
                Framing::Chunked(chunked::Decoder::default()),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 7\r\ncontent-length: 7\r\n\r\n",
                Framing::Fixed(7),
            ),
            (
                b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\n\r\n",
                Framing::Done,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                Framing::Done,
            ),
        ];
        for (head, framing) in cases {
            // Incomplete at every split point, then complete.
            for at in 0..head.len() {
                assert!(
                    matches!(parse_all(&head[..at]).0, Ok(None)),
                    "split at {at}"
                );
            }
            let with_next = [head, b"GET /next HTTP/1.1\r\n"].concat();
            let (r, rest) = parse_all(&with_next);
            let h = r.ok().flatten().expect("complete");
            assert_eq!(h.framing, framing, "{:?}", String::from_utf8_lossy(head));
            assert_eq!(
                &rest[..],
                b"GET /next HTTP/1.1\r\n",
                "only the head is taken"
            );
        }
    }

    #[test]
    fn builds_the_request_from_the_head() {
        let (r, _) = parse_all(
            b"PUT /a/b?c=d HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
        );
        let h = r.ok().flatten().expect("complete");
        assert_eq!(h.method, Method::PUT);
        assert_eq!(h.uri, "/a/b?c=d");
        assert_eq!(h.meta.version, Version::HTTP_10);
        assert!(h.meta.keep_alive);
        let all: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);

        let (r, _) = parse_all(b"GET / HTTP/1.0\r\n\r\n");
        assert!(
            !r.ok().flatten().expect("complete").meta.keep_alive,
            "1.0 closes by default"
        );
        let (r, _) = parse_all(b"GET / HTTP/1.1\r\nConnection: foo, Close\r\n\r\n");
        assert!(!r.ok().flatten().expect("complete").meta.keep_alive);
        let (r, _) =
            parse_all(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        assert!(r.ok().flatten().expect("complete").meta.expect_continue);
        for spelled in ["Content_Length: 5", "transfer_encoding: chunked"] {
            let (r, _) = parse_all(format!("POST / HTTP/1.1\r\n{spelled}\r\n\r\n").as_bytes());
            assert!(r.is_err(), "{spelled}");
        }
        let (r, _) = parse_all(b"GET / HTTP/1.1\r\nif_modified_since: x\r\n\r\n");
        assert!(r.is_ok_and(|h| h.is_some()));
        let (r, _) = parse_all(
            b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(
            !r.ok().flatten().expect("complete").meta.keep_alive,
            "chunked in 1.0 ends the connection"
        );
    }

    #[test]
    fn refuses_malformed_and_oversized_heads() {
        assert!(refusal(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n").contains("malformed"));
        assert!(
            refusal(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n").contains("malformed"),
            "obs-fold"
        );
        let big = [&b"GET / HTTP/1.1\r\nX: "[..], &[b'a'; 9000]].concat();
        let r = parse_all(&big)
            .0
            .err()
            .expect("refused before the head ends");
        assert_eq!(r.kind, ErrorKind::HeadersTooLarge);
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let r = parse_all(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes())
            .0
            .err();
        assert_eq!(r.map(|r| r.kind), Some(ErrorKind::HeadersTooLarge));
    }

    /// Reads a whole body framed as `framing` from `bytes` (delivered in
    /// pieces of `piece` bytes); returns it and what is left buffered.
    fn read_body(
        bytes: &[u8],
        framing: Framing,
        piece: usize,
    ) -> (Result<Vec<u8>, String>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(1 << 16);
            let io = Arc::new(Mutex::new(Io {
                stream: server,
                buf: BytesMut::new(),
                eof: false,
                body: framing,
                continue_owed: &[],
                flush_owed: false,
                aborted: false,
                armed: false,
                watch: None,
            }));
            let data = bytes.to_vec();
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut client = client;
                for c in data.chunks(piece.max(1)) {
                    client.write_all(c).await.unwrap();
                    tokio::task::yield_now().await;
                }
                client
            });
            let src: Arc<dyn Source> = io.clone();
            let mut body = RequestBody {
                src: Some(src),
                remaining: None,
            };
            let mut got = Vec::new();
            let out = loop {
                match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    None => break Ok(got),
                    Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap()),
                    Some(Err(e)) => break Err(e.to_string()),
                }
            };
            let _client = writer.await.unwrap();
            let rest = lock(&io).buf.to_vec();
            (out, rest)
        })
    }

    #[test]
    fn mutated_heads_are_refused_or_framed_unambiguously() {
        // Hostile bytes around valid heads: never a panic; an accepted head
        // is framed by exactly what its fields say (one Content-Length
        // value, or a single chunked coding, never both); and it was not
        // refused or taken any earlier when it arrived a byte at a time.
        let seeds: [&[u8]; 6] = [
            b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"GET http://x/abs HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            b"PUT /p HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\nConnection: close, x-b\r\nX-B: 1\r\n\r\n",
            b"\r\nOPTIONS * HTTP/1.1\nHost: x\n\n",
        ];
        let mut rng = fastrand::Rng::with_seed(21);
        let mut accepted = 0;
        for i in 0..20_000 {
            let input = crate::mutate::mutate(&mut rng, seeds[i % seeds.len()]);
            let (got, rest) = parse_all(&input);
            let Ok(Some(head)) = got else { continue };
            accepted += 1;
            let len = input.len() - rest.len();
            let shown = String::from_utf8_lossy(&input);
            assert!(len > 0 && input.ends_with(&rest), "{shown}");
            let h = &head.headers;
            let lengths: Vec<_> = h.get_all(http::header::CONTENT_LENGTH).iter().collect();
            let codings = h.get_all(http::header::TRANSFER_ENCODING).iter().count();
            assert!(
                codings <= 1 && (codings == 0 || lengths.is_empty()),
                "{shown}"
            );
            let length = lengths
                .iter()
                .map(|v| crate::wire::content_length(v.as_bytes()).expect("valid length"))
                .reduce(|a, b| {
                    assert_eq!(a, b, "{shown}");
                    a
                });
            let want = match (codings, length) {
                (1, _) => Framing::Chunked(chunked::Decoder::default()),
                (_, Some(n)) if n > 0 => Framing::Fixed(n),
                _ => Framing::Done,
            };
            assert_eq!(head.framing, want, "{shown}");
            for k in 0..len {
                assert!(
                    matches!(parse_all(&input[..k]).0, Ok(None)),
                    "{shown}: its first {k} bytes were not just incomplete"
                );
            }
        }
        // The mutations leave enough heads whole for the checks to bite.
        assert!(accepted > 2_000, "{accepted}");
    }

    const NEXT: &[u8] =
        b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn bodies_end_where_their_framing_says_in_any_piece_size() {
        let chunked = Framing::Chunked(chunked::Decoder::default());
        // A smuggling-looking head inside a chunk, or a fixed body, is data.
        let inside = [
            format!("{:x}\r\n", NEXT.len()).as_bytes(),
            NEXT,
            b"\r\n0\r\n\r\n",
        ]
        .concat();
        let cases: [(&[u8], Framing, &[u8]); 5] = [
            (b"hello", Framing::Fixed(5), b"hello"),
            (
                b"5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\n\r\n",
                chunked,
                b"hello0123456789",
            ),
            (b"1\r\nx\r\n0\r\nX-Trailer: y\r\n\r\n", chunked, b"x"),
            (&inside, chunked, NEXT),
            (NEXT, Framing::Fixed(NEXT.len() as u64), NEXT),
        ];
        for (body, framing, want) in cases {
            for piece in [1, 2, 3, 7, 1000] {
                let (got, rest) = read_body(&[body, NEXT].concat(), framing, piece);
                assert_eq!(
                    got.as_deref(),
                    Ok(want),
                    "{:?} in pieces of {piece}",
                    String::from_utf8_lossy(body)
                );
                // What follows the body stays for the next head (all of it
                // has arrived when the writer is done, except in pieces of 1,
                // where the reader may stop first).
                assert!(
                    NEXT.starts_with(&rest),
                    "{:?}",
                    String::from_utf8_lossy(&rest)
                );
                if piece >= body.len() + NEXT.len() {
                    // Read in one piece: the next head is all there.
                    assert_eq!(rest, NEXT, "{:?}", String::from_utf8_lossy(&rest));
                }
            }
        }
    }

    #[test]
    fn refuses_malformed_chunked_bodies() {
        for body in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"12345678901234567\r\n",
            b"1\r\nxy",
        ] {
            let (got, _) = read_body(body, Framing::Chunked(chunked::Decoder::default()), 100);
            let e = got.expect_err("refused");
            assert!(
                e.contains("malformed chunked"),
                "{:?}: {e}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
