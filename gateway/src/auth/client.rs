//! The client the auth steps use to call identity providers and forward-auth
//! services: pooled hyper-util clients speaking HTTP/1.1 over plain TCP or
//! TLS (rustls on ring, like the listeners), with a time limit per call and
//! a size limit on answers. TLS trusts the system's roots, or only the CAs
//! of a provider's `ca_file`.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Largest answer read (discovery documents, JWKS, introspection).
const MAX_BODY: usize = 1024 * 1024;

/// A pooled HTTP and HTTPS client.
#[derive(Clone)]
pub struct HttpClient(Client<HttpsConnector<HttpConnector>, Full<Bytes>>);

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

impl HttpClient {
    /// A client trusting `roots`.
    fn new(roots: Arc<rustls::RootCertStore>) -> Result<HttpClient, String> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(HttpClient(
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector),
        ))
    }

    /// The client trusting the system's roots (made once per process).
    pub fn system() -> Result<HttpClient, String> {
        static SYSTEM: OnceLock<Result<HttpClient, String>> = OnceLock::new();
        SYSTEM
            .get_or_init(|| HttpClient::new(crate::pem::system_roots()))
            .clone()
    }

    /// A client trusting only the CA certificates in the PEM file `path`.
    pub fn with_ca_file(path: &Path) -> Result<HttpClient, String> {
        HttpClient::new(Arc::new(crate::pem::ca_roots(path)?))
    }

    /// Sends `req` and reads the whole answer within `timeout`.
    pub async fn call(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<Bytes>, String> {
        let uri = req.uri().clone();
        let exchange = async {
            let resp = self
                .0
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
    pub async fn get(&self, uri: &Uri, timeout: Duration) -> Result<Bytes, String> {
        let req = Request::get(uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Full::default())
            .map_err(|e| e.to_string())?;
        let resp = self.call(req, timeout).await?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("{uri}: status {}", resp.status()));
        }
        Ok(resp.into_body())
    }
}

/// Checks a URL written in the config: absolute `http://` or `https://`
/// with a host.
pub fn parse_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "invalid URL {s:?}: expected http:// or https://HOST[:PORT]/PATH"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("invalid URL {s:?}: no host"));
    }
    Ok(uri)
}
