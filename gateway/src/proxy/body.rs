//! The body types of the proxy: `Incoming`, a client's request body as the
//! listener reads it (the gateway's own HTTP/1.1 server, or hyper's HTTP/2),
//! and `Body`, used both ways through the proxy: a fixed buffer, or a
//! streamed body. A client's request body is also capped in size and
//! in the time the client may take between two chunks, and tells the try
//! sending it upstream who holds it up (`Upload`). An enum rather than a
//! boxed trait object, so that the common cases cost no allocation.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::upstream::UpstreamBody;

/// A client's request body.
#[derive(Debug)]
pub enum Incoming {
    /// Read from an HTTP/1.1 connection by `listener::h1`.
    H1(crate::listener::h1::RequestBody),
    /// An HTTP/2 stream's data, from hyper.
    Hyper(hyper::body::Incoming),
}

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Incoming::H1(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            Incoming::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Incoming::H1(b) => b.is_end_stream(),
            Incoming::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Incoming::H1(b) => b.size_hint(),
            Incoming::Hyper(b) => b.size_hint(),
        }
    }
}

/// A request or response body.
#[derive(Debug)]
pub enum Body {
    /// A complete body (possibly empty).
    Full(Option<Bytes>),
    /// A streamed body passed through as is.
    Stream(Incoming),
    /// A client's request body with a size cap and a read timeout.
    Guarded(Box<Guarded>),
    /// An upstream response streamed to the client, holding what the
    /// request holds upstream (the target's in-flight count, connection and
    /// concurrency slots) until it ends or is dropped. Boxed: it is several
    /// times the size of the other variants, and a response moves through
    /// a few futures (measured: fewer instructions per request this way,
    /// allocation included).
    Upstream(Box<(UpstreamBody, crate::upstream::Held)>),
}

/// State of a guarded request body.
#[derive(Debug)]
pub struct Guarded {
    inner: Incoming,
    remaining: u64,
    limit: u64,
    read_timeout: Duration,
    /// Armed while we wait for the client's next chunk.
    deadline: Pin<Box<Sleep>>,
    waiting: bool,
    /// When the whole body must have arrived (`request_timeout`), and
    /// that timeout.
    whole: Option<(Instant, Duration)>,
    /// Where the upload stands, for the try that is sending it (its
    /// timeout runs only while the upstream has the next move).
    upload: Option<watch::Sender<Upload>>,
}

/// Who holds up a streamed request body, as the try sending it sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upload {
    /// The upstream: the body waits to be taken (or the try has not
    /// asked for it yet).
    Upstream,
    /// The client: the next chunk has not arrived (its own timeout,
    /// `body_read_timeout`, runs).
    Client,
    /// Nobody: the body has been sent whole, since then.
    Done(Instant),
    /// The client's side of the body failed. The try learns why from here:
    /// hyper's HTTP/2 client only reports that it reset the stream.
    Failed(ClientFault),
}

/// How a request body failed on the client's side; what the client is
/// answered (`ClientFault::error`). Never the upstream's fault: it counts
/// against no breaker or outlier streak and is not retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFault {
    /// Over the route's `max_body_bytes`: 413.
    TooLarge(u64),
    /// No data for `body_read_timeout`: 408.
    Timeout(Duration),
    /// Not whole within `request_timeout`: 408.
    RequestTimeout(Duration),
    /// Malformed chunked framing: 400.
    Malformed(&'static str),
    /// Closed, reset or cut short: 400.
    BrokenOff,
}

impl ClientFault {
    /// The answer owed to the client; the connection closes after it (the
    /// rest of the body was not read).
    pub fn error(self) -> crate::error::ProxyError {
        use crate::error::{ErrorKind, ProxyError};
        let (kind, detail) = match self {
            ClientFault::TooLarge(limit) => (
                ErrorKind::PayloadTooLarge,
                format!("request body exceeds {limit} bytes"),
            ),
            ClientFault::Timeout(t) => (
                ErrorKind::RequestTimeout,
                format!("the client sent no body data for {t:?}"),
            ),
            ClientFault::RequestTimeout(t) => (
                ErrorKind::RequestTimeout,
                format!("the request body did not arrive whole within {t:?} (request_timeout)"),
            ),
            ClientFault::Malformed(why) => (
                ErrorKind::BadRequest,
                crate::listener::h1::ReadError::Framing(why).to_string(),
            ),
            ClientFault::BrokenOff => (
                ErrorKind::BadRequest,
                "the client's request body broke off".to_string(),
            ),
        };
        ProxyError::new(kind, detail).closing()
    }
}

/// Errors a body can yield while streaming.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("the client sent no body data for {0:?}")]
    Timeout(Duration),
    #[error("the request body did not arrive whole within {0:?} (request_timeout)")]
    RequestTimeout(Duration),
    #[error("the upstream sent no body data for {0:?}")]
    Stalled(Duration),
    #[error("the client took none of the response for {0:?}")]
    NotTaken(Duration),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Client(#[from] crate::listener::h1::ReadError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::h1::Error),
}

impl BodyError {
    /// What this failure of a request body means for the client (the
    /// upstream-side variants cannot happen to a request body; they read
    /// as the body breaking off).
    pub fn fault(&self) -> ClientFault {
        match self {
            BodyError::TooLarge(limit) => ClientFault::TooLarge(*limit),
            BodyError::Timeout(t) => ClientFault::Timeout(*t),
            BodyError::RequestTimeout(t) => ClientFault::RequestTimeout(*t),
            BodyError::Client(crate::listener::h1::ReadError::Framing(why)) => {
                ClientFault::Malformed(why)
            }
            BodyError::Hyper(_)
            | BodyError::Client(_)
            | BodyError::Upstream(_)
            | BodyError::Stalled(_)
            | BodyError::NotTaken(_) => ClientFault::BrokenOff,
        }
    }

    /// The answer owed to a client whose request body failed while it was
    /// being sent upstream (see `ClientFault`).
    pub fn request_error(&self) -> crate::error::ProxyError {
        self.fault().error()
    }
}

impl Body {
    pub fn empty() -> Self {
        Body::Full(None)
    }

    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        Body::Full(if b.is_empty() { None } else { Some(b) })
    }

    /// Streams `inner` as is.
    pub fn stream(inner: Incoming) -> Self {
        Body::Stream(inner)
    }

    /// Streams `inner`, failing once more than `limit` bytes have passed,
    /// when the client sends nothing for `read_timeout`, or when the body
    /// has not arrived whole by `whole` (an instant, and the timeout it
    /// comes from, for the message).
    pub fn guarded(
        inner: Incoming,
        limit: u64,
        read_timeout: Duration,
        whole: Option<(Instant, Duration)>,
    ) -> Self {
        Body::Guarded(Box::new(Guarded {
            inner,
            remaining: limit,
            limit,
            read_timeout,
            deadline: Box::pin(tokio::time::sleep(read_timeout)),
            waiting: false,
            whole,
            upload: None,
        }))
    }

    /// For a streamed body not yet at its end, a view of where its upload
    /// stands from now on (replacing any earlier view: one try at a time
    /// sends a body); `None` for a body that is complete.
    pub fn watch_upload(&mut self) -> Option<watch::Receiver<Upload>> {
        match self {
            Body::Guarded(g) if !g.inner.is_end_stream() => {
                let (tx, rx) = watch::channel(Upload::Upstream);
                g.upload = Some(tx);
                Some(rx)
            }
            _ => None,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(inner) => Pin::new(inner).poll_frame(cx),
            Body::Guarded(g) => g.poll_frame(cx),
            Body::Upstream(up) => {
                let (inner, held) = &mut **up;
                let r = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(None) = r {
                    *held = Default::default();
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_none(),
            Body::Stream(inner) => inner.is_end_stream(),
            Body::Guarded(g) => g.inner.is_end_stream(),
            Body::Upstream(up) => up.0.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(inner) => inner.size_hint(),
            Body::Guarded(g) => g.inner.size_hint(),
            Body::Upstream(up) => up.0.size_hint(),
        }
    }
}

impl Guarded {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.waiting = false;
                if let Some((at, t)) = self.whole
                    && !self.inner.is_end_stream()
                    && Instant::now() >= at
                {
                    return self.fail(BodyError::RequestTimeout(t));
                }
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.remaining {
                        return self.fail(BodyError::TooLarge(self.limit));
                    }
                    self.remaining -= n;
                }
                if self.inner.is_end_stream() {
                    self.done();
                } else {
                    self.tell(Upload::Upstream);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => self.fail(e),
            Poll::Ready(None) => {
                self.done();
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Time only the client: start the clock when we begin to
                // wait, not when the upstream last asked for data.
                if !self.waiting {
                    self.waiting = true;
                    self.tell(Upload::Client);
                    let gap = Instant::now() + self.read_timeout;
                    let at = self.whole.map_or(gap, |(w, _)| w.min(gap));
                    self.deadline.as_mut().reset(at);
                }
                match self.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => self.fail(match self.whole {
                        Some((at, t)) if Instant::now() >= at => BodyError::RequestTimeout(t),
                        _ => BodyError::Timeout(self.read_timeout),
                    }),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    /// Yields `e`, after telling the try sending this body, if one watches,
    /// why the client's side failed.
    fn fail(&self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.tell(Upload::Failed(e.fault()));
        Poll::Ready(Some(Err(e)))
    }

    /// Tells the try sending this body, if one watches, that the upload is
    /// over (the clock is read only then).
    fn done(&self) {
        if self.upload.is_some() {
            self.tell(Upload::Done(Instant::now()));
        }
    }

    /// Tells the try sending this body where its upload stands.
    fn tell(&self, now: Upload) {
        if let Some(tx) = &self.upload {
            tx.send_if_modified(|u| {
                std::mem::discriminant(&std::mem::replace(u, now)) != std::mem::discriminant(&now)
            });
        }
    }
}
