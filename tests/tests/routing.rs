//! Routing through the real gateway binary: host, path, template, method,
//! header and query predicates, precedence, rewrite and strip_prefix,
//! 404/405 problem+json, path normalization, and `gateway routes`.
//!
//! Every route sets an `x-route` response header, so a test can see which
//! route answered whatever the upstream.

use gateway_tests::backend::Backend;
use gateway_tests::client::{self, Reply};
use gateway_tests::free_port;
use gateway_tests::gateway::{Gateway, run_cli};
use http::Request;
use http_body_util::Full;

struct Env {
    _gw: Gateway,
    base: String,
    listen: String,
    _a: Backend,
    _b: Backend,
}

const ROUTES: &str = r#"
[[routes]]
name = "api-host"
upstream = "a"
response_headers.set = { "x-route" = "api-host" }
[routes.match]
hosts = ["api.example.com"]
path_prefix = "/"

[[routes]]
name = "wild-host"
upstream = "a"
response_headers.set = { "x-route" = "wild-host" }
[routes.match]
hosts = ["*.example.com"]
path_prefix = "/"

[[routes]]
name = "user"
upstream = "b"
rewrite = "/v2/users/{id}"
response_headers.set = { "x-route" = "user" }
[routes.match]
path = "/users/{id}"
methods = ["GET"]

[[routes]]
name = "user-edit"
upstream = "b"
response_headers.set = { "x-route" = "user-edit" }
[routes.match]
path = "/users/{id}"
methods = ["DELETE", "PUT"]

[[routes]]
name = "files"
upstream = "a"
rewrite = "/static/{path}"
response_headers.set = { "x-route" = "files" }
[routes.match]
path = "/files/{path...}"

[[routes]]
name = "api"
upstream = "a"
strip_prefix = "/api"
response_headers.set = { "x-route" = "api" }
[routes.match]
path_prefix = "/api/"

[[routes]]
name = "api-beta"
upstream = "b"
response_headers.set = { "x-route" = "api-beta" }
[routes.match]
path_prefix = "/api/"
headers = [{ name = "X-Beta", present = true }]

[[routes]]
name = "api-health"
response_headers.set = { "x-route" = "api-health" }
respond = { status = 200, body = "ok" }
[routes.match]
path = "/api/health"

[[routes]]
name = "public"
upstream = "a"
response_headers.set = { "x-route" = "public" }
[routes.match]
path = "/public"

[[routes]]
name = "admin"
upstream = "a"
response_headers.set = { "x-route" = "admin" }
[routes.match]
path = "/admin"

[[routes]]
name = "search"
upstream = "a"
response_headers.set = { "x-route" = "search" }
[routes.match]
path = "/search"

[[routes]]
name = "search-json"
upstream = "a"
response_headers.set = { "x-route" = "search-json" }
[routes.match]
path = "/search"
query = [{ name = "format", value = "json" }]

[[routes]]
name = "versioned"
upstream = "a"
response_headers.set = { "x-route" = "versioned" }
[routes.match]
path = "/ver"
headers = [{ name = "x-version", regex = "v[0-9]+" }]
"#;

const REDIRECTS: &str = r#"
[[routes]]
name = "to-https"
response_headers.set = { "x-route" = "to-https" }
[routes.match]
path_prefix = "/secure/"
[routes.redirect]
scheme = "https"

[[routes]]
name = "moved"
strip_prefix = "/old"
[routes.match]
path_prefix = "/old/"
[routes.redirect]
host = "new.example.com"
port = 8443
status = 308
strip_query = true

[[routes]]
name = "renamed"
rewrite = "/v2/things/{id}"
[routes.match]
path = "/things/{id}"
[routes.redirect]
status = 302
"#;

async fn start() -> Env {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
[server]
workers = 1
watch_config = false
[admin]
listen = "{admin}"
[access_log]
enabled = false
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
[[upstreams]]
name = "a"
targets = ["{a}"]
[[upstreams]]
name = "b"
targets = ["{b}"]
{ROUTES}{REDIRECTS}"#,
        a = a.addr,
        b = b.addr,
    );
    let gw = Gateway::start(&config, &admin);
    Env {
        _gw: gw,
        base: format!("http://127.0.0.1:{port}"),
        listen: format!("127.0.0.1:{port}"),
        _a: a,
        _b: b,
    }
}

impl Env {
    /// Sends `method target` with extra headers over HTTP/1.1.
    async fn send(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{target}", self.base));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        client::send(
            &client::http1(),
            req.body(Full::default()).expect("request"),
        )
        .await
    }

    async fn get(&self, target: &str) -> Reply {
        self.send("GET", target, &[]).await
    }

    /// The route that answered `GET target` with these headers.
    async fn route(&self, target: &str, headers: &[(&str, &str)]) -> String {
        let r = self.send("GET", target, headers).await;
        assert_eq!(r.status, 200, "GET {target}: {}", r.text());
        r.header("x-route").unwrap_or("<none>").to_string()
    }

    /// Sends a raw request line (for paths a client would clean up itself)
    /// and returns (status, x-route, the path the backend saw).
    async fn raw(&self, target: &str) -> (u16, Option<String>, Option<String>) {
        let listen = self.listen.clone();
        let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let resp = tokio::task::spawn_blocking(move || client::raw(&listen, &request))
            .await
            .expect("raw client");
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status for {target}: {resp:?}"));
        let route = head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("x-route")
                .then(|| v.trim().to_string())
        });
        let path = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["path"].as_str().map(str::to_string));
        (status, route, path)
    }
}

fn assert_problem(r: &Reply, status: u16) -> serde_json::Value {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let p = r.json();
    assert_eq!(p["status"], status);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_exact_and_wildcard_outrank_paths() {
    let env = start().await;
    let host = |h: &'static str| [("host", h)];
    assert_eq!(
        env.route("/users/1", &host("api.example.com")).await,
        "api-host"
    );
    assert_eq!(
        env.route("/users/1", &host("API.example.com:80")).await,
        "api-host"
    );
    assert_eq!(
        env.route("/users/1", &host("www.example.com")).await,
        "wild-host"
    );
    assert_eq!(env.route("/x", &host("a.b.example.com")).await, "wild-host");
    // The wildcard needs at least one label before the suffix.
    assert_eq!(env.route("/users/1", &host("example.com")).await, "user");
    let r = env.send("GET", "/x", &host("example.com")).await;
    assert_problem(&r, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_templates_and_rewrites() {
    let env = start().await;
    // Template + rewrite.
    let r = env.get("/users/42").await;
    assert_eq!(r.header("x-route"), Some("user"));
    assert_eq!(r.header("x-backend"), Some("b"));
    assert_eq!(r.json()["path"], "/v2/users/42");
    // `{path...}` takes the rest.
    let r = env.get("/files/css/site.css?v=3").await;
    assert_eq!(r.header("x-route"), Some("files"));
    assert_eq!(r.json()["path"], "/static/css/site.css");
    assert_eq!(r.json()["query"], "v=3");
    // A segment prefix strips on the boundary and matches without the slash.
    let r = env.get("/api/things/1").await;
    assert_eq!(r.header("x-route"), Some("api"));
    assert_eq!(r.json()["path"], "/things/1");
    let r = env.get("/api").await;
    assert_eq!(r.header("x-route"), Some("api"));
    assert_eq!(r.json()["path"], "/");
    assert_problem(&env.get("/apix").await, 404);
    // Exact beats prefix.
    let r = env.get("/api/health").await;
    assert_eq!(r.header("x-route"), Some("api-health"));
    assert_eq!(r.text(), "ok");
    // A template needs exactly one non-empty segment.
    assert_problem(&env.get("/users/1/2").await, 404);
    assert_problem(&env.get("/users/").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_headers_and_query() {
    let env = start().await;
    let r = env.send("DELETE", "/users/7", &[]).await;
    assert_eq!(r.header("x-route"), Some("user-edit"));
    assert_eq!(r.json()["method"], "DELETE");
    // More predicates win: the header picks the beta route.
    assert_eq!(env.route("/api/x", &[("x-beta", "1")]).await, "api-beta");
    assert_eq!(env.route("/api/x", &[("X-BETA", "")]).await, "api-beta");
    assert_eq!(env.route("/api/x", &[]).await, "api");
    // Regex is a full match.
    assert_eq!(
        env.route("/ver", &[("x-version", "v12")]).await,
        "versioned"
    );
    let r = env.send("GET", "/ver", &[("x-version", "v12-rc1")]).await;
    assert_problem(&r, 404);
    // Query values are percent-decoded.
    assert_eq!(env.route("/search?format=json", &[]).await, "search-json");
    assert_eq!(
        env.route("/search?q=a&format=%6Ason", &[]).await,
        "search-json"
    );
    assert_eq!(env.route("/search?format=xml", &[]).await, "search");
    assert_eq!(env.route("/search", &[]).await, "search");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_and_method_not_allowed_are_problem_json() {
    let env = start().await;
    let p = assert_problem(&env.get("/nothing/here").await, 404);
    assert!(
        p["detail"].as_str().unwrap_or("").contains("/nothing/here"),
        "{p}"
    );
    let r = env.send("PATCH", "/users/7", &[]).await;
    assert_problem(&r, 405);
    assert_eq!(
        r.header("allow"),
        Some("GET, PUT, DELETE"),
        "union of the matching routes' methods"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normalized_paths_hit_the_route_they_name() {
    let env = start().await;
    for (target, route, seen) in [
        ("/admin/../public", "public", "/public"),
        ("/%61dmin", "admin", "/admin"),
        ("//admin", "admin", "/admin"),
        ("/x/../public", "public", "/public"),
        ("/api/../admin", "admin", "/admin"),
        ("/./admin", "admin", "/admin"),
        ("/x/%2E%2e/admin", "admin", "/admin"),
    ] {
        let (status, r, path) = env.raw(target).await;
        assert_eq!(status, 200, "{target}");
        assert_eq!(r.as_deref(), Some(route), "{target}");
        assert_eq!(
            path.as_deref(),
            Some(seen),
            "{target}: the upstream sees the normalized path"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_are_rejected() {
    let env = start().await;
    for target in [
        "/%2e%2e/x",
        "/..",
        "/../admin",
        "/api/../../admin",
        "/admin%2Fx",
        "/api%2f..%2fadmin",
        "/admin%5C",
        "/admin%00",
        "/%zz",
        "/admin%",
        "/public/..;/admin",
        "/;x/admin",
    ] {
        let (status, route, _) = env.raw(target).await;
        assert_eq!(status, 400, "{target}");
        assert_eq!(route, None, "{target}");
    }
    // And through a real client: 400 is problem+json.
    let r = env.get("/a%2Fb").await;
    let p = assert_problem(&r, 400);
    assert!(
        p["detail"].as_str().unwrap_or("").contains("encoded slash"),
        "{p}"
    );
}

#[test]
fn routes_command_lists_precedence_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    let config = format!(
        r#"
[[listeners]]
name = "main"
listen = "127.0.0.1:{}"
[[upstreams]]
name = "a"
targets = ["127.0.0.1:1"]
[[upstreams]]
name = "b"
targets = ["127.0.0.1:2"]
{ROUTES}{REDIRECTS}"#,
        free_port()
    );
    std::fs::write(&path, config).expect("write config");
    let (code, out, err) = run_cli(&["routes", "-c", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "{err}");
    let order: Vec<&str> = out
        .lines()
        .skip(2) // listener line, column headings
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        order,
        [
            "api-host",
            "wild-host",
            "search-json",
            "versioned",
            "api-health",
            "public",
            "admin",
            "search",
            "user",
            "user-edit",
            "renamed",
            "files",
            "to-https",
            "api-beta",
            "api",
            "moved",
        ],
        "{out}"
    );
    assert!(out.contains("template /users/{id}"), "{out}");
    assert!(out.contains("header x-beta present"), "{out}");
    // Where each goes.
    let row = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} row: {out}"))
            .to_string()
    };
    assert!(row("user").contains("upstream b"), "{out}");
    assert!(row("to-https").contains("redirect 301"), "{out}");
}

#[test]
fn bad_routes_are_reported_with_locations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    let config = r#"[[upstreams]]
name = "a"
targets = ["127.0.0.1:1"]
[[routes]]
name = "bad"
upstream = "a"
rewrite = "/v2/{user}"
[routes.match]
path = "/users/{id}/{id}"
[[routes]]
name = "bad2"
upstream = "a"
rewrite = "/v2/{user}"
[routes.match]
path = "/users/{id}"
[[routes]]
name = "bad3"
upstream = "a"
[routes.match]
hosts = ["a.*.com"]
headers = [{ name = "x", regex = "(" }]
"#;
    std::fs::write(&path, config).expect("write config");
    let (code, out, _) = run_cli(&["check", "-c", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 2, "{out}");
    let p = path.display();
    for want in [
        format!("{p}:9:8: duplicate parameter name \"id\""),
        format!("{p}:13:11: rewrite \"/v2/{{user}}\" uses {{user}}"),
        format!("{p}:20:10: invalid host pattern \"a.*.com\""),
        format!("{p}:21:34: invalid regex \"(\""),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_keep_what_they_do_not_replace() {
    let env = start().await;
    for (target, host, status, location) in [
        // To HTTPS: the request's host without its port, path and query.
        (
            "/secure/a?x=1",
            "shop.example.net:8080",
            301,
            "https://shop.example.net/secure/a?x=1",
        ),
        // The normalized path (the one the route matched).
        (
            "/secure/b/../c",
            "shop.example.net",
            301,
            "https://shop.example.net/secure/c",
        ),
        // Another host and port, strip_prefix, no query, 308.
        (
            "/old/b/c?q=2",
            "x:8080",
            308,
            "http://new.example.com:8443/b/c",
        ),
        // Same scheme and host: the request's port stays; rewrite applies.
        (
            "/things/42?z=1",
            "h:9000",
            302,
            "http://h:9000/v2/things/42?z=1",
        ),
    ] {
        let r = env.send("GET", target, &[("host", host)]).await;
        assert_eq!(r.status.as_u16(), status, "{target}: {}", r.text());
        assert_eq!(r.header("location"), Some(location), "{target}");
        assert_eq!(r.header("content-length"), Some("0"), "{target}");
    }
    // Route response headers apply to the redirect too.
    let r = env.send("GET", "/secure/x", &[("host", "a.test")]).await;
    assert_eq!(r.header("x-route"), Some("to-https"));
}
