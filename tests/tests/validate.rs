//! Request and response validation through the real gateway: every failure
//! kind (content type, required/typed/patterned headers and query
//! parameters, body too large, not JSON, schema violations with JSON
//! pointers), a valid body reaching the upstream intact, and response
//! validation in log and reject modes.

use bytes::Bytes;
use gateway_tests::backend::Backend;
use gateway_tests::client::{self, Reply};
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use http::{Method, Request};
use http_body_util::Full;

struct Env {
    gw: Gateway,
    base: String,
}

const ORDER_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["item", "qty"],
  "properties": {
    "item": {"type": "string", "minLength": 1},
    "qty": {"type": "integer", "minimum": 1},
    "tags": {"type": "array", "items": {"type": "string"}}
  },
  "additionalProperties": false
}"#;

fn start(b: &Backend) -> Env {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("order.json");
    std::fs::write(&schema_path, ORDER_SCHEMA).unwrap();
    let config = format!(
        r#"
[server]
workers = 2
watch_config = false
[access_log]
enabled = false
[admin]
listen = "{admin}"
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
[[upstreams]]
name = "one"
targets = ["{b}"]
[[routes]]
name = "orders"
upstream = "one"
[routes.match]
path_prefix = "/orders"
[routes.validate]
content_types = ["application/json"]
schema_file = "{schema}"
max_body_bytes = 256
[[routes.validate.headers]]
name = "x-tenant"
required = true
pattern = "[a-z]+"
[[routes.validate.headers]]
name = "x-trace"
type = "uuid"
[[routes.validate.query]]
name = "limit"
type = "integer"
[[routes.validate.query]]
name = "dry_run"
required = true
type = "boolean"
[[routes.routes_placeholder]]
"#,
        b = b.addr,
        schema = schema_path.display(),
    )
    .replace("[[routes.routes_placeholder]]\n", RESPONSE_ROUTES);
    let gw = Gateway::start(&config, &admin);
    // The schema file is read at load; the directory may go now.
    drop(dir);
    Env {
        gw,
        base: format!("http://127.0.0.1:{port}"),
    }
}

const RESPONSE_ROUTES: &str = r#"
[[routes]]
name = "resp-log"
upstream = "one"
[routes.match]
path_prefix = "/resp-log/"
[routes.validate.response]
schema = '{"type": "object", "required": ["nope"]}'
[[routes]]
name = "resp-reject"
upstream = "one"
strip_prefix = "/resp-reject"
[routes.match]
path_prefix = "/resp-reject/"
[routes.validate.response]
schema = '{"type": "object", "required": ["nope"]}'
on_violation = "reject"
[[routes]]
name = "resp-ok"
upstream = "one"
[routes.match]
path_prefix = "/resp-ok/"
[routes.validate.response]
schema = '{"type": "object", "required": ["backend", "path"]}'
on_violation = "reject"
[[routes]]
name = "small"
upstream = "one"
max_body_bytes = 64
[routes.match]
path_prefix = "/small"
[routes.validate]
schema = '{"type": "object"}'
[[routes]]
name = "slow-body"
upstream = "one"
[routes.match]
path_prefix = "/slow-body"
[routes.validate]
schema = '{"type": "object"}'
body_timeout = "300ms"
[[routes.validate.query]]
name = "price"
type = "number"
"#;

async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    client::send(
        &client::http1(),
        req.body(Full::new(Bytes::from(body.to_string()))).unwrap(),
    )
    .await
}

const GOOD_HEADERS: &[(&str, &str)] = &[
    ("content-type", "application/json; charset=utf-8"),
    ("x-tenant", "acme"),
    ("x-trace", "123e4567-e89b-12d3-a456-426614174000"),
];

fn errors(r: &Reply) -> Vec<serde_json::Value> {
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    r.json()["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors member: {}", r.text()))
        .clone()
}

fn has(errors: &[serde_json::Value], location: &str, pointer: &str) -> bool {
    errors
        .iter()
        .any(|e| e["in"] == location && e["pointer"] == pointer && e["message"].is_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_request_reaches_the_upstream_with_its_body() {
    let b = Backend::start("one").await;
    let env = start(&b);
    let body = r#"{"item": "book", "qty": 2, "tags": ["a"]}"#;
    let r = send(
        Method::POST,
        &format!("{}/orders?dry_run=false&limit=5", env.base),
        GOOD_HEADERS,
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], body.len());
    // A request without a body skips the content-type and schema checks.
    let r = send(
        Method::GET,
        &format!("{}/orders?dry_run=true", env.base),
        &GOOD_HEADERS[1..],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_query_and_content_type_violations_are_listed_together() {
    let b = Backend::start("one").await;
    let env = start(&b);
    let r = send(
        Method::POST,
        &format!("{}/orders?limit=ten", env.base),
        &[("content-type", "text/plain"), ("x-trace", "not-a-uuid")],
        "{}",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = errors(&r);
    assert_eq!(e.len(), 5, "{e:?}");
    assert!(has(&e, "header", "/headers/content-type"), "{e:?}");
    assert!(has(&e, "header", "/headers/x-tenant"), "missing: {e:?}");
    assert!(has(&e, "header", "/headers/x-trace"), "type: {e:?}");
    assert!(has(&e, "query", "/query/limit"), "type: {e:?}");
    assert!(has(&e, "query", "/query/dry_run"), "missing: {e:?}");

    // Pattern and boolean type.
    let r = send(
        Method::GET,
        &format!("{}/orders?dry_run=maybe", env.base),
        &[("x-tenant", "ACME")],
        "",
    )
    .await;
    assert_eq!(r.status, 400);
    let e = errors(&r);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0]["message"].as_str().unwrap().contains("does not match"),
        "{e:?}"
    );
    assert!(has(&e, "query", "/query/dry_run"));

    // A copy that does not decode is not skipped beside a valid one.
    let r = send(
        Method::GET,
        &format!(
            "{}/orders?dry_run=true&limit=5&limit=1%20OR%201%FF",
            env.base
        ),
        &GOOD_HEADERS[1..],
        "",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = errors(&r);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(has(&e, "query", "/query/limit"), "{e:?}");

    // Two content types: which one counts is the upstream parser's guess.
    let r = send(
        Method::POST,
        &format!("{}/orders?dry_run=true", env.base),
        &[
            ("content-type", "application/json"),
            ("content-type", "text/xml"),
            ("x-tenant", "acme"),
        ],
        r#"{"item": "book", "qty": 2}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = errors(&r);
    assert!(has(&e, "header", "/headers/content-type"), "{e:?}");
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_violations() {
    let b = Backend::start("one").await;
    let env = start(&b);
    let url = format!("{}/orders?dry_run=true", env.base);
    // Schema violations: 422 with every violation and its pointer.
    let r = send(
        Method::POST,
        &url,
        GOOD_HEADERS,
        r#"{"qty": 0, "tags": ["ok", 7], "extra": true}"#,
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    let e = errors(&r);
    assert!(
        has(&e, "body", ""),
        "required item / additionalProperties: {e:?}"
    );
    assert!(has(&e, "body", "/qty"), "{e:?}");
    assert!(has(&e, "body", "/tags/1"), "{e:?}");
    assert!(e.len() >= 4, "{e:?}");
    // No body where one is expected: 400.
    let r = send(Method::POST, &url, GOOD_HEADERS, "").await;
    assert_eq!(r.status, 400);
    assert!(
        errors(&r)[0]["message"]
            .as_str()
            .unwrap()
            .contains("required")
    );
    // Not JSON: 400.
    let r = send(Method::POST, &url, GOOD_HEADERS, "{not json").await;
    assert_eq!(r.status, 400);
    let e = errors(&r);
    assert!(e[0]["message"].as_str().unwrap().contains("not valid JSON"));
    // Duplicate keys: which copy an upstream reads is its parser's choice.
    let r = send(
        Method::POST,
        &url,
        GOOD_HEADERS,
        r#"{"item": "book", "qty": 1, "qty": 0}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = errors(&r);
    assert!(
        e[0]["message"]
            .as_str()
            .unwrap()
            .contains("duplicate key \"qty\""),
        "{e:?}"
    );
    // Over the size limit: 413.
    let big = format!(r#"{{"item": "{}", "qty": 1}}"#, "x".repeat(400));
    let r = send(Method::POST, &url, GOOD_HEADERS, &big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_validation_logs_or_rejects() {
    let b = Backend::start("one").await;
    let env = start(&b);
    // log: passed on, logged and counted.
    let r = send(Method::GET, &format!("{}/resp-log/x", env.base), &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/resp-log/x", "body passed on intact");
    // reject: 502 problem+json.
    let r = send(Method::GET, &format!("{}/resp-reject/x", env.base), &[], "").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(
        r.json()["request_id"].as_str(),
        r.header("x-request-id"),
        "the replacement carries the request id"
    );
    // A conforming response passes.
    let r = send(Method::GET, &format!("{}/resp-ok/x", env.base), &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["backend"], "one");
    // Errors from upstream are not checked.
    let r = send(
        Method::GET,
        &format!("{}/resp-reject/status/404", env.base),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    // Responses without a body to check pass: HEAD, 204, and bodies in a
    // content coding only the client decodes.
    let r = send(Method::HEAD, &format!("{}/resp-ok/x", env.base), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        Method::GET,
        &format!("{}/resp-reject/status/204", env.base),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = send(
        Method::GET,
        &format!("{}/resp-reject/x", env.base),
        &[("x-respond-header", "content-encoding=gzip")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = gateway_tests::client::raw(
        &env.gw.admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        m.contains("gateway_response_validation_failures_total{route=\"resp-log\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("gateway_response_validation_failures_total{route=\"resp-reject\"}"),
        "{m}"
    );
    assert!(
        env.gw
            .stderr()
            .contains("upstream response violates its schema")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schemas_are_config_problems() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.toml");
    std::fs::write(
        &path,
        r#"[[upstreams]]
name = "u"
targets = ["127.0.0.1:1"]
[[routes]]
name = "r"
upstream = "u"
[routes.validate]
schema = '{"type": 12}'
content_types = ["json"]
[[routes.validate.query]]
name = "q"
pattern = "("
"#,
    )
    .unwrap();
    let (code, out, _) = gateway_tests::gateway::run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("g.toml:8:10: invalid JSON Schema"), "{out}");
    assert!(
        out.contains("g.toml:9:18: invalid media type \"json\""),
        "{out}"
    );
    assert!(out.contains("g.toml:12:11: invalid pattern"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn number_parameters_and_a_body_that_never_arrives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("one").await;
    let env = start(&b);
    for (price, ok) in [
        ("12.5", true),
        ("-3e2", true),
        ("7", true),
        ("NaN", false),
        ("inf", false),
        ("1.2.3", false),
    ] {
        let r = send(
            Method::POST,
            &format!("{}/slow-body?price={price}", env.base),
            &[("content-type", "application/json")],
            "{}",
        )
        .await;
        if ok {
            assert_eq!(r.status, 200, "{price}: {}", r.text());
        } else {
            assert_eq!(r.status, 400, "{price}: {}", r.text());
            assert!(has(&errors(&r), "query", "/query/price"), "{price}");
        }
    }
    // A body announced and not sent: 408 problem+json after body_timeout,
    // and the upstream never sees the request.
    let hits = b.hits();
    let addr = env.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /slow-body HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"a\":",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(read.is_ok(), "no answer within 5 s: {text}");
    let took = started.elapsed();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("application/problem+json"), "{text}");
    assert!(
        took >= std::time::Duration::from_millis(250) && took < std::time::Duration::from_secs(3),
        "answered after {took:?}"
    );
    assert_eq!(b.hits(), hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_body_limit_holds_for_validated_bodies_without_a_length() {
    let b = Backend::start("one").await;
    let env = start(&b);
    let addr = env.base.trim_start_matches("http://");
    let doc = format!("{{\"pad\": \"{}\"}}", "x".repeat(500));
    let raw = format!(
        "POST /small HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{doc}\r\n0\r\n\r\n",
        doc.len()
    );
    let resp = gateway_tests::client::raw(addr, &raw);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("application/problem+json"), "{resp}");
    assert_eq!(
        b.hits(),
        0,
        "nothing over the route's limit reaches the upstream"
    );
    // Within the limit, it passes.
    let r = send(
        Method::POST,
        &format!("{}/small", env.base),
        &[("content-type", "application/json")],
        "{\"a\": 1}",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
