//! The one place that turns errors into responses: RFC 9457
//! `application/problem+json` bodies with `type`, `title`, `status`,
//! `detail` and the request id (or, for another service's verdict passed
//! on, that service's own body). Nothing else builds error responses.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::error::{ErrorKind, ProxyError};
use crate::proxy::body::Body;

/// The problem+json media type.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The status code an error kind maps to.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    use ErrorKind::*;
    match kind {
        BadRequest => StatusCode::BAD_REQUEST,
        Unauthorized => StatusCode::UNAUTHORIZED,
        AuthRedirect(s) | AuthDenied(s) => s,
        Forbidden => StatusCode::FORBIDDEN,
        NoRoute => StatusCode::NOT_FOUND,
        MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        UpstreamConnect | UpstreamProtocol => StatusCode::BAD_GATEWAY,
        NoUpstream | CircuitOpen | Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        // nginx's code for it; never sent.
        ClientClosed => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn title_of(kind: ErrorKind) -> &'static str {
    use ErrorKind::*;
    match kind {
        BadRequest => "Bad Request",
        Unauthorized => "Unauthorized",
        AuthRedirect(_) => "Redirect",
        AuthDenied(s) => s.canonical_reason().unwrap_or("Client Error"),
        Forbidden => "Forbidden",
        NoRoute => "Not Found",
        MethodNotAllowed => "Method Not Allowed",
        RequestTimeout => "Request Timeout",
        PayloadTooLarge => "Content Too Large",
        Unprocessable => "Unprocessable Content",
        TooManyRequests => "Too Many Requests",
        HeadersTooLarge => "Request Header Fields Too Large",
        UpstreamConnect | UpstreamProtocol => "Bad Gateway",
        NoUpstream | CircuitOpen | Overloaded => "Service Unavailable",
        UpstreamTimeout => "Gateway Timeout",
        ClientClosed => "Client Closed Request",
        Internal => "Internal Server Error",
    }
}

/// The problem+json body for an error of `kind`.
fn problem_body(
    kind: ErrorKind,
    detail: &str,
    request_id: &str,
    extra: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    m.insert(
        "type".into(),
        format!(
            "https://gateway.dev/problems/{}",
            kind.as_str().replace('_', "-")
        )
        .into(),
    );
    m.insert("title".into(), title_of(kind).into());
    m.insert("status".into(), status_of(kind).as_u16().into());
    m.insert("detail".into(), detail.into());
    m.insert("request_id".into(), request_id.into());
    if let Some(extra) = extra {
        for (k, v) in extra {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    serde_json::to_vec(&m).unwrap_or_default()
}

/// The problem+json response for `err`, tagged with `request_id`.
pub fn error_response(err: &ProxyError, request_id: &str) -> Response<Body> {
    let status = status_of(err.kind);
    let (body, content_type) = match &err.passed_on {
        Some(p) => (p.body.clone(), p.content_type.clone()),
        None => (
            Bytes::from(problem_body(
                err.kind,
                &err.detail,
                request_id,
                err.extra.as_ref(),
            )),
            Some(HeaderValue::from_static(PROBLEM_JSON)),
        ),
    };
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Some(ct) = content_type {
        h.insert(CONTENT_TYPE, ct);
    }
    for (name, value) in &err.headers {
        h.append(name.clone(), value.clone());
    }
    if err.close {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A complete HTTP/1.1 error response as bytes, for errors found before
/// hyper has parsed a request (e.g. the header read timeout). The
/// connection is closed after it.
pub fn raw_error(kind: ErrorKind, detail: &str) -> Vec<u8> {
    let id = crate::proxy::new_request_id();
    let id = id.to_str().unwrap_or("");
    let body = problem_body(kind, detail, id, None);
    let status = status_of(kind);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {PROBLEM_JSON}\r\ncontent-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_body_has_rfc9457_members() {
        let e = ProxyError::new(ErrorKind::NoRoute, "no route for GET /x")
            .with_member("errors", serde_json::json!(["a"]));
        let r = error_response(&e, "abc");
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()[CONTENT_TYPE], PROBLEM_JSON);
        let body = problem_body(ErrorKind::NoRoute, "d", "abc", e.extra.as_ref());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 404);
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["errors"][0], "a");
        assert!(v["type"].as_str().unwrap().ends_with("/no-route"));
    }
}
