//! A read-side guard for HTTP/1 connections, sitting between the socket (or
//! TLS stream) and hyper. It follows request heads as they arrive and:
//!
//! - flags heads carrying both `Content-Length` and `Transfer-Encoding`:
//!   hyper would resolve them by chunked framing and silently drop
//!   `Content-Length`; the proxy rejects them instead (400, connection
//!   closed) as request smuggling attempts;
//! - enforces the header read timeout from the first byte of a head to the
//!   blank line that ends it, answering `408` problem+json and closing
//!   (hyper's own timer closes silently, and also runs while a keep-alive
//!   connection is idle, which is the idle timeout's job).
//!
//! Only heads are scanned: scanning pauses at the blank line and resumes when
//! the proxy has answered the request, so body bytes are not taken for
//! header lines. An h2c preface turns the guard off for the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Shared between the guard (which sets `conflict`) and the proxy (which
/// reads it and sets `rearm` when it has answered a request).
#[derive(Debug, Default)]
pub struct HeadFlags {
    /// The current request head had both framing headers.
    pub conflict: AtomicBool,
    /// The next bytes start a new head.
    pub rearm: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the first byte of a head.
    Idle,
    /// Inside a head.
    Head,
    /// Past the head; waiting for the proxy to answer.
    Body,
    /// Not HTTP/1 (h2c): nothing to do.
    Off,
}

/// Longest line prefix we need to recognize.
const LINE: usize = 18;

/// Wraps an I/O object and guards request heads as they are read.
pub struct HeadGuard<T> {
    inner: T,
    flags: Arc<HeadFlags>,
    state: State,
    line: [u8; LINE],
    line_len: usize,
    /// Lines seen in this head (the first is the request line).
    lines: u32,
    prev_lf: bool,
    cl: bool,
    te: bool,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The 408 response still to be written, then the connection ends.
    timed_out: Option<(Vec<u8>, usize)>,
}

impl<T> HeadGuard<T> {
    pub fn new(inner: T, flags: Arc<HeadFlags>, timeout: Duration) -> Self {
        HeadGuard {
            inner,
            flags,
            state: State::Idle,
            line: [0; LINE],
            line_len: 0,
            lines: 0,
            prev_lf: false,
            cl: false,
            te: false,
            timeout,
            deadline: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
            timed_out: None,
        }
    }

    fn start_head(&mut self) {
        self.state = State::Head;
        self.line_len = 0;
        self.lines = 0;
        self.prev_lf = false;
        self.cl = false;
        self.te = false;
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match self.state {
                State::Off => return,
                State::Body => {
                    if !self.flags.rearm.swap(false, Ordering::AcqRel) {
                        return;
                    }
                    self.state = State::Idle;
                    self.feed_idle(b);
                }
                State::Idle => self.feed_idle(b),
                State::Head => self.feed_head(b),
            }
        }
    }

    fn feed_idle(&mut self, b: u8) {
        // Empty lines before a request line are allowed (RFC 9112 §2.2).
        if b != b'\r' && b != b'\n' {
            self.start_head();
            self.feed_head(b);
        }
    }

    fn feed_head(&mut self, b: u8) {
        match b {
            b'\r' => {}
            b'\n' => {
                let line = &self.line[..self.line_len];
                if self.lines == 0 && line.starts_with(b"PRI * HTTP/2") {
                    self.state = State::Off;
                    return;
                }
                if self.line_len > 0 {
                    self.cl |= starts_with_ci(line, b"content-length:");
                    self.te |= starts_with_ci(line, b"transfer-encoding:");
                }
                self.lines += 1;
                self.line_len = 0;
                if self.prev_lf {
                    if self.cl && self.te {
                        self.flags.conflict.store(true, Ordering::Release);
                    }
                    self.state = State::Body;
                    return;
                }
                self.prev_lf = true;
            }
            _ => {
                self.prev_lf = false;
                if self.line_len < LINE {
                    self.line[self.line_len] = b;
                    self.line_len += 1;
                }
            }
        }
    }
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.timed_out.is_none() {
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {
                    this.feed(&buf.filled()[before..]);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if this.state != State::Head || this.deadline.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let body = crate::respond::raw_error(
                        crate::error::ErrorKind::RequestTimeout,
                        &format!(
                            "the request head was not received within {:?}",
                            this.timeout
                        ),
                    );
                    metrics::counter!("gateway_header_timeouts_total").increment(1);
                    this.timed_out = Some((body, 0));
                }
            }
        }
        // Write the 408 (best effort), then report the timeout to hyper,
        // which closes the connection.
        if let Some((resp, written)) = &mut this.timed_out {
            while *written < resp.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &resp[*written..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break,
                    Poll::Ready(Ok(n)) => *written += n,
                    Poll::Pending => return Poll::Pending,
                }
            }
            let _ = Pin::new(&mut this.inner).poll_flush(cx);
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request head read timeout",
        )))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadGuard<T> {
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
        bufs: &[io::IoSlice<'_>],
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

    fn scan(chunks: &[&[u8]]) -> bool {
        let flags = Arc::new(HeadFlags::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _g = rt.enter();
        let mut s = HeadGuard::new((), flags.clone(), Duration::from_secs(1));
        for c in chunks {
            s.feed(c);
        }
        flags.conflict.load(Ordering::Acquire)
    }

    #[test]
    fn finds_both_framing_headers() {
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(scan(&[
            b"\r\nPOST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"
        ]));
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Le",
            b"ngth: 3\r\nTransfer-Enc",
            b"oding: chunked\r\n\r\n"
        ]));
    }

    #[test]
    fn ignores_bodies_single_headers_and_h2c() {
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\nx\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n"
        ]));
    }
}
