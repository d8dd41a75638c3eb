//! The one place that turns errors into responses: RFC 9457
//! `application/problem+json` bodies with `type`, `title`, `status`,
//! `detail` and the request id. Nothing else builds error responses.

use bytes::Bytes;
use http::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::error::{ErrorKind, ProxyError};
use crate::proxy::body::Body;

/// The problem+json media type.
pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    request_id: &'a str,
}

/// The status code an error kind maps to.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    use ErrorKind::*;
    match kind {
        BadRequest => StatusCode::BAD_REQUEST,
        NoRoute => StatusCode::NOT_FOUND,
        MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        UpstreamConnect | UpstreamProtocol => StatusCode::BAD_GATEWAY,
        NoUpstream => StatusCode::SERVICE_UNAVAILABLE,
        UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn title_of(kind: ErrorKind) -> &'static str {
    use ErrorKind::*;
    match kind {
        BadRequest => "Bad Request",
        NoRoute => "Not Found",
        MethodNotAllowed => "Method Not Allowed",
        RequestTimeout => "Request Timeout",
        PayloadTooLarge => "Content Too Large",
        HeadersTooLarge => "Request Header Fields Too Large",
        UpstreamConnect => "Bad Gateway",
        UpstreamProtocol => "Bad Gateway",
        NoUpstream => "Service Unavailable",
        UpstreamTimeout => "Gateway Timeout",
        Internal => "Internal Server Error",
    }
}

/// The problem+json body for an error of `kind`.
fn problem_body(kind: ErrorKind, detail: &str, request_id: &str) -> Vec<u8> {
    let type_uri = format!(
        "https://gateway.dev/problems/{}",
        kind.as_str().replace('_', "-")
    );
    let problem = Problem {
        kind: &type_uri,
        title: title_of(kind),
        status: status_of(kind).as_u16(),
        detail,
        request_id,
    };
    serde_json::to_vec(&problem).unwrap_or_default()
}

/// The problem+json response for `err`, tagged with `request_id`.
pub fn error_response(err: &ProxyError, request_id: &str) -> Response<Body> {
    let status = status_of(err.kind);
    let body = problem_body(err.kind, &err.detail, request_id);

    let mut resp = Response::new(Body::full(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(allow) = &err.allow {
        h.insert(ALLOW, allow.clone());
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
    let body = problem_body(kind, detail, id);
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
        let e = ProxyError::new(ErrorKind::NoRoute, "no route for GET /x");
        let r = error_response(&e, "abc");
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()[CONTENT_TYPE], PROBLEM_JSON);
    }
}
