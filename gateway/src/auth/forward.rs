//! Forward auth: ask an external HTTP service about each request. It gets a
//! GET with the chosen client headers and `X-Forwarded-Method`, `-Uri`,
//! `-Host`, `-For`, `-Proto`. A 2xx answer admits the request (its chosen
//! headers are copied onto the upstream request, one of them may name the
//! consumer). Any 4xx is the service's verdict (401 and 403 keep their own
//! error kinds; a 429 counts towards auto-ban like the gateway's own), and
//! so are redirects (301, 302, 303, 307, 308 with a `Location`: a login
//! flow): the client gets its status, its `WWW-Authenticate`,
//! `Retry-After`, `Location` and `Set-Cookie`, and its body with its
//! `Content-Type` when it sent one (problem+json when not). Anything else
//! (a 5xx, a redirect without `Location`), or no answer, fails closed with
//! 502.

use std::sync::Arc;
use std::time::Duration;

use crate::proxy::body::Incoming;
use http::header::{
    CONTENT_ENCODING, CONTENT_TYPE, HeaderName, HeaderValue, LOCATION, RETRY_AFTER, SET_COOKIE,
    WWW_AUTHENTICATE,
};
use http::{Request, StatusCode, Uri};
use http_body_util::Full;

use super::client::HttpClient;
use crate::error::{ErrorKind, ProxyError};
use crate::proxy::Conn;

static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// `[routes.auth.forward]`, compiled.
#[derive(Debug)]
pub struct ForwardAuth {
    pub uri: Uri,
    pub client: HttpClient,
    pub timeout: Duration,
    pub request_headers: Vec<HeaderName>,
    pub response_headers: Vec<HeaderName>,
    pub consumer_from: Option<HeaderName>,
}

/// A 2xx verdict: the consumer it names and the headers to pass on.
pub struct Admitted {
    pub consumer: Option<Arc<str>>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ForwardAuth {
    pub async fn check(
        &self,
        conn: &Conn,
        req: &Request<Incoming>,
    ) -> Result<Admitted, ProxyError> {
        let mut call = Request::get(self.uri.clone());
        let h = req.headers();
        for name in &self.request_headers {
            for v in h.get_all(name) {
                call = call.header(name, v);
            }
        }
        call = call.header(&X_FORWARDED_METHOD, req.method().as_str());
        if let Some(pq) = req.uri().path_and_query() {
            call = call.header(&X_FORWARDED_URI, pq.as_str());
        }
        let host = h.get(http::header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        if let Some(host) = host {
            call = call.header(&X_FORWARDED_HOST, host);
        }
        call = call
            .header(&X_FORWARDED_FOR, conn.peer.ip().to_string())
            .header(&X_FORWARDED_PROTO, if conn.tls { "https" } else { "http" });
        let call = call.body(Full::default()).map_err(|e| {
            ProxyError::new(ErrorKind::Internal, "cannot build the forward-auth request")
                .with_source(e)
        })?;
        let resp = self.client.call(call, self.timeout).await.map_err(|e| {
            ProxyError::new(
                ErrorKind::UpstreamConnect,
                "the forward-auth service did not answer",
            )
            .with_source(e)
        })?;
        let status = resp.status();
        if status.is_success() {
            let rh = resp.headers();
            let consumer = self
                .consumer_from
                .as_ref()
                .and_then(|n| rh.get(n))
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(Arc::from);
            let headers = self
                .response_headers
                .iter()
                .flat_map(|n| rh.get_all(n).iter().map(move |v| (n.clone(), v.clone())))
                .collect();
            return Ok(Admitted { consumer, headers });
        }
        // The service's own page or JSON explains its verdict better than
        // the gateway could: a body it sent goes to the client as it is.
        let passed_on = |mut e: ProxyError, names: &[&HeaderName]| {
            for name in names {
                for v in resp.headers().get_all(*name) {
                    e = e.with_header((*name).clone(), v.clone());
                }
            }
            // A coded body (gzip, ...) would reach the client without its
            // coding named: only a plain one is passed on.
            let coded = resp
                .headers()
                .get(CONTENT_ENCODING)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
            if !resp.body().is_empty() && !coded {
                e = e.with_body(
                    resp.headers().get(CONTENT_TYPE).cloned(),
                    resp.body().clone(),
                );
            }
            e
        };
        const VERDICT_HEADERS: &[&HeaderName] = &[&WWW_AUTHENTICATE, &RETRY_AFTER, &SET_COOKIE];
        Err(match status {
            StatusCode::UNAUTHORIZED => passed_on(
                ProxyError::new(
                    ErrorKind::Unauthorized,
                    "the forward-auth service refused the credentials",
                ),
                VERDICT_HEADERS,
            ),
            StatusCode::FORBIDDEN => passed_on(
                ProxyError::new(
                    ErrorKind::Forbidden,
                    "the forward-auth service denied the request",
                ),
                VERDICT_HEADERS,
            ),
            s if s.is_client_error() => passed_on(
                ProxyError::new(
                    ErrorKind::AuthDenied(s),
                    format!("the forward-auth service refused the request ({s})"),
                ),
                VERDICT_HEADERS,
            ),
            StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
                if resp.headers().contains_key(LOCATION) =>
            {
                passed_on(
                    ProxyError::new(
                        ErrorKind::AuthRedirect(status),
                        "the forward-auth service redirected the request",
                    ),
                    &[&LOCATION, &SET_COOKIE],
                )
            }
            s => ProxyError::new(
                ErrorKind::UpstreamProtocol,
                format!("the forward-auth service answered {s}"),
            ),
        })
    }
}
