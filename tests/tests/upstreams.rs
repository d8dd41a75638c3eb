//! Upstreams that stay up: balancing, consistent hashing, active health
//! checks, outlier ejection, the circuit breaker, retries and their budget,
//! concurrency limits, and file and DNS discovery, against real backends
//! that die, come back, hang and fail. Timings are short (health checks
//! every 200–300 ms) and every wait is a deadline, not a fixed sleep.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_tests::backend::{Backend, Mode};
use gateway_tests::client::{self, Reply};
use gateway_tests::dns::{DnsServer, Record};
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use http::Request;
use http_body_util::Full;

struct Env {
    gw: Gateway,
    base: String,
}

impl Env {
    /// A gateway with `body` (upstreams and routes) after a listener and
    /// the admin section.
    fn start(body: &str) -> Env {
        let port = free_port();
        let admin = format!("127.0.0.1:{}", free_port());
        let gw = Gateway::start(&Self::config(port, &admin, body), &admin);
        Env {
            gw,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn config(port: u16, admin: &str, body: &str) -> String {
        format!(
            r#"
[server]
workers = 2
watch_config = false
[admin]
listen = "{admin}"
[access_log]
enabled = false
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
{body}
"#
        )
    }

    async fn get(&self, path: &str) -> Reply {
        client::get(&format!("{}{path}", self.base)).await
    }

    async fn get_with(&self, path: &str, header: (&str, &str)) -> Reply {
        let req = Request::get(format!("{}{path}", self.base))
            .header(header.0, header.1)
            .body(Full::default())
            .unwrap();
        client::send(&client::http1(), req).await
    }

    async fn upstream(&self, name: &str) -> serde_json::Value {
        let r = client::get(&format!("http://{}/admin/upstreams", self.gw.admin)).await;
        assert_eq!(r.status, 200);
        r.json()["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no upstream {name} in {}", r.text()))
    }

    async fn target(&self, upstream: &str, addr: &str) -> serde_json::Value {
        let u = self.upstream(upstream).await;
        u["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["address"] == addr)
            .cloned()
            .unwrap_or_else(|| panic!("no target {addr} in {u}"))
    }

    async fn metrics(&self) -> String {
        client::get(&format!("http://{}/metrics", self.gw.admin))
            .await
            .text()
    }
}

fn backend_of(r: &Reply) -> String {
    r.header("x-backend").unwrap_or("").to_string()
}

fn assert_problem(r: &Reply, status: u16) -> serde_json::Value {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let p = r.json();
    assert_eq!(p["status"], status);
    p
}

/// Polls `f` every 50 ms until it is true or `within` passes.
async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count_backends(env: &Env, path: &str, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = env.get(path).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *seen.entry(backend_of(&r)).or_insert(0) += 1;
    }
    seen
}

/// The value of the metric line that starts with `series` (name and
/// labels as exported), if there is one.
fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_weighted_and_least_request_spread_load() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "rr"
targets = ["{a}", "{b}", "{c}"]
[[upstreams]]
name = "wrr"
balance = "weighted_round_robin"
targets = [{{ address = "{a}", weight = 3 }}, "{b}"]
[[upstreams]]
name = "lr"
balance = "least_request"
targets = ["{a}", "{c}"]
[[routes]]
name = "rr"
upstream = "rr"
strip_prefix = "/rr"
[routes.match]
path_prefix = "/rr/"
[[routes]]
name = "wrr"
upstream = "wrr"
strip_prefix = "/wrr"
[routes.match]
path_prefix = "/wrr/"
[[routes]]
name = "lr"
upstream = "lr"
strip_prefix = "/lr"
[routes.match]
path_prefix = "/lr/"
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr
    ));
    let rr = count_backends(&env, "/rr/x", 30).await;
    assert_eq!(rr.get("a"), Some(&10), "{rr:?}");
    assert_eq!(rr.get("b"), Some(&10), "{rr:?}");
    assert_eq!(rr.get("c"), Some(&10), "{rr:?}");
    let wrr = count_backends(&env, "/wrr/x", 40).await;
    assert_eq!(wrr.get("a"), Some(&30), "{wrr:?}");
    assert_eq!(wrr.get("b"), Some(&10), "{wrr:?}");

    // Least request: while `a` holds slow requests, new ones go to `c`.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let url = format!("{}/lr/delay/1500", env.base);
            tokio::spawn(async move { client::get(&url).await })
        })
        .collect();
    eventually(
        Duration::from_secs(3),
        "slow requests in flight",
        || async {
            let u = env.upstream("lr").await;
            u["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["in_flight"].as_u64().unwrap())
                .sum::<u64>()
                == 4
        },
    )
    .await;
    let busy_a = env.target("lr", &a.addr.to_string()).await["in_flight"]
        .as_u64()
        .unwrap();
    let busy_c = env.target("lr", &c.addr.to_string()).await["in_flight"]
        .as_u64()
        .unwrap();
    let lr = count_backends(&env, "/lr/x", 20).await;
    let (busier, idler) = if busy_a > busy_c {
        ("a", "c")
    } else {
        ("c", "a")
    };
    if busy_a != busy_c {
        assert!(
            lr.get(idler).copied().unwrap_or(0) > lr.get(busier).copied().unwrap_or(0),
            "least request should favour the idle target: {lr:?} (in flight a={busy_a} c={busy_c})"
        );
    }
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_balancer_spreads_over_all_targets() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "random"
balance = "random"
targets = ["{a}", "{b}", "{c}"]
[[routes]]
name = "all"
upstream = "random"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr
    ));
    let c = client::http1();
    let mut order = Vec::new();
    for _ in 0..300 {
        let r = client::send(
            &c,
            Request::get(format!("{}/x", env.base))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        order.push(backend_of(&r));
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for b in &order {
        *seen.entry(b).or_default() += 1;
    }
    // About 100 each; below 45 is more than 6 standard deviations off.
    for name in ["a", "b", "c"] {
        let n = seen.get(name).copied().unwrap_or(0);
        assert!(n >= 45, "{name} got {n} of 300: {seen:?}");
    }
    // Random, not a rotation: some target is picked twice in a row (a
    // random order of 300 has none with odds of (2/3)^299).
    assert!(
        order.windows(2).any(|w| w[0] == w[1]),
        "picks follow a strict rotation: {:?}",
        &order[..12]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_keeps_most_keys_when_a_target_goes_away() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "ring"
balance = "ring_hash"
hash_key = "header:x-user"
targets = ["{a}", "{b}", "{c}"]
[upstreams.health]
path = "/healthz"
interval = "200ms"
timeout = "200ms"
unhealthy_threshold = 1
[upstreams.retry]
max_retries = 0
[[upstreams]]
name = "maglev"
balance = "maglev"
hash_key = "cookie:session"
targets = ["{a}", "{b}", "{c}"]
[upstreams.health]
path = "/healthz"
interval = "200ms"
timeout = "200ms"
unhealthy_threshold = 1
[upstreams.retry]
max_retries = 0
[[routes]]
name = "ring"
upstream = "ring"
[routes.match]
path_prefix = "/ring"
[[routes]]
name = "maglev"
upstream = "maglev"
[routes.match]
path_prefix = "/maglev"
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr
    ));
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let mut before = HashMap::new();
    for k in &keys {
        let r1 = env.get_with("/ring", ("x-user", k)).await;
        let r2 = env
            .get_with("/maglev", ("cookie", &format!("x=1; session={k}")))
            .await;
        // The same key lands on the same target every time.
        assert_eq!(
            backend_of(&r1),
            backend_of(&env.get_with("/ring", ("x-user", k)).await)
        );
        before.insert(k.clone(), (backend_of(&r1), backend_of(&r2)));
    }
    for which in [0, 1] {
        let mut spread: HashMap<&str, usize> = HashMap::new();
        for v in before.values() {
            *spread
                .entry(if which == 0 { &v.0 } else { &v.1 })
                .or_default() += 1;
        }
        assert_eq!(spread.len(), 3, "keys spread over all targets: {spread:?}");
    }

    let b_addr = b.kill().await.to_string();
    eventually(Duration::from_secs(3), "b marked unhealthy", || async {
        env.target("ring", &b_addr).await["healthy"] == false
            && env.target("maglev", &b_addr).await["healthy"] == false
    })
    .await;
    let (mut stayed, mut moved) = (0, 0);
    for k in &keys {
        let r1 = env.get_with("/ring", ("x-user", k)).await;
        let r2 = env
            .get_with("/maglev", ("cookie", &format!("session={k}")))
            .await;
        assert_eq!(r1.status, 200);
        assert_eq!(r2.status, 200);
        let (was1, was2) = &before[k];
        for (was, now) in [(was1, backend_of(&r1)), (was2, backend_of(&r2))] {
            assert_ne!(now, "b");
            if was != "b" {
                assert_eq!(*was, now, "key {k} moved off a live target");
                stayed += 1;
            } else {
                moved += 1;
            }
        }
    }
    assert!(
        stayed > moved,
        "most keys stay: {stayed} stayed, {moved} moved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_target_leaves_rotation_within_one_interval_and_comes_back() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{a}", "{b}"]
[upstreams.health]
path = "/status/204"
interval = "300ms"
timeout = "200ms"
unhealthy_threshold = 1
healthy_threshold = 2
[upstreams.outlier]
enabled = false
[upstreams.retry]
max_retries = 0
[[routes]]
name = "all"
upstream = "pool"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr,
        b = b.addr
    ));
    assert_eq!(count_backends(&env, "/x", 10).await.len(), 2);
    let killed = Instant::now();
    let b_addr = b.kill().await;
    eventually(Duration::from_secs(3), "b out of rotation", || async {
        env.target("pool", &b_addr.to_string()).await["healthy"] == false
    })
    .await;
    let took = killed.elapsed();
    // As documented: within one interval (300 ms) plus the check's timeout
    // (200 ms); the margin covers scheduling and this test's 50 ms polls.
    assert!(
        took < Duration::from_millis(300 + 200 + 500),
        "b left rotation only after {took:?}"
    );
    let seen = count_backends(&env, "/x", 20).await;
    assert_eq!(
        seen.get("a"),
        Some(&20),
        "all traffic on a after {took:?}: {seen:?}"
    );

    let b = Backend::start_at(b_addr, "b2").await;
    eventually(Duration::from_secs(3), "b back in rotation", || async {
        env.target("pool", &b_addr.to_string()).await["healthy"] == true
    })
    .await;
    let seen = count_backends(&env, "/x", 10).await;
    assert_eq!(seen.get("b2"), Some(&5), "{seen:?}");
    assert!(b.hits() >= 5);
    let m = env.metrics().await;
    assert!(m.contains("gateway_upstream_target_healthy"), "{m}");
    assert!(m.contains("gateway_upstream_health_checks_total"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_target_is_a_503_problem_without_trying_one() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    // Both targets answer traffic, but fail their health checks.
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "sick"
targets = ["{a}", "{b}"]
[upstreams.health]
path = "/status/500"
interval = "200ms"
timeout = "200ms"
unhealthy_threshold = 1
[upstreams.outlier]
enabled = false
[[routes]]
name = "all"
upstream = "sick"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr,
        b = b.addr
    ));
    eventually(Duration::from_secs(3), "both targets unhealthy", || async {
        env.upstream("sick").await["healthy_targets"] == 0
    })
    .await;
    for _ in 0..5 {
        let r = env.get("/x").await;
        let p = assert_problem(&r, 503);
        assert_eq!(
            p["detail"], "upstream \"sick\" has no healthy targets",
            "{p}"
        );
        assert_eq!(p["title"], "Service Unavailable");
        assert_eq!(p["type"], "https://gateway.dev/problems/no-upstream");
        assert_eq!(p["request_id"].as_str(), r.header("x-request-id"));
        assert_eq!(backend_of(&r), "", "answered by the gateway");
    }
    // Counted as such; no try reached a target, so nothing was retried.
    let m = env.metrics().await;
    assert!(
        m.contains(r#"gateway_upstream_errors_total{upstream="sick",kind="no_upstream"} 5"#),
        "{m}"
    );
    assert!(!m.contains("kind=\"upstream_connect\""), "{m}");
    for t in env.upstream("sick").await["targets"].as_array().unwrap() {
        assert_eq!(t["requests"], 0, "no request went to a target: {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_check_takes_a_dead_target_out_and_brings_it_back() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    // Accepts connections but answers every request 503: healthy to a
    // connect-only check, which sends no request at all.
    let grumpy = Backend::start("grumpy").await;
    grumpy.set_mode(Mode::Status(503));
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{a}", "{b}"]
[upstreams.health]
kind = "tcp"
interval = "200ms"
timeout = "200ms"
unhealthy_threshold = 1
healthy_threshold = 1
[upstreams.outlier]
enabled = false
[upstreams.retry]
max_retries = 0
[[upstreams]]
name = "grumpy"
targets = ["{grumpy}"]
[upstreams.health]
kind = "tcp"
interval = "200ms"
timeout = "200ms"
unhealthy_threshold = 1
[[routes]]
name = "all"
upstream = "pool"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr,
        b = b.addr,
        grumpy = grumpy.addr
    ));
    assert_eq!(count_backends(&env, "/x", 10).await.len(), 2);

    let b_addr = b.kill().await;
    eventually(Duration::from_secs(3), "b out of rotation", || async {
        env.target("pool", &b_addr.to_string()).await["healthy"] == false
    })
    .await;
    assert_eq!(env.upstream("pool").await["healthy_targets"], 1);
    let seen = count_backends(&env, "/x", 20).await;
    assert_eq!(seen.get("a"), Some(&20), "{seen:?}");

    let b = Backend::start_at(b_addr, "b2").await;
    eventually(Duration::from_secs(3), "b back in rotation", || async {
        env.target("pool", &b_addr.to_string()).await["healthy"] == true
    })
    .await;
    let seen = count_backends(&env, "/x", 10).await;
    assert_eq!(seen.get("b2"), Some(&5), "{seen:?}");
    assert!(b.hits() >= 5);

    // Connect-only: the 503s of `grumpy` are never asked for.
    eventually(Duration::from_secs(3), "checks of grumpy ran", || async {
        metric_value(
            &env.metrics().await,
            "gateway_upstream_health_checks_total{upstream=\"grumpy\",result=\"success\"}",
        )
        .is_some_and(|n| n >= 3.0)
    })
    .await;
    assert_eq!(
        env.target("grumpy", &grumpy.addr.to_string()).await["healthy"],
        true
    );
    assert_eq!(grumpy.hits(), 0, "a TCP check sent a request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_expected_statuses_replace_the_default_range() {
    // 418 is outside the default 200-399 and listed; 200 is inside it but
    // not listed.
    let teapot = Backend::start("teapot").await;
    teapot.set_mode(Mode::Status(418));
    let plain = Backend::start("plain").await;
    plain.set_mode(Mode::Status(200));
    let empty = Backend::start("empty").await;
    empty.set_mode(Mode::Status(204));
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{teapot}", "{plain}", "{empty}"]
[upstreams.health]
path = "/health"
expected_statuses = [204, 418]
interval = "200ms"
timeout = "200ms"
unhealthy_threshold = 1
healthy_threshold = 1
[upstreams.outlier]
enabled = false
[upstreams.retry]
max_retries = 0
[[routes]]
name = "all"
upstream = "pool"
[routes.match]
path_prefix = "/"
"#,
        teapot = teapot.addr,
        plain = plain.addr,
        empty = empty.addr
    ));
    let healthy = |addr: std::net::SocketAddr| {
        let env = &env;
        async move { env.target("pool", &addr.to_string()).await["healthy"] == true }
    };
    let successes = || async {
        metric_value(
            &env.metrics().await,
            "gateway_upstream_health_checks_total{upstream=\"pool\",result=\"success\"}",
        )
        .unwrap_or(0.0)
    };
    // Only answers from listed statuses' targets, once checks have run.
    let spread = || async {
        let mut seen = HashMap::new();
        for _ in 0..20 {
            let r = env.get("/x").await;
            *seen.entry(backend_of(&r)).or_insert(0) += 1;
        }
        seen
    };

    eventually(Duration::from_secs(3), "plain (200) taken out", || async {
        !healthy(plain.addr).await
    })
    .await;
    // A few more rounds: the listed statuses keep passing.
    let before = successes().await;
    eventually(Duration::from_secs(3), "two more rounds", || async {
        successes().await >= before + 4.0
    })
    .await;
    assert!(healthy(teapot.addr).await && healthy(empty.addr).await);
    let seen = spread().await;
    assert_eq!(
        (seen.get("teapot"), seen.get("empty"), seen.get("plain")),
        (Some(&10), Some(&10), None),
        "{seen:?}"
    );

    // Statuses change: the verdicts follow.
    teapot.set_mode(Mode::Status(200));
    plain.set_mode(Mode::Status(418));
    eventually(Duration::from_secs(3), "teapot out, plain back", || async {
        !healthy(teapot.addr).await && healthy(plain.addr).await
    })
    .await;
    let seen = spread().await;
    assert_eq!(
        (seen.get("plain"), seen.get("empty"), seen.get("teapot")),
        (Some(&10), Some(&10), None),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_target_and_keeps_it_across_reload() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    b.set_mode(Mode::Status(500));
    let upstreams = format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{a}", "{b}"]
[upstreams.outlier]
consecutive_5xx = 3
base_ejection = "30s"
[upstreams.retry]
max_retries = 0
[[routes]]
name = "all"
upstream = "pool"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr,
        b = b.addr
    );
    let env = Env::start(&upstreams);
    let mut errors = 0;
    for _ in 0..20 {
        if env.get("/x").await.status != 200 {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "three 5xx, then b is ejected");
    let t = env.target("pool", &b.addr.to_string()).await;
    assert_eq!(t["ejected"], true, "{t}");
    assert!(t["ejected_for_ms"].as_u64().unwrap() > 20_000, "{t}");
    assert!(t["recent_errors"].as_u64().unwrap() >= 3, "{t}");
    assert!(
        env.metrics()
            .await
            .contains("gateway_upstream_ejections_total"),
    );

    // A reload that leaves the pool alone keeps its state.
    let cfg = std::fs::read_to_string(&env.gw.config).unwrap();
    env.gw.write_config(&format!(
        "{cfg}\n[[routes]]\nname = \"extra\"\n[routes.match]\npath = \"/extra\"\n[routes.respond]\nbody = \"x\"\n"
    ));
    let r = client::send(
        &client::http1(),
        Request::post(format!("http://{}/admin/reload", env.gw.admin))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(env.get("/extra").await.text(), "x");
    let t = env.target("pool", &b.addr.to_string()).await;
    assert_eq!(t["ejected"], true, "still ejected after reload: {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_target_is_ejected_and_connections_per_target_are_capped() {
    let fast = Backend::start("fast").await;
    let slow = Backend::start("slow").await;
    slow.set_mode(Mode::Delay(300));
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{fast}", "{slow}"]
[upstreams.outlier]
slow_threshold = "150ms"
consecutive_slow = 2
[[upstreams]]
name = "capped"
targets = ["{fast}"]
max_connections_per_target = 1
[[routes]]
name = "capped"
upstream = "capped"
strip_prefix = "/capped"
[routes.match]
path_prefix = "/capped/"
[[routes]]
name = "capped-short"
upstream = "capped"
strip_prefix = "/short"
timeout = "200ms"
[routes.match]
path_prefix = "/short/"
[[routes]]
name = "all"
upstream = "pool"
[routes.match]
path_prefix = "/"
"#,
        fast = fast.addr,
        slow = slow.addr
    ));
    let mut slow_answers = 0;
    for _ in 0..12 {
        if backend_of(&env.get("/x").await) == "slow" {
            slow_answers += 1;
        }
    }
    assert_eq!(
        slow_answers, 2,
        "two slow answers, then the slow target is ejected"
    );
    let t = env.target("pool", &slow.addr.to_string()).await;
    assert_eq!(t["ejected"], true, "{t}");
    assert_eq!(t["errors"], 0, "slow is not an error: {t}");

    // One connection per target: three 300 ms requests take turns.
    let t = Instant::now();
    let all: Vec<_> = (0..3)
        .map(|_| {
            let url = format!("{}/capped/delay/300", env.base);
            tokio::spawn(async move { client::get(&url).await.status })
        })
        .collect();
    for r in all {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert!(
        t.elapsed() >= Duration::from_millis(850),
        "{:?}",
        t.elapsed()
    );

    // A request that cannot get the slot within its timeout: 503, with
    // Retry-After like every overload answer.
    let url = format!("{}/capped/delay/800", env.base);
    let holder = tokio::spawn(async move { client::get(&url).await.status });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let r = env.get("/short/x").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.text().contains("max_connections_per_target"),
        "{}",
        r.text()
    );
    assert!(
        t.elapsed() < Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(holder.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_answers_fast_half_opens_and_closes() {
    let a = Backend::start("a").await;
    a.set_mode(Mode::Status(503));
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "fragile"
targets = ["{a}"]
[upstreams.breaker]
error_rate = 0.5
min_requests = 5
open_for = "700ms"
half_open_probes = 2
[upstreams.retry]
max_retries = 0
[[routes]]
name = "all"
upstream = "fragile"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr
    ));
    for _ in 0..5 {
        assert_eq!(env.get("/x").await.status, 503);
    }
    assert_eq!(env.upstream("fragile").await["circuit"]["state"], "open");
    let hits = a.hits();
    let t = Instant::now();
    let r = env.get("/x").await;
    let p = assert_problem(&r, 503);
    assert!(t.elapsed() < Duration::from_millis(200), "answered at once");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("upstream circuit open"),
        "{p}"
    );
    assert!(r.header("retry-after").is_some());
    assert_eq!(a.hits(), hits, "the backend was not touched");
    assert!(
        env.metrics()
            .await
            .contains("gateway_circuit_state{upstream=\"fragile\"} 1"),
    );

    // Recovered: after open_for, two probes go through and close it.
    a.set_mode(Mode::Normal);
    tokio::time::sleep(Duration::from_millis(750)).await;
    assert_eq!(env.get("/x").await.status, 200);
    assert_eq!(
        env.upstream("fragile").await["circuit"]["state"],
        "half_open"
    );
    assert_eq!(env.get("/x").await.status, 200);
    assert_eq!(env.upstream("fragile").await["circuit"]["state"], "closed");
    assert!(
        env.metrics()
            .await
            .contains("gateway_circuit_state{upstream=\"fragile\"} 0"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_buffered_for_retries_must_arrive_within_the_timeout() {
    use std::io::{Read, Write};
    let a = Backend::start("a").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "one"
targets = ["{a}"]
timeout = "500ms"
[upstreams.retry]
max_retries = 1
buffer_body = "1KiB"
[upstreams.concurrency]
max = 1
queue = 0
[[routes]]
name = "all"
upstream = "one"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr
    ));
    let addr = env.base.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"PUT /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .unwrap();
    // While it trickles, the pool's only slot is free for others.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(env.get("/other").await.status, 200);
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.hits(), 1, "only /other reached the backend");
}

/// One upstream `timeout = "500ms"` to `target` over `protocol`, no
/// retries, bodies up to 64 MiB.
fn upload_env(target: std::net::SocketAddr, protocol: &str) -> Env {
    Env::start(&format!(
        r#"
[[upstreams]]
name = "one"
targets = ["{target}"]
protocol = "{protocol}"
timeout = "500ms"
[upstreams.retry]
max_retries = 0
[[routes]]
name = "all"
upstream = "one"
max_body_bytes = "64MiB"
[routes.match]
path_prefix = "/"
"#
    ))
}

/// `client::trickle` of a `PUT` to `path` on the gateway at `base`.
async fn upload(base: &str, path: &str, chunks: Vec<(Duration, Vec<u8>)>) -> (String, Duration) {
    let addr = base.trim_start_matches("http://").to_string();
    let head = format!("PUT {path} HTTP/1.1\r\nHost: x\r\n");
    tokio::task::spawn_blocking(move || client::trickle(&addr, &head, chunks))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_counted_against_the_upstream_timeout() {
    // Three chunks 300 ms apart: the upload takes longer than the 500 ms
    // timeout, but the upstream answers as soon as it has the body.
    // The same over HTTP/2 to the target, where hyper's client sends it.
    let a = Backend::start("a").await;
    for protocol in ["http1", "http2"] {
        let env = upload_env(a.addr, protocol);
        let pause = Duration::from_millis(300);
        let (resp, took) = upload(
            &env.base,
            "/up",
            vec![
                (Duration::ZERO, b"ab".to_vec()),
                (pause, b"cd".to_vec()),
                (pause, b"ef".to_vec()),
                (pause, b"gh".to_vec()),
            ],
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{protocol}: {resp}");
        assert!(resp.contains("\"body_len\":8"), "{protocol}: {resp}");
        assert!(
            took >= Duration::from_millis(850),
            "{protocol}: answered after {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_target_times_out_after_the_upload_or_while_it_takes_none() {
    let hung = Backend::start("hung").await;
    hung.set_mode(Mode::Hang);
    let env = upload_env(hung.addr, "http1");
    let ms = Duration::from_millis;
    for (chunks, detail, within) in [
        // The body's last part comes 600 ms in; the target reads it but
        // never answers: 504 a timeout after that, not after the head.
        (
            vec![(Duration::ZERO, b"ab".to_vec()), (ms(600), b"cd".to_vec())],
            "did not answer within 500ms",
            ms(1050)..ms(3000),
        ),
        // The target reads the head, then neither the body nor answers:
        // once the sockets between are full, the upload stalls on its
        // side, and the try ends a timeout later.
        (
            (0..64)
                .map(|_| (Duration::ZERO, vec![b'x'; 1 << 20]))
                .collect(),
            "took none of the request body for 500ms",
            ms(0)..ms(3000),
        ),
    ] {
        let (resp, took) = upload(&env.base, "/up", chunks).await;
        assert!(resp.starts_with("HTTP/1.1 504"), "{resp}");
        assert!(resp.contains(detail), "{resp}");
        assert!(within.contains(&took), "504 after {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_does_not_make_its_target_slow() {
    // Slowness for outlier detection counts from the body's end too: slow
    // uploads eject nobody, slow answers still do.
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{a}", "{b}"]
[upstreams.outlier]
slow_threshold = "150ms"
consecutive_slow = 2
[[routes]]
name = "all"
upstream = "pool"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr,
        b = b.addr
    ));
    let ejected = || async {
        let mut n = 0;
        for t in [a.addr, b.addr] {
            if env.target("pool", &t.to_string()).await["ejected"] == true {
                n += 1;
            }
        }
        n
    };
    let pause = Duration::from_millis(200);
    for _ in 0..4 {
        let (resp, _) = upload(
            &env.base,
            "/up",
            vec![(Duration::ZERO, b"ab".to_vec()), (pause, b"cd".to_vec())],
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    assert_eq!(ejected().await, 0, "slow uploads eject no target");
    for _ in 0..4 {
        let (resp, _) = upload(
            &env.base,
            "/delay/300",
            vec![(Duration::ZERO, b"ab".to_vec())],
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    assert_eq!(
        ejected().await,
        1,
        "two slow answers in a row eject a target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_breaking_off_uploads_do_not_count_against_the_target() {
    use std::io::Write;
    let a = Backend::start("a").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "fragile"
targets = ["{a}"]
[upstreams.breaker]
consecutive_failures = 2
open_for = "30s"
[upstreams.retry]
max_retries = 0
[[routes]]
name = "all"
upstream = "fragile"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr
    ));
    let addr = env.base.trim_start_matches("http://").to_string();
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nonly a start",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
    }
    eventually(
        Duration::from_secs(3),
        "the uploads reached the backend",
        || async { a.hits() == 3 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let circuit = env.upstream("fragile").await["circuit"].clone();
    assert_eq!(circuit["state"], "closed", "{circuit}");
    assert_eq!(circuit["window_failures"], 0, "{circuit}");
    assert_eq!(env.get("/x").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_after_consecutive_failures_well_below_min_requests() {
    let a = Backend::start("a").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "fragile"
targets = ["{a}"]
[upstreams.breaker]
error_rate = 0.5
min_requests = 100
consecutive_failures = 3
open_for = "30s"
[upstreams.retry]
max_retries = 0
[[routes]]
name = "all"
upstream = "fragile"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr
    ));
    // Two failures, a success that ends the run, two more failures: 80 %
    // failed, but 5 tries are far below min_requests and no run reached 3.
    for (path, status) in [
        ("/status/503", 503),
        ("/status/500", 500),
        ("/x", 200),
        ("/status/503", 503),
        ("/status/502", 502),
    ] {
        assert_eq!(env.get(path).await.status, status, "{path}");
    }
    let circuit = env.upstream("fragile").await["circuit"].clone();
    assert_eq!(circuit["state"], "closed", "{circuit}");
    assert_eq!(circuit["window_failures"], 4, "{circuit}");
    // The third failure in a row opens it.
    assert_eq!(env.get("/status/503").await.status, 503);
    let circuit = env.upstream("fragile").await["circuit"].clone();
    assert_eq!(circuit["state"], "open", "{circuit}");

    let hits = a.hits();
    let r = env.get("/x").await;
    let p = assert_problem(&r, 503);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("upstream circuit open"),
        "{p}"
    );
    let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((25..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(a.hits(), hits, "the backend was not touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_breaker_stays_open_across_a_reload_that_keeps_it() {
    let a = Backend::start("a").await;
    let body = |extra: &str| {
        format!(
            r#"
[[upstreams]]
name = "shared"
targets = ["{a}"]
[upstreams.retry]
max_retries = 0
[[routes]]
name = "fragile"
upstream = "shared"
[routes.match]
path_prefix = "/"
[routes.breaker]
consecutive_failures = 2
open_for = "30s"
{extra}"#,
            a = a.addr
        )
    };
    let env = Env::start(&body(""));
    for _ in 0..2 {
        assert_eq!(env.get("/status/500").await.status, 500);
    }
    assert_eq!(env.get("/x").await.status, 503, "open");
    // A reload that adds a route rebuilds the routes; this breaker's
    // settings did not change, so it is the same breaker, still open.
    let port: u16 = env.base.rsplit(':').next().unwrap().parse().unwrap();
    let extra =
        "[[routes]]\nname = \"more\"\nupstream = \"shared\"\n[routes.match]\npath = \"/more\"\n";
    env.gw
        .write_config(&Env::config(port, &env.gw.admin, &body(extra)));
    env.gw.signal(libc::SIGHUP);
    eventually(Duration::from_secs(5), "the reload", || async {
        env.metrics()
            .await
            .contains("gateway_config_reloads_total{result=\"ok\"} 1")
    })
    .await;
    assert_eq!(env.get("/more").await.status, 200, "the new config serves");
    let hits = a.hits();
    let r = env.get("/x").await;
    assert_eq!(r.status, 503, "still open after the reload: {}", r.text());
    assert_eq!(a.hits(), hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_breaker_opens_for_its_route_only() {
    let a = Backend::start("a").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "shared"
targets = ["{a}"]
[upstreams.retry]
max_retries = 0
[[routes]]
name = "fragile"
upstream = "shared"
strip_prefix = "/fragile"
[routes.match]
path_prefix = "/fragile/"
[routes.breaker]
consecutive_failures = 3
open_for = "30s"
[[routes]]
name = "solid"
upstream = "shared"
strip_prefix = "/solid"
[routes.match]
path_prefix = "/solid/"
"#,
        a = a.addr
    ));
    // Failures on the other route do not count for this route's breaker.
    for _ in 0..5 {
        assert_eq!(env.get("/solid/status/500").await.status, 500);
    }
    assert_eq!(env.get("/fragile/x").await.status, 200);
    for _ in 0..3 {
        assert_eq!(env.get("/fragile/status/500").await.status, 500);
    }
    // Registered at the first config load, so it must work from the start.
    assert!(
        env.metrics()
            .await
            .contains("gateway_circuit_state{upstream=\"route:fragile\"} 1"),
    );
    // Open for this route: answered at once, the backend not touched...
    let hits = a.hits();
    let r = env.get("/fragile/x").await;
    let p = assert_problem(&r, 503);
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("upstream circuit open") && detail.contains("route:fragile"),
        "{p}"
    );
    assert!(r.header("retry-after").is_some());
    assert_eq!(a.hits(), hits);
    // ...while the other route to the same upstream keeps working.
    for _ in 0..5 {
        let r = env.get("/solid/x").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(a.hits(), hits + 5);
    // The pool itself has no breaker: nothing was opened there.
    assert!(env.upstream("shared").await["circuit"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_elsewhere_respect_idempotency_and_stay_within_budget() {
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    bad.set_mode(Mode::Status(503));
    let worse = Backend::start("worse").await;
    worse.set_mode(Mode::Status(503));
    let dead = free_port();
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "mixed"
targets = ["{good}", "{bad}"]
[upstreams.outlier]
enabled = false
[upstreams.retry]
max_retries = 2
on_status = [503]
backoff = "1ms"
[[upstreams]]
name = "half-dead"
targets = ["{good}", "127.0.0.1:{dead}"]
connect_timeout = "500ms"
[upstreams.outlier]
enabled = false
[[upstreams]]
name = "broken"
targets = ["{bad}", "{worse}"]
[upstreams.outlier]
enabled = false
[upstreams.retry]
max_retries = 3
on_status = [503]
backoff = "1ms"
budget_percent = 20
budget_min_per_sec = 0
[[routes]]
name = "mixed"
upstream = "mixed"
strip_prefix = "/mixed"
[routes.match]
path_prefix = "/mixed/"
[[routes]]
name = "half-dead"
upstream = "half-dead"
strip_prefix = "/half-dead"
[routes.match]
path_prefix = "/half-dead/"
[[routes]]
name = "buffered"
upstream = "half-dead"
strip_prefix = "/buffered"
[routes.match]
path_prefix = "/buffered/"
[routes.retry]
buffer_body = "1KiB"
[[routes]]
name = "broken"
upstream = "broken"
strip_prefix = "/broken"
[routes.match]
path_prefix = "/broken/"
"#,
        good = good.addr,
        bad = bad.addr,
        worse = worse.addr
    ));
    // A 503 is retried on the other target.
    for _ in 0..10 {
        let r = env.get("/mixed/x").await;
        assert_eq!(r.status, 200);
        assert_eq!(backend_of(&r), "good");
    }
    // ...but not a POST whose body streams: it cannot be sent twice. (The
    // idempotency rule itself, with bodies that could be sent again:
    // `non_idempotent_requests_are_retried_only_where_the_route_opts_in`.)
    let c = client::http1();
    let mut posts = HashMap::new();
    for _ in 0..6 {
        let r = client::send(
            &c,
            Request::post(format!("{}/mixed/x", env.base))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await;
        *posts.entry(r.status.as_u16()).or_insert(0) += 1;
    }
    assert_eq!(posts.get(&503), Some(&3), "{posts:?}");

    // A connect failure is retried for any method: the request never left
    // (a streamed request body cannot be sent twice, so this one has none).
    for _ in 0..6 {
        let r = client::send(
            &c,
            Request::post(format!("{}/half-dead/x", env.base))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // With buffer_body, a request body can be sent again too.
    for _ in 0..6 {
        let r = client::send(
            &c,
            Request::post(format!("{}/buffered/echo", env.base))
                .body(Full::new(Bytes::from_static(b"0123456789")))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["body_len"], 10);
    }

    // Everything fails: retries stop at the budget (20 % of requests).
    let before = bad.hits() + worse.hits();
    let n = 100;
    for _ in 0..n {
        assert_eq!(env.get("/broken/x").await.status, 503);
    }
    let tries = bad.hits() + worse.hits() - before;
    assert!(
        tries <= n + n / 5 + 2,
        "{tries} tries for {n} requests: retries exceeded the budget"
    );
    assert!(tries > n, "some retries were made");
    let m = env.metrics().await;
    assert!(
        m.contains("gateway_upstream_retry_budget_exhausted_total{upstream=\"broken\"}"),
        "{m}"
    );
    assert!(
        m.contains("gateway_upstream_retries_total{upstream=\"mixed\",reason=\"status\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_requests_are_retried_only_where_the_route_opts_in() {
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    bad.set_mode(Mode::Status(503));
    let resetting = Backend::start("resetting").await;
    resetting.set_mode(Mode::Reset);
    // Bodies are buffered, so they can be sent again: what decides is the
    // method alone.
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "mixed"
targets = ["{good}", "{bad}"]
[upstreams.outlier]
enabled = false
[upstreams.retry]
max_retries = 1
on_status = [503]
backoff = "1ms"
buffer_body = "1KiB"
[[upstreams]]
name = "flaky"
targets = ["{good}", "{resetting}"]
[upstreams.outlier]
enabled = false
[[routes]]
name = "mixed"
upstream = "mixed"
strip_prefix = "/mixed"
[routes.match]
path_prefix = "/mixed/"
[[routes]]
name = "mixed-opt-in"
upstream = "mixed"
strip_prefix = "/mixed-opt-in"
[routes.match]
path_prefix = "/mixed-opt-in/"
[routes.retry]
max_retries = 1
on_status = [503]
backoff = "1ms"
buffer_body = "1KiB"
non_idempotent = true
[[routes]]
name = "flaky"
upstream = "flaky"
strip_prefix = "/flaky"
[routes.match]
path_prefix = "/flaky/"
[[routes]]
name = "flaky-opt-in"
upstream = "flaky"
strip_prefix = "/flaky-opt-in"
[routes.match]
path_prefix = "/flaky-opt-in/"
[routes.retry]
non_idempotent = true
"#,
        good = good.addr,
        bad = bad.addr,
        resetting = resetting.addr
    ));
    let c = client::http1();
    let post = |path: &str, body: &'static [u8]| {
        client::send(
            &c,
            Request::post(format!("{}{path}", env.base))
                .body(Full::new(Bytes::from_static(body)))
                .unwrap(),
        )
    };

    // A GET that gets a 503 is retried on the other target...
    for _ in 0..4 {
        let r = env.get("/mixed/x").await;
        assert_eq!((r.status.as_u16(), backend_of(&r)), (200, "good".into()));
    }
    // ...a POST is not: the client sees the 503, and the good target never
    // sees that POST.
    let mut refused = 0;
    for _ in 0..6 {
        let (g, b) = (good.hits(), bad.hits());
        let r = post("/mixed/x", b"{}").await;
        match r.status.as_u16() {
            503 => {
                refused += 1;
                assert_eq!((good.hits(), bad.hits()), (g, b + 1), "POST retried");
            }
            200 => assert_eq!((good.hits(), bad.hits()), (g + 1, b)),
            s => panic!("status {s}: {}", r.text()),
        }
    }
    assert_eq!(refused, 3, "round robin sends every other POST to bad");
    // Where the route opts in, it is, body and all.
    let (g, b) = (good.hits(), bad.hits());
    for _ in 0..6 {
        let r = post("/mixed-opt-in/x", b"{}").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(backend_of(&r), "good");
        assert_eq!(r.json()["body_len"], 2, "the retry carried the body");
    }
    assert_eq!(good.hits(), g + 6);
    assert!(bad.hits() >= b + 3, "the POSTs went to bad first");

    // A connection closed without an answer: the request may have been
    // acted on, so the same rule applies.
    let mut broken = 0;
    for _ in 0..6 {
        let r = post("/flaky/x", b"").await;
        match r.status.as_u16() {
            502 => {
                assert_problem(&r, 502);
                broken += 1;
            }
            200 => {}
            s => panic!("status {s}: {}", r.text()),
        }
    }
    assert_eq!(broken, 3, "every other POST hits the closing target");
    for _ in 0..6 {
        assert_eq!(env.get("/flaky/x").await.status, 200, "GET retried");
        assert_eq!(post("/flaky-opt-in/x", b"").await.status, 200);
    }
    let m = env.metrics().await;
    assert!(
        m.contains("gateway_upstream_retries_total{upstream=\"mixed\",reason=\"status\"}"),
        "{m}"
    );
    assert!(
        m.contains("gateway_upstream_retries_total{upstream=\"flaky\",reason=\"reset\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_a_hung_target() {
    let hung = Backend::start("hung").await;
    hung.set_mode(Mode::Hang);
    let ok = Backend::start("ok").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{hung}", "{ok}"]
timeout = "3s"
[upstreams.outlier]
enabled = false
[upstreams.retry]
max_retries = 1
on_timeout = true
per_try_timeout = "200ms"
backoff = "1ms"
[[routes]]
name = "all"
upstream = "pool"
[routes.match]
path_prefix = "/"
"#,
        hung = hung.addr,
        ok = ok.addr
    ));
    for _ in 0..4 {
        let t = Instant::now();
        let r = env.get("/x").await;
        assert_eq!(r.status, 200);
        assert_eq!(backend_of(&r), "ok");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_queues_then_answers_503_with_retry_after() {
    let a = Backend::start("a").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{a}"]
[[routes]]
name = "limited"
upstream = "pool"
[routes.match]
path_prefix = "/"
[routes.concurrency]
max = 1
queue = 1
queue_timeout = "300ms"
"#,
        a = a.addr
    ));
    let first = {
        let url = format!("{}/delay/1200", env.base);
        tokio::spawn(async move { client::get(&url).await })
    };
    eventually(
        Duration::from_secs(2),
        "first request in flight",
        || async { a.hits() == 1 },
    )
    .await;
    let queued = {
        let url = format!("{}/x", env.base);
        tokio::spawn(async move {
            let t = Instant::now();
            (client::get(&url).await, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Queue full: refused at once.
    let t = Instant::now();
    let r = env.get("/x").await;
    assert_problem(&r, 503);
    assert!(r.header("retry-after").is_some());
    assert!(t.elapsed() < Duration::from_millis(200));
    // The queued one waited for its timeout, then got 503 too.
    let (r, waited) = queued.await.unwrap();
    assert_problem(&r, 503);
    assert!(r.header("retry-after").is_some());
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert_eq!(first.await.unwrap().status, 200);
    // Free again.
    assert_eq!(env.get("/x").await.status, 200);
    // Counted from the first config load on (route limits are built then).
    let m = env.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "gateway_upstream_overloaded_total{upstream=\"route:limited\"}"
        ),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_concurrency_limit_is_shared_by_its_routes() {
    let a = Backend::start("a").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{a}"]
[upstreams.concurrency]
max = 1
queue = 1
queue_timeout = "1s"
[[routes]]
name = "one"
upstream = "pool"
strip_prefix = "/one"
[routes.match]
path_prefix = "/one/"
[[routes]]
name = "two"
upstream = "pool"
strip_prefix = "/two"
[routes.match]
path_prefix = "/two/"
"#,
        a = a.addr
    ));
    let concurrency = || async { env.upstream("pool").await["concurrency"].clone() };
    let spawn_get = |path: &str| {
        let url = format!("{}{path}", env.base);
        tokio::spawn(async move {
            let t = Instant::now();
            (client::get(&url).await, t.elapsed())
        })
    };

    // A slow answer holds the one slot; a request on the other route waits
    // in the queue and is served once the slot frees.
    a.set_mode(Mode::Delay(500));
    let holder = spawn_get("/one/x");
    eventually(
        Duration::from_secs(2),
        "first request in flight",
        || async { a.hits() == 1 },
    )
    .await;
    let queued = spawn_get("/two/x");
    eventually(Duration::from_secs(2), "second request queued", || async {
        concurrency().await["queued"] == 1
    })
    .await;
    let c = concurrency().await;
    assert_eq!(
        (c["max"].as_u64(), c["in_flight"].as_u64()),
        (Some(1), Some(1)),
        "{c}"
    );
    // Queue full: refused at once, on either route.
    for path in ["/one/x", "/two/x"] {
        let t = Instant::now();
        let r = env.get(path).await;
        let p = assert_problem(&r, 503);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(
            p["detail"].as_str().unwrap().contains("queue is full"),
            "{p}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
    }
    assert_eq!(holder.await.unwrap().0.status, 200);
    let (r, took) = queued.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        took >= Duration::from_millis(600),
        "served after the first: {took:?}"
    );
    assert_eq!(
        a.hits(),
        2,
        "the refused requests never reached the backend"
    );

    // A slot that stays busy past queue_timeout: the waiting request gets
    // 503 with Retry-After.
    a.set_mode(Mode::Delay(2000));
    let holder = spawn_get("/two/x");
    eventually(Duration::from_secs(2), "slow request in flight", || async {
        concurrency().await["in_flight"] == 1
    })
    .await;
    let t = Instant::now();
    let r = env.get("/one/x").await;
    let waited = t.elapsed();
    let p = assert_problem(&r, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(p["detail"].as_str().unwrap().contains("in time"), "{p}");
    assert!(
        (Duration::from_millis(950)..Duration::from_millis(1900)).contains(&waited),
        "waited {waited:?} for a 1 s queue timeout"
    );
    assert_eq!(holder.await.unwrap().0.status, 200);
    a.set_mode(Mode::Normal);
    assert_eq!(env.get("/one/x").await.status, 200);
    let c = concurrency().await;
    assert_eq!(
        (c["in_flight"].as_u64(), c["queued"].as_u64()),
        (Some(0), Some(0)),
        "{c}"
    );
    let m = env.metrics().await;
    assert_eq!(
        metric_value(&m, "gateway_upstream_overloaded_total{upstream=\"pool\"}"),
        Some(3.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_discovery_changes_apply_live() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("targets.json");
    let write = |text: String| {
        let tmp = dir.path().join("targets.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(format!(r#"{{"api": ["{}"]}}"#, a.addr));
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "api"
[upstreams.file]
path = "{}"
interval = "300ms"
[[routes]]
name = "all"
upstream = "api"
[routes.match]
path_prefix = "/"
"#,
        file.display()
    ));
    assert_eq!(count_backends(&env, "/x", 4).await.get("a"), Some(&4));

    write(format!(
        r#"{{"api": ["{}", {{"address": "{}", "weight": 2}}], "other": []}}"#,
        b.addr, c.addr
    ));
    eventually(Duration::from_secs(3), "b and c in the pool", || async {
        env.upstream("api").await["targets"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    let seen = count_backends(&env, "/x", 10).await;
    assert!(!seen.contains_key("a"), "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");

    // A broken file keeps the last good set.
    write("{ not json".to_string());
    eventually(
        Duration::from_secs(3),
        "the failure is reported",
        || async { env.upstream("api").await["discovery"]["last_error"].is_string() },
    )
    .await;
    let seen = count_backends(&env, "/x", 6).await;
    assert_eq!(seen.values().sum::<usize>(), 6);
    assert!(!seen.contains_key("a"));
    write(r#"{"api": []}"#.to_string());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.upstream("api").await["targets"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "an empty list does not empty the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_dns_pool_keeps_its_targets_while_dns_is_down() {
    let dns = DnsServer::start().await;
    let a = Backend::start("a").await;
    dns.set("api.test", vec![Record::A("127.0.0.1".parse().unwrap())]);
    let body = |timeout: &str| {
        format!(
            r#"
[[upstreams]]
name = "api"
timeout = "{timeout}"
[upstreams.dns]
name = "api.test."
port = {port}
resolver = "{resolver}"
interval = "200ms"
[[routes]]
name = "all"
upstream = "api"
[routes.match]
path_prefix = "/"
"#,
            port = a.addr.port(),
            resolver = dns.addr
        )
    };
    let env = Env::start(&body("10s"));
    assert_eq!(env.get("/x").await.status, 200);
    // DNS goes down; a reload changes the pool (a new one is built).
    dns.fail(true);
    let port: u16 = env.base.rsplit(':').next().unwrap().parse().unwrap();
    env.gw
        .write_config(&Env::config(port, &env.gw.admin, &body("9s")));
    env.gw.signal(libc::SIGHUP);
    eventually(Duration::from_secs(5), "the reload", || async {
        env.metrics()
            .await
            .contains("gateway_config_reloads_total{result=\"ok\"} 1")
    })
    .await;
    let r = env.get("/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        env.upstream("api").await["targets"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_adds_and_removes_targets() {
    let dns = DnsServer::start().await;
    // Two backends on one port, at two loopback addresses.
    let port = free_port();
    let one = Backend::start_at(format!("127.0.0.1:{port}").parse().unwrap(), "one").await;
    let two = Backend::start_at(format!("127.0.0.2:{port}").parse().unwrap(), "two").await;
    let three = Backend::start("three").await;
    dns.set("api.test", vec![Record::A("127.0.0.1".parse().unwrap())]);
    dns.set(
        "_http._tcp.api.test",
        vec![
            Record::Srv {
                priority: 1,
                weight: 3,
                port: three.addr.port(),
                target: "three.test".into(),
            },
            Record::Srv {
                priority: 1,
                weight: 1,
                port,
                target: "api.test".into(),
            },
            Record::Srv {
                priority: 9,
                weight: 1,
                port: 1,
                target: "backup.test".into(),
            },
            // Same priority, but its target does not resolve: skipped, the
            // others still count.
            Record::Srv {
                priority: 1,
                weight: 1,
                port: 1,
                target: "gone.test".into(),
            },
        ],
    );
    dns.set("three.test", vec![Record::A("127.0.0.1".parse().unwrap())]);
    // A name with both an A and an AAAA record: both families are asked for.
    dns.set(
        "dual.test",
        vec![
            Record::A("127.0.0.1".parse().unwrap()),
            Record::Aaaa("::1".parse().unwrap()),
        ],
    );
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "api"
[upstreams.dns]
name = "api.test."
port = {port}
resolver = "{resolver}"
interval = "200ms"
[[upstreams]]
name = "srv"
[upstreams.dns]
name = "_http._tcp.api.test."
srv = true
resolver = "{resolver}"
interval = "200ms"
[[upstreams]]
name = "dual"
[upstreams.dns]
name = "dual.test."
port = {port}
resolver = "{resolver}"
interval = "200ms"
[[routes]]
name = "srv"
upstream = "srv"
strip_prefix = "/srv"
[routes.match]
path_prefix = "/srv/"
[[routes]]
name = "all"
upstream = "api"
[routes.match]
path_prefix = "/"
"#,
        resolver = dns.addr
    ));
    assert_eq!(count_backends(&env, "/x", 4).await.get("one"), Some(&4));

    // SRV: port and weight from the records; the priority-9 record unused,
    // the one whose target is gone skipped.
    let srv = env.upstream("srv").await;
    let mut targets: Vec<(String, u64)> = srv["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["address"].as_str().unwrap().to_string(),
                t["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    targets.sort();
    let mut want = vec![
        (format!("127.0.0.1:{port}"), 1),
        (three.addr.to_string(), 3),
    ];
    want.sort();
    assert_eq!(targets, want, "{srv}");

    // A and AAAA: both addresses become targets.
    let dual = env.upstream("dual").await;
    let mut addrs: Vec<String> = dual["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["address"].as_str().unwrap().to_string())
        .collect();
    addrs.sort();
    assert_eq!(
        addrs,
        vec![format!("127.0.0.1:{port}"), format!("[::1]:{port}")],
        "{dual}"
    );

    // A record added.
    dns.set(
        "api.test",
        vec![
            Record::A("127.0.0.1".parse().unwrap()),
            Record::A("127.0.0.2".parse().unwrap()),
        ],
    );
    eventually(Duration::from_secs(3), "two targets", || async {
        env.upstream("api").await["targets"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    let seen = count_backends(&env, "/x", 10).await;
    assert_eq!(
        (seen.get("one"), seen.get("two")),
        (Some(&5), Some(&5)),
        "{seen:?}"
    );

    // The server fails: the last good set stays.
    dns.fail(true);
    eventually(
        Duration::from_secs(3),
        "the failure is reported",
        || async { env.upstream("api").await["discovery"]["last_error"].is_string() },
    )
    .await;
    assert_eq!(count_backends(&env, "/x", 4).await.len(), 2);
    dns.fail(false);

    // A record removed.
    dns.set("api.test", vec![Record::A("127.0.0.2".parse().unwrap())]);
    eventually(Duration::from_secs(3), "one target left", || async {
        env.upstream("api").await["targets"]
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;
    assert_eq!(count_backends(&env, "/x", 4).await.get("two"), Some(&4));
    assert!(one.hits() > 0 && two.hits() > 0);
}

/// Load for `GATEWAY_CHAOS_SECS` (default 30) seconds while one of three
/// backends closes connections unanswered for a second, and another is
/// killed (with requests in flight) and later restored: every
/// answer is a 200 or a clean problem+json 502/503, none hangs, and the
/// restored backend takes traffic again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_and_restore_under_load_fails_cleanly() {
    let secs: u64 = std::env::var("GATEWAY_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let run = Duration::from_secs(secs);
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "pool"
balance = "least_request"
targets = ["{a}", "{b}", "{c}"]
connect_timeout = "300ms"
timeout = "3s"
[upstreams.health]
path = "/healthz"
interval = "300ms"
timeout = "200ms"
unhealthy_threshold = 1
healthy_threshold = 2
[upstreams.outlier]
consecutive_failures = 2
base_ejection = "1s"
[[routes]]
name = "all"
upstream = "pool"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr
    ));
    let start = Instant::now();
    let stop = start + run;
    let mut clients = Vec::new();
    for i in 0..6 {
        let base = env.base.clone();
        clients.push(tokio::spawn(async move {
            let c = client::http1();
            let (mut ok, mut failed, mut hung) = (0u32, 0u32, 0u32);
            let mut bad = Vec::new();
            let mut n = 0u32;
            while Instant::now() < stop && n < 200_000 {
                n += 1;
                // Some requests linger so that a kill catches them in flight.
                let path = if (n + i).is_multiple_of(10) {
                    "/delay/50"
                } else {
                    "/x"
                };
                let req = Request::get(format!("{base}{path}"))
                    .body(Full::default())
                    .unwrap();
                let fut = async {
                    let resp = c.request(req).await?;
                    let (parts, body) = resp.into_parts();
                    let body = http_body_util::BodyExt::collect(body).await?.to_bytes();
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
                };
                match tokio::time::timeout(Duration::from_secs(5), fut).await {
                    Err(_) => hung += 1,
                    Ok(Err(e)) => bad.push(format!("client error: {e}")),
                    Ok(Ok((parts, body))) => match parts.status.as_u16() {
                        200 => ok += 1,
                        502 | 503 => {
                            failed += 1;
                            let clean = parts
                                .headers
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                == Some("application/problem+json")
                                && serde_json::from_slice::<serde_json::Value>(&body)
                                    .is_ok_and(|p| p["status"] == parts.status.as_u16());
                            if !clean {
                                bad.push(format!("unclean {}: {body:?}", parts.status));
                            }
                        }
                        s => bad.push(format!("status {s}: {body:?}")),
                    },
                }
            }
            (ok, failed, hung, bad)
        }));
    }
    // A burst of connections closed without an answer on b...
    tokio::time::sleep(run / 6).await;
    b.set_mode(Mode::Reset);
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.set_mode(Mode::Normal);
    // ...then c dies with requests in flight, and comes back later.
    tokio::time::sleep((run / 3).saturating_sub(run / 6 + Duration::from_secs(1))).await;
    let c_addr = c.kill().await;
    tokio::time::sleep(run / 3).await;
    let c = Backend::start_at(c_addr, "c").await;
    let (mut ok, mut failed, mut hung) = (0, 0, 0);
    let mut bad = Vec::new();
    for t in clients {
        let (o, f, h, b) = t.await.unwrap();
        ok += o;
        failed += f;
        hung += h;
        bad.extend(b);
    }
    assert!(
        start.elapsed() < run + Duration::from_secs(10),
        "the load stopped on time"
    );
    assert_eq!(hung, 0, "requests hung");
    assert!(
        bad.is_empty(),
        "{} bad answers, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(ok > 100, "{ok} ok");
    assert!(
        f64::from(failed) <= 0.01 * f64::from(ok + failed),
        "{failed} failures of {}",
        ok + failed
    );
    assert!(c.hits() > 0, "the restored backend takes traffic again");
    eprintln!(
        "chaos: {ok} ok, {failed} clean failures, a={} b={} c(restored)={}",
        a.hits(),
        b.hits(),
        c.hits()
    );
}

/// `gateway check` places upstream problems at their key.
#[test]
fn check_reports_upstream_problems_with_locations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.toml");
    std::fs::write(
        &path,
        r#"[[upstreams]]
name = "both"
targets = ["127.0.0.1:1"]
[upstreams.dns]
name = "api.test"
port = 80
[[upstreams]]
name = "bad"
balance = "round_robin"
hash_key = "header:x-user"
targets = [{ address = "127.0.0.1:2", weight = 0 }]
[upstreams.breaker]
error_rate = 1.5
[upstreams.retry]
on_status = [999]
[upstreams.concurrency]
max = 0
[[upstreams]]
name = "odd"
balance = "sideways"
targets = ["127.0.0.1:3"]
"#,
    )
    .unwrap();
    let (code, out, _) = gateway_tests::gateway::run_cli(&["check", "-c", path.to_str().unwrap()]);
    let p = path.display().to_string();
    let lines: Vec<String> = out.lines().map(|l| l.replace(&p, "F")).collect();
    assert_eq!(code, 2, "{lines:?}");
    // A bad enum value is a parse error, reported alone.
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("F:20:11: unknown variant `sideways`"),
        "{lines:?}"
    );

    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"sideways\"", "\"maglev\"")
            + "[upstreams.health]\npath = \"/health check\"\nhost = \"bad host\"\n",
    )
    .unwrap();
    let (code, out, _) = gateway_tests::gateway::run_cli(&["check", "-c", path.to_str().unwrap()]);
    let lines: Vec<String> = out.lines().map(|l| l.replace(&p, "F")).collect();
    assert_eq!(code, 2);
    assert_eq!(
        lines,
        [
            "F:2:8: upstream \"both\" needs exactly one target source: `targets`, `[upstreams.dns]` or `[upstreams.file]`",
            "F:10:12: hash_key needs balance = \"ring_hash\" or \"maglev\"",
            "F:11:12: target weight must be between 1 and 1000",
            "F:13:14: error_rate must be above 0 and at most 1",
            "F:15:14: invalid status 999",
            "F:17:7: concurrency max must be at least 1",
            "F:23:8: health check path \"/health check\" is not a valid request target (escape spaces and the like)",
            "F:24:8: health check host \"bad host\" is not a host name or host:port",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_until_idle_too_long() {
    let a = Backend::start("a").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "one"
targets = ["{a}"]
pool_idle_timeout = "400ms"
[[routes]]
name = "all"
upstream = "one"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr
    ));
    // One after another, with bodies and without (204, 304): the backend
    // sees a connection or two (the gateway has two workers), not one per
    // request.
    for i in 0..60 {
        let path = match i % 3 {
            0 => "/x".to_string(),
            1 => "/status/204".to_string(),
            _ => "/status/304".to_string(),
        };
        let r = env.get(&path).await;
        assert!(r.status.as_u16() < 400, "{path}: {}", r.status);
    }
    assert_eq!(a.hits(), 60);
    let used = a.connections();
    assert!(
        (1..=2).contains(&used),
        "{used} upstream connections for 60 requests"
    );
    // An idle connection older than pool_idle_timeout is not used again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(env.get("/x").await.status, 200);
    assert_eq!(
        a.connections(),
        used + 1,
        "a new connection after the idle timeout"
    );
}

/// A scripted HTTP/1.1 upstream on raw TCP: per request path, a response
/// written byte for byte (see `upstream_response_framings_...`). Counts
/// connections.
async fn scripted_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = std::sync::Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // Read one request head (bodies are not read).
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    // `/host` answers with the Host the request came with.
                    let host = head
                        .lines()
                        .find_map(|l| l.strip_prefix("host: "))
                        .unwrap_or("")
                        .to_string();
                    let host_answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{host}",
                        host.len()
                    );
                    let (resp, close): (&[u8], bool) = match path.as_str() {
                        "/host" => (host_answer.as_bytes(), false),
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
                            false,
                        ),
                        "/close" => (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", true),
                        // Both framings: chunked wins, the length is dropped.
                        "/chunked-and-length" => (
                            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                            true,
                        ),
                        // A 304's length describes the representation: kept.
                        "/not-modified" => (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n", false),
                        // A HEAD answer framed as chunked: no body follows.
                        "/head-chunked" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false),
                        "/continue" => (
                            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                            false,
                        ),
                        "/early" => (
                            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope",
                            true,
                        ),
                        "/bad" => (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", true),
                        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
                    };
                    if s.write_all(resp).await.is_err() {
                        return;
                    }
                    if close {
                        // Close as servers do: stop writing, then drain
                        // what the client still sends for a while.
                        let _ = s.shutdown().await;
                        let mut sink = [0u8; 65536];
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Ok(n) = s.read(&mut sink).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        })
                        .await;
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_framings_and_early_answers() {
    use std::sync::atomic::Ordering;
    let (addr, conns) = scripted_upstream().await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "raw"
targets = ["{addr}"]
[upstreams.retry]
max_retries = 0
[[routes]]
name = "all"
upstream = "raw"
[routes.match]
path_prefix = "/"
"#
    ));
    // Chunked (with an extension and a trailer), then a plain response on
    // the same connection.
    let r = env.get("/chunked").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "hello world"));
    let r = env.get("/plain").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    // An interim 100 is skipped.
    let r = env.get("/continue").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    // One connection per gateway worker at most, for three exchanges.
    assert!(
        conns.load(Ordering::Relaxed) <= 2,
        "keep-alive connections reused"
    );
    // A request without Host (HTTP/1.0) gets the target's on the way
    // upstream; one with Host keeps it.
    let listen = env.base.trim_start_matches("http://");
    let raw = client::raw(listen, "GET /host HTTP/1.0\r\n\r\n");
    assert!(raw.ends_with(&format!("\r\n\r\n{addr}")), "{raw}");
    let raw = client::raw(listen, "GET /host HTTP/1.0\r\nHost: example.test\r\n\r\n");
    assert!(raw.ends_with("\r\n\r\nexample.test"), "{raw}");
    // HEAD answered as chunked: the client gets a head with no made-up
    // length and no body, and the connection goes on.
    let raw = client::raw(
        listen,
        "HEAD /head-chunked HTTP/1.1\r\nHost: x\r\n\r\nGET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let parts: Vec<&str> = raw.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(parts.len(), 2, "{raw}");
    assert!(
        parts[0].starts_with("200") && parts[0].ends_with("\r\n\r\n"),
        "{raw}"
    );
    assert!(!parts[0].contains("content-length"), "{raw}");
    assert!(!parts[0].contains("transfer-encoding"), "{raw}");
    assert!(
        parts[1].starts_with("200") && parts[1].ends_with("ok"),
        "{raw}"
    );
    // Chunked with a Content-Length: read as chunked, sent on without the
    // upstream's length; a 304 keeps its length and has no body.
    let raw = client::raw(
        listen,
        "GET /chunked-and-length HTTP/1.1\r\nHost: x\r\n\r\nGET /not-modified HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let parts: Vec<&str> = raw.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(parts.len(), 2, "{raw}");
    assert!(parts[0].starts_with("200"), "{raw}");
    assert!(!parts[0].contains("content-length: 99"), "{raw}");
    assert!(parts[0].contains("transfer-encoding: chunked"), "{raw}");
    assert!(parts[0].ends_with("5\r\nhello\r\n0\r\n\r\n"), "{raw}");
    assert!(parts[1].starts_with("304"), "{raw}");
    assert!(parts[1].contains("content-length: 42\r\n"), "{raw}");
    assert!(parts[1].ends_with("\r\n\r\n"), "{raw}");
    // Delimited by the connection's end: read whole, connection not kept.
    let r = env.get("/close").await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "until the end")
    );
    let before = conns.load(Ordering::Relaxed);
    for _ in 0..4 {
        assert_eq!(env.get("/plain").await.status, 200);
    }
    // At most one new connection per worker (the closed one replaced, and
    // one for a worker that had none).
    assert!(
        conns.load(Ordering::Relaxed) <= before + 2,
        "connections are still reused after a close-delimited response"
    );
    // Conflicting lengths from the upstream: a 502, not a guess.
    let r = env.get("/bad").await;
    assert_problem(&r, 502);
    // An upstream that answers before reading a large streamed body: the
    // answer reaches the client; the rest of the body is not sent.
    let body = Bytes::from(vec![b'z'; 2 * 1024 * 1024]);
    let req = Request::post(format!("{}/early", env.base))
        .body(Full::new(body))
        .unwrap();
    let r = client::send(&client::http1(), req).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.text(), "nope");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_keep_their_framing_upstream() {
    let a = Backend::start("a").await;
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "one"
targets = ["{a}"]
[[routes]]
name = "all"
upstream = "one"
[routes.match]
path_prefix = "/"
"#,
        a = a.addr
    ));
    let addr = env.base.trim_start_matches("http://").to_string();
    let echo = |raw: String| {
        let addr = addr.clone();
        async move {
            let text = tokio::task::spawn_blocking(move || client::raw(&addr, &raw))
                .await
                .unwrap();
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            serde_json::from_str::<serde_json::Value>(&body)
                .unwrap_or_else(|e| panic!("{e}: {text}"))
        }
    };
    // A chunked body goes on chunked, whole.
    let v = echo(
        "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
            .to_string(),
    )
    .await;
    assert_eq!(v["body_len"], 12, "{v}");
    assert_eq!(v["headers"]["transfer-encoding"], "chunked", "{v}");
    assert!(v["headers"]["content-length"].is_null(), "{v}");
    // A body with a length keeps it.
    let v = echo(
        "PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
            .to_string(),
    )
    .await;
    assert_eq!(
        (
            v["body_len"].as_u64(),
            v["headers"]["content-length"].as_str()
        ),
        (Some(3), Some("3")),
        "{v}"
    );
    // An empty POST says so.
    let v = echo("POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string()).await;
    assert_eq!(v["headers"]["content-length"], "0", "{v}");
    assert!(v["headers"]["transfer-encoding"].is_null(), "{v}");
}

/// A request body fed chunk by chunk from a channel.
struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http2_upload_is_not_counted_against_the_upstream_timeout() {
    // The client speaks HTTP/2 to the gateway (hyper's server side feeds
    // the body), the target HTTP/1.1; the upload outlasts the timeout.
    let a = Backend::start("a").await;
    let env = upload_env(a.addr, "http1");
    let tcp = tokio::net::TcpStream::connect(env.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for chunk in ["ab", "cd", "ef", "gh"] {
            if tx.send(Bytes::from_static(chunk.as_bytes())).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let started = Instant::now();
    let resp = send
        .send_request(
            Request::put(format!("{}/up", env.base))
                .body(Chunks(rx))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["body_len"], 8, "{v}");
    assert!(started.elapsed() >= Duration::from_millis(850));
}

/// `[[upstreams]]` named `name` with one target and `tls` as its
/// `[upstreams.tls]` table, and a route to it for `/NAME/`.
fn tls_upstream(name: &str, target: std::net::SocketAddr, tls: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "{name}"
targets = ["{target}"]
[upstreams.tls]
{tls}
[[routes]]
name = "{name}"
upstream = "{name}"
[routes.match]
path_prefix = "/{name}/"
"#
    )
}

/// A backend speaking HTTP/1.1 over TLS only, with a certificate from
/// `ca` for `names` (DNS names or IP addresses).
async fn tls_backend(ca: &gateway_tests::pki::Ca, name: &str, names: &[&str]) -> Backend {
    Backend::start_tls(
        name,
        ca.server(name, names).server_config(&[b"http/1.1"], None),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstreams_verify_the_certificate_chain_and_name() {
    use gateway_tests::pki::Ca;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "up");
    let other = Ca::new(dir.path(), "other");
    let by_ip = tls_backend(&ca, "by-ip", &["127.0.0.1"]).await;
    let by_name = tls_backend(&ca, "by-name", &["api.internal"]).await;
    let ca_file = format!("ca_file = {:?}", ca.ca_file.display().to_string());
    let other_ca = format!("ca_file = {:?}", other.ca_file.display().to_string());
    let env = Env::start(
        &[
            tls_upstream("trusted", by_ip.addr, &ca_file),
            tls_upstream(
                "named",
                by_name.addr,
                &format!("{ca_file}\nsni = \"api.internal\""),
            ),
            tls_upstream("wrongname", by_name.addr, &ca_file),
            tls_upstream("untrusted", by_ip.addr, &other_ca),
            tls_upstream("untrusted2", by_ip.addr, &other_ca)
                .replace("[upstreams.tls]", "protocol = \"http2\"\n[upstreams.tls]"),
            tls_upstream("unverified", by_ip.addr, "verify = false"),
        ]
        .concat(),
    );

    // Sequential requests share one pooled TLS connection per worker.
    for i in 0..30 {
        let r = env.get(&format!("/trusted/{i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(backend_of(&r), "by-ip");
    }
    let used = by_ip.connections();
    assert!(
        (1..=2).contains(&used),
        "{used} TLS connections for 30 requests"
    );

    let r = env.get("/named/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend_of(&r), "by-name");
    // The admin API says how each upstream speaks TLS.
    let u = env.upstream("named").await;
    assert_eq!(u["protocol"], "http1", "{u}");
    assert_eq!(u["tls"]["server_name"], "api.internal", "{u}");
    assert_eq!(u["tls"]["verify"], true, "{u}");
    assert_eq!(u["tls"]["client_certificate"], false, "{u}");
    assert_eq!(env.upstream("unverified").await["tls"]["verify"], false);
    assert_eq!(env.get("/unverified/x").await.status, 200);

    // The target's address is not a name in its certificate, or the
    // certificate comes from a CA the upstream does not trust: 502, and
    // the log says why.
    for (path, why) in [
        ("/wrongname/x", "certificate not valid for name"),
        ("/untrusted/x", "UnknownIssuer"),
        // The same on an HTTP/2 upstream's connection.
        ("/untrusted2/x", "UnknownIssuer"),
    ] {
        let hits = by_ip.hits() + by_name.hits();
        let r = env.get(path).await;
        let p = assert_problem(&r, 502);
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .starts_with("TLS handshake failed with upstream"),
            "{p}"
        );
        assert_eq!(
            by_ip.hits() + by_name.hits(),
            hits,
            "{path} reached a backend"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !env.gw.stderr().contains(why) {
            assert!(
                Instant::now() < deadline,
                "no {why} in the log: {}",
                env.gw.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstreams_present_client_certificates_speak_http2_and_stream_uploads() {
    use gateway_tests::pki::Ca;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "up");
    let clients = Ca::new(dir.path(), "clients");
    let client = clients.client("gateway-client");
    let mtls = Backend::start_tls(
        "mtls",
        ca.server("m", &["127.0.0.1"])
            .server_config(&[b"http/1.1"], Some(&clients)),
    )
    .await;
    let h2 = Backend::start_tls(
        "h2",
        ca.server("h2", &["127.0.0.1"])
            .server_config(&[b"h2"], None),
    )
    .await;
    let ca_file = format!("ca_file = {:?}", ca.ca_file.display().to_string());
    let with_cert = format!(
        "{ca_file}\ncert = {:?}\nkey = {:?}",
        client.cert_file.display().to_string(),
        client.key_file.display().to_string()
    );
    let env = Env::start(
        &[
            tls_upstream("withcert", mtls.addr, &with_cert),
            tls_upstream("nocert", mtls.addr, &ca_file),
            tls_upstream("h2", h2.addr, &ca_file)
                .replace("[upstreams.tls]", "protocol = \"http2\"\n[upstreams.tls]"),
        ]
        .concat(),
    );

    // Mutual TLS: the target asks for a certificate; only the upstream
    // that has one gets through.
    let r = env.get("/withcert/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend_of(&r), "mtls");
    // (TLS 1.3: the refusal comes after the client's handshake, with the
    // first read.)
    let p = assert_problem(&env.get("/nocert/x").await, 502);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .starts_with("TLS failed with upstream \"nocert\""),
        "{p}"
    );
    assert_eq!(
        mtls.hits(),
        1,
        "the request without a certificate was served"
    );
    eventually(Duration::from_secs(5), "the reason in the log", || async {
        env.gw.stderr().contains("CertificateRequired")
    })
    .await;

    // HTTP/2 over TLS, chosen by ALPN.
    let r = env.get("/h2/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/2.0");

    // A streamed request body goes out through TLS while the response is
    // awaited, to both protocols.
    for path in ["/withcert/up", "/h2/up"] {
        let pause = Duration::from_millis(30);
        let chunks = (0..4).map(|i| (pause, vec![b'a' + i; 1000])).collect();
        let (resp, _) = upload(&env.base, path, chunks).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{path}: {resp}");
        assert!(resp.contains("\"body_len\":4000"), "{path}: {resp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_health_checks_and_a_reload_that_changes_only_a_ca_file() {
    use gateway_tests::pki::Ca;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "up");
    let other = Ca::new(dir.path(), "other");
    let good = tls_backend(&ca, "good", &["127.0.0.1"]).await;
    // A plain backend among TLS targets fails every check's handshake.
    let plain = Backend::start("plain").await;
    // The upstream trusts whatever `trust.pem` holds: the wrong CA first.
    let trust = dir.path().join("trust.pem");
    std::fs::copy(&other.ca_file, &trust).unwrap();
    let env = Env::start(&format!(
        r#"
[[upstreams]]
name = "checked"
targets = ["{good}", "{plain}"]
[upstreams.tls]
ca_file = "{ca}"
[upstreams.health]
path = "/healthz"
interval = "100ms"
unhealthy_threshold = 1
healthy_threshold = 1
[[routes]]
name = "checked"
upstream = "checked"
[routes.match]
path_prefix = "/checked/"
{pinned}"#,
        good = good.addr,
        plain = plain.addr,
        ca = ca.ca_file.display(),
        pinned = tls_upstream(
            "pinned",
            good.addr,
            &format!("ca_file = {:?}", trust.display().to_string())
        ),
    ));
    let plain_addr = plain.addr.to_string();
    eventually(Duration::from_secs(5), "plain target unhealthy", || async {
        env.target("checked", &plain_addr).await["healthy"] == false
    })
    .await;
    assert_eq!(
        env.target("checked", &good.addr.to_string()).await["healthy"],
        true
    );
    for _ in 0..10 {
        assert_eq!(backend_of(&env.get("/checked/x").await), "good");
    }
    assert!(good.hits() > 10, "the checks reached the TLS target");
    assert_eq!(plain.hits(), 0);

    // Only the CA file's contents change: a reload rebuilds the upstream.
    assert_problem(&env.get("/pinned/x").await, 502);
    std::fs::copy(&ca.ca_file, &trust).unwrap();
    let cfg = std::fs::read_to_string(&env.gw.config).unwrap();
    env.gw.write_config(&cfg);
    env.gw.signal(libc::SIGHUP);
    eventually(Duration::from_secs(5), "the new CA is trusted", || async {
        env.get("/pinned/x").await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_ends_is_bounded_by_connect_timeout() {
    // The kernel completes the TCP handshake on this socket's backlog;
    // nothing ever answers the TLS client hello.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let upstream = |name: &str, protocol: &str| {
        tls_upstream(name, addr, "verify = false").replace(
            "[upstreams.tls]",
            &format!(
                "protocol = \"{protocol}\"\nconnect_timeout = \"300ms\"\ntimeout = \"20s\"\nretry = {{ max_retries = 0 }}\n[upstreams.tls]"
            ),
        )
    };
    let env = Env::start(&[upstream("one", "http1"), upstream("two", "http2")].concat());
    for path in ["/one/x", "/two/x"] {
        let started = Instant::now();
        let p = assert_problem(&env.get(path).await, 502);
        let took = started.elapsed();
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .starts_with("cannot connect to upstream"),
            "{path}: {p}"
        );
        assert!(took < Duration::from_secs(3), "{path} took {took:?}");
    }
    assert!(env.gw.stderr().contains("connect timed out after 300ms"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_hosted_https_upstream_gets_its_own_name_as_sni_and_host() {
    use gateway_tests::pki::Ca;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "up");
    let partner = tls_backend(&ca, "partner", &["api.partner.test"]).await;
    let env = Env::start(
        &tls_upstream(
            "partner",
            partner.addr,
            &format!(
                "sni = \"api.partner.test\"\nca_file = {:?}",
                ca.ca_file.display().to_string()
            ),
        )
        .replace(
            "[routes.match]",
            "request_headers.set = { host = \"api.partner.test\" }\n[routes.match]",
        ),
    );
    let r = env.get("/partner/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["headers"]["host"], "api.partner.test", "{v}");
    // The client's host is still passed on as X-Forwarded-Host.
    assert_ne!(v["headers"]["x-forwarded-host"], "api.partner.test", "{v}");
}
