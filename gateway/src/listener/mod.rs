//! Client-facing listeners: binding (one SO_REUSEPORT socket per worker),
//! the accept loop with its connection limit and allow/deny check, TLS
//! handshakes, and serving each connection with hyper over HTTP/1.1 or
//! HTTP/2 (h2c prior knowledge on plain listeners, ALPN on TLS), with
//! header-read and idle timeouts and graceful shutdown.

mod head;
pub mod tls;

pub use head::HeadFlags;
use head::HeadGuard;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::ListenerConfig;
use crate::proxy::{self, Conn, Shared};
use crate::xdp::Enforcer;

/// Binds `addr` with SO_REUSEPORT so that each worker accepts on its own
/// socket and the kernel spreads connections between them.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// What the accept loop of one listener needs.
pub struct Accept {
    pub name: Arc<str>,
    pub socket: std::net::TcpListener,
    pub shared: Arc<Shared>,
    pub enforcer: Arc<Enforcer>,
    /// Open connections on this listener, across all workers.
    pub active: Arc<AtomicUsize>,
    pub shutdown: watch::Receiver<bool>,
    pub tracker: TaskTracker,
}

/// Accepts connections until shutdown is signalled.
pub async fn accept_loop(a: Accept) {
    let listener = match TcpListener::from_std(a.socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %a.name, "cannot register listener: {e}");
            return;
        }
    };
    let mut shutdown = a.shutdown.clone();
    let label = metrics::SharedString::from(a.name.clone());
    let active_gauge = metrics::gauge!("gateway_active_connections", "listener" => label.clone());
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %a.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        if !a.enforcer.admit(peer.ip()) {
            metrics::counter!("gateway_connections_rejected_total", "listener" => label.clone(), "reason" => "denied").increment(1);
            continue;
        }
        let generation = a.shared.live.load();
        let Some(cfg) = generation
            .config
            .listeners
            .iter()
            .find(|l| l.name == a.name)
        else {
            continue;
        };
        if a.active.load(Ordering::Relaxed) >= cfg.max_connections {
            metrics::counter!("gateway_connections_rejected_total", "listener" => label.clone(), "reason" => "max_connections").increment(1);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let settings = Settings::from(cfg);
        a.active.fetch_add(1, Ordering::Relaxed);
        active_gauge.increment(1.0);
        let active = a.active.clone();
        let gauge = active_gauge.clone();
        let conn = Arc::new(Conn {
            listener: a.name.clone(),
            peer,
            tls: settings.tls.is_some(),
            head: Arc::new(HeadFlags::default()),
        });
        let shared = a.shared.clone();
        let shutdown = a.shutdown.clone();
        a.tracker.spawn(async move {
            serve(stream, conn, settings, shared, shutdown).await;
            active.fetch_sub(1, Ordering::Relaxed);
            gauge.decrement(1.0);
        });
    }
}

/// A connection's settings, copied from the listener config at accept.
struct Settings {
    tls: Option<Arc<rustls::ServerConfig>>,
    http2: bool,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    max_headers: usize,
}

impl From<&ListenerConfig> for Settings {
    fn from(c: &ListenerConfig) -> Self {
        Settings {
            tls: c.tls.clone(),
            http2: c.http2,
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            max_header_bytes: c.max_header_bytes,
            max_headers: c.max_headers,
        }
    }
}

impl Settings {
    /// hyper's own head size limit: twice ours, so that between our limit
    /// and this one `proxy` answers 431 with problem+json; beyond it hyper
    /// answers a bare 431 before any request exists.
    fn hyper_max_buf(&self) -> usize {
        self.max_header_bytes.saturating_mul(2).max(8192)
    }

    /// hyper's header count limit, when ours exceeds its default of 100
    /// (which parses on the stack; a larger one costs a heap allocation per
    /// request, so it is only set when needed).
    fn hyper_max_headers(&self) -> Option<usize> {
        (self.max_headers > 100).then(|| self.max_headers.saturating_mul(2))
    }
}

/// A hyper HTTP/1 connection builder with our limits.
fn http1(s: &Settings) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(s.hyper_max_buf());
    if let Some(n) = s.hyper_max_headers() {
        b.max_headers(n);
    }
    b
}

/// Activity on one connection, for the idle timeout.
struct Activity {
    started: Instant,
    /// Milliseconds since `started` of the last request start or end.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

async fn serve(
    stream: TcpStream,
    conn: Arc<Conn>,
    s: Settings,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity {
        started: Instant::now(),
        last_ms: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let head = conn.head.clone();
    let svc = {
        let activity = activity.clone();
        let conn = conn.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let conn = conn.clone();
            let activity = activity.clone();
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            async move {
                let resp = proxy::handle(&shared, &conn, req).await;
                conn.head.answered.fetch_add(1, Ordering::Release);
                activity.touch();
                activity.in_flight.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    match s.tls.clone() {
        Some(cfg) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let tls =
                match tokio::time::timeout(s.header_read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %conn.peer, "TLS handshake failed: {e}");
                        metrics::counter!("gateway_tls_handshake_errors_total").increment(1);
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %conn.peer, "TLS handshake timed out");
                        return;
                    }
                };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            if h2 {
                let io = TokioIo::new(tls);
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new())
                    .max_header_list_size(u32::try_from(s.hyper_max_buf()).unwrap_or(u32::MAX));
                drive(
                    b.serve_connection(io, svc),
                    |c| c.graceful_shutdown(),
                    &activity,
                    s.idle_timeout,
                    shutdown,
                )
                .await;
            } else {
                let io = TokioIo::new(HeadGuard::new(tls, head, s.header_read_timeout));
                drive(
                    http1(&s).serve_connection(io, svc),
                    |c| c.graceful_shutdown(),
                    &activity,
                    s.idle_timeout,
                    shutdown,
                )
                .await;
            }
        }
        None if s.http2 => {
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let mut h1 = b.http1();
            h1.timer(TokioTimer::new())
                .header_read_timeout(None)
                .max_buf_size(s.hyper_max_buf());
            if let Some(n) = s.hyper_max_headers() {
                h1.max_headers(n);
            }
            b.http2()
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(s.hyper_max_buf()).unwrap_or(u32::MAX));
            drive(
                b.serve_connection(
                    TokioIo::new(HeadGuard::new(stream, head, s.header_read_timeout)),
                    svc,
                ),
                |c| c.graceful_shutdown(),
                &activity,
                s.idle_timeout,
                shutdown,
            )
            .await;
        }
        None => {
            drive(
                http1(&s).serve_connection(
                    TokioIo::new(HeadGuard::new(stream, head, s.header_read_timeout)),
                    svc,
                ),
                |c| c.graceful_shutdown(),
                &activity,
                s.idle_timeout,
                shutdown,
            )
            .await;
        }
    }
}

/// Runs a connection to completion, closing it gracefully when it has been
/// idle for `idle` or when the gateway shuts down.
async fn drive<C, T, E>(
    conn: C,
    graceful: impl Fn(std::pin::Pin<&mut C>),
    activity: &Activity,
    idle: Duration,
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
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline), if !closing => {
                let now_ms = u64::try_from(activity.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let idle_for = now_ms.saturating_sub(activity.last_ms.load(Ordering::Relaxed));
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
