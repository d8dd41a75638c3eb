//! The data path's one error type: what failed (`ErrorKind`), on which side,
//! and whether a retry could help. `crate::respond` turns it into a response;
//! metrics and logs read the same fields.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderName, HeaderValue};

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed (bad path, smuggling attempt, bad header).
    BadRequest,
    /// No credentials, or credentials that do not verify (401).
    Unauthorized,
    /// The forward-auth service sent the client elsewhere with this 3xx
    /// (e.g. to a login page).
    AuthRedirect(http::StatusCode),
    /// The forward-auth service refused the request with this 4xx (other
    /// than 401 and 403, which keep their own kinds).
    AuthDenied(http::StatusCode),
    /// Authenticated, but not allowed (403); also route-level IP denies.
    Forbidden,
    /// No route matches.
    NoRoute,
    /// A route matches everything but the method.
    MethodNotAllowed,
    /// The client was too slow to send its request.
    RequestTimeout,
    /// The request body is larger than the route allows.
    PayloadTooLarge,
    /// The request is well-formed but fails validation (422).
    Unprocessable,
    /// A rate limit or quota is exhausted (429).
    TooManyRequests,
    /// Request headers are too large or too many.
    HeadersTooLarge,
    /// Could not connect to the upstream.
    UpstreamConnect,
    /// The upstream broke the protocol or the connection.
    UpstreamProtocol,
    /// No upstream target is available.
    NoUpstream,
    /// The upstream's circuit breaker is open.
    CircuitOpen,
    /// Too many requests in flight for the route or upstream (503).
    Overloaded,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The client closed its connection before the response (logged as
    /// `499`, as nginx does; nothing is sent).
    ClientClosed,
    /// A bug or resource problem inside the gateway.
    Internal,
}

/// Which side of the proxy caused the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
    Internal,
}

impl ErrorKind {
    pub fn side(self) -> Side {
        use ErrorKind::*;
        match self {
            BadRequest | Unauthorized | AuthRedirect(_) | AuthDenied(_) | Forbidden | NoRoute
            | MethodNotAllowed | RequestTimeout | PayloadTooLarge | Unprocessable
            | TooManyRequests | HeadersTooLarge | ClientClosed => Side::Downstream,
            UpstreamConnect | UpstreamProtocol | NoUpstream | CircuitOpen | Overloaded
            | UpstreamTimeout => Side::Upstream,
            Internal => Side::Internal,
        }
    }

    /// Whether trying again (possibly elsewhere) could succeed.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorKind::UpstreamConnect | ErrorKind::NoUpstream)
    }

    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        use ErrorKind::*;
        match self {
            BadRequest => "bad_request",
            Unauthorized => "unauthorized",
            AuthRedirect(_) => "auth_redirect",
            AuthDenied(_) => "auth_denied",
            Forbidden => "forbidden",
            NoRoute => "no_route",
            MethodNotAllowed => "method_not_allowed",
            RequestTimeout => "request_timeout",
            PayloadTooLarge => "payload_too_large",
            Unprocessable => "unprocessable",
            TooManyRequests => "too_many_requests",
            HeadersTooLarge => "headers_too_large",
            UpstreamConnect => "upstream_connect",
            UpstreamProtocol => "upstream_protocol",
            NoUpstream => "no_upstream",
            CircuitOpen => "circuit_open",
            Overloaded => "overloaded",
            UpstreamTimeout => "upstream_timeout",
            ClientClosed => "client_closed",
            Internal => "internal",
        }
    }
}

/// An error on the data path.
#[derive(Debug)]
pub struct ProxyError {
    pub kind: ErrorKind,
    /// Human-readable detail for the problem+json `detail` member.
    pub detail: Cow<'static, str>,
    /// Extra response headers (`Allow`, `WWW-Authenticate`, `Retry-After`, ...).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Extra problem+json members (e.g. validation `errors`).
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
    /// Whether the connection must be closed after the response.
    pub close: bool,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// A body to answer with instead of problem+json: another service's
    /// own verdict (forward auth's denial page), with its content type.
    pub passed_on: Option<Box<PassedOn>>,
}

/// A body another service answered with, passed on to the client as is.
#[derive(Debug)]
pub struct PassedOn {
    pub content_type: Option<HeaderValue>,
    pub body: bytes::Bytes,
}

impl ProxyError {
    pub fn new(kind: ErrorKind, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            headers: Vec::new(),
            extra: None,
            close: false,
            source: None,
            passed_on: None,
        }
    }

    pub fn with_source(mut self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.source = Some(e.into());
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Adds a problem+json member.
    pub fn with_member(mut self, key: &str, value: serde_json::Value) -> Self {
        self.extra
            .get_or_insert_with(Default::default)
            .insert(key.to_string(), value);
        self
    }

    /// Answers with `body` (of `content_type`) instead of problem+json.
    pub fn with_body(mut self, content_type: Option<HeaderValue>, body: bytes::Bytes) -> Self {
        self.passed_on = Some(Box::new(PassedOn { content_type, body }));
        self
    }

    /// Marks the connection for closing after the error response.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.detail)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
