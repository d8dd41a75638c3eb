//! The client the auth steps use to call identity providers and forward-auth
//! services: one pooled hyper-util client for the process, plain HTTP,
//! with a time limit per call and a size limit on answers.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Largest answer read (discovery documents, JWKS, introspection).
const MAX_BODY: usize = 1024 * 1024;

fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: OnceLock<Client<HttpConnector, Full<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector)
    })
}

/// Sends `req` and reads the whole answer within `timeout`.
pub async fn call(req: Request<Full<Bytes>>, timeout: Duration) -> Result<Response<Bytes>, String> {
    let uri = req.uri().clone();
    let exchange = async {
        let resp = client()
            .request(req)
            .await
            .map_err(|e| format!("{uri}: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("{uri}: reading the answer: {e}"))?
            .to_bytes();
        Ok(Response::from_parts(parts, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{uri}: no answer within {timeout:?}"))?
}

/// GET `uri` expecting a 200 answer.
pub async fn get(uri: &Uri, timeout: Duration) -> Result<Bytes, String> {
    let req = Request::get(uri.clone())
        .header(http::header::ACCEPT, "application/json")
        .body(Full::default())
        .map_err(|e| e.to_string())?;
    let resp = call(req, timeout).await?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("{uri}: status {}", resp.status()));
    }
    Ok(resp.into_body())
}

/// Checks a URL written in the config: absolute `http://` with a host.
pub fn parse_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{s:?}: https is not supported for identity providers yet; use http on a trusted network"
            ));
        }
        _ => {
            return Err(format!(
                "invalid URL {s:?}: expected http://HOST[:PORT]/PATH"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("invalid URL {s:?}: no host"));
    }
    Ok(uri)
}
