//! Step 4b: CORS. Preflights (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`) are answered here and never reach the
//! upstream; actual requests from an allowed origin get their CORS headers
//! in phase 7 (`apply`), on every response including errors. A disallowed
//! origin gets no CORS headers at all, so the browser refuses the response.
//!
//! Configured globally (`[cors]`) or per route (`[routes.cors]`, which then
//! replaces the global one for that route). Every header value is built at
//! config load.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use toml::Spanned;

use crate::config::Problem;
use crate::config::units::Secs;
use crate::proxy::body::Body;

/// `[cors]` / `[routes.cors]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSection {
    /// Exact origins (`https://app.example.com`), patterns with one `*`
    /// (`https://*.example.com`), or `"*"` for any origin.
    pub allow_origins: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<Spanned<String>>,
    /// Request headers allowed; `"*"` allows whatever the preflight asks for.
    #[serde(default)]
    pub allow_headers: Vec<Spanned<String>>,
    /// Response headers the browser may expose to scripts.
    #[serde(default)]
    pub expose_headers: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow_credentials: Option<Spanned<bool>>,
    /// How long a browser may cache a preflight answer; absent means the
    /// browser's default.
    #[serde(default)]
    pub max_age: Option<Secs>,
}

fn default_methods() -> Vec<Spanned<String>> {
    ["GET", "HEAD", "POST"]
        .iter()
        .map(|m| Spanned::new(0..0, m.to_string()))
        .collect()
}

/// One allowed-origin rule.
#[derive(Debug)]
enum OriginRule {
    Any,
    Exact(String),
    /// `prefix*suffix`; the `*` stands for one or more host characters.
    Pattern(String, String),
}

/// CORS compiled.
#[derive(Debug)]
pub struct Cors {
    origins: Vec<OriginRule>,
    any_origin: bool,
    methods: Vec<Method>,
    methods_value: HeaderValue,
    /// Lowercase header names; empty with `any_header` set means "*".
    headers: Vec<String>,
    headers_value: Option<HeaderValue>,
    any_header: bool,
    expose_value: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

static VARY_PREFLIGHT: HeaderValue = HeaderValue::from_static(
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
);

impl Cors {
    pub fn compile(s: &CorsSection, problems: &mut Vec<Problem>) -> Cors {
        let mut origins = Vec::new();
        if s.allow_origins.get_ref().is_empty() {
            problems.push(Problem::at(
                s.allow_origins.span(),
                "allow_origins is empty: list origins, patterns such as \"https://*.example.com\", or \"*\"",
            ));
        }
        for o in s.allow_origins.get_ref() {
            let v = o.get_ref().to_ascii_lowercase();
            let rule = if v == "*" {
                OriginRule::Any
            } else if v.matches('*').count() > 1 || !v.contains("://") || v.ends_with('/') {
                problems.push(Problem::at(
                    o.span(),
                    format!(
                        "invalid origin {:?}: expected SCHEME://HOST[:PORT] with at most one '*', or \"*\"",
                        o.get_ref()
                    ),
                ));
                continue;
            } else if let Some((pre, suf)) = v.split_once('*') {
                OriginRule::Pattern(pre.to_string(), suf.to_string())
            } else {
                OriginRule::Exact(v)
            };
            origins.push(rule);
        }
        let any_origin = origins.iter().any(|o| matches!(o, OriginRule::Any));
        let credentials = s.allow_credentials.as_ref().is_some_and(|c| *c.get_ref());
        if any_origin && credentials {
            problems.push(Problem::at(
                s.allow_credentials.as_ref().map_or(0..0, |c| c.span()),
                "allow_credentials with allow_origins = [\"*\"] would let every site send credentialed requests; list the origins instead",
            ));
        }
        let methods = crate::config::methods(&s.allow_methods, problems);
        let any_header = s.allow_headers.iter().any(|h| h.get_ref() == "*");
        let headers = names(&s.allow_headers, problems);
        let expose = names(&s.expose_headers, problems);
        let join = |v: &[String]| {
            (!v.is_empty())
                .then(|| HeaderValue::from_str(&v.join(", ")).ok())
                .flatten()
        };
        let methods_value = HeaderValue::from_str(
            &methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        )
        .unwrap_or_else(|_| HeaderValue::from_static("GET"));
        Cors {
            origins,
            any_origin,
            methods,
            methods_value,
            headers_value: join(&headers),
            headers,
            any_header,
            expose_value: join(&expose),
            credentials,
            max_age: s.max_age.map(|d| HeaderValue::from(d.0.as_secs())),
        }
    }

    /// Whether `origin` is allowed.
    pub fn allows_origin(&self, origin: &[u8]) -> bool {
        if self.any_origin {
            return true;
        }
        let Ok(o) = std::str::from_utf8(origin) else {
            return false;
        };
        self.origins.iter().any(|r| match r {
            OriginRule::Any => true,
            OriginRule::Exact(e) => e.eq_ignore_ascii_case(o),
            OriginRule::Pattern(pre, suf) => {
                o.len() > pre.len() + suf.len()
                    && o.is_char_boundary(pre.len())
                    && o.is_char_boundary(o.len() - suf.len())
                    && o[..pre.len()].eq_ignore_ascii_case(pre)
                    && o[o.len() - suf.len()..].eq_ignore_ascii_case(suf)
                    && o[pre.len()..o.len() - suf.len()]
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            }
        })
    }

    /// The origin of a request from an allowed origin, to echo in phase 7.
    pub fn allowed_origin<B>(&self, req: &Request<B>) -> Option<HeaderValue> {
        let o = req.headers().get(header::ORIGIN)?;
        self.allows_origin(o.as_bytes()).then(|| o.clone())
    }

    /// The answer to a preflight request, or `None` when `req` is not one.
    pub fn preflight<B>(&self, req: &Request<B>) -> Option<Response<Body>> {
        let h = req.headers();
        let requested = preflight_method(req)?;
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let out = resp.headers_mut();
        out.insert(header::VARY, VARY_PREFLIGHT.clone());
        let origin = h.get(header::ORIGIN)?;
        if !self.allows_origin(origin.as_bytes()) || !self.methods.contains(&requested) {
            return Some(resp);
        }
        let asked = h.get(header::ACCESS_CONTROL_REQUEST_HEADERS);
        if !self.any_header
            && let Some(asked) = asked
        {
            let ok = asked
                .to_str()
                .map(|s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .all(|n| self.headers.iter().any(|a| a.eq_ignore_ascii_case(n)))
                })
                .unwrap_or(false);
            if !ok {
                return Some(resp);
            }
        }
        self.set_origin(out, origin);
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.methods_value.clone(),
        );
        let allow_headers = if self.any_header {
            asked.cloned()
        } else {
            self.headers_value.clone()
        };
        if let Some(v) = allow_headers {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(v) = &self.max_age {
            out.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        Some(resp)
    }

    /// Phase 7 for an actual request: the route's CORS headers replace any
    /// the upstream sent (the gateway owns CORS on this route, so an
    /// upstream that reflects every origin cannot widen it); `origin` is
    /// the request's when allowed. Every answer varies by `Origin` unless
    /// it is the same `*` for all.
    pub fn respond(&self, origin: Option<HeaderValue>, out: &mut HeaderMap) {
        for name in [
            &header::ACCESS_CONTROL_ALLOW_ORIGIN,
            &header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            &header::ACCESS_CONTROL_EXPOSE_HEADERS,
            &header::ACCESS_CONTROL_ALLOW_METHODS,
            &header::ACCESS_CONTROL_ALLOW_HEADERS,
            &header::ACCESS_CONTROL_MAX_AGE,
        ] {
            out.remove(name);
        }
        match origin {
            Some(origin) => {
                self.set_origin(out, &origin);
                if let Some(v) = &self.expose_value {
                    out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
                }
            }
            None if self.any_origin && !self.credentials => {}
            None => {
                out.append(header::VARY, HeaderValue::from_static("Origin"));
            }
        }
    }

    fn set_origin(&self, out: &mut HeaderMap, origin: &HeaderValue) {
        if self.any_origin && !self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        } else {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            out.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

/// For a CORS preflight, the method it asks about; `None` for any other
/// request. Routing uses it so that a preflight finds the route of the
/// request it announces.
pub fn preflight_method<B>(req: &Request<B>) -> Option<Method> {
    if req.method() != Method::OPTIONS || !req.headers().contains_key(header::ORIGIN) {
        return None;
    }
    let m = req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(m.as_bytes()).ok()
}

/// Header names, lowercased and checked; `"*"` is skipped (the caller
/// handles it).
fn names(list: &[Spanned<String>], problems: &mut Vec<Problem>) -> Vec<String> {
    let mut out = Vec::new();
    for n in list {
        if n.get_ref() == "*" {
            continue;
        }
        match http::HeaderName::from_bytes(n.get_ref().as_bytes()) {
            Ok(h) => out.push(h.as_str().to_string()),
            Err(_) => problems.push(Problem::at(
                n.span(),
                format!("invalid header name {:?}", n.get_ref()),
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(toml_text: &str) -> Cors {
        let s: CorsSection = toml::from_str(toml_text).unwrap();
        let mut p = Vec::new();
        let c = Cors::compile(&s, &mut p);
        assert!(p.is_empty(), "{p:?}");
        c
    }

    #[test]
    fn origin_rules() {
        let c = cors(
            r#"allow_origins = ["https://app.example.com", "https://*.example.org", "http://localhost:*"]"#,
        );
        assert!(c.allows_origin(b"https://app.example.com"));
        assert!(c.allows_origin(b"https://APP.example.com"));
        assert!(!c.allows_origin(b"https://app.example.com.evil.net"));
        assert!(c.allows_origin(b"https://a.b.example.org"));
        assert!(!c.allows_origin(b"https://example.org"));
        assert!(!c.allows_origin(b"https://x/y.example.org"));
        assert!(!c.allows_origin(b"http://a.example.org"));
        assert!(c.allows_origin(b"http://localhost:3000"));
        assert!(!c.allows_origin(b"null"));
    }

    #[test]
    fn preflight_answers() {
        let c = cors(
            r#"
allow_origins = ["https://app.example.com"]
allow_methods = ["GET", "PUT"]
allow_headers = ["content-type", "x-token"]
allow_credentials = true
max_age = "10m"
"#,
        );
        let req = Request::options("/x")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "PUT")
            .header("access-control-request-headers", "Content-Type, X-Token")
            .body(())
            .unwrap();
        let r = c.preflight(&req).unwrap();
        assert_eq!(r.status(), 204);
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h["access-control-allow-methods"], "GET, PUT");
        assert_eq!(h["access-control-allow-headers"], "content-type, x-token");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-max-age"], "600");

        for (origin, method, headers) in [
            ("https://evil.example.com", "PUT", "x-token"),
            ("https://app.example.com", "DELETE", "x-token"),
            ("https://app.example.com", "PUT", "x-other"),
        ] {
            let req = Request::options("/x")
                .header("origin", origin)
                .header("access-control-request-method", method)
                .header("access-control-request-headers", headers)
                .body(())
                .unwrap();
            let r = c.preflight(&req).unwrap();
            assert!(
                !r.headers().contains_key("access-control-allow-origin"),
                "{origin} {method} {headers}"
            );
        }
        let plain = Request::options("/x").body(()).unwrap();
        assert!(c.preflight(&plain).is_none());
    }

    #[test]
    fn wildcard_with_credentials_is_refused() {
        let s: CorsSection =
            toml::from_str("allow_origins = [\"*\"]\nallow_credentials = true").unwrap();
        let mut p = Vec::new();
        Cors::compile(&s, &mut p);
        assert_eq!(p.len(), 1);
    }
}
