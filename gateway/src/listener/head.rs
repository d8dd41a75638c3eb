//! A read-side guard for HTTP/1 connections, sitting between the socket (or
//! TLS stream) and hyper. It follows request heads as they arrive and:
//!
//! - refuses heads whose framing is ambiguous, as request smuggling
//!   attempts: both `Content-Length` and `Transfer-Encoding` (hyper would
//!   resolve them by chunked framing and silently drop `Content-Length`),
//!   conflicting or malformed `Content-Length` values, and any
//!   `Transfer-Encoding` other than a single `chunked`. The head never
//!   reaches hyper: the guard answers `400` problem+json and closes (hyper's
//!   own refusal of some of these is a bare `400`);
//! - enforces the header read timeout from the first byte of a head to the
//!   blank line that ends it, answering `408` problem+json and closing
//!   (hyper's own timer closes silently, and also runs while a keep-alive
//!   connection is idle, which is the idle timeout's job).
//!
//! The guard follows each request's body framing (`Content-Length`, or the
//! chunked coding's chunk sizes and trailers) to find where the next head
//! starts, so a pipelined head is scanned like any other, whether or not the
//! proxy has answered the request before it. An h2c preface turns the guard
//! off for the connection.
//!
//! The guard writes its `400` or `408` itself and closes. A pipelined head
//! refused while requests before it are in flight is cut off (those requests
//! reach hyper) and held: the `400` is written once hyper has flushed their
//! responses. (A response body still streaming then may be cut short; only
//! the client that sent the attempt is affected.) The header timeout of a
//! pipelined head starts once the requests before it are answered.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Shared between the guard and the proxy, which counts the requests it
/// has answered.
#[derive(Debug, Default)]
pub struct HeadFlags {
    /// Requests answered on this connection.
    pub answered: AtomicU32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the first byte of a head.
    Idle,
    /// Inside a head.
    Head,
    /// A `Content-Length` body: bytes still to come.
    Fixed(u64),
    /// A chunked body.
    Chunked(crate::chunked::Decoder),
    /// Not HTTP/1 (h2c), or refused: nothing more to do.
    Off,
}

/// Longest line prefix kept: enough for a framing header's name and any
/// valid value; a longer framing line is refused.
const LINE: usize = 64;

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
    /// The current line was longer than `LINE`.
    long: bool,
    /// The head's `Content-Length`, once seen.
    cl: Option<u64>,
    /// `Transfer-Encoding` lines in the head.
    te: u32,
    /// Why the current head (or body framing) is refused.
    reject: Option<&'static str>,
    /// Complete heads seen (requests hyper will hand to the proxy).
    heads: u32,
    /// Where in the bytes being scanned the current head began (0 when it
    /// began in an earlier read).
    head_at: usize,
    /// The refusal is of a body's framing.
    body_error: bool,
    /// A refused head, cut off, waiting for the requests before it to be
    /// answered before the guard answers it.
    held: Option<&'static str>,
    /// The reader to wake when hyper has flushed a response while a head is
    /// held.
    waiting: Option<std::task::Waker>,
    /// The header timeout was paused while requests were in flight.
    paused: bool,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The 408 or 400 still to be written, then the connection ends.
    closing: Option<Closing>,
}

/// A response the guard writes itself before ending the connection, and the
/// error hyper then gets.
struct Closing {
    response: Vec<u8>,
    written: usize,
    error: (io::ErrorKind, &'static str),
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
            long: false,
            cl: None,
            te: 0,
            reject: None,
            heads: 0,
            head_at: 0,
            body_error: false,
            held: None,
            waiting: None,
            paused: false,
            timeout,
            deadline: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
            closing: None,
        }
    }

    fn start_head(&mut self) {
        self.state = State::Head;
        self.line_len = 0;
        self.lines = 0;
        self.prev_lf = false;
        self.long = false;
        self.cl = None;
        self.te = 0;
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
    }

    /// Whether a request seen by the guard is not answered yet.
    fn in_flight(&self) -> bool {
        self.flags.answered.load(Ordering::Acquire) != self.heads
    }

    /// Scans `bytes`; body bytes are skipped in bulk.
    fn feed(&mut self, mut bytes: &[u8]) {
        let total = bytes.len();
        self.head_at = 0;
        while let Some((&b, rest)) = bytes.split_first() {
            match self.state {
                State::Off => return,
                State::Idle => {
                    self.feed_idle(b);
                    if self.state == State::Head {
                        self.head_at = total - bytes.len();
                    }
                }
                State::Head => {
                    let n = self.feed_head_run(bytes);
                    bytes = &bytes[n..];
                    continue;
                }
                State::Fixed(n) => {
                    let take = n.min(bytes.len() as u64);
                    self.state = if take == n {
                        State::Idle
                    } else {
                        State::Fixed(n - take)
                    };
                    // `take` ≤ `bytes.len()`, so it fits a usize.
                    bytes = &bytes[usize::try_from(take).unwrap_or(bytes.len())..];
                    continue;
                }
                State::Chunked(mut d) => {
                    let step = match d.advance(bytes) {
                        Ok(s) => s,
                        Err(why) => return self.refuse_body(why),
                    };
                    self.state = if d.is_done() {
                        State::Idle
                    } else {
                        State::Chunked(d)
                    };
                    bytes = &bytes[step.framing + step.data..];
                    continue;
                }
            }
            bytes = rest;
        }
    }

    fn feed_idle(&mut self, b: u8) {
        // Empty lines before a request line are allowed (RFC 9112 §2.2).
        if b != b'\r' && b != b'\n' {
            self.start_head();
            self.feed_head(b);
        }
    }

    /// Scans head bytes a line at a time (memchr for the line ends); stops
    /// after the byte that ends the head. Returns the bytes consumed.
    fn feed_head_run(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            let Some(p) = memchr::memchr(b'\n', &bytes[i..]) else {
                self.absorb(&bytes[i..]);
                return bytes.len();
            };
            self.absorb(&bytes[i..i + p]);
            i += p + 1;
            self.feed_head(b'\n');
            if self.state != State::Head {
                break;
            }
        }
        i
    }

    /// Adds line bytes (no `\n`) to the current line; `\r` is ignored.
    fn absorb(&mut self, seg: &[u8]) {
        let seg = seg.strip_suffix(b"\r").unwrap_or(seg);
        if seg.is_empty() {
            return;
        }
        if memchr::memchr(b'\r', seg).is_some() {
            for &b in seg {
                self.feed_head(b);
            }
            return;
        }
        self.prev_lf = false;
        let take = (LINE - self.line_len).min(seg.len());
        self.line[self.line_len..self.line_len + take].copy_from_slice(&seg[..take]);
        self.line_len += take;
        if seg.len() > take {
            self.long = true;
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
                if self.lines > 0 && self.line_len > 0 {
                    self.check_line();
                }
                self.lines += 1;
                self.line_len = 0;
                self.long = false;
                if self.prev_lf {
                    if self.cl.is_some() && self.te > 0 {
                        self.refuse("request has both Content-Length and Transfer-Encoding");
                    }
                    if self.state == State::Head {
                        self.heads = self.heads.wrapping_add(1);
                        self.state = if self.te > 0 {
                            State::Chunked(crate::chunked::Decoder::default())
                        } else {
                            match self.cl {
                                Some(n) if n > 0 => State::Fixed(n),
                                _ => State::Idle,
                            }
                        };
                    }
                    return;
                }
                self.prev_lf = true;
            }
            _ => {
                self.prev_lf = false;
                if self.line_len < LINE {
                    self.line[self.line_len] = b;
                    self.line_len += 1;
                } else {
                    self.long = true;
                }
            }
        }
    }

    /// Checks a complete header line for framing headers.
    fn check_line(&mut self) {
        const CL: &[u8] = b"content-length:";
        const TE: &[u8] = b"transfer-encoding:";
        let line = &self.line[..self.line_len];
        if starts_with_ci(line, CL) {
            let value = line[CL.len()..].trim_ascii();
            // Digits only (no sign, no list); `parse` refuses overflow.
            let parsed = if !self.long && value.iter().all(u8::is_ascii_digit) {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
            } else {
                None
            };
            match (parsed, self.cl) {
                (None, _) => self.refuse("invalid Content-Length"),
                (Some(v), Some(prev)) if v != prev => {
                    self.refuse("conflicting Content-Length values")
                }
                (Some(v), _) => self.cl = Some(v),
            }
        } else if starts_with_ci(line, TE) {
            self.te += 1;
            let value = line[TE.len()..].trim_ascii();
            if self.long || self.te > 1 || !value.eq_ignore_ascii_case(b"chunked") {
                self.refuse(
                    "unsupported Transfer-Encoding (only a single \"chunked\" is accepted)",
                );
            }
        }
    }

    /// Refuses the current head: scanning stops, and the reader answers 400.
    fn refuse(&mut self, why: &'static str) {
        self.reject.get_or_insert(why);
        self.state = State::Off;
    }

    /// Refuses a chunked body hyper has begun to read: the connection ends
    /// (hyper would fail on it too), without an answer of the guard's.
    fn refuse_body(&mut self, why: &'static str) {
        self.body_error = true;
        self.refuse(why);
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
        loop {
            // A 408 or 400 to write (best effort), then the error for
            // hyper, which closes the connection.
            if let Some(c) = &mut this.closing {
                while c.written < c.response.len() {
                    match Pin::new(&mut this.inner).poll_write(cx, &c.response[c.written..]) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break,
                        Poll::Ready(Ok(n)) => c.written += n,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                let _ = Pin::new(&mut this.inner).poll_flush(cx);
                return Poll::Ready(Err(io::Error::new(c.error.0, c.error.1)));
            }
            // A refused pipelined head: answered once the requests before
            // it are (hyper polls again when it has a response to write).
            if let Some(why) = this.held {
                if this.in_flight() {
                    this.waiting = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                this.held = None;
                this.closing = Some(Closing {
                    response: crate::respond::raw_error(crate::error::ErrorKind::BadRequest, why),
                    written: 0,
                    error: (io::ErrorKind::InvalidData, "ambiguous request framing"),
                });
                continue;
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {
                    this.feed(&buf.filled()[before..]);
                    let Some(why) = this.reject.take() else {
                        return Poll::Ready(Ok(()));
                    };
                    metrics::counter!("gateway_smuggling_rejected_total").increment(1);
                    if this.body_error {
                        tracing::debug!("malformed chunked body, connection closed: {why}");
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
                    }
                    // The refused head (and anything after it) never
                    // reaches hyper; the requests before it do.
                    buf.set_filled(before + this.head_at);
                    this.held = Some(why);
                    if this.head_at > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if this.state != State::Head {
                        return Poll::Pending;
                    }
                    // A pipelined head's time starts when the requests
                    // before it are answered (hyper polls again then).
                    if this.in_flight() {
                        this.paused = true;
                        return Poll::Pending;
                    }
                    if std::mem::take(&mut this.paused) {
                        let at = Instant::now() + this.timeout;
                        this.deadline.as_mut().reset(at);
                    }
                    if this.deadline.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    metrics::counter!("gateway_header_timeouts_total").increment(1);
                    this.closing = Some(Closing {
                        response: crate::respond::raw_error(
                            crate::error::ErrorKind::RequestTimeout,
                            &format!(
                                "the request head was not received within {:?}",
                                this.timeout
                            ),
                        ),
                        written: 0,
                        error: (io::ErrorKind::TimedOut, "request head read timeout"),
                    });
                }
            }
        }
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
        let this = &mut *self;
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        // A response is out: a held head may be answered now.
        if flushed.is_ready()
            && this.held.is_some()
            && !this.in_flight()
            && let Some(w) = this.waiting.take()
        {
            w.wake();
        }
        flushed
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` to a guard and returns why it refused the head, if it did.
    fn scan(chunks: &[&[u8]]) -> Option<&'static str> {
        let flags = Arc::new(HeadFlags::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _g = rt.enter();
        let mut s = HeadGuard::new((), flags, Duration::from_secs(1));
        for c in chunks {
            s.feed(c);
        }
        s.reject
    }

    #[test]
    fn refuses_both_framing_headers() {
        let both = Some("request has both Content-Length and Transfer-Encoding");
        assert_eq!(
            scan(&[b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"]),
            both
        );
        assert_eq!(
            scan(&[
                b"\r\nPOST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"
            ]),
            both
        );
        assert_eq!(
            scan(&[
                b"POST / HTTP/1.1\r\nContent-Le",
                b"ngth: 3\r\nTransfer-Enc",
                b"oding: chunked\r\n\r\n"
            ]),
            both
        );
    }

    #[test]
    fn refuses_bad_content_lengths_and_transfer_codings() {
        let cases: [(&[u8], &str); 7] = [
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n", "conflicting"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 5\r\n\r\n", "invalid"),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "invalid"),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", "invalid"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n", "Transfer-Encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", "Transfer-Encoding"),
        ];
        for (head, want) in cases {
            let got = scan(&[head]);
            assert!(
                got.is_some_and(|g| g.contains(want)),
                "{:?}: {got:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn accepts_plain_framing_bodies_and_h2c() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\nx\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked \r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 7\r\ncontent-length: 7\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n",
        ] {
            assert_eq!(scan(&[head]), None, "{:?}", String::from_utf8_lossy(head));
        }
    }

    const SMUGGLED: &[u8] =
        b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn pipelined_heads_are_scanned_after_every_kind_of_body() {
        let bodies: [&[u8]; 4] = [
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-Trailer: y\r\n\r\n",
        ];
        for first in bodies {
            let both = [first, SMUGGLED].concat();
            assert!(
                scan(&[&both]).is_some(),
                "{:?}",
                String::from_utf8_lossy(first)
            );
            // Split at every byte: the state carries across reads.
            for at in 1..both.len() {
                let (a, b) = both.split_at(at);
                assert!(scan(&[a, b]).is_some(), "split at {at}");
            }
            // And a well-formed second request passes.
            let two = [first, first].concat();
            assert_eq!(scan(&[&two]), None, "{:?}", String::from_utf8_lossy(first));
        }
    }

    #[test]
    fn body_bytes_are_never_taken_for_a_head() {
        // A smuggling-looking head inside a chunk and inside a fixed body.
        let chunked = [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            format!("{:x}\r\n", SMUGGLED.len()).as_bytes(),
            SMUGGLED,
            b"\r\n0\r\n\r\n",
        ]
        .concat();
        assert_eq!(scan(&[&chunked]), None);
        let fixed = [
            format!(
                "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                SMUGGLED.len()
            )
            .as_bytes(),
            SMUGGLED,
        ]
        .concat();
        assert_eq!(scan(&[&fixed]), None);
    }

    #[test]
    fn refuses_malformed_chunked_framing() {
        for body in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"12345678901234567\r\n",
            b"1\r\nxy",
        ] {
            let req = [
                &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                body,
            ]
            .concat();
            assert!(
                scan(&[&req]).is_some(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
