//! A read-side wrapper for HTTP/1 connections that spots request heads
//! carrying both `Content-Length` and `Transfer-Encoding`. hyper resolves
//! such a request by its chunked framing, silently drops `Content-Length`
//! and closes the connection afterwards, so the proxy never sees the
//! conflict. We reject it outright instead (400, connection closed), as a
//! request smuggling attempt.
//!
//! Only the head that starts a request is scanned: scanning pauses at the
//! blank line that ends it and resumes when the proxy has answered that
//! request, so body bytes are never mistaken for header lines.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the wrapper (which sets it) and the proxy (which reads it).
#[derive(Debug, Default)]
pub struct HeadFlags {
    /// The current request head had both framing headers.
    pub conflict: AtomicBool,
    /// Set by the proxy when a response is done: the next bytes start a head.
    pub rearm: AtomicBool,
}

/// Scanner state for one connection.
#[derive(Debug)]
struct Scan {
    scanning: bool,
    /// Bytes of the current line seen so far (only the first few matter).
    line: [u8; 18],
    line_len: usize,
    /// The last byte other than CR was LF: another LF ends the head.
    prev_lf: bool,
    cl: bool,
    te: bool,
}

/// Wraps an I/O object and scans request heads as they are read.
pub struct Sniff<T> {
    inner: T,
    scan: Scan,
    flags: Arc<HeadFlags>,
}

impl<T> Sniff<T> {
    pub fn new(inner: T, flags: Arc<HeadFlags>) -> Self {
        Sniff {
            inner,
            scan: Scan {
                scanning: true,
                line: [0; 18],
                line_len: 0,
                prev_lf: false,
                cl: false,
                te: false,
            },
            flags,
        }
    }

    #[cfg(test)]
    fn feed(&mut self, bytes: &[u8]) {
        feed(&mut self.scan, &self.flags, bytes);
    }
}

fn feed(s: &mut Scan, flags: &HeadFlags, bytes: &[u8]) {
    {
        if !s.scanning {
            if !flags.rearm.swap(false, Ordering::AcqRel) {
                return;
            }
            *s = Scan {
                scanning: true,
                line: [0; 18],
                line_len: 0,
                prev_lf: false,
                cl: false,
                te: false,
            };
        }
        for &b in bytes {
            match b {
                b'\r' => {}
                b'\n' => {
                    if s.line_len > 0 {
                        let line = &s.line[..s.line_len];
                        s.cl |= starts_with_ci(line, b"content-length:");
                        s.te |= starts_with_ci(line, b"transfer-encoding:");
                        s.line_len = 0;
                    }
                    // A blank line ("\r\n\r\n" or "\n\n") ends the head.
                    if s.prev_lf {
                        if s.cl && s.te {
                            flags.conflict.store(true, Ordering::Release);
                        }
                        s.scanning = false;
                        return;
                    }
                    s.prev_lf = true;
                }
                _ => {
                    s.prev_lf = false;
                    if s.line_len < s.line.len() {
                        s.line[s.line_len] = b;
                        s.line_len += 1;
                    }
                }
            }
        }
    }
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniff<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            feed(&mut this.scan, &this.flags, &buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniff<T> {
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
        let mut s = Sniff::new((), flags.clone());
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
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"
        ]));
        // Split across reads.
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Le",
            b"ngth: 3\r\nTransfer-Enc",
            b"oding: chunked\r\n\r\n"
        ]));
    }

    #[test]
    fn ignores_bodies_and_single_headers() {
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\nx\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
    }
}
