use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use toml::Spanned;

use super::normalize::{NormalizeError, normalize};
use super::*;
use crate::config::Problem;
use crate::config::file;

// ---------------------------------------------------------------- helpers

fn parse(src: &str) -> file::Match {
    toml::from_str(src).unwrap_or_else(|e| panic!("bad test TOML {src:?}: {e}"))
}

fn matcher(src: &str) -> Matcher {
    Matcher::compile(&parse(src)).unwrap_or_else(|ps| panic!("{src:?}: {ps:?}"))
}

/// The problems of a `[routes.match]` body, as (offending text, message).
fn problems(src: &str) -> Vec<(String, String)> {
    match Matcher::compile(&parse(src)) {
        Ok(_) => panic!("{src:?} compiled"),
        Err(ps) => ps
            .into_iter()
            .map(|Problem { span, message }| {
                let span = span.expect("located problem");
                (src[span].to_string(), message)
            })
            .collect(),
    }
}

/// A router over `[routes.match]` bodies; route id = index.
fn router(routes: &[&str]) -> Router {
    Router::new(
        routes
            .iter()
            .enumerate()
            .map(|(i, s)| (i, Arc::new(matcher(s))))
            .collect(),
    )
}

struct Req<'a> {
    method: Method,
    host: Option<&'a str>,
    target: &'a str,
    headers: HeaderMap,
}

fn req(target: &str) -> Req<'_> {
    Req {
        method: Method::GET,
        host: None,
        target,
        headers: HeaderMap::new(),
    }
}

impl<'a> Req<'a> {
    fn method(mut self, m: &str) -> Self {
        self.method = Method::from_bytes(m.as_bytes()).expect("method");
        self
    }
    fn host(mut self, h: &'a str) -> Self {
        self.host = Some(h);
        self
    }
    fn header(mut self, n: &str, v: &str) -> Self {
        self.headers.append(
            HeaderName::from_bytes(n.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
        self
    }
    fn find(&self, r: &Router) -> Outcome {
        let (path, query) = match self.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.target, None),
        };
        r.find(&Request {
            method: &self.method,
            host: self.host,
            path,
            query,
            headers: &self.headers,
        })
    }
    /// The matched route id, if any.
    fn route(&self, r: &Router) -> Option<usize> {
        match self.find(r) {
            Outcome::Matched { route, .. } => Some(route),
            _ => None,
        }
    }
}

// ---------------------------------------------------------- normalization

#[test]
fn normalize_keeps_canonical_paths_borrowed() {
    for p in [
        "/",
        "/a",
        "/a/b/",
        "/caf%C3%A9",
        "/a-b_c.~d",
        "/a:b@c!$&'()*+,;=",
        "/.well-known/x",
        "/...",
        "/a/.b/..c/",
        "/%25",
    ] {
        assert!(
            matches!(normalize(p), Ok(Cow::Borrowed(x)) if x == p),
            "{p:?} -> {:?}",
            normalize(p)
        );
    }
}

#[test]
fn normalize_keeps_path_parameters_of_named_segments() {
    assert_eq!(normalize("/a;x=1/b").unwrap(), "/a;x=1/b");
    assert_eq!(normalize("/a/b;jsessionid=2").unwrap(), "/a/b;jsessionid=2");
    assert_eq!(normalize("/a/..x;y").unwrap(), "/a/..x;y");
}

#[test]
fn normalize_rewrites() {
    for (input, want) in [
        // Unreserved escapes decoded, others uppercased.
        ("/%61dmin", "/admin"),
        ("/%7Euser", "/~user"),
        ("/%2D%2e%5F%7e%41%7a%30", "/-._~Az0"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/%3f%2b", "/%3F%2B"),
        // Bytes not allowed raw are encoded.
        ("/a b", "/a%20b"),
        ("/café", "/caf%C3%A9"),
        ("/{x}|^`\"<>[]", "/%7Bx%7D%7C%5E%60%22%3C%3E%5B%5D"),
        // Slashes merged.
        ("//admin", "/admin"),
        ("/a//b///c", "/a/b/c"),
        ("///", "/"),
        ("/a//", "/a/"),
        // Dot segments removed.
        ("/a/./b/../c", "/a/c"),
        ("/admin/../public", "/public"),
        ("/a/.", "/a/"),
        ("/a/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/b/../", "/a/"),
        ("/.", "/"),
        ("/./", "/"),
        ("/./a", "/a"),
        ("/a/%2e%2E/b", "/b"),
        ("/a/.%2e", "/"),
        ("/a//../b", "/b"),
        ("/%2e/x", "/x"),
    ] {
        assert_eq!(normalize(input).as_deref(), Ok(want), "{input:?}");
    }
}

#[test]
fn normalize_rejects_hostile_paths() {
    use NormalizeError::*;
    for (input, want) in [
        ("", NotAbsolute),
        ("a", NotAbsolute),
        ("*", NotAbsolute),
        ("/%2F", EncodedSlash),
        ("/a%2fb", EncodedSlash),
        ("/%5C", EncodedBackslash),
        ("/%5c..%5c", EncodedBackslash),
        ("/%00", EncodedControl(0)),
        ("/a%0Ab", EncodedControl(0x0a)),
        ("/%7f", EncodedControl(0x7f)),
        ("/a\\b", Backslash),
        ("/..\\x", Backslash),
        ("/a\nb", ControlByte(b'\n')),
        ("/a\0", ControlByte(0)),
        ("/\x7f", ControlByte(0x7f)),
        ("/%", MalformedEscape),
        ("/%4", MalformedEscape),
        ("/%zz", MalformedEscape),
        ("/%%41", MalformedEscape),
        ("/%-1", MalformedEscape),
        ("/..", AboveRoot),
        ("/../x", AboveRoot),
        ("/a/../..", AboveRoot),
        ("/a/../../b", AboveRoot),
        ("/%2e%2e/x", AboveRoot),
        ("/.%2E", AboveRoot),
        ("//../x", AboveRoot),
        ("/public/..;/admin", DotSegmentParams),
        ("/public/.;x/admin", DotSegmentParams),
        ("/%2e%2e;/admin", DotSegmentParams),
        ("/;jsessionid=1/admin", DotSegmentParams),
        ("/a//;x", DotSegmentParams),
        ("/..;", DotSegmentParams),
    ] {
        assert_eq!(normalize(input), Err(want), "{input:?}");
    }
}

/// Random paths: never a panic; every result is canonical (normalizing it
/// again borrows it unchanged) and free of `//` and dot segments.
#[test]
fn normalize_property_random_paths() {
    const ALPHABET: &[&str] = &[
        "/", "/", "/", ".", ".", "%", "2", "e", "E", "f", "F", "5", "c", "C", "0", "a", "A", "~",
        "\\", " ", "é", "{", "%2e", "%2E", "%41", "%2f", "..", "\n", "+",
    ];
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let (mut ok, mut changed) = (0, 0);
    for _ in 0..50_000 {
        let mut s = String::new();
        if rng.u8(..) < 230 {
            s.push('/');
        }
        for _ in 0..rng.usize(0..24) {
            s.push_str(ALPHABET[rng.usize(..ALPHABET.len())]);
        }
        if let Some(n) = check_normalized(&s) {
            ok += 1;
            changed += usize::from(n != s);
        }
    }
    // The generator must exercise both outcomes.
    assert!(ok > 5_000 && changed > 2_000, "ok {ok}, changed {changed}");
    // Arbitrary bytes, made UTF-8.
    for _ in 0..20_000 {
        let bytes: Vec<u8> = (0..rng.usize(0..16)).map(|_| rng.u8(..)).collect();
        check_normalized(&format!("/{}", String::from_utf8_lossy(&bytes)));
    }
}

/// Checks the invariants; the normalized path, if `s` is accepted.
fn check_normalized(s: &str) -> Option<String> {
    let n = normalize(s).ok()?;
    assert!(
        matches!(normalize(&n), Ok(Cow::Borrowed(x)) if x == n),
        "not idempotent: {s:?} -> {n:?} -> {:?}",
        normalize(&n)
    );
    assert!(n.starts_with('/') && !n.contains("//"), "{s:?} -> {n:?}");
    assert!(
        !n.split('/').any(|seg| seg == "." || seg == ".."),
        "{s:?} -> {n:?}"
    );
    assert!(n.is_ascii(), "{s:?} -> {n:?}");
    Some(n.into_owned())
}

// ------------------------------------------------------- compile problems

#[test]
fn compile_accepts_an_empty_match() {
    let r = router(&[""]);
    assert_eq!(req("/anything").route(&r), Some(0));
    assert_eq!(req("/").method("DELETE").host("x").route(&r), Some(0));
}

#[test]
fn compile_reports_every_problem_at_its_span() {
    let src = r#"
hosts = ["ok.example.com", "bad host", "a.*.com"]
path = "users"
methods = ["GET", "B@D", "", "M1", "purge"]
headers = [
  { name = "bad name", value = "x" },
  { name = "x-a", value = "x", present = true },
  { name = "x-b" },
  { name = "x-c", regex = "(" },
]
query = [{ name = "", present = true }]
"#;
    let ps = problems(src);
    let texts: Vec<&str> = ps.iter().map(|(t, _)| t.as_str()).collect();
    for want in [
        "\"bad host\"",
        "\"a.*.com\"",
        "\"users\"",
        "\"B@D\"",
        "\"M1\"",
        "\"\"",
        "\"bad name\"",
        "{ name = \"x-a\", value = \"x\", present = true }",
        "{ name = \"x-b\" }",
        "\"(\"",
    ] {
        assert!(texts.contains(&want), "no problem at {want}: {ps:#?}");
    }
    // ("purge" is PURGE: methods are named in any case.)
    assert_eq!(ps.len(), 11, "{ps:#?}");
    let regex = ps
        .iter()
        .find(|(t, _)| t == "\"(\"")
        .expect("regex problem");
    assert!(regex.1.contains("unclosed group"), "{}", regex.1);
}

#[test]
fn compile_rejects_path_and_prefix_together() {
    let ps = problems(
        r#"path = "/a"
path_prefix = "/b""#,
    );
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0].0, "\"/b\"");
    assert!(ps[0].1.contains("not both"));
}

#[test]
fn compile_rejects_bad_templates() {
    for (path, what) in [
        ("/users/{id", "unbalanced"),
        ("/users/id}", "unbalanced"),
        ("/users/{{id}}", "whole segment"),
        ("/users/{}", "empty parameter name"),
        ("/users/{...}", "empty parameter name"),
        ("/users/{id}/{id}", "duplicate"),
        ("/files/{rest...}/x", "last segment"),
        ("/files/x{id}", "whole segment"),
        ("/files/{id}.json", "whole segment"),
        ("/files/{a}{b}", "whole segment"),
        ("/files/{1a}", "invalid parameter name"),
        ("/files/{a-b}", "invalid parameter name"),
        ("/a//{x}", "empty segment"),
        ("/a/../{x}", "\"..\""),
        ("/%61/{x}", "write \"a\""),
        ("/a/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}/{j}", "at most 8"),
        ("users/{id}", "start with '/'"),
    ] {
        let ps = problems(&format!("path = {path:?}"));
        assert_eq!(ps.len(), 1, "{path}: {ps:?}");
        assert!(ps[0].1.contains(what), "{path}: {ps:?}");
        assert_eq!(ps[0].0, format!("{path:?}"));
    }
}

#[test]
fn compile_rejects_paths_that_could_never_match() {
    for (key, path, what) in [
        ("path", "/a//b", "write \"/a/b\""),
        ("path", "/a/./b", "write \"/a/b\""),
        ("path", "/%7Euser", "write \"/~user\""),
        ("path", "/caf%c3%a9", "write \"/caf%C3%A9\""),
        ("path", "/café", "write \"/caf%C3%A9\""),
        ("path", "/a%2Fb", "encoded slash"),
        ("path_prefix", "/api/..", "write \"/\""),
        ("path_prefix", "api/", "start with '/'"),
    ] {
        let ps = problems(&format!("{key} = {path:?}"));
        assert_eq!(ps.len(), 1, "{path}: {ps:?}");
        assert!(ps[0].1.contains(what), "{path}: {ps:?}");
    }
}

#[test]
fn compile_rejects_bad_hosts() {
    for h in [
        "*",
        "*.",
        "**.example.com",
        "foo*.example.com",
        "*example.com",
        "api.*.com",
        "example.com:8080",
        "example..com",
        "example.com.",
        "",
        "exa mple.com",
        "[zz]",
    ] {
        let ps = problems(&format!("hosts = [{h:?}]"));
        assert_eq!(ps.len(), 1, "{h}: {ps:?}");
        assert!(ps[0].1.contains("invalid host pattern"), "{h}: {ps:?}");
    }
    // Accepted.
    matcher(r#"hosts = ["API.Example.com", "*.example.com", "127.0.0.1", "[::1]", "a_b.local"]"#);
}

#[test]
fn compile_rejects_header_value_that_never_matches() {
    let ps = problems(r#"headers = [{ name = "x", value = "a\nb" }]"#);
    assert_eq!(ps.len(), 1, "{ps:?}");
}

// ---------------------------------------------------------------- matchers

#[test]
fn host_exact_and_wildcard() {
    let r = router(&[
        r#"hosts = ["api.example.com"]"#,
        r#"hosts = ["*.example.com"]"#,
        r#"hosts = ["*.eu.example.com"]"#,
        r#"hosts = ["OTHER.example.org", "[::1]"]"#,
    ]);
    let at = |h: &str| req("/").host(h).route(&r);
    assert_eq!(at("api.example.com"), Some(0));
    assert_eq!(at("api.example.com."), Some(0), "trailing dot");
    assert_eq!(at("www.example.com"), Some(1));
    assert_eq!(at("a.b.example.com"), Some(1), "one or more labels");
    assert_eq!(at("x.eu.example.com"), Some(2), "longer suffix first");
    assert_eq!(at("eu.example.com"), Some(1));
    assert_eq!(at("other.example.org"), Some(3));
    assert_eq!(at("[::1]"), Some(3));
    assert_eq!(at("example.com"), None, "a wildcard needs a label");
    assert_eq!(at(".example.com"), None);
    assert_eq!(at("notexample.com"), None);
    assert_eq!(req("/").route(&r), None, "no Host");
}

#[test]
fn path_exact() {
    let r = router(&[r#"path = "/hello""#]);
    assert_eq!(req("/hello").route(&r), Some(0));
    assert_eq!(req("/hello/").route(&r), None);
    assert_eq!(req("/hello/x").route(&r), None);
    assert_eq!(req("/Hello").route(&r), None);
}

#[test]
fn path_prefix_on_segments() {
    let r = router(&[r#"path_prefix = "/api/""#]);
    for p in ["/api", "/api/", "/api/x", "/api/x/y"] {
        assert_eq!(req(p).route(&r), Some(0), "{p}");
    }
    for p in ["/apix", "/ap", "/", "/x/api/"] {
        assert_eq!(req(p).route(&r), None, "{p}");
    }
    let root = router(&[r#"path_prefix = "/""#]);
    assert_eq!(req("/").route(&root), Some(0));
    assert_eq!(req("/anything/at/all").route(&root), Some(0));
}

#[test]
fn path_prefix_on_characters() {
    let r = router(&[r#"path_prefix = "/api""#]);
    for p in ["/api", "/apix", "/api/", "/api/x"] {
        assert_eq!(req(p).route(&r), Some(0), "{p}");
    }
    assert_eq!(req("/ap").route(&r), None);
}

fn params_of(r: &Router, target: &str) -> Option<Vec<String>> {
    match req(target).find(r) {
        Outcome::Matched { params, .. } => {
            let path = target.split('?').next().unwrap_or_default();
            Some(
                (0..params.len())
                    .map(|i| path[params.get(i).expect("param")].to_string())
                    .collect(),
            )
        }
        _ => None,
    }
}

#[test]
fn path_templates() {
    let r = router(&[r#"path = "/users/{id}/posts/{post}""#]);
    assert_eq!(
        params_of(&r, "/users/7/posts/abc").as_deref(),
        Some(&["7".to_string(), "abc".to_string()][..])
    );
    for p in [
        "/users/7/posts",
        "/users/7/posts/",
        "/users//posts/a",
        "/users/7/posts/a/b",
        "/users/7/post/a",
    ] {
        assert_eq!(params_of(&r, p), None, "{p}");
    }
    let r = router(&[r#"path = "/files/{path...}""#]);
    assert_eq!(
        params_of(&r, "/files/a/b/c.txt"),
        Some(vec!["a/b/c.txt".to_string()])
    );
    assert_eq!(
        params_of(&r, "/files/"),
        Some(vec![String::new()]),
        "rest may be empty"
    );
    assert_eq!(params_of(&r, "/files"), None);
    assert_eq!(params_of(&r, "/filesx/a"), None);
    let r = router(&[r#"path = "/{all...}""#]);
    assert_eq!(params_of(&r, "/"), Some(vec![String::new()]));
    assert_eq!(params_of(&r, "/x/y"), Some(vec!["x/y".to_string()]));
    let r = router(&[r#"path = "/users/{id}/""#]);
    assert_eq!(params_of(&r, "/users/1/"), Some(vec!["1".to_string()]));
    assert_eq!(params_of(&r, "/users/1"), None);
}

#[test]
fn methods() {
    let r = router(&[r#"path = "/m"
methods = ["get", "POST"]"#]);
    assert_eq!(req("/m").route(&r), Some(0));
    assert_eq!(req("/m").method("POST").route(&r), Some(0));
    assert_eq!(
        req("/m").method("DELETE").find(&r),
        Outcome::MethodNotAllowed {
            allowed: vec![Method::GET, Method::POST]
        }
    );
    // HEAD is not implied by GET.
    assert!(matches!(
        req("/m").method("HEAD").find(&r),
        Outcome::MethodNotAllowed { .. }
    ));
}

#[test]
fn headers() {
    let r = router(&[
        r#"headers = [{ name = "X-Tenant", value = "acme" }]"#,
        r#"headers = [{ name = "x-version", regex = "v[0-9]+" }]"#,
        r#"headers = [{ name = "x-debug", present = true }, { name = "x-prod", present = false }]"#,
    ]);
    assert_eq!(req("/").header("x-tenant", "acme").route(&r), Some(0));
    assert_eq!(
        req("/").header("X-TENANT", "acme").route(&r),
        Some(0),
        "names are case-insensitive"
    );
    assert_eq!(
        req("/").header("x-tenant", "ACME").route(&r),
        None,
        "values are exact"
    );
    assert_eq!(
        req("/")
            .header("x-tenant", "other")
            .header("x-tenant", "acme")
            .route(&r),
        Some(0),
        "any value"
    );
    assert_eq!(req("/").header("x-version", "v12").route(&r), Some(1));
    assert_eq!(
        req("/").header("x-version", "v12-beta").route(&r),
        None,
        "full match"
    );
    assert_eq!(
        req("/").header("x-version", "xv1").route(&r),
        None,
        "full match"
    );
    assert_eq!(req("/").header("x-debug", "").route(&r), Some(2));
    assert_eq!(
        req("/")
            .header("x-debug", "1")
            .header("x-prod", "1")
            .route(&r),
        None
    );
    assert_eq!(req("/").route(&r), None);
}

#[test]
fn regex_alternation_is_anchored_as_a_whole() {
    let r = router(&[r#"headers = [{ name = "x", regex = "a|b" }]"#]);
    assert_eq!(req("/").header("x", "a").route(&r), Some(0));
    assert_eq!(req("/").header("x", "ab").route(&r), None);
    assert_eq!(req("/").header("x", "xb").route(&r), None);
}

#[test]
fn query() {
    let r = router(&[
        r#"query = [{ name = "q", value = "a b/c" }]"#,
        r#"query = [{ name = "page", regex = "[0-9]+" }]"#,
        r#"query = [{ name = "debug", present = true }, { name = "prod", present = false }]"#,
    ]);
    assert_eq!(req("/?q=a%20b%2Fc").route(&r), Some(0), "percent-decoded");
    assert_eq!(req("/?q=a+b/c").route(&r), Some(0), "+ is a space");
    assert_eq!(req("/?x=1&%71=a%20b/c").route(&r), Some(0), "names decoded");
    assert_eq!(req("/?q=a%20b").route(&r), None);
    assert_eq!(req("/?page=12").route(&r), Some(1));
    assert_eq!(req("/?page=%31%32").route(&r), Some(1));
    assert_eq!(req("/?page=12x").route(&r), None);
    assert_eq!(req("/?debug").route(&r), Some(2));
    assert_eq!(req("/?debug=&prod=1").route(&r), None);
    assert_eq!(req("/?debugx=1").route(&r), None);
    assert_eq!(
        req("/?%zz&q=%").route(&r),
        None,
        "malformed escapes do not panic"
    );
    assert_eq!(req("/").route(&r), None);
}

// -------------------------------------------------------------- precedence

#[test]
fn precedence_by_path_kind() {
    let r = router(&[
        "",                             // 0: any path
        r#"path_prefix = "/users/""#,   // 1
        r#"path_prefix = "/users/1""#,  // 2: longer prefix
        r#"path = "/users/{rest...}""#, // 3
        r#"path = "/users/{id}""#,      // 4
        r#"path = "/users/1""#,         // 5: exact
    ]);
    assert_eq!(req("/users/1").route(&r), Some(5));
    assert_eq!(req("/users/2").route(&r), Some(4));
    assert_eq!(req("/users/2/x").route(&r), Some(3));
    assert_eq!(req("/users/10/x/").route(&r), Some(3));
    assert_eq!(req("/users").route(&r), Some(1));
    assert_eq!(req("/other").route(&r), Some(0));
    assert_eq!(r.route_ids().collect::<Vec<_>>(), [5, 4, 3, 2, 1, 0]);
}

#[test]
fn precedence_among_templates() {
    let r = router(&[
        r#"path = "/{a}/{b}/{c}""#,       // 0: no literals
        r#"path = "/users/{id}/{x}""#,    // 1: one literal
        r#"path = "/users/{id}/posts""#,  // 2: two literals
        r#"path = "/users/{rest...}""#,   // 3: one literal, rest
        r#"path = "/users/{id}/{r...}""#, // 4: one literal, rest, more segments
    ]);
    assert_eq!(req("/users/1/posts").route(&r), Some(2));
    assert_eq!(req("/users/1/x").route(&r), Some(1));
    assert_eq!(req("/a/b/c").route(&r), Some(0));
    assert_eq!(req("/users/1/x/y").route(&r), Some(4));
    assert_eq!(req("/users/1").route(&r), Some(3));
    assert_eq!(r.route_ids().collect::<Vec<_>>(), [2, 1, 4, 3, 0]);
}

#[test]
fn precedence_by_predicate_count_then_declaration() {
    let r = router(&[
        r#"path = "/x""#, // 0
        r#"path = "/x"
methods = ["GET"]"#, // 1
        r#"path = "/x"
methods = ["GET"]
headers = [{ name = "x-a", present = true }]"#, // 2
        r#"path = "/x"
query = [{ name = "a", present = true }]
methods = ["GET"]"#, // 3: ties with 2
        r#"path = "/x""#, // 4: ties with 0
    ]);
    assert_eq!(req("/x?a").header("x-a", "1").route(&r), Some(2));
    assert_eq!(req("/x?a").route(&r), Some(3));
    assert_eq!(req("/x").route(&r), Some(1));
    assert_eq!(req("/x").method("POST").route(&r), Some(0));
    assert_eq!(r.route_ids().collect::<Vec<_>>(), [2, 3, 1, 0, 4]);
}

#[test]
fn host_precedes_path() {
    let r = router(&[
        r#"path = "/exact""#, // 0: any host, exact path
        r#"hosts = ["*.example.com"]
path_prefix = "/""#, // 1: wildcard host
        r#"hosts = ["api.example.com"]
path_prefix = "/v1/""#, // 2: exact host
    ]);
    assert_eq!(req("/exact").host("api.example.com").route(&r), Some(1));
    assert_eq!(req("/v1/x").host("api.example.com").route(&r), Some(2));
    assert_eq!(req("/exact").host("example.org").route(&r), Some(0));
    assert_eq!(req("/nope").host("example.org").route(&r), None);
}

#[test]
fn multi_host_route_is_ordered_per_host() {
    let r = router(&[
        r#"hosts = ["a.com", "*.b.com"]
path_prefix = "/""#, // 0
        r#"hosts = ["*.b.com"]
path = "/x""#, // 1: more specific path in the *.b.com group
    ]);
    assert_eq!(req("/x").host("w.b.com").route(&r), Some(1));
    assert_eq!(req("/x").host("a.com").route(&r), Some(0));
}

#[test]
fn method_not_allowed_collects_every_route() {
    let r = router(&[
        r#"path = "/r"
methods = ["PUT", "GET"]"#,
        r#"path_prefix = "/r"
methods = ["POST", "GET"]"#,
        r#"path = "/r"
methods = ["PATCH"]
headers = [{ name = "x", present = true }]"#,
        r#"hosts = ["h.com"]
path = "/r"
methods = ["DELETE"]"#,
    ]);
    assert_eq!(
        req("/r").method("OPTIONS").find(&r),
        Outcome::MethodNotAllowed {
            allowed: vec![Method::GET, Method::POST, Method::PUT]
        }
    );
    assert_eq!(
        req("/r")
            .method("OPTIONS")
            .host("h.com")
            .header("x", "1")
            .find(&r),
        Outcome::MethodNotAllowed {
            allowed: vec![
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH
            ]
        }
    );
    assert_eq!(req("/s").method("OPTIONS").find(&r), Outcome::NotFound);
}

#[test]
fn full_match_anywhere_beats_method_not_allowed() {
    let r = router(&[
        r#"hosts = ["h.com"]
path = "/r"
methods = ["GET"]"#,
        r#"path_prefix = "/""#,
    ]);
    assert_eq!(req("/r").method("POST").host("h.com").route(&r), Some(1));
}

#[test]
fn empty_router() {
    let r = Router::new(Vec::new());
    assert!(r.is_empty());
    assert_eq!(req("/").find(&r), Outcome::NotFound);
}

// ---------------------------------------------------------------- rewrite

fn rewrite(route: &str, rw: &str) -> Result<Rewrite, String> {
    let m = matcher(route);
    Rewrite::compile(&Spanned::new(0..rw.len(), rw.to_string()), &m).map_err(|p| {
        assert_eq!(p.span, Some(0..rw.len()));
        p.message
    })
}

#[test]
fn rewrite_substitutes_params() {
    let r = router(&[r#"path = "/users/{id}/files/{path...}""#]);
    let target = "/users/42/files/a/b.txt";
    let Outcome::Matched { params, .. } = req(target).find(&r) else {
        panic!("no match");
    };
    let rw = rewrite(
        r#"path = "/users/{id}/files/{path...}""#,
        "/v2/{path}/of/{id}",
    )
    .expect("compile");
    assert_eq!(rw.apply(target, &params), "/v2/a/b.txt/of/42");
    let lit = rewrite(r#"path_prefix = "/old/""#, "/new").expect("compile");
    assert_eq!(lit.apply("/old/x", &Params::default()), "/new");
    // An empty rest parameter between slashes leaves no `//`.
    let r = router(&[r#"path = "/files/{p...}""#]);
    let Outcome::Matched { params, .. } = req("/files/").find(&r) else {
        panic!("no match for /files/");
    };
    let rw = rewrite(r#"path = "/files/{p...}""#, "/{p}/meta").expect("compile");
    assert_eq!(rw.apply("/files/", &params), "/meta");
}

#[test]
fn rewrite_problems() {
    let t = r#"path = "/users/{id}""#;
    assert!(rewrite(t, "/v2/{user}").unwrap_err().contains("{user}"));
    assert!(
        rewrite(t, "/v2/{user}")
            .unwrap_err()
            .contains("defines {id}")
    );
    assert!(
        rewrite(r#"path = "/x""#, "/{id}")
            .unwrap_err()
            .contains("no template parameters")
    );
    assert!(
        rewrite(t, "v2/{id}")
            .unwrap_err()
            .contains("start with '/'")
    );
    assert!(rewrite(t, "/v2/{id").unwrap_err().contains("unbalanced"));
    assert!(rewrite(t, "/v2/id}").unwrap_err().contains("unbalanced"));
    assert!(rewrite(t, "/v2/{{id}}").unwrap_err().contains("unbalanced"));
    assert!(rewrite(t, "/v2//{id}").unwrap_err().contains("normalized"));
    assert!(
        rewrite(t, "/v2/../{id}")
            .unwrap_err()
            .contains("normalized")
    );
    assert!(
        rewrite(t, "/v2/{id}?x=1")
            .unwrap_err()
            .contains("normalized")
    );
    assert!(
        rewrite(r#"path = "/f/{p...}""#, "/g/{p...}")
            .unwrap_err()
            .contains("without '...'")
    );
}

// ---------------------------------------------------------------- display

#[test]
fn display_lists_routes_in_precedence_order() {
    let r = router(&[
        "",
        r#"hosts = ["api.example.com", "*.example.com"]
path = "/users/{id}"
methods = ["GET", "HEAD"]
headers = [{ name = "x-tenant", value = "acme" }]
query = [{ name = "debug", present = false }]"#,
    ]);
    let routes: Vec<crate::config::RouteConfig> = ["catch-all", "users"]
        .into_iter()
        .map(|name| crate::config::RouteConfig {
            name: name.into(),
            action: crate::config::RouteAction::Upstream(0),
            strip_prefix: None,
            rewrite: None,
            timeout: None,
            max_body_bytes: None,
            request_headers: Default::default(),
            response_headers: Default::default(),
            policy: Default::default(),
            upstream_policy: Default::default(),
        })
        .collect();
    let out = r.display(&routes, &[]).to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains("ROUTE") && lines[0].contains("PREDICATES"),
        "{out}"
    );
    assert!(lines[1].contains("users"), "{out}");
    assert!(lines[1].contains("api.example.com,*.example.com"), "{out}");
    assert!(lines[1].contains("GET,HEAD"), "{out}");
    // Route 0's upstream 0 is not in the (empty) list.
    assert!(lines[1].contains("upstream ?"), "{out}");
    assert!(lines[1].contains("template /users/{id}"), "{out}");
    assert!(
        lines[1].contains(r#"header x-tenant = "acme", query debug absent"#),
        "{out}"
    );
    assert!(
        lines[2].contains("catch-all") && lines[2].contains("any"),
        "{out}"
    );
}
