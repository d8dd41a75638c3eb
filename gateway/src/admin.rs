//! The admin listener: `/metrics` (Prometheus), `/healthz` (process alive),
//! `/readyz` (config loaded, listeners bound), `POST /admin/reload`,
//! `/admin/upstreams` (per pool and target: health, ejection, in-flight,
//! recent errors, circuit state), `GET /admin/bans` (auto-ban bans in
//! force), `/admin/xdp/{allow,deny}` (see `crate::xdp::api`). Also the
//! client side of `gateway reload`.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio::sync::watch;

use crate::proxy::body::Body;
use crate::reload::Live;

/// What the admin endpoints read.
pub struct State {
    pub live: Arc<Live>,
    pub metrics: PrometheusHandle,
    /// `STARTING`, then `READY` once every listener is bound and serving,
    /// then `DRAINING` from SIGTERM/SIGINT until the process exits.
    pub phase: AtomicU8,
}

/// `State::phase` before the listeners serve.
pub const STARTING: u8 = 0;
/// `State::phase` while serving.
pub const READY: u8 = 1;
/// `State::phase` while in-flight requests drain on shutdown.
pub const DRAINING: u8 = 2;

/// Serves the admin API on `listener` until `stop` fires. The gateway stops
/// it only after the drain, so that `/readyz` answers 503 while in-flight
/// requests finish and load balancers see the instance leave.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => match state.phase.load(Ordering::Acquire) {
            READY => text(StatusCode::OK, "text/plain", "ready\n".into()),
            DRAINING => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "draining\n".into(),
            ),
            _ => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "starting\n".into(),
            ),
        },
        (&Method::POST, "/admin/reload") => {
            let live = state.live.clone();
            match tokio::task::spawn_blocking(move || live.reload()).await {
                Ok(Ok(())) => json(StatusCode::OK, serde_json::json!({"status": "reloaded"})),
                Ok(Err(e)) => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    serde_json::json!({"status": "rejected", "problems": e.lines()}),
                ),
                Err(_) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"status": "reload task failed"}),
                ),
            }
        }
        (&Method::GET, "/admin/upstreams") => {
            let generation = state.live.load();
            let pools: Vec<serde_json::Value> =
                generation.upstreams.iter().map(|p| p.status()).collect();
            json(StatusCode::OK, serde_json::json!({ "upstreams": pools }))
        }
        (&Method::GET, "/admin/bans") => {
            let bans: Vec<_> = state
                .live
                .enforcer()
                .bans()
                .into_iter()
                .map(|(net, left)| serde_json::json!({"ip": crate::policy::access::display_net(&net), "expires_in_s": left.as_secs_f64()}))
                .collect();
            json(StatusCode::OK, serde_json::json!({ "bans": bans }))
        }
        // The XDP allow/deny lists (gateway/src/xdp/api.rs); blocking: it
        // may write pinned maps under a file lock.
        (_, p) if p.starts_with("/admin/xdp/") => {
            let enforcer = state.live.enforcer().clone();
            let (method, path) = (req.method().clone(), p.to_string());
            let query = req.uri().query().map(str::to_string);
            match tokio::task::spawn_blocking(move || {
                crate::xdp::api::handle(&enforcer, &method, &path, query.as_deref())
            })
            .await
            {
                Ok((status, v)) => json(status, v),
                Err(_) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"status": "xdp task failed"}),
                ),
            }
        }
        (
            _,
            "/metrics" | "/healthz" | "/readyz" | "/admin/reload" | "/admin/upstreams"
            | "/admin/bans",
        ) => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"status": "method not allowed"}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"status": "not found"}),
        ),
    }
}

fn text(status: StatusCode, ct: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut body = v.to_string();
    body.push('\n');
    text(status, "application/json", body)
}

/// Just enough of the config file to find the admin listener, so that
/// `gateway reload` works even when the rest of the file is broken.
#[derive(Deserialize)]
struct AdminOnly {
    #[serde(default)]
    admin: AdminSection,
}

#[derive(Deserialize, Default)]
struct AdminSection {
    listen: Option<String>,
}

/// `gateway reload`: asks the gateway running with `config` to reload it.
pub fn request_reload(config: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let parsed: AdminOnly =
        toml::from_str(&text).with_context(|| format!("cannot parse {}", config.display()))?;
    let Some(listen) = parsed.admin.listen else {
        bail!(
            "{} has no [admin] listen address; send SIGHUP to the gateway instead",
            config.display()
        );
    };
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("invalid admin listen address {listen:?}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("cannot reach the gateway's admin listener at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST /admin/reload HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).unwrap_or("");
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    if status == "200" {
        return Ok(());
    }
    let problems: Vec<String> = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("problems").cloned())
        .and_then(|p| serde_json::from_value(p).ok())
        .unwrap_or_default();
    if problems.is_empty() {
        bail!("reload failed: HTTP {status}: {}", body.trim());
    }
    bail!(
        "reload rejected; the gateway keeps its previous config:\n{}",
        problems.join("\n")
    );
}
