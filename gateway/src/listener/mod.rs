//! Client-facing listeners: binding (one SO_REUSEPORT socket per worker),
//! the accept loop with its connection limit and allow/deny check, TLS
//! handshakes, and serving each connection: HTTP/1.1 by the gateway's own
//! server side (`h1`), HTTP/2 by hyper (`h2`: h2c prior knowledge on
//! plain listeners, ALPN on TLS), with header-read, idle and send timeouts
//! and graceful shutdown.

pub mod h1;
pub mod h2;
pub mod proxy_protocol;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::ListenerConfig;
use crate::proxy::{Conn, Shared};
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
        let shared = a.shared.clone();
        let shutdown = a.shutdown.clone();
        let name = a.name.clone();
        let enforcer = a.enforcer.clone();
        let label = label.clone();
        // Each stage is boxed: the task is allocated at the size of its
        // largest state for the connection's whole life, and an idle
        // keep-alive connection should cost only the stage it is in.
        a.tracker.spawn(async move {
            if let Some((stream, conn)) =
                client(stream, peer, name, &settings, &enforcer, &label).await
            {
                serve(stream, conn, settings, shared, shutdown).await;
            }
            active.fetch_sub(1, Ordering::Relaxed);
            gauge.decrement(1.0);
        });
    }
}

/// Who the connection is from: its peer, or on a `proxy_protocol`
/// listener the client its PROXY header names, admitted again as the
/// accept loop admitted the peer (auto-ban, and the `[xdp]` lists while
/// userspace enforces them). `None`: the connection is closed.
async fn client(
    mut stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    s: &Settings,
    enforcer: &Enforcer,
    label: &metrics::SharedString,
) -> Option<(TcpStream, Arc<Conn>)> {
    let network_peer = peer;
    let peer = if s.proxy_protocol {
        // Boxed (see `accept_loop`): only these listeners pay for it.
        match Box::pin(proxy_protocol::read(&mut stream, s.header_read_timeout)).await {
            Ok(named) => {
                let client = named.unwrap_or(peer);
                if !enforcer.admit(client.ip()) {
                    metrics::counter!("gateway_connections_rejected_total", "listener" => label.clone(), "reason" => "denied").increment(1);
                    return None;
                }
                client
            }
            Err(e) => {
                metrics::counter!("gateway_proxy_protocol_errors_total", "listener" => label.clone(), "reason" => e.label()).increment(1);
                tracing::debug!(%peer, listener = %listener, "connection refused: {e}");
                return None;
            }
        }
    } else {
        peer
    };
    let conn = Arc::new(Conn {
        listener,
        peer,
        source: (peer != network_peer).then_some(network_peer),
        forwarded_for: crate::proxy::forward::client_text(peer.ip()),
        tls: s.tls.is_some(),
        client_cert: None,
        trusted_proxies: s.trusted_proxies,
    });
    Some((stream, conn))
}

/// A connection's settings, copied from the listener config at accept.
struct Settings {
    tls: Option<Arc<rustls::ServerConfig>>,
    http2: bool,
    http2_max_concurrent_streams: u32,
    http2_keepalive: Option<(Duration, Duration)>,
    proxy_protocol: bool,
    trusted_proxies: bool,
    max_requests: u64,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    ignore_client_abort: bool,
    max_header_bytes: usize,
    max_headers: usize,
}

impl From<&ListenerConfig> for Settings {
    fn from(c: &ListenerConfig) -> Self {
        Settings {
            tls: c.tls.clone(),
            http2: c.http2,
            http2_max_concurrent_streams: c.http2_max_concurrent_streams,
            http2_keepalive: c.http2_keepalive,
            proxy_protocol: c.proxy_protocol,
            trusted_proxies: !c.trusted_proxies.is_empty(),
            max_requests: c.max_requests_per_connection,
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            send_timeout: c.send_timeout,
            ignore_client_abort: c.ignore_client_abort,
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
            watch_client: !self.ignore_client_abort,
            max_requests: self.max_requests,
            h2c,
        }
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
            let tls = match Box::pin(tokio::time::timeout(
                s.header_read_timeout,
                acceptor.accept(stream),
            ))
            .await
            {
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
            // Verified by the handshake (`client_ca`): described once here.
            let conn = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                Some(leaf) => Arc::new(Conn {
                    client_cert: Some(Arc::new(tls::ClientCert::describe(leaf))),
                    ..(*conn).clone()
                }),
                None => conn,
            };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                Box::pin(h2::serve(tls, conn, &s, shared, shutdown)).await;
            } else {
                Box::pin(h1::serve(tls, conn, s.h1_limits(false), shared, shutdown)).await;
            }
        }
        None => {
            let limits = s.h1_limits(s.http2);
            if let h1::End::H2c { stream, read } = Box::pin(h1::serve(
                stream,
                conn.clone(),
                limits,
                shared.clone(),
                shutdown.clone(),
            ))
            .await
            {
                Box::pin(h2::serve(
                    h1::Rewind::new(read, stream),
                    conn,
                    &s,
                    shared,
                    shutdown,
                ))
                .await;
            }
        }
    }
}
