//! CORS through the real gateway: preflights answered without the upstream
//! (allowed and refused), actual requests with and without an allowed
//! origin, CORS headers on error responses, and the global `[cors]` versus a
//! route's own.

use bytes::Bytes;
use gateway_tests::backend::Backend;
use gateway_tests::client::{self, Reply};
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use http::{Method, Request};
use http_body_util::Full;

struct Env {
    _gw: Gateway,
    base: String,
}

fn start(b: &Backend) -> Env {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let dead = free_port();
    let config = format!(
        r#"
[server]
workers = 2
watch_config = false
[access_log]
enabled = false
[admin]
listen = "{admin}"
[cors]
allow_origins = ["*"]
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
[[upstreams]]
name = "one"
targets = ["{b}"]
[[upstreams]]
name = "dead"
targets = ["127.0.0.1:{dead}"]
[[routes]]
name = "api"
upstream = "one"
[routes.match]
path_prefix = "/api/"
methods = ["GET", "PUT"]
[routes.cors]
allow_origins = ["https://app.example.com", "https://*.example.org"]
allow_methods = ["GET", "PUT"]
allow_headers = ["content-type", "x-token"]
expose_headers = ["x-backend"]
allow_credentials = true
max_age = "10m"
[[routes]]
name = "dead"
upstream = "dead"
[routes.match]
path_prefix = "/dead/"
[routes.cors]
allow_origins = ["https://app.example.com"]
[[routes]]
name = "walled"
upstream = "one"
[routes.match]
path_prefix = "/walled/"
[routes.access]
allow = ["10.0.0.0/8"]
[routes.cors]
allow_origins = ["https://app.example.com"]
[[routes]]
name = "public"
upstream = "one"
[routes.match]
path_prefix = "/"
"#,
        b = b.addr,
    );
    let gw = Gateway::start(&config, &admin);
    Env {
        _gw: gw,
        base: format!("http://127.0.0.1:{port}"),
    }
}

async fn send(method: Method, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    client::send(
        &client::http1(),
        req.body(Full::<Bytes>::default()).unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_is_answered_by_the_gateway() {
    let b = Backend::start("one").await;
    let env = start(&b);
    let r = send(
        Method::OPTIONS,
        &format!("{}/api/items", env.base),
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "Content-Type, X-Token"),
        ],
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type, x-token")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert!(r.header("vary").is_some_and(|v| v.contains("Origin")));
    // A pattern origin.
    let r = send(
        Method::OPTIONS,
        &format!("{}/api/items", env.base),
        &[
            ("origin", "https://shop.eu.example.org"),
            ("access-control-request-method", "GET"),
        ],
    )
    .await;
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.eu.example.org")
    );
    assert_eq!(b.hits(), 0, "preflights never reach the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_preflights_get_no_cors_headers() {
    let b = Backend::start("one").await;
    let env = start(&b);
    for (origin, method, headers) in [
        ("https://evil.example.com", "PUT", "x-token"),
        ("https://example.org", "GET", ""),
        ("https://app.example.com", "DELETE", ""),
        ("https://app.example.com", "PUT", "x-secret"),
    ] {
        let mut h = vec![
            ("origin", origin),
            ("access-control-request-method", method),
        ];
        if !headers.is_empty() {
            h.push(("access-control-request-headers", headers));
        }
        let r = send(Method::OPTIONS, &format!("{}/api/items", env.base), &h).await;
        assert_eq!(r.status, 204, "{origin} {method}");
        for name in [
            "access-control-allow-origin",
            "access-control-allow-methods",
            "access-control-allow-credentials",
        ] {
            assert!(
                r.header(name).is_none(),
                "{origin} {method} {headers}: {name}"
            );
        }
    }
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actual_requests_get_cors_headers_only_for_allowed_origins() {
    let b = Backend::start("one").await;
    let env = start(&b);
    let url = format!("{}/api/items", env.base);
    let r = send(Method::GET, &url, &[("origin", "https://app.example.com")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("access-control-expose-headers"), Some("x-backend"));
    assert!(r.header("vary").is_some_and(|v| v.contains("Origin")));

    let r = send(Method::GET, &url, &[("origin", "https://evil.example.com")]).await;
    assert_eq!(
        r.status, 200,
        "the gateway does not block; the browser does"
    );
    assert!(r.header("access-control-allow-origin").is_none());
    assert!(r.header("access-control-allow-credentials").is_none());

    assert!(
        r.header("vary").is_some_and(|v| v.contains("Origin")),
        "a cache must not serve this answer to another origin"
    );

    // The route's CORS is the gateway's: an upstream reflecting every
    // origin with credentials does not widen it.
    let r = send(
        Method::GET,
        &url,
        &[
            ("origin", "https://evil.example.com"),
            (
                "x-respond-header",
                "access-control-allow-origin=https://evil.example.com",
            ),
            ("x-respond-header", "access-control-allow-credentials=true"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header("access-control-allow-origin").is_none());
    assert!(r.header("access-control-allow-credentials").is_none());

    let r = send(Method::GET, &url, &[]).await;
    assert!(r.header("access-control-allow-origin").is_none());
    // A plain OPTIONS (not a preflight) is routed as usual: to the
    // catch-all route and its upstream here.
    let r = send(
        Method::OPTIONS,
        &url,
        &[("origin", "https://app.example.com")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "OPTIONS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_responses_carry_cors_headers() {
    let b = Backend::start("one").await;
    let env = start(&b);
    let r = send(
        Method::GET,
        &format!("{}/dead/x", env.base),
        &[("origin", "https://app.example.com")],
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    // So does a route's access refusal, the first step of phase 4.
    let r = send(
        Method::GET,
        &format!("{}/walled/x", env.base),
        &[("origin", "https://app.example.com")],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_cors_applies_where_a_route_has_none() {
    let b = Backend::start("one").await;
    let env = start(&b);
    let r = send(
        Method::GET,
        &format!("{}/anything", env.base),
        &[("origin", "https://whoever.test")],
    )
    .await;
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(r.header("access-control-allow-credentials").is_none());
    let r = send(
        Method::GET,
        &format!("{}/anything", env.base),
        &[
            ("origin", "https://whoever.test"),
            ("x-respond-header", "access-control-allow-credentials=true"),
        ],
    )
    .await;
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(
        r.header("access-control-allow-credentials").is_none(),
        "an upstream's credentials flag does not survive a `*` policy"
    );
    let r = send(
        Method::OPTIONS,
        &format!("{}/anything", env.base),
        &[
            ("origin", "https://whoever.test"),
            ("access-control-request-method", "POST"),
        ],
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, HEAD, POST")
    );
    assert_eq!(b.hits(), 2, "the preflight did not reach the upstream");
}
