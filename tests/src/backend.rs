//! A real HTTP backend for tests (and the demo backend of `cargo xtask run`).
//! It speaks HTTP/1.1 and HTTP/2 (h2c) and answers every request with a JSON
//! echo of what it received. Paths with special meaning:
//! `/status/{code}` answers that status, `/delay/{ms}` waits first,
//! `/bytes/{n}` answers n bytes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A running backend; stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    /// Requests served.
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
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

    /// Serves on an already bound listener.
    pub fn serve(listener: TcpListener, name: &str) -> Backend {
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let name: Arc<str> = name.into();
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                let hits = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        hits.fetch_add(1, Ordering::Relaxed);
                        echo(name.clone(), req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, hits, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
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
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let query = req.uri().query().map(str::to_string);
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
    Ok(resp)
}
