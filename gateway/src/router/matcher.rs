//! One route's compiled predicates: hosts, path, methods, headers, query.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::bytes::Regex;
use toml::Spanned;

use super::Request;
use super::path::{PathKey, PathMatch};
use crate::config::Problem;
use crate::config::file;

/// One route's compiled predicates. All given predicates must hold.
#[derive(Debug)]
pub struct Matcher {
    pub(super) hosts: Box<[HostPattern]>,
    pub(super) path: PathMatch,
    /// Deduplicated, in `method_order`; empty means any.
    pub(super) methods: Box<[Method]>,
    headers: Box<[HeaderPredicate]>,
    query: Box<[QueryPredicate]>,
}

/// A `hosts` entry, lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HostPattern {
    Exact(Box<str>),
    /// `*.example.com`, stored as the suffix `.example.com`: matches hosts
    /// with one or more labels before it.
    Wildcard(Box<str>),
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

#[derive(Debug)]
struct HeaderPredicate {
    name: HeaderName,
    test: Test,
}

#[derive(Debug)]
struct QueryPredicate {
    /// Compared with the percent-decoded parameter name.
    name: Box<str>,
    test: Test,
}

#[derive(Debug)]
enum Test {
    /// Some value equals this exactly.
    Value(Box<[u8]>),
    /// Some value matches this (anchored at both ends).
    Regex { regex: Regex, source: Box<str> },
    /// Present (`true`) or absent (`false`).
    Present(bool),
}

impl Matcher {
    /// Compiles a `[routes.match]` table, reporting every problem with the
    /// span of the offending value.
    pub fn compile(m: &file::Match) -> Result<Matcher, Vec<Problem>> {
        let mut problems = Vec::new();

        let mut hosts = Vec::new();
        for h in &m.hosts {
            match HostPattern::parse(h.get_ref()) {
                Ok(p) if !hosts.contains(&p) => hosts.push(p),
                Ok(_) => {}
                Err(msg) => problems.push(Problem::at(h.span(), msg)),
            }
        }

        let path = PathMatch::compile(m.path.as_ref(), m.path_prefix.as_ref(), &mut problems);

        let mut methods = crate::config::methods(&m.methods, &mut problems);
        methods.sort_by(|a, b| method_order(a).cmp(&method_order(b)));
        methods.dedup();

        let mut headers = Vec::new();
        for p in &m.headers {
            let name = p.get_ref().name.get_ref();
            let name = match HeaderName::from_bytes(name.as_bytes()) {
                Ok(n) => Some(n),
                Err(_) => {
                    problems.push(Problem::at(
                        p.get_ref().name.span(),
                        format!("invalid header name {name:?}"),
                    ));
                    None
                }
            };
            let test = Test::compile(p, &mut problems);
            if let Some(Test::Value(v)) = &test
                && HeaderValue::from_bytes(v).is_err()
            {
                problems.push(Problem::at(
                    p.span(),
                    format!(
                        "header {:?}: value is not a valid header value and would never match",
                        p.get_ref().name.get_ref()
                    ),
                ));
            }
            if let (Some(name), Some(test)) = (name, test) {
                headers.push(HeaderPredicate { name, test });
            }
        }

        let mut query = Vec::new();
        for p in &m.query {
            let name = p.get_ref().name.get_ref();
            if name.is_empty() {
                problems.push(Problem::at(
                    p.get_ref().name.span(),
                    "query parameter name must not be empty",
                ));
            }
            if let Some(test) = Test::compile(p, &mut problems)
                && !name.is_empty()
            {
                query.push(QueryPredicate {
                    name: name.as_str().into(),
                    test,
                });
            }
        }

        match path {
            Some(path) if problems.is_empty() => Ok(Matcher {
                hosts: hosts.into(),
                path,
                methods: methods.into(),
                headers: headers.into(),
                query: query.into(),
            }),
            _ => Err(problems),
        }
    }

    /// Names of the path template's parameters, in declaration order.
    pub fn param_names(&self) -> &[Box<str>] {
        self.path.param_names()
    }

    /// Specificity of the path predicate (smaller is more specific).
    pub(super) fn path_key(&self) -> PathKey {
        self.path.key()
    }

    /// Method, header and query predicates (a method list counts as one).
    pub(super) fn predicate_count(&self) -> usize {
        usize::from(!self.methods.is_empty()) + self.headers.len() + self.query.len()
    }

    /// Whether the headers and query predicates hold (host and path are
    /// checked by the router's index).
    pub(super) fn matches_predicates(&self, req: &Request<'_>) -> bool {
        self.headers.iter().all(|p| p.matches(req.headers))
            && self.query.iter().all(|p| p.matches(req.query))
    }

    /// Whether the method is allowed.
    pub(super) fn allows(&self, method: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(method)
    }

    /// The header and query predicates, for `gateway routes`.
    pub(super) fn describe_predicates(&self) -> String {
        let mut out = Vec::new();
        for h in &self.headers {
            out.push(format!("header {}{}", h.name, h.test));
        }
        for q in &self.query {
            out.push(format!("query {}{}", q.name, q.test));
        }
        out.join(", ")
    }
}

impl HostPattern {
    fn parse(raw: &str) -> Result<HostPattern, String> {
        let h = raw.to_ascii_lowercase();
        let bad = |why: &str| format!("invalid host pattern {raw:?}: {why}");
        if h == "*" {
            return Err(bad("leave `hosts` empty to match any host"));
        }
        let (wild, name) = match h.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, h.as_str()),
        };
        if name.contains('*') {
            return Err(bad(
                "a wildcard must be the whole first label, as in *.example.com",
            ));
        }
        if !wild && name.starts_with('[') {
            // IPv6 literal, compared as the request spells it.
            let inner = name.strip_prefix('[').and_then(|s| s.strip_suffix(']'));
            return match inner {
                Some(i)
                    if !i.is_empty()
                        && i.chars()
                            .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') =>
                {
                    Ok(HostPattern::Exact(h.as_str().into()))
                }
                _ => Err(bad("not a bracketed IPv6 address")),
            };
        }
        if name.contains(':') {
            return Err(bad("a host pattern has no port"));
        }
        if name.is_empty() || name.len() > 253 {
            return Err(bad("expected a host name such as api.example.com"));
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(bad("empty label"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(bad("use letters, digits, '-' and '_' in host names"));
            }
        }
        Ok(if wild {
            HostPattern::Wildcard(format!(".{name}").into())
        } else {
            HostPattern::Exact(name.into())
        })
    }
}

impl Test {
    /// Compiles the `value` / `regex` / `present` part of a predicate.
    fn compile(p: &Spanned<file::Predicate>, problems: &mut Vec<Problem>) -> Option<Test> {
        let pred = p.get_ref();
        let given = usize::from(pred.value.is_some())
            + usize::from(pred.regex.is_some())
            + usize::from(pred.present.is_some());
        if given != 1 {
            problems.push(Problem::at(
                p.span(),
                format!(
                    "predicate on {:?} needs exactly one of `value`, `regex` and `present` ({given} given)",
                    pred.name.get_ref()
                ),
            ));
            return None;
        }
        if let Some(v) = &pred.value {
            return Some(Test::Value(v.as_bytes().into()));
        }
        if let Some(present) = pred.present {
            return Some(Test::Present(present));
        }
        let re = pred.regex.as_ref()?;
        let src = re.get_ref();
        // Compile the pattern alone first so the error names the user's text.
        if let Err(e) = Regex::new(src) {
            problems.push(Problem::at(
                re.span(),
                format!("invalid regex {src:?}: {e}"),
            ));
            return None;
        }
        match Regex::new(&format!(r"\A(?:{src})\z")) {
            Ok(regex) => Some(Test::Regex {
                regex,
                source: src.as_str().into(),
            }),
            Err(e) => {
                problems.push(Problem::at(
                    re.span(),
                    format!("invalid regex {src:?}: {e}"),
                ));
                None
            }
        }
    }

    fn matches_value(&self, v: &[u8]) -> bool {
        match self {
            Test::Value(want) => **want == *v,
            Test::Regex { regex, .. } => regex.is_match(v),
            Test::Present(_) => true,
        }
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Test::Value(v) => write!(f, " = {:?}", String::from_utf8_lossy(v)),
            Test::Regex { source, .. } => write!(f, " ~ {source:?}"),
            Test::Present(true) => f.write_str(" present"),
            Test::Present(false) => f.write_str(" absent"),
        }
    }
}

impl HeaderPredicate {
    fn matches(&self, headers: &HeaderMap) -> bool {
        match &self.test {
            Test::Present(want) => headers.contains_key(&self.name) == *want,
            test => headers
                .get_all(&self.name)
                .iter()
                .any(|v| test.matches_value(v.as_bytes())),
        }
    }
}

impl QueryPredicate {
    fn matches(&self, query: Option<&str>) -> bool {
        let mut pairs = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .filter(|(k, _)| decoded_eq(k.as_bytes(), self.name.as_bytes()));
        match &self.test {
            Test::Present(want) => pairs.next().is_some() == *want,
            Test::Value(want) => pairs.any(|(_, v)| decoded_eq(v.as_bytes(), want)),
            test => pairs.any(|(_, v)| test.matches_value(&decode(v.as_bytes()))),
        }
    }
}

/// The bytes of a query component after form decoding: `+` is a space and
/// valid `%XX` escapes are decoded; a malformed escape stays as written.
fn decoded(raw: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let b = *raw.get(i)?;
        i += 1;
        Some(match b {
            b'+' => b' ',
            b'%' => match (
                raw.get(i).and_then(|&h| hex(h)),
                raw.get(i + 1).and_then(|&l| hex(l)),
            ) {
                (Some(h), Some(l)) => {
                    i += 2;
                    h << 4 | l
                }
                _ => b'%',
            },
            b => b,
        })
    })
}

/// Compares a raw query component with `want` without allocating.
fn decoded_eq(raw: &[u8], want: &[u8]) -> bool {
    decoded(raw).eq(want.iter().copied())
}

/// A decoded query component; borrowed when there is nothing to decode.
fn decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if raw.iter().any(|&b| b == b'%' || b == b'+') {
        Cow::Owned(decoded(raw).collect())
    } else {
        Cow::Borrowed(raw)
    }
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// A stable order for methods: the common ones as RFC 9110 lists them, then
/// extensions alphabetically.
pub(super) fn method_order(m: &Method) -> (u8, &str) {
    let rank = match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::CONNECT => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::PATCH => 8,
        _ => 9,
    };
    (rank, m.as_str())
}
