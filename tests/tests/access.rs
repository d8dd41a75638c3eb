//! Route-level IP allow/deny, and auto-ban in userspace mode: a source that
//! keeps exceeding limits has its connections refused for the ban's TTL,
//! then is let in again. Sources are told apart by binding clients to
//! different loopback addresses (127.0.0.1, 127.0.0.2, ...).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gateway_tests::backend::Backend;
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Env {
    gw: Gateway,
    addr: SocketAddr,
}

fn start(b: &Backend, listener_extra: &str, routes: &str) -> Env {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
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
{listener_extra}
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
    );
    let gw = Gateway::start(&config, &admin);
    Env {
        gw,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
    }
}

/// Sends `GET path` from source address `src` on a fresh connection; the
/// status, or `None` when the connection is refused or closed unanswered.
async fn get_from(src: &str, addr: SocketAddr, path: &str) -> Option<u16> {
    get_with(src, addr, path, "").await
}

/// `get_from` from 127.0.0.1 with `X-Forwarded-For: client` (for
/// listeners that trust 127.0.0.1, which then stand for `client`).
async fn get_as(client: &str, addr: SocketAddr, path: &str) -> Option<u16> {
    get_with(
        "127.0.0.1",
        addr,
        path,
        &format!("X-Forwarded-For: {client}\r\n"),
    )
    .await
}

async fn get_with(src: &str, addr: SocketAddr, path: &str, headers: &str) -> Option<u16> {
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind(format!("{src}:0").parse().ok()?).ok()?;
    let mut s = tokio::time::timeout(Duration::from_secs(5), sock.connect(addr))
        .await
        .ok()?
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn admin_get(gw: &Gateway, path: &str) -> String {
    gateway_tests::client::raw(
        &gw.admin,
        &format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_allow_and_deny_lists() {
    let b = Backend::start("one").await;
    let env = start(
        &b,
        "",
        r#"
[[routes]]
name = "no-two"
upstream = "one"
[routes.match]
path_prefix = "/no-two/"
[routes.access]
deny = ["127.0.0.2"]
[[routes]]
name = "loopback-but-not-three"
upstream = "one"
[routes.match]
path_prefix = "/lb/"
[routes.access]
allow = ["127.0.0.0/8"]
deny = ["127.0.0.3/32"]
[[routes]]
name = "ten-only"
upstream = "one"
[routes.match]
path_prefix = "/ten/"
[routes.access]
allow = ["10.0.0.0/8", "2001:db8::/32"]
"#,
    );
    assert_eq!(
        get_from("127.0.0.1", env.addr, "/no-two/x").await,
        Some(200)
    );
    assert_eq!(
        get_from("127.0.0.2", env.addr, "/no-two/x").await,
        Some(403)
    );
    assert_eq!(get_from("127.0.0.2", env.addr, "/lb/x").await, Some(200));
    assert_eq!(get_from("127.0.0.3", env.addr, "/lb/x").await, Some(403));
    assert_eq!(get_from("127.0.0.1", env.addr, "/ten/x").await, Some(403));
    // Other routes are not affected.
    assert_eq!(get_from("127.0.0.2", env.addr, "/open").await, Some(200));
    assert_eq!(b.hits(), 3, "refused requests never reach the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cidr_is_reported_with_its_location() {
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
[routes.access]
deny = ["10.0.0.0/33"]
"#,
    )
    .unwrap();
    let (code, out, _) = gateway_tests::gateway::run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("g.toml:8:9: invalid CIDR \"10.0.0.0/33\""),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_ban_refuses_a_source_that_keeps_exceeding_limits_until_the_ttl_ends() {
    let b = Backend::start("one").await;
    let env = start(
        &b,
        r#"
[listeners.auto_ban]
limit_exceeded = 3
auth_failures = 0
window = "30s"
ttl = "2s"
exempt = ["127.0.0.3"]
"#,
        r#"
[[routes]]
name = "limited"
upstream = "one"
[routes.match]
path_prefix = "/limited/"
[routes.rate_limit]
limits = [{ requests = 1, per = "1h" }]
"#,
    );
    let addr = env.addr;
    // 127.0.0.2: one request passes, then three 429s earn a ban.
    assert_eq!(get_from("127.0.0.2", addr, "/limited/a").await, Some(200));
    for _ in 0..3 {
        assert_eq!(get_from("127.0.0.2", addr, "/limited/a").await, Some(429));
    }
    let banned_at = Instant::now();
    assert_eq!(
        get_from("127.0.0.2", addr, "/open").await,
        None,
        "a banned source's connections are refused"
    );
    // Other sources are served; an exempt source is never banned.
    assert_eq!(get_from("127.0.0.1", addr, "/open").await, Some(200));
    for _ in 0..5 {
        assert!(get_from("127.0.0.3", addr, "/limited/a").await.is_some());
    }
    assert_eq!(get_from("127.0.0.3", addr, "/open").await, Some(200));
    let bans = admin_get(&env.gw, "/admin/bans");
    assert!(bans.contains("\"ip\":\"127.0.0.2\""), "{bans}");
    assert!(!bans.contains("127.0.0.3"), "{bans}");
    let metrics = admin_get(&env.gw, "/metrics");
    assert!(
        metrics
            .contains("gateway_autoban_bans_total{listener=\"main\",reason=\"limit_exceeded\"} 1"),
        "{metrics}"
    );
    // Let in again once the TTL has passed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if get_from("127.0.0.2", addr, "/open").await == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "ban never lifted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        banned_at.elapsed() >= Duration::from_millis(1900),
        "lifted after {:?}, before the 2 s TTL",
        banned_at.elapsed()
    );
    let bans = admin_get(&env.gw, "/admin/bans");
    assert!(!bans.contains("127.0.0.2"), "{bans}");
    assert!(
        env.gw.stderr().contains("auto-ban: source banned"),
        "{}",
        env.gw.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_ban_never_bans_an_xdp_allow_listed_source() {
    let b = Backend::start("one").await;
    let env = start(
        &b,
        r#"
[listeners.auto_ban]
limit_exceeded = 2
auth_failures = 0
ttl = "1m"
ipv4_prefix = 24
[xdp]
allow = ["127.0.0.4/32"]
"#,
        r#"
[[routes]]
name = "limited"
upstream = "one"
[routes.match]
path_prefix = "/limited/"
[routes.rate_limit]
limits = [{ requests = 1, per = "1h" }]
"#,
    );
    let addr = env.addr;
    for src in ["127.0.0.4", "127.0.0.5"] {
        assert_eq!(get_from(src, addr, "/limited/a").await, Some(200));
        for _ in 0..2 {
            assert_eq!(get_from(src, addr, "/limited/a").await, Some(429));
        }
    }
    // The allow-listed source keeps being served; the other is banned,
    // into the [xdp] deny list (userspace enforcement here: --no-xdp).
    assert_eq!(get_from("127.0.0.4", addr, "/open").await, Some(200));
    assert_eq!(get_from("127.0.0.5", addr, "/open").await, None);
    // Sources are /24s here, but the allow-listed address lies in this
    // one: only the address that earned the ban is banned, not the /24.
    assert_eq!(get_from("127.0.0.6", addr, "/open").await, Some(200));
    let deny = admin_get(&env.gw, "/admin/xdp/deny");
    assert!(deny.contains("127.0.0.5"), "{deny}");
    assert!(!deny.contains("127.0.0.0/24"), "{deny}");
    let stderr = env.gw.stderr();
    assert!(
        stderr.contains("auto-ban skipped: the source is allow-listed"),
        "{stderr}"
    );
    let metrics = admin_get(&env.gw, "/metrics");
    assert!(
        metrics
            .contains("gateway_autoban_bans_total{listener=\"main\",reason=\"limit_exceeded\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_is_counted_and_banned_by_its_64() {
    let b = Backend::start("one").await;
    // Clients are named by a trusted proxy on 127.0.0.1, so that any IPv6
    // address can stand for one.
    let env = start(
        &b,
        r#"
trusted_proxies = ["127.0.0.1"]
[listeners.auto_ban]
limit_exceeded = 3
auth_failures = 0
window = "30s"
ttl = "30s"
"#,
        r#"
[[routes]]
name = "per-64"
upstream = "one"
[routes.match]
path_prefix = "/per-64/"
[routes.rate_limit]
limits = [{ requests = 2, per = "1h" }]
[[routes]]
name = "per-address"
upstream = "one"
[routes.match]
path_prefix = "/per-address/"
[routes.rate_limit]
limits = [{ requests = 1, per = "1h" }]
ipv6_prefix = 128
[[routes]]
name = "per-24"
upstream = "one"
[routes.match]
path_prefix = "/per-24/"
[routes.rate_limit]
limits = [{ requests = 1, per = "1h" }]
ipv4_prefix = 24
"#,
    );
    let addr = env.addr;
    // One address each within one /64: the /64 has one budget.
    assert_eq!(
        get_as("2001:db8:1:2::1", addr, "/per-64/x").await,
        Some(200)
    );
    assert_eq!(
        get_as("2001:db8:1:2::2", addr, "/per-64/x").await,
        Some(200)
    );
    assert_eq!(
        get_as("2001:db8:1:2::3", addr, "/per-64/x").await,
        Some(429)
    );
    assert_eq!(
        get_as("2001:db8:1:3::1", addr, "/per-64/x").await,
        Some(200)
    );
    // ipv6_prefix = 128: each address has its own.
    for a in ["2001:db8:9::1", "2001:db8:9::2"] {
        assert_eq!(get_as(a, addr, "/per-address/x").await, Some(200), "{a}");
    }
    assert_eq!(
        get_as("2001:db8:9::2", addr, "/per-address/x").await,
        Some(429)
    );
    // ipv4_prefix = 24: one budget for the /24.
    assert_eq!(get_as("198.51.100.1", addr, "/per-24/x").await, Some(200));
    assert_eq!(get_as("198.51.100.2", addr, "/per-24/x").await, Some(429));
    assert_eq!(get_as("198.51.101.2", addr, "/per-24/x").await, Some(200));

    // Auto-ban counts the /64's refusals together (one is in above): two
    // more from other addresses in it ban the whole /64.
    for a in ["2001:db8:1:2::4", "2001:db8:1:2:ffff::5"] {
        assert_eq!(get_as(a, addr, "/per-64/x").await, Some(429), "{a}");
    }
    assert_eq!(
        get_as("2001:db8:1:2:abcd::77", addr, "/open").await,
        Some(403),
        "an address of the banned /64 that never sent anything"
    );
    assert_eq!(get_as("2001:db8:1:3::1", addr, "/open").await, Some(200));
    let bans = admin_get(&env.gw, "/admin/bans");
    assert!(bans.contains("\"ip\":\"2001:db8:1:2::/64\""), "{bans}");
}
