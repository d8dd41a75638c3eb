//! Step 4e: request validation, and the optional response check of phase 7.
//!
//! Order: content type, required/typed headers and query parameters (every
//! violation of these is listed in one `400`); then, with a schema, the body
//! is read whole (up to `max_body_bytes`, else `413`), parsed (`400` if it
//! is missing — GET, HEAD, OPTIONS and DELETE may come without one — or is
//! not JSON) and validated (`422` listing every schema violation with
//! its JSON pointer). The bytes read are sent upstream in place of the
//! client's stream. Schemas are compiled at config load.
//!
//! Problem members: `errors: [{ "in": "header"|"query"|"body",
//! "name"?, "pointer", "message" }]`.

use std::path::Path;
use std::time::Duration;

use crate::proxy::body::Incoming;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};
use toml::Spanned;

use crate::config::Problem;
use crate::config::units::{ByteSize, Secs};
use crate::error::{ErrorKind, ProxyError};
use crate::proxy::body::Body;

/// `[routes.validate]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateSection {
    /// Media types a request body may have (`application/json`, `text/*`);
    /// empty means any.
    #[serde(default)]
    pub content_types: Vec<Spanned<String>>,
    #[serde(default)]
    pub headers: Vec<Spanned<ParamSection>>,
    #[serde(default)]
    pub query: Vec<Spanned<ParamSection>>,
    /// JSON Schema for the request body, as JSON text.
    #[serde(default)]
    pub schema: Option<Spanned<String>>,
    /// The same, from a file (relative to the config file).
    #[serde(default)]
    pub schema_file: Option<Spanned<String>>,
    /// Largest body read for schema validation.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: ByteSize,
    /// Longest time to read that body.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: Secs,
    #[serde(default)]
    pub response: Option<Spanned<ResponseSection>>,
}

/// A header or query parameter rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSection {
    pub name: Spanned<String>,
    #[serde(default)]
    pub required: bool,
    #[serde(default, rename = "type")]
    pub kind: ParamType,
    /// A regex the whole value must match.
    #[serde(default)]
    pub pattern: Option<Spanned<String>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    #[default]
    String,
    Integer,
    Number,
    Boolean,
    Uuid,
}

/// `[routes.validate.response]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseSection {
    #[serde(default)]
    pub schema: Option<Spanned<String>>,
    #[serde(default)]
    pub schema_file: Option<Spanned<String>>,
    /// `"log"`: log and count, pass the response on; `"reject"`: answer
    /// `502` instead.
    #[serde(default)]
    pub on_violation: OnViolation,
    /// Larger (or non-JSON) responses are passed on unchecked.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: ByteSize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnViolation {
    #[default]
    Log,
    Reject,
}

fn default_max_body() -> ByteSize {
    ByteSize(1024 * 1024)
}
fn default_body_timeout() -> Secs {
    Secs(Duration::from_secs(30))
}

#[derive(Debug)]
struct Param {
    name: String,
    header: Option<HeaderName>,
    required: bool,
    kind: ParamType,
    pattern: Option<regex::Regex>,
}

/// `[routes.validate]` compiled.
#[derive(Debug)]
pub struct Validate {
    route: std::sync::Arc<str>,
    content_types: Vec<String>,
    headers: Vec<Param>,
    query: Vec<Param>,
    schema: Option<jsonschema::Validator>,
    max_body: u64,
    body_timeout: Duration,
    response: Option<ResponseCheck>,
}

#[derive(Debug)]
struct ResponseCheck {
    schema: jsonschema::Validator,
    reject: bool,
    max_body: u64,
}

impl Validate {
    pub fn compile(
        route: &str,
        s: &ValidateSection,
        base: &Path,
        problems: &mut Vec<Problem>,
    ) -> Validate {
        let mut content_types = Vec::new();
        for c in &s.content_types {
            let v = c.get_ref().trim().to_ascii_lowercase();
            if v.split_once('/')
                .is_none_or(|(a, b)| a.is_empty() || b.is_empty())
            {
                problems.push(Problem::at(
                    c.span(),
                    format!(
                        "invalid media type {:?}: expected TYPE/SUBTYPE",
                        c.get_ref()
                    ),
                ));
            }
            content_types.push(v);
        }
        let headers = params(&s.headers, true, problems);
        let query = params(&s.query, false, problems);
        let schema = load_schema(
            route,
            s.schema.as_ref(),
            s.schema_file.as_ref(),
            base,
            problems,
        );
        let response = s.response.as_ref().and_then(|r| {
            let rr = r.get_ref();
            let sch = load_schema(
                route,
                rr.schema.as_ref(),
                rr.schema_file.as_ref(),
                base,
                problems,
            );
            if sch.is_none() && rr.schema.is_none() && rr.schema_file.is_none() {
                problems.push(Problem::at(
                    r.span(),
                    "response validation needs `schema` or `schema_file`",
                ));
            }
            Some(ResponseCheck {
                schema: sch?,
                reject: rr.on_violation == OnViolation::Reject,
                max_body: rr.max_body_bytes.0,
            })
        });
        Validate {
            route: route.into(),
            content_types,
            headers,
            query,
            schema,
            max_body: s.max_body_bytes.0,
            body_timeout: s.body_timeout.0,
            response,
        }
    }

    /// Step 4e. With a schema, returns the body it read.
    pub async fn check(&self, req: &mut Request<Incoming>) -> Result<Option<Bytes>, ProxyError> {
        let mut errors = Vec::new();
        let has_body = !http_body::Body::is_end_stream(req.body());
        if !self.content_types.is_empty() && has_body {
            let mut all = req.headers().get_all(header::CONTENT_TYPE).iter();
            let ct = all.next().and_then(|v| v.to_str().ok()).unwrap_or("");
            let media = ct.split(';').next().unwrap_or("").trim();
            if all.next().is_some() {
                // Which one the upstream reads is its parser's choice.
                errors.push(json!({
                    "in": "header",
                    "name": "content-type",
                    "pointer": "/headers/content-type",
                    "message": "more than one content type",
                }));
            } else if !self.content_types.iter().any(|a| media_matches(a, media)) {
                errors.push(json!({
                    "in": "header",
                    "name": "content-type",
                    "pointer": "/headers/content-type",
                    "message": format!("content type {media:?} is not accepted; expected one of {:?}", self.content_types),
                }));
            }
        }
        for p in &self.headers {
            let Some(h) = &p.header else { continue };
            let mut values = req.headers().get_all(h).iter().peekable();
            if values.peek().is_none() {
                if p.required {
                    errors.push(violation("header", &p.name, "is required"));
                }
                continue;
            }
            for v in values {
                match v.to_str() {
                    Ok(v) => p.check("header", v, &mut errors),
                    Err(_) => errors.push(violation("header", &p.name, "is not visible ASCII")),
                }
            }
        }
        if !self.query.is_empty() {
            let q = req.uri().query().unwrap_or("");
            for p in &self.query {
                let mut seen = false;
                for kv in q.split('&') {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    // A pair that does not decode (bad UTF-8) is judged by
                    // its lossy name: skipping it would let a checked
                    // parameter through beside a valid copy.
                    let name = decode(k);
                    let named = match &name {
                        Some(n) => *n == p.name,
                        None => String::from_utf8_lossy(&decode_bytes(k)) == p.name,
                    };
                    if !named {
                        continue;
                    }
                    seen = true;
                    match name.and(decode(v)) {
                        Some(v) => p.check("query", &v, &mut errors),
                        None => errors.push(violation("query", &p.name, "is not valid UTF-8")),
                    }
                }
                if !seen && p.required {
                    errors.push(violation("query", &p.name, "is required"));
                }
            }
        }
        if !errors.is_empty() {
            return Err(invalid(ErrorKind::BadRequest, errors));
        }
        let Some(schema) = &self.schema else {
            return Ok(None);
        };
        if !has_body {
            // Requests that usually carry no body are not checked without
            // one; the others must send the document the schema describes.
            if matches!(
                *req.method(),
                Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
            ) {
                return Ok(None);
            }
            return Err(invalid(
                ErrorKind::BadRequest,
                vec![json!({"in": "body", "pointer": "", "message": "a JSON body is required"})],
            ));
        }
        let limit = usize::try_from(self.max_body).unwrap_or(usize::MAX);
        let read = http_body_util::Limited::new(req.body_mut(), limit).collect();
        let bytes = match tokio::time::timeout(self.body_timeout, read).await {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) => {
                if e.is::<http_body_util::LengthLimitError>() {
                    return Err(ProxyError::new(
                        ErrorKind::PayloadTooLarge,
                        format!(
                            "request body is over the {} bytes this route validates",
                            self.max_body
                        ),
                    )
                    .closing());
                }
                return Err(
                    ProxyError::new(ErrorKind::BadRequest, "cannot read the request body")
                        .with_source(e)
                        .closing(),
                );
            }
            Err(_) => {
                return Err(ProxyError::new(
                    ErrorKind::RequestTimeout,
                    "the request body took too long",
                )
                .closing());
            }
        };
        let value = match serde_json::from_slice::<UniqueKeys>(&bytes) {
            Ok(UniqueKeys(v)) => v,
            Err(e) => {
                return Err(invalid(
                    ErrorKind::BadRequest,
                    vec![json!({
                        "in": "body",
                        "pointer": "",
                        "message": format!("the body is not valid JSON: {e}"),
                    })],
                ));
            }
        };
        let errors = schema_errors(schema, &value);
        if !errors.is_empty() {
            return Err(invalid(ErrorKind::Unprocessable, errors));
        }
        Ok(Some(bytes))
    }

    /// Whether phase 7 has a response check to run.
    pub fn checks_responses(&self) -> bool {
        self.response.is_some()
    }

    /// Phase 7: validates a JSON response body against the response schema.
    /// The body is read whole (it is small by `max_body_bytes`); a violation
    /// is logged and counted, and with `on_violation = "reject"` the
    /// response becomes a `502`.
    pub async fn check_response(&self, resp: &mut Response<Body>) -> Result<(), ProxyError> {
        let Some(rc) = &self.response else {
            return Ok(());
        };
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let m = ct.split(';').next().unwrap_or("").trim();
                m.eq_ignore_ascii_case("application/json") || m.ends_with("+json")
            });
        let small = http_body::Body::size_hint(resp.body())
            .upper()
            .is_some_and(|n| n <= rc.max_body);
        // No body to check (204, 205), or one only the client decodes.
        let encoded = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let status = resp.status();
        if !is_json
            || !small
            || encoded
            || !status.is_success()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::RESET_CONTENT
        {
            return Ok(());
        }
        let body = std::mem::replace(resp.body_mut(), Body::empty());
        let bytes = match body.collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                return Err(ProxyError::new(
                    ErrorKind::UpstreamProtocol,
                    "cannot read the upstream response",
                )
                .with_source(e));
            }
        };
        let errors = match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => schema_errors(&rc.schema, &v),
            Err(e) => vec![
                json!({"in": "body", "pointer": "", "message": format!("not valid JSON: {e}")}),
            ],
        };
        *resp.body_mut() = Body::full(bytes);
        if errors.is_empty() {
            return Ok(());
        }
        metrics::counter!("gateway_response_validation_failures_total", "route" => metrics::SharedString::from(self.route.clone()))
            .increment(1);
        tracing::warn!(route = %self.route, errors = %serde_json::Value::Array(errors.clone()), "upstream response violates its schema");
        if rc.reject {
            return Err(ProxyError::new(
                ErrorKind::UpstreamProtocol,
                "the upstream response does not match its schema",
            ));
        }
        Ok(())
    }
}

impl Param {
    fn check(&self, location: &str, v: &str, errors: &mut Vec<Value>) {
        let ok = match self.kind {
            ParamType::String => true,
            ParamType::Integer => v.parse::<i64>().is_ok(),
            ParamType::Number => v.parse::<f64>().is_ok_and(f64::is_finite),
            ParamType::Boolean => matches!(v, "true" | "false"),
            ParamType::Uuid => is_uuid(v),
        };
        if !ok {
            errors.push(violation(
                location,
                &self.name,
                &format!("{v:?} is not a valid {:?}", self.kind).to_lowercase(),
            ));
        } else if let Some(re) = &self.pattern
            && !re.is_match(v)
        {
            errors.push(violation(
                location,
                &self.name,
                &format!("{v:?} does not match {:?}", re.as_str()),
            ));
        }
    }
}

fn violation(location: &str, name: &str, message: &str) -> Value {
    let section = if location == "header" {
        "headers"
    } else {
        "query"
    };
    json!({
        "in": location,
        "name": name,
        "pointer": format!("/{section}/{}", name.replace('~', "~0").replace('/', "~1")),
        "message": format!("{location} {name:?} {message}"),
    })
}

fn invalid(kind: ErrorKind, errors: Vec<Value>) -> ProxyError {
    let n = errors.len();
    ProxyError::new(
        kind,
        format!(
            "the request fails validation ({n} violation{})",
            if n == 1 { "" } else { "s" }
        ),
    )
    .with_member("errors", Value::Array(errors))
}

fn schema_errors(schema: &jsonschema::Validator, v: &Value) -> Vec<Value> {
    schema
        .iter_errors(v)
        .map(|e| {
            json!({
                "in": "body",
                "pointer": e.instance_path().as_str(),
                "message": e.to_string(),
            })
        })
        .collect()
}

fn media_matches(allowed: &str, media: &str) -> bool {
    match allowed.strip_suffix("/*") {
        Some(top) => media
            .split_once('/')
            .is_some_and(|(t, _)| t.eq_ignore_ascii_case(top)),
        None => allowed.eq_ignore_ascii_case(media),
    }
}

fn is_uuid(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A JSON document whose objects have no duplicate keys. Parsers differ on
/// which copy wins (serde_json keeps the last, others the first), so a body
/// with duplicates could pass the schema as one document and reach the
/// upstream as another: it is refused instead.
struct UniqueKeys(Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(UniqueKeys)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(UniqueKeys(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let UniqueKeys(v) = map.next_value()?;
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key {k:?}"
                )));
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// Percent-decodes a query component (`+` is a space); `None` if it is not
/// UTF-8.
fn decode(s: &str) -> Option<String> {
    String::from_utf8(decode_bytes(s)).ok()
}

/// `s` form-decoded (`+` is a space, `%XX` a byte), as bytes.
fn decode_bytes(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    out
}

fn params(list: &[Spanned<ParamSection>], header: bool, problems: &mut Vec<Problem>) -> Vec<Param> {
    let mut out = Vec::new();
    for p in list {
        let pp = p.get_ref();
        let name = pp.name.get_ref().clone();
        let h = if header {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    problems.push(Problem::at(
                        pp.name.span(),
                        format!("invalid header name {name:?}"),
                    ));
                    continue;
                }
            }
        } else {
            None
        };
        let pattern = match &pp.pattern {
            Some(re) => match regex::Regex::new(&format!("^(?:{})$", re.get_ref())) {
                Ok(r) => Some(r),
                Err(e) => {
                    problems.push(Problem::at(re.span(), format!("invalid pattern: {e}")));
                    continue;
                }
            },
            None => None,
        };
        out.push(Param {
            name: h.as_ref().map_or(name, |h| h.as_str().to_string()),
            header: h,
            required: pp.required,
            kind: pp.kind,
            pattern,
        });
    }
    out
}

/// Loads and compiles a schema given inline or as a file.
fn load_schema(
    route: &str,
    inline: Option<&Spanned<String>>,
    file: Option<&Spanned<String>>,
    base: &Path,
    problems: &mut Vec<Problem>,
) -> Option<jsonschema::Validator> {
    let (text, span) = match (inline, file) {
        (None, None) => return None,
        (Some(i), Some(f)) => {
            problems.push(Problem::at(
                f.span(),
                format!("route {route:?}: give `schema` or `schema_file`, not both"),
            ));
            let _ = i;
            return None;
        }
        (Some(i), None) => (i.get_ref().clone(), i.span()),
        (None, Some(f)) => {
            let path = crate::config::compile_resolve(base, f.get_ref());
            match std::fs::read_to_string(&path) {
                Ok(t) => (t, f.span()),
                Err(e) => {
                    problems.push(Problem::at(
                        f.span(),
                        format!("cannot read schema {}: {e}", path.display()),
                    ));
                    return None;
                }
            }
        }
    };
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            problems.push(Problem::at(span, format!("schema is not valid JSON: {e}")));
            return None;
        }
    };
    match jsonschema::validator_for(&value) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(Problem::at(span, format!("invalid JSON Schema: {e}")));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let parse = |t: &str| serde_json::from_slice::<UniqueKeys>(t.as_bytes()).map(|u| u.0);
        assert_eq!(
            parse(r#"{"a": [1, {"b": null}], "c": 1.5}"#).unwrap(),
            json!({"a": [1, {"b": null}], "c": 1.5})
        );
        let e = parse(r#"{"role": "admin", "role": "user"}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate key \"role\""), "{e}");
        assert!(parse(r#"[{"x": {"y": 1, "y": 2}}]"#).is_err());
        assert!(parse(r#"{"a": 1} trailing"#).is_err());
    }

    #[test]
    fn helpers() {
        assert!(media_matches("application/json", "Application/JSON"));
        assert!(media_matches("text/*", "text/plain"));
        assert!(!media_matches("text/*", "application/json"));
        assert!(is_uuid("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_uuid("123e4567e89b12d3a456426614174000"));
        assert_eq!(decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(decode("100%").as_deref(), Some("100%"));
        assert_eq!(decode("%zz").as_deref(), Some("%zz"));
    }

    #[test]
    fn schema_errors_carry_pointers() {
        let v = jsonschema::validator_for(&json!({
            "type": "object",
            "required": ["name"],
            "properties": {"items": {"type": "array", "items": {"type": "integer"}}}
        }))
        .unwrap();
        let errs = schema_errors(&v, &json!({"items": [1, "x", 3, "y"]}));
        let pointers: Vec<&str> = errs
            .iter()
            .map(|e| e["pointer"].as_str().unwrap())
            .collect();
        assert!(pointers.contains(&""), "{errs:?}");
        assert!(pointers.contains(&"/items/1"), "{errs:?}");
        assert!(pointers.contains(&"/items/3"), "{errs:?}");
    }
}
