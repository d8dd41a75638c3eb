//! Rate limits through the real gateway: GCRA windows and their headers,
//! 429 problem+json, keys (IP, route, header), several windows at once,
//! quotas, concurrency, state kept across reloads; and Redis-shared limits
//! with a real redis-server: two gateways share one limit, an outage falls
//! back as configured, and the gateways recover when Redis returns.
//!
//! Limits that step 4c decides: keyed by consumer or by API key on routes
//! that authenticate, and consumers' own limits (one budget across routes).

use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_tests::backend::Backend;
use gateway_tests::client::{self, Reply};
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use gateway_tests::redis::Redis;
use http::Request;
use http_body_util::Full;
use sha2::{Digest, Sha256};

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Consumer `cust-7` with two API keys (`k7-a`, `k7-b`), consumer `gold`
/// with key `kg` and its own limit of 3 an hour, and consumer `cust-8`.
fn consumers() -> String {
    format!(
        r#"
[[consumers]]
name = "cust-7"
api_keys = ["sha256:{a}", "sha256:{b}"]
[[consumers]]
name = "cust-8"
api_keys = ["sha256:{c}"]
[[consumers]]
name = "gold"
api_keys = ["sha256:{g}"]
[consumers.rate_limit]
limits = [{{ requests = 3, per = "1h" }}]
"#,
        a = sha256_hex("k7-a"),
        b = sha256_hex("k7-b"),
        c = sha256_hex("k8"),
        g = sha256_hex("kg"),
    )
}

struct Env {
    gw: Gateway,
    base: String,
}

fn config(b: &Backend, port: u16, admin: &str, top: &str, routes: &str) -> String {
    format!(
        r#"
[server]
workers = 2
watch_config = false
[access_log]
enabled = false
[admin]
listen = "{admin}"
{top}
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
[[upstreams]]
name = "one"
targets = ["{b}"]
{routes}
[[routes]]
name = "open"
upstream = "one"
[routes.match]
path_prefix = "/"
"#,
        b = b.addr,
    )
}

fn start_with(b: &Backend, top: &str, routes: &str) -> Env {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&config(b, port, &admin, top, routes), &admin);
    Env {
        gw,
        base: format!("http://127.0.0.1:{port}"),
    }
}

fn start(b: &Backend, routes: &str) -> Env {
    start_with(b, "", routes)
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    client::send(
        &client::http1(),
        req.body(Full::<Bytes>::default()).unwrap(),
    )
    .await
}

fn num(r: &Reply, name: &str) -> u64 {
    r.header(name)
        .unwrap_or_else(|| panic!("no {name} header: {:?}", r.headers))
        .parse()
        .unwrap()
}

fn metrics(gw: &Gateway) -> String {
    gateway_tests::client::raw(
        &gw.admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_headers_then_429_problem_with_retry_after() {
    let b = Backend::start("one").await;
    let env = start(
        &b,
        r#"
[[routes]]
name = "limited"
upstream = "one"
[routes.match]
path_prefix = "/limited/"
[routes.rate_limit]
limits = [{ requests = 3, per = "1m" }]
"#,
    );
    let url = format!("{}/limited/x", env.base);
    for left in [2, 1, 0] {
        let r = get(&url, &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(num(&r, "ratelimit-limit"), 3);
        assert_eq!(num(&r, "ratelimit-remaining"), left);
        let reset = num(&r, "ratelimit-reset");
        assert!((1..=60).contains(&reset), "reset {reset}");
    }
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let p = r.json();
    assert_eq!(p["status"], 429);
    assert!(p["detail"].as_str().unwrap().contains("rate limit"), "{p}");
    let retry = num(&r, "retry-after");
    assert!((15..=20).contains(&retry), "one request per 20 s: {retry}");
    assert_eq!(num(&r, "ratelimit-remaining"), 0);
    assert_eq!(num(&r, "ratelimit-limit"), 3);
    assert_eq!(b.hits(), 3, "refused requests never reach the upstream");
    // Unlimited routes carry no RateLimit headers.
    let r = get(&format!("{}/free", env.base), &[]).await;
    assert!(r.header("ratelimit-limit").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_by_header_and_by_route() {
    let b = Backend::start("one").await;
    let env = start(
        &b,
        r#"
[[routes]]
name = "per-key"
upstream = "one"
[routes.match]
path_prefix = "/per-key/"
[routes.rate_limit]
key = "header:x-api-key"
limits = [{ requests = 2, per = "1h" }]
[[routes]]
name = "per-route"
upstream = "one"
[routes.match]
path_prefix = "/per-route/"
[routes.rate_limit]
key = "route"
limits = [{ requests = 2, per = "1h" }]
"#,
    );
    let url = format!("{}/per-key/x", env.base);
    for _ in 0..2 {
        assert_eq!(get(&url, &[("x-api-key", "alice")]).await.status, 200);
    }
    assert_eq!(get(&url, &[("x-api-key", "alice")]).await.status, 429);
    assert_eq!(get(&url, &[("x-api-key", "bob")]).await.status, 200);
    // Without the header the client IP is the key.
    assert_eq!(get(&url, &[]).await.status, 200);

    let url = format!("{}/per-route/x", env.base);
    assert_eq!(get(&url, &[("x-api-key", "a")]).await.status, 200);
    assert_eq!(get(&url, &[("x-api-key", "b")]).await.status, 200);
    assert_eq!(get(&url, &[("x-api-key", "c")]).await.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_must_admit() {
    let b = Backend::start("one").await;
    let env = start(
        &b,
        r#"
[[routes]]
name = "two-windows"
upstream = "one"
[routes.match]
path_prefix = "/w/"
[routes.rate_limit]
limits = [{ requests = 2, per = "2s" }, { requests = 3, per = "1h" }]
"#,
    );
    let url = format!("{}/w/x", env.base);
    assert_eq!(get(&url, &[]).await.status, 200);
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        num(&r, "ratelimit-remaining"),
        0,
        "the 2 s window is closest"
    );
    assert_eq!(num(&r, "ratelimit-limit"), 2);
    // Refused by the short window (which spends nothing hourly); it earns
    // a request back each second, so these must come quickly.
    for _ in 0..2 {
        assert_eq!(get(&url, &[]).await.status, 429);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 200, "third of the hourly three");
    assert_eq!(num(&r, "ratelimit-remaining"), 0);
    assert_eq!(
        num(&r, "ratelimit-limit"),
        3,
        "now the hourly window is closest"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 429, "the hourly window is spent");
    assert!(num(&r, "retry-after") > 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_quota() {
    let b = Backend::start("one").await;
    let env = start(
        &b,
        r#"
[[routes]]
name = "metered"
upstream = "one"
[routes.match]
path_prefix = "/metered/"
[routes.rate_limit]
key = "header:x-api-key"
limits = [{ requests = 100, per = "1s" }]
quota = { requests = 2, per = "day" }
"#,
    );
    let url = format!("{}/metered/x", env.base);
    let r = get(&url, &[("x-api-key", "k1")]).await;
    assert_eq!(num(&r, "ratelimit-limit"), 2, "the quota is closest");
    assert_eq!(num(&r, "ratelimit-remaining"), 1);
    assert!(num(&r, "ratelimit-reset") <= 86_400);
    assert_eq!(get(&url, &[("x-api-key", "k1")]).await.status, 200);
    let r = get(&url, &[("x-api-key", "k1")]).await;
    assert_eq!(r.status, 429);
    assert!(r.json()["detail"].as_str().unwrap().contains("quota"));
    assert!(num(&r, "retry-after") <= 86_400);
    assert_eq!(get(&url, &[("x-api-key", "k2")]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_per_key() {
    let b = Backend::start("one").await;
    let env = start(
        &b,
        r#"
[[routes]]
name = "slow"
upstream = "one"
[routes.match]
path_prefix = "/delay/"
[routes.rate_limit]
key = "header:x-api-key"
max_in_flight = 1
"#,
    );
    let url = format!("{}/delay/1500", env.base);
    let first = {
        let url = url.clone();
        tokio::spawn(async move { get(&url, &[("x-api-key", "a")]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = get(&url, &[("x-api-key", "a")]).await;
    assert_eq!(second.status, 429, "{}", second.text());
    assert!(
        second.json()["detail"]
            .as_str()
            .unwrap()
            .contains("in flight")
    );
    let other = get(&url, &[("x-api-key", "b")]).await;
    assert_eq!(other.status, 200, "another key has its own slot");
    assert_eq!(first.await.unwrap().status, 200);
    // The slot is free again.
    assert_eq!(get(&url, &[("x-api-key", "a")]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_survive_a_reload() {
    let b = Backend::start("one").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let route = r#"
[[routes]]
name = "limited"
upstream = "one"
[routes.match]
path_prefix = "/limited/"
[routes.rate_limit]
limits = [{ requests = 1, per = "1h" }]
"#;
    let gw = Gateway::start(&config(&b, port, &admin, "", route), &admin);
    let url = format!("http://127.0.0.1:{port}/limited/x");
    assert_eq!(get(&url, &[]).await.status, 200);
    assert_eq!(get(&url, &[]).await.status, 429);
    // An unrelated change, then a reload: the spent limit stays spent.
    gw.write_config(&config(
        &b,
        port,
        &admin,
        "",
        &format!("{route}\n[[routes]]\nname = \"extra\"\nupstream = \"one\"\n[routes.match]\npath = \"/extra\"\n"),
    ));
    let (code, out, err) =
        gateway_tests::gateway::run_cli(&["reload", "-c", gw.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(get(&url, &[]).await.status, 429);
    // A changed limit starts afresh.
    gw.write_config(&config(
        &b,
        port,
        &admin,
        "",
        &route.replace("requests = 1,", "requests = 2,"),
    ));
    let (code, out, err) =
        gateway_tests::gateway::run_cli(&["reload", "-c", gw.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(get(&url, &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_config_problems_have_locations() {
    let (code, out) = gateway_tests::gateway::check_config(
        r#"[[upstreams]]
name = "u"
targets = ["127.0.0.1:1"]
[[routes]]
name = "r"
upstream = "u"
[routes.rate_limit]
key = "cookie"
backend = "redis"
limits = [{ requests = 0, per = "1s" }]
"#,
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("g.toml:8:7: invalid rate-limit key \"cookie\""),
        "{out}"
    );
    assert!(
        out.contains("g.toml:10:11: a limit needs requests > 0"),
        "{out}"
    );
    assert!(out.contains("needs a top-level [redis] section"), "{out}");
}

// ---- Redis-shared limits -------------------------------------------------

fn redis_route(on_error: &str) -> String {
    format!(
        r#"
[[routes]]
name = "shared"
upstream = "one"
[routes.match]
path_prefix = "/shared/"
[routes.rate_limit]
key = "route"
backend = "redis"
on_redis_error = "{on_error}"
limits = [{{ requests = 10, per = "10s", burst = 10 }}]
"#
    )
}

fn redis_top(r: &Redis) -> String {
    format!(
        "[redis]\nurl = \"{}\"\ntimeout = \"200ms\"\nkey_prefix = \"t{}:\"\n",
        r.url(),
        free_port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_limit_through_redis() {
    let Some(redis) = Redis::start() else { return };
    let b = Backend::start("one").await;
    let top = redis_top(&redis);
    let g1 = start_with(&b, &top, &redis_route("deny"));
    let g2 = start_with(&b, &top, &redis_route("deny"));
    // 10 at once, then one per second. Alternate between the gateways.
    let started = Instant::now();
    let mut admitted = 0u64;
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..60 {
        let base = if i % 2 == 0 { &g1.base } else { &g2.base };
        let r = get(&format!("{base}/shared/x"), &[]).await;
        *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
        if r.status == 200 {
            admitted += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // GCRA admits at most burst + rate × elapsed; the tolerance is one
    // extra cell for the emission interval in progress at the start.
    let most = 10.0 + elapsed + 1.0;
    assert!(
        admitted >= 10 && admitted as f64 <= most,
        "admitted {admitted} in {elapsed:.2}s (at most {most:.1}): {statuses:?}"
    );
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200, 429],
        "{statuses:?}"
    );
    // Each gateway alone would have admitted 10: together they did not.
    assert!(admitted < 20, "{admitted}");
    assert_eq!(b.hits() as u64, admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_then_recovers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let b = Backend::start("one").await;
    let env = start_with(&b, &redis_top(&redis), &redis_route("deny"));
    let url = format!("{}/shared/x", env.base);
    assert_eq!(get(&url, &[]).await.status, 200);
    redis.kill();
    for _ in 0..5 {
        let r = get(&url, &[]).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(
            r.json()["detail"]
                .as_str()
                .unwrap()
                .contains("rate limiter")
        );
    }
    let stderr = env.gw.stderr();
    assert_eq!(
        stderr.matches("redis unreachable").count(),
        1,
        "logged once per outage: {stderr}"
    );
    let m = metrics(&env.gw);
    assert!(m.contains("gateway_ratelimit_redis_errors_total"), "{m}");
    assert!(m.contains("gateway_ratelimit_redis_up 0"), "{m}");

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(&url, &[]).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(env.gw.stderr().contains("redis reachable again"));
    assert!(metrics(&env.gw).contains("gateway_ratelimit_redis_up 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_local_or_open() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let b = Backend::start("one").await;
    let routes = format!(
        "{}\n{}",
        redis_route("local"),
        redis_route("allow")
            .replace("name = \"shared\"", "name = \"open-on-error\"")
            .replace("/shared/", "/fail-open/")
    );
    let env = start_with(&b, &redis_top(&redis), &routes);
    assert_eq!(
        get(&format!("{}/shared/x", env.base), &[]).await.status,
        200
    );
    redis.kill();
    // local: the same limit, counted in process (a fresh bucket of 10,
    // then one a second).
    let started = Instant::now();
    let mut ok = 0;
    for _ in 0..15 {
        match get(&format!("{}/shared/x", env.base), &[])
            .await
            .status
            .as_u16()
        {
            200 => ok += 1,
            429 => {}
            s => panic!("unexpected {s}"),
        }
    }
    let most = 11 + started.elapsed().as_secs();
    assert!(
        ok >= 10 && ok <= most,
        "local fallback admitted {ok} (at most {most})"
    );
    // allow: everything passes, without RateLimit headers.
    for _ in 0..15 {
        let r = get(&format!("{}/fail-open/x", env.base), &[]).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(env.gw.stderr().matches("redis unreachable").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_is_shared_and_metered_in_redis() {
    let Some(redis) = Redis::start() else { return };
    let b = Backend::start("one").await;
    let top = format!("[redis]\nurl = \"{}\"\nkey_prefix = \"m:\"\n", redis.url());
    let top = format!("{top}{}", consumers());
    let route = r#"
[[routes]]
name = "metered"
upstream = "one"
[routes.match]
path_prefix = "/metered/"
[routes.auth.api_key]
[routes.rate_limit]
key = "consumer"
backend = "redis"
quota = { requests = 3, per = "month" }
"#;
    let g1 = start_with(&b, &top, route);
    let g2 = start_with(&b, &top, route);
    // Both of cust-7's keys spend the one quota of the consumer.
    for (i, left) in [2, 1, 0].into_iter().enumerate() {
        let base = if i % 2 == 0 { &g1.base } else { &g2.base };
        let key = if i == 1 { "k7-b" } else { "k7-a" };
        let r = get(&format!("{base}/metered/x"), &[("x-api-key", key)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(num(&r, "ratelimit-remaining"), left);
    }
    let r = get(&format!("{}/metered/x", g2.base), &[("x-api-key", "k7-b")]).await;
    assert_eq!(r.status, 429);
    assert!(r.json()["detail"].as_str().unwrap().contains("quota"));
    assert_eq!(
        get(&format!("{}/metered/x", g1.base), &[("x-api-key", "k8")])
            .await
            .status,
        200
    );
    // The count is readable in Redis under the consumer's name (the
    // metering record).
    let keys = redis
        .command("KEYS m:route:metered:k:cust-7:quota:month:*")
        .unwrap_or_default();
    assert_eq!(keys, "*1", "one quota key for the customer this month");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_limits_count_each_key_by_its_hash() {
    let Some(redis) = Redis::start() else { return };
    let b = Backend::start("one").await;
    let top = format!(
        "[redis]\nurl = \"{}\"\nkey_prefix = \"ak:\"\n{}",
        redis.url(),
        consumers()
    );
    let env = start_with(
        &b,
        &top,
        r#"
[[routes]]
name = "per-key"
upstream = "one"
[routes.match]
path_prefix = "/per-key/"
[routes.auth.api_key]
[routes.rate_limit]
key = "api_key"
backend = "redis"
limits = [{ requests = 2, per = "1h" }]
"#,
    );
    let url = format!("{}/per-key/x", env.base);
    for _ in 0..2 {
        assert_eq!(get(&url, &[("x-api-key", "k7-a")]).await.status, 200);
    }
    assert_eq!(get(&url, &[("x-api-key", "k7-a")]).await.status, 429);
    // The same consumer's other key has its own budget.
    assert_eq!(get(&url, &[("x-api-key", "k7-b")]).await.status, 200);
    // A wrong key is refused by 4c before it is counted.
    assert_eq!(get(&url, &[("x-api-key", "nope")]).await.status, 401);
    // Redis holds the keys' hashes, never the keys.
    let keys = redis.command_reply("KEYS ak:*").unwrap_or_default();
    assert!(
        keys.contains(&format!("ak:route:per-key:h:{}:w", sha256_hex("k7-a")))
            && keys.contains(&sha256_hex("k7-b")),
        "{keys}"
    );
    assert!(!keys.contains("k7-a:") && !keys.contains("k7-b:"), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumers_own_limit_spans_every_route() {
    let b = Backend::start("one").await;
    let env = start_with(
        &b,
        &consumers(),
        r#"
[[routes]]
name = "a"
upstream = "one"
[routes.match]
path_prefix = "/a/"
[routes.auth.api_key]
[[routes]]
name = "b"
upstream = "one"
[routes.match]
path_prefix = "/b/"
[routes.auth.api_key]
[routes.rate_limit]
key = "consumer"
limits = [{ requests = 10, per = "1h" }]
"#,
    );
    // gold may make 3 requests an hour, wherever they go; the headers
    // report the tighter of the route's and the consumer's limit.
    let r = get(&format!("{}/a/x", env.base), &[("x-api-key", "kg")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(num(&r, "ratelimit-limit"), 3);
    assert_eq!(num(&r, "ratelimit-remaining"), 2);
    let r = get(&format!("{}/b/x", env.base), &[("x-api-key", "kg")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(num(&r, "ratelimit-limit"), 3);
    assert_eq!(num(&r, "ratelimit-remaining"), 1);
    assert_eq!(
        get(&format!("{}/a/x", env.base), &[("x-api-key", "kg")])
            .await
            .status,
        200
    );
    for path in ["/a/x", "/b/x"] {
        let r = get(&format!("{}{path}", env.base), &[("x-api-key", "kg")]).await;
        assert_eq!(r.status, 429, "{path}");
        assert!(num(&r, "retry-after") >= 1);
        // The refusal reports the limit that refused, not the route's.
        assert_eq!(num(&r, "ratelimit-limit"), 3, "{path}");
        assert_eq!(num(&r, "ratelimit-remaining"), 0, "{path}");
    }
    // Consumers without their own limit have only the routes'.
    for _ in 0..5 {
        let r = get(&format!("{}/a/x", env.base), &[("x-api-key", "k8")]).await;
        assert_eq!(r.status, 200);
        assert!(r.header("ratelimit-limit").is_none());
    }
    let r = get(&format!("{}/b/x", env.base), &[("x-api-key", "k8")]).await;
    assert_eq!(num(&r, "ratelimit-limit"), 10);
    assert_eq!(b.hits(), 3 + 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_decided_by_auth_are_checked_at_load() {
    let (code, out) = gateway_tests::gateway::check_config(
        r#"[[upstreams]]
name = "u"
targets = ["127.0.0.1:1"]
[[consumers]]
name = "c"
[consumers.rate_limit]
key = "ip"
limits = [{ requests = 0, per = "1s" }]
[[routes]]
name = "anonymous"
upstream = "u"
[routes.rate_limit]
key = "api_key"
limits = [{ requests = 1, per = "1s" }]
[[routes]]
name = "stripped"
upstream = "u"
[routes.auth.api_key]
header = "X-Key"
[routes.rate_limit]
key = "header:x-key"
limits = [{ requests = 1, per = "1s" }]
"#,
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("g.toml:7:7: a consumer's rate_limit is always keyed by the consumer"),
        "{out}"
    );
    assert!(
        out.contains("g.toml:13:7: rate-limit key \"api_key\" needs [routes.auth.api_key]"),
        "{out}"
    );
    assert!(
        out.contains("g.toml:21:7: header \"x-key\" carries this route's API key"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumers_own_concurrency_and_redis_backed_limit() {
    let Some(redis) = Redis::start() else { return };
    let b = Backend::start("one").await;
    let top = format!(
        r#"[redis]
url = "{url}"
key_prefix = "own:"
[[consumers]]
name = "busy"
api_keys = ["sha256:{k}"]
[consumers.rate_limit]
max_in_flight = 1
limits = [{{ requests = 4, per = "1h" }}]
backend = "redis"
"#,
        url = redis.url(),
        k = sha256_hex("kb"),
    );
    let env = start_with(
        &b,
        &top,
        r#"
[[routes]]
name = "slow"
upstream = "one"
[routes.match]
path_prefix = "/delay/"
[routes.auth.api_key]
"#,
    );
    let url = format!("{}/delay/1500", env.base);
    let first = {
        let url = url.clone();
        tokio::spawn(async move { get(&url, &[("x-api-key", "kb")]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One request of this consumer in flight at a time, on any route.
    let second = get(&url, &[("x-api-key", "kb")]).await;
    assert_eq!(second.status, 429, "{}", second.text());
    assert!(
        second.json()["detail"]
            .as_str()
            .unwrap()
            .contains("in flight")
    );
    assert_eq!(first.await.unwrap().status, 200);
    // The slot is back. The window (in Redis) has spent 2 of 4, the first
    // request and this one: the refused one took no slot and so spent
    // nothing.
    let r = get(&format!("{}/delay/0", env.base), &[("x-api-key", "kb")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(num(&r, "ratelimit-remaining"), 2);
    let keys = redis.command_reply("KEYS own:*").unwrap_or_default();
    assert!(keys.contains("own:consumer:k:busy:w4/"), "{keys}");
}
