//! A real HTTP backend for tests (and the demo backend of `cargo xtask run`).
//! It speaks HTTP/1.1 and HTTP/2 (h2c) and answers every request with a JSON
//! echo of what it received. Paths with special meaning:
//! `/status/{code}` answers that status, `/delay/{ms}` waits first,
//! `/bytes/{n}` answers n bytes. Echo answers carry `x-backend` (the
//! backend's name) and `x-backend-secret: hunter2`, a header for routes to
//! remove.
//!
//! For upstream tests a backend can also misbehave (`set_mode`: answer a
//! fixed status, hang, answer late, or close connections without
//! answering), be killed with its open connections (`kill`), and be
//! started again on the same address (`start_at`). `start_tls` makes one
//! that speaks only TLS, for upstream TLS tests (certificates from `pki`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A running backend; stops accepting when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    /// Requests served.
    pub hits: Arc<AtomicUsize>,
    /// The host (`Host`, or the HTTP/2 authority) of each request served.
    hosts: Arc<std::sync::Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    mode: Arc<AtomicU64>,
    kill: tokio::sync::watch::Sender<bool>,
}

/// How a backend behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The JSON echo (and the special paths).
    Normal,
    /// Every request gets this status.
    Status(u16),
    /// Requests are never answered.
    Hang,
    /// Every request is answered this many milliseconds late.
    Delay(u32),
    /// Connections are closed without an answer (new ones at accept).
    Reset,
}

impl Mode {
    fn encode(self) -> u64 {
        match self {
            Mode::Normal => 0,
            Mode::Status(s) => 1 << 32 | u64::from(s),
            Mode::Hang => 2 << 32,
            Mode::Delay(ms) => 3 << 32 | u64::from(ms),
            Mode::Reset => 4 << 32,
        }
    }

    fn decode(v: u64) -> Mode {
        let arg = (v & 0xffff_ffff) as u32;
        match v >> 32 {
            1 => Mode::Status(arg as u16),
            2 => Mode::Hang,
            3 => Mode::Delay(arg),
            4 => Mode::Reset,
            _ => Mode::Normal,
        }
    }
}

impl Backend {
    /// Starts a backend on an ephemeral 127.0.0.1 port, tagged `name` (the
    /// `x-backend` response header and the `backend` JSON member).
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::serve(listener, name)
    }

    /// Starts a backend on `addr` (e.g. where a killed one was), retrying
    /// the bind for up to 5 s.
    pub async fn start_at(addr: SocketAddr, name: &str) -> Backend {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind(addr).await {
                Ok(l) => return Self::serve(l, name),
                Err(e) if std::time::Instant::now() > deadline => panic!("bind {addr}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Starts a backend on an ephemeral 127.0.0.1 port that speaks only
    /// TLS with `tls` (HTTP/2 when its ALPN offers `h2` and the client
    /// picks it). Connections whose handshake fails are closed unserved.
    pub async fn start_tls(name: &str, tls: Arc<rustls::ServerConfig>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::serve_with(listener, name, Some(tokio_rustls::TlsAcceptor::from(tls)))
    }

    /// Serves on an already bound listener.
    pub fn serve(listener: TcpListener, name: &str) -> Backend {
        Self::serve_with(listener, name, None)
    }

    fn serve_with(
        listener: TcpListener,
        name: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Backend {
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = accepted.clone();
        let name: Arc<str> = name.into();
        let h = hits.clone();
        let hosts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = hosts.clone();
        let mode = Arc::new(AtomicU64::new(0));
        let m = mode.clone();
        let (kill, killed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::Relaxed);
                if Mode::decode(m.load(Ordering::Relaxed)) == Mode::Reset {
                    drop(stream);
                    continue;
                }
                let name = name.clone();
                let hits = h.clone();
                let seen = seen.clone();
                let mode = m.clone();
                let killed = killed.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let host = req
                            .headers()
                            .get(http::header::HOST)
                            .and_then(|v| v.to_str().ok())
                            .or(req.uri().authority().map(|a| a.as_str()))
                            .unwrap_or("")
                            .to_string();
                        if let Ok(mut seen) = seen.lock() {
                            seen.push(host);
                        }
                        hits.fetch_add(1, Ordering::Relaxed);
                        misbehave(
                            Mode::decode(mode.load(Ordering::Relaxed)),
                            name.clone(),
                            req,
                        )
                    });
                    match tls {
                        None => serve_connection(stream, svc, killed).await,
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                serve_connection(s, svc, killed).await;
                            }
                        }
                    }
                });
            }
        });
        Backend {
            addr,
            hits,
            hosts,
            accepted,
            task,
            mode,
            kill,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// The host of each request served so far, in order.
    pub fn hosts(&self) -> Vec<String> {
        self.hosts.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Changes how the backend answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode.encode(), Ordering::Relaxed);
    }

    /// Stops accepting and closes every open connection, as a crashed
    /// process would. Returns the address, to start again there.
    pub async fn kill(self) -> SocketAddr {
        let addr = self.addr;
        self.task.abort();
        let _ = self.kill.send(true);
        // Let the accept loop and the connections see it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        addr
    }
}

/// Serves one connection until it ends or the backend is killed.
async fn serve_connection<I, S>(io: I, svc: S, mut killed: tokio::sync::watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = std::io::Error,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    // `kill` closes the connection; a dropped backend leaves it open, as
    // before.
    let killed = async {
        if killed.wait_for(|k| *k).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = conn => {}
        _ = killed => {}
    }
}

async fn misbehave(
    mode: Mode,
    name: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    match mode {
        Mode::Normal => {}
        Mode::Status(code) => {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"misbehaving")));
            *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            resp.headers_mut().insert(
                "x-backend",
                name.parse().unwrap_or(http::HeaderValue::from_static("?")),
            );
            return Ok(resp);
        }
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Delay(ms) => tokio::time::sleep(Duration::from_millis(u64::from(ms))).await,
        Mode::Reset => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset mode",
            ));
        }
    }
    echo(name, req).await.map_err(|never| match never {})
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(name: Arc<str>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let mut status = StatusCode::OK;
    let mut body_override = None;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        body_override = Some(Bytes::from(vec![b'x'; n.parse().unwrap_or(0)]));
    }
    // `x-respond-header: name=value` asks for that header on the response.
    let asked: Vec<(http::HeaderName, http::HeaderValue)> = req
        .headers()
        .get_all("x-respond-header")
        .iter()
        .filter_map(|v| {
            let (n, v) = v.to_str().ok()?.split_once('=')?;
            Some((n.parse().ok()?, v.parse().ok()?))
        })
        .collect();
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let query = req.uri().query().map(str::to_string);
    // HTTP/2's `:authority` (HTTP/1.1 requests have none in origin form).
    let authority = req.uri().authority().map(|a| a.to_string());
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = body_override.unwrap_or_else(|| {
        let v = serde_json::json!({
            "backend": &*name,
            "method": method,
            "path": path,
            "query": query,
            "authority": authority,
            "version": version,
            "headers": headers,
            "body_len": body.len(),
        });
        Bytes::from(v.to_string())
    });
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "x-backend",
        name.parse().unwrap_or(http::HeaderValue::from_static("?")),
    );
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        "x-backend-secret",
        http::HeaderValue::from_static("hunter2"),
    );
    for (n, v) in asked {
        resp.headers_mut().append(n, v);
    }
    Ok(resp)
}

/// A TCP address whose connects never complete: a listener with a backlog
/// of 0 that never accepts, its accept queue filled by connections of its
/// own. Linux then drops further SYNs, so a connect hangs until the
/// connector gives up (no RST, no refusal).
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<std::net::TcpStream>,
}

impl Blackhole {
    /// Binds an ephemeral 127.0.0.1 port and fills its queue; panics if
    /// connects still complete after a few (then the kernel does not behave
    /// as described above and the test would prove nothing).
    pub fn start() -> Blackhole {
        use socket2::{Domain, Protocol, Socket, Type};
        let listener =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("blackhole socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        listener.bind(&any.into()).expect("bind blackhole");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("blackhole address");
        let mut queued = Vec::new();
        // Bounded: a backlog of 0 queues one connection; allow a few more
        // for kernels that round it up.
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => queued.push(s),
                // This one hung: the queue is full.
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Blackhole {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    };
                }
                Err(e) => panic!("connect to the blackhole {addr}: {e}"),
            }
        }
        panic!(
            "connects to {addr} still complete after {} queued",
            queued.len()
        );
    }
}
