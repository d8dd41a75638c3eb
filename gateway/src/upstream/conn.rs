//! HTTP/1.1 connections to targets, pooled per target and per worker: each
//! `Target` holds one last-in first-out list of idle connections for each
//! worker thread, so a request takes the most recently used connection of
//! the target the balancer chose, made on its own runtime, with one
//! uncontended lock and without a pool-wide map keyed by address. (HTTP/2
//! upstreams, which multiplex, keep their own per target instead:
//! `h2`.)
//!
//! A connection goes back to its list when the response body has been read
//! to its end (`release`, when `h1::H1Body` is dropped); a response dropped half-read
//! takes its connection with it. Idle connections older than
//! `pool_idle_timeout` are dropped when found, and by `sweep` once a second.
//!
//! A connection is plain TCP or, for an upstream with `[upstreams.tls]`,
//! TLS over it (`Stream`); both the TCP connect and the handshake fall
//! under `connect_timeout`.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::Authority;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::h1;
use super::target::Target;
use super::tls::Tls;

/// An upstream connection's byte stream.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether the peer has neither closed the stream nor sent anything
    /// unasked. Costs no syscall unless the runtime has seen the socket
    /// become readable.
    pub fn is_idle(&mut self) -> bool {
        match self {
            Stream::Plain(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
            // Raw bytes may be TLS records that carry no data (a session
            // ticket): only rustls can tell, so it is asked for data
            // without waiting.
            Stream::Tls(s) => {
                let mut probe = [std::mem::MaybeUninit::uninit(); 1];
                let mut buf = ReadBuf::uninit(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                Pin::new(&mut **s).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A new connection to `addr`, TLS when `tls` says so, within `timeout`
/// (connect and handshake together).
pub async fn open(
    addr: &Authority,
    timeout: Duration,
    tls: Option<&Tls>,
) -> Result<Stream, ConnectError> {
    tokio::time::timeout(timeout, dial(addr, tls))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

/// `open` without a time limit of its own (the caller has one).
pub async fn dial(addr: &Authority, tls: Option<&Tls>) -> Result<Stream, ConnectError> {
    let tcp = TcpStream::connect(addr.as_str()).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some(tls) => match tls.handshake(tcp, addr).await {
            Ok(s) => Ok(Stream::Tls(Box::new(s))),
            Err(e) => Err(ConnectError::Tls(e)),
        },
    }
}

/// An idle connection and when it became idle.
#[derive(Debug)]
pub struct Idle {
    conn: h1::Conn,
    since: Instant,
}

/// Idle lists, one per worker.
pub type IdleLists = Box<[Mutex<Vec<Idle>>]>;

static WORKERS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Sets how many workers serve requests (once, at start-up).
pub fn set_workers(n: usize) {
    WORKERS.store(n.max(1), Ordering::Relaxed);
}

/// Marks the calling thread as worker `i`.
pub fn enter_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The calling thread's worker number (0 off the workers).
pub fn worker() -> usize {
    WORKER.with(Cell::get)
}

/// Empty idle lists for a new target.
pub fn idle_lists() -> IdleLists {
    (0..WORKERS.load(Ordering::Relaxed))
        .map(|_| Mutex::new(Vec::new()))
        .collect()
}

fn my_list(target: &Target) -> Option<&Mutex<Vec<Idle>>> {
    let i = worker();
    target.idle.get(i % target.idle.len().max(1))
}

/// What making a connection can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
}

/// Pool settings of the upstream a connection belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

/// Where a response's connection goes back to once its body has ended.
#[derive(Debug, Clone)]
pub struct ReturnTo {
    pub target: Arc<Target>,
    pub settings: Settings,
}

/// The most recently used idle connection to `target` that is still
/// usable, if any.
pub fn checkout(target: &Target, settings: Settings) -> Option<h1::Conn> {
    let list = my_list(target)?;
    let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
    while let Some(mut i) = idle.pop() {
        if i.since.elapsed() <= settings.idle_timeout && i.conn.is_usable() {
            return Some(i.conn);
        }
    }
    None
}

/// A new connection to `target`.
pub async fn connect(
    target: &Target,
    settings: Settings,
    tls: Option<&Tls>,
) -> Result<h1::Conn, ConnectError> {
    open(&target.addr, settings.connect_timeout, tls)
        .await
        .map(h1::Conn::new)
}

/// Gives a connection whose exchange ended cleanly back to its target.
pub fn release(to: &ReturnTo, mut conn: h1::Conn) {
    let Some(list) = my_list(&to.target) else {
        return;
    };
    conn.shed();
    let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < to.settings.max_idle {
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

/// Drops `target`'s idle connections older than `idle_timeout`.
pub fn sweep(target: &Target, idle_timeout: Duration) {
    for list in target.idle.iter() {
        let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|i| i.since.elapsed() <= idle_timeout);
    }
}
