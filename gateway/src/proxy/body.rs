//! The body type used both ways through the proxy: a fixed buffer, or a
//! streamed hyper body optionally capped in size. An enum rather than a boxed
//! trait object, so that the common cases cost no allocation.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

/// A request or response body.
#[derive(Debug)]
pub enum Body {
    /// A complete body (possibly empty).
    Full(Option<Bytes>),
    /// A streamed body; `remaining` caps how many more bytes may pass.
    Stream {
        inner: Incoming,
        remaining: u64,
        limit: u64,
    },
}

/// The body grew past its limit.
#[derive(Debug, thiserror::Error)]
#[error("body exceeds the limit of {limit} bytes")]
pub struct TooLarge {
    pub limit: u64,
}

/// Errors a body can yield while streaming.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

impl Body {
    pub fn empty() -> Self {
        Body::Full(None)
    }

    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        Body::Full(if b.is_empty() { None } else { Some(b) })
    }

    /// Streams `inner` without a size limit.
    pub fn stream(inner: Incoming) -> Self {
        Body::Stream {
            inner,
            remaining: u64::MAX,
            limit: u64::MAX,
        }
    }

    /// Streams `inner`, failing once more than `limit` bytes have passed.
    pub fn limited(inner: Incoming, limit: u64) -> Self {
        Body::Stream {
            inner,
            remaining: limit,
            limit,
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
            Body::Stream {
                inner,
                remaining,
                limit,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let n = data.len() as u64;
                        if n > *remaining {
                            return Poll::Ready(Some(Err(TooLarge { limit: *limit }.into())));
                        }
                        *remaining -= n;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_none(),
            Body::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream { inner, .. } => inner.size_hint(),
        }
    }
}
