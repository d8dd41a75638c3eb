//! Upstream pools: targets, the choice of target (round robin), and the
//! pooled keep-alive client (hyper-util) that talks HTTP/1.1 or HTTP/2 to
//! them with connect and request timeouts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use crate::config::file::UpstreamProtocol;
use crate::error::{ErrorKind, ProxyError};
use crate::proxy::body::{Body, BodyError};

/// A live upstream pool.
#[derive(Debug)]
pub struct Pool {
    pub config: UpstreamConfig,
    targets: Vec<Authority>,
    next: AtomicUsize,
    client: Client<HttpConnector, Body>,
}

impl Pool {
    /// Builds the pool and its client. Targets were validated at load.
    pub fn new(config: &UpstreamConfig) -> Arc<Pool> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_target);
        if config.protocol == UpstreamProtocol::Http2 {
            builder.http2_only(true);
        }
        let targets = config
            .targets
            .iter()
            .filter_map(|t| t.parse().ok())
            .collect();
        Arc::new(Pool {
            config: config.clone(),
            targets,
            next: AtomicUsize::new(0),
            client: builder.build(connector),
        })
    }

    /// The next target in round-robin order.
    fn pick(&self) -> Option<&Authority> {
        if self.targets.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        self.targets.get(i)
    }

    /// Sends `req` (whose URI holds only a path and query) to a target,
    /// waiting at most `timeout` for the response head.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        let Some(target) = self.pick() else {
            return Err(ProxyError::new(
                ErrorKind::NoUpstream,
                format!("upstream {:?} has no targets", self.config.name),
            ));
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(target.clone());
        parts.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        *req.uri_mut() = Uri::from_parts(parts)
            .map_err(|e| ProxyError::new(ErrorKind::Internal, "bad upstream URI").with_source(e))?;
        if self.config.protocol == UpstreamProtocol::Http2 {
            *req.version_mut() = http::Version::HTTP_2;
        } else {
            *req.version_mut() = http::Version::HTTP_11;
        }
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&self.config.name, target, e)),
            Err(_) => Err(ProxyError::new(
                ErrorKind::UpstreamTimeout,
                format!(
                    "upstream {:?} ({target}) did not answer within {timeout:?}",
                    self.config.name
                ),
            )),
        }
    }
}

/// Maps a client error to the error kind it means.
fn classify(name: &str, target: &Authority, e: hyper_util::client::legacy::Error) -> ProxyError {
    // A request body over its limit surfaces as a client error.
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = src {
        match s.downcast_ref::<BodyError>() {
            Some(BodyError::TooLarge(limit)) => {
                return ProxyError::new(
                    ErrorKind::PayloadTooLarge,
                    format!("request body exceeds {limit} bytes"),
                )
                .closing();
            }
            Some(BodyError::Timeout(t)) => {
                return ProxyError::new(
                    ErrorKind::RequestTimeout,
                    format!("the client sent no body data for {t:?}"),
                )
                .closing();
            }
            _ => {}
        }

        src = s.source();
    }
    if e.is_connect() {
        ProxyError::new(
            ErrorKind::UpstreamConnect,
            format!("cannot connect to upstream {name:?} ({target})"),
        )
        .with_source(e)
    } else {
        ProxyError::new(
            ErrorKind::UpstreamProtocol,
            format!("upstream {name:?} ({target}) failed"),
        )
        .with_source(e)
    }
}
