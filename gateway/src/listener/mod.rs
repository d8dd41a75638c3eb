//! Client-facing listeners: binding (one SO_REUSEPORT socket per worker),
//! the accept loop with its connection limit and allow/deny check, TLS
//! handshakes, and serving each connection: HTTP/1.1 by the gateway's own
//! server side (`h1`), HTTP/2 by hyper (h2c prior knowledge on plain
//! listeners, ALPN on TLS), with header-read and idle timeouts and graceful
//! shutdown.

pub mod h1;
pub mod tls;

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
            forwarded_for: crate::proxy::forward::client_text(peer.ip()),
            tls: settings.tls.is_some(),
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
    send_timeout: Duration,
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
            send_timeout: c.send_timeout,
            max_header_bytes: c.max_header_bytes,
            max_headers: c.max_headers,
        }
    }
}

impl Settings {
    /// The head size refused before parsing: twice ours, so that between
    /// our limit and this one `proxy` answers 431 with the request's id and
    /// exact size.
    fn max_head(&self) -> usize {
        self.max_header_bytes.saturating_mul(2).max(8192)
    }

    fn h1_limits(&self, h2c: bool) -> h1::Limits {
        h1::Limits {
            max_head: self.max_head(),
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers.saturating_mul(2).max(100),
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            send_timeout: self.send_timeout,
            h2c,
        }
    }
}

/// hyper's HTTP/2 connection builder with our limits.
fn http2(s: &Settings) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(s.max_head()).unwrap_or(u32::MAX));
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
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                serve_h2(tls, conn, &s, shared, shutdown).await;
            } else {
                h1::serve(tls, conn, s.h1_limits(false), shared, shutdown).await;
            }
        }
        None => {
            let limits = s.h1_limits(s.http2);
            if let h1::End::H2c { stream, read } = h1::serve(
                stream,
                conn.clone(),
                limits,
                shared.clone(),
                shutdown.clone(),
            )
            .await
            {
                serve_h2(h1::Rewind::new(read, stream), conn, &s, shared, shutdown).await;
            }
        }
    }
}

/// Serves an HTTP/2 connection with hyper.
async fn serve_h2<T>(
    io: T,
    conn: Arc<Conn>,
    s: &Settings,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        started: Instant::now(),
        last_ms: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
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
                Ok::<_, Infallible>(resp)
            }
        })
    };
    drive(
        http2(s).serve_connection(TokioIo::new(io), svc),
        |c| c.graceful_shutdown(),
        &activity,
        s.idle_timeout,
        shutdown,
    )
    .await;
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
