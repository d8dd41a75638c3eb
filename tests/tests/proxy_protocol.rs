//! Listeners behind a load balancer (`proxy_protocol = true`): the client a
//! PROXY header (v1 or v2) names stands for the peer in forwarding headers
//! and access rules; a connection without a valid header is closed unserved.
//! And behind trusted HTTP proxies (`trusted_proxies`): the client their
//! `X-Forwarded-For` names.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use gateway_tests::backend::Backend;
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;

/// A gateway with `listeners` (TOML tables), one upstream, a
/// `/private/` route refusing the CIDRs `deny` (a TOML array), a route for
/// everything else, and `extra` sections.
fn gateway(backend: &Backend, listeners: &str, deny: &str, extra: &str) -> Gateway {
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
[server]
workers = 1
watch_config = false
[admin]
listen = "{admin}"
{listeners}
[[upstreams]]
name = "be"
targets = ["{b}"]
[[routes]]
name = "private"
upstream = "be"
[routes.match]
path_prefix = "/private/"
[routes.access]
deny = {deny}
[[routes]]
name = "all"
upstream = "be"
[routes.match]
path_prefix = "/"
{extra}
"#,
        b = backend.addr
    );
    Gateway::start(&config, &admin)
}

/// The PROXY protocol listener "lb", with `extra` sections.
fn start(backend: &Backend, extra: &str) -> (Gateway, String) {
    let port = free_port();
    let listener = format!(
        r#"[[listeners]]
name = "lb"
listen = "127.0.0.1:{port}"
proxy_protocol = true
header_read_timeout = "500ms"
[listeners.auto_ban]
auth_failures = 3"#
    );
    let gw = gateway(backend, &listener, r#"["203.0.113.0/24"]"#, extra);
    (gw, format!("127.0.0.1:{port}"))
}

/// Sends `header` and then a GET for `path` on a new connection; returns
/// what came back until the gateway closed it.
fn exchange(addr: &str, header: &[u8], path: &str) -> String {
    exchange_with(addr, header, path, "")
}

/// `exchange` with more header `fields` (each ending in CRLF).
fn exchange_with(addr: &str, header: &[u8], path: &str, fields: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = header.to_vec();
    out.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{fields}Connection: close\r\n\r\n").as_bytes(),
    );
    s.write_all(&out).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// The `X-Forwarded-For` the backend saw, from its JSON echo.
fn forwarded_for(resp: &str) -> String {
    let body = &resp[resp.find("\r\n\r\n").expect("a response") + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"));
    v["headers"]["x-forwarded-for"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn v2(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(addrs);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_a_proxy_header_names_stands_for_the_peer() {
    let backend = Backend::start("be").await;
    let (gw, addr) = start(&backend, "");
    let r = exchange(
        &addr,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 56324 80\r\n",
        "/x",
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(forwarded_for(&r), "203.0.113.7");

    let mut addrs = "2001:db8::1"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets()
        .to_vec();
    addrs.extend_from_slice(&[0; 16]);
    addrs.extend_from_slice(&[0x0f, 0xa0, 0, 80]);
    // A TLV after the addresses (as AWS's balancers add) is skipped.
    addrs.extend_from_slice(&[0xea, 0, 3, 1, 2, 3]);
    let r = exchange(&addr, &v2(1, 0x21, &addrs), "/x");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(forwarded_for(&r), "2001:db8::1");
    // The access log names both: the client, and the balancer it came
    // through.
    let v = gw.access_log_line("\"client.ip\":\"2001:db8::1\"");
    assert_eq!(v["source.ip"], "127.0.0.1", "{v}");

    // LOCAL (the balancer's own health check): the peer itself.
    let r = exchange(&addr, &v2(0, 0, &[]), "/x");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(forwarded_for(&r), "127.0.0.1");

    // Route access rules see the named client.
    let r = exchange(
        &addr,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 1000 80\r\n",
        "/private/x",
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let r = exchange(
        &addr,
        b"PROXY TCP4 198.51.100.1 127.0.0.1 1000 80\r\n",
        "/private/x",
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(forwarded_for(&r), "198.51.100.1");

    // No header, a malformed one, or none in time: closed unserved.
    let hits = backend.hits();
    assert_eq!(exchange(&addr, b"", "/x"), "");
    assert_eq!(
        exchange(&addr, b"PROXY TCP4 203.0.113.7 nowhere 1 2\r\n", "/x"),
        ""
    );
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"PROXY TCP4 203.0.").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = std::time::Instant::now();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.is_empty() && t.elapsed() < Duration::from_secs(3),
        "{got:?} after {:?}",
        t.elapsed()
    );
    assert_eq!(
        backend.hits(),
        hits,
        "nothing unlabelled reached the upstream"
    );
    let m = gateway_tests::client::raw(
        &gw.admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    for reason in ["missing", "malformed", "timeout"] {
        assert!(
            m.contains(&format!(
                "gateway_proxy_protocol_errors_total{{listener=\"lb\",reason=\"{reason}\"}} 1"
            )),
            "{reason}: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_ban_bans_the_named_client_not_the_balancer() {
    let backend = Backend::start("be").await;
    // With an [xdp] section (enforced in userspace here, --no-xdp), bans
    // of directly connected sources go into its deny list.
    let (gw, addr) = start(&backend, "[xdp]");
    let banned = b"PROXY TCP4 203.0.113.9 127.0.0.1 1000 80\r\n";
    for _ in 0..3 {
        let r = exchange(&addr, banned, "/private/x");
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    }
    // Three 403s: the client is banned, its next connection refused after
    // its header; another client through the same balancer is served.
    assert_eq!(exchange(&addr, banned, "/x"), "");
    let r = exchange(
        &addr,
        b"PROXY TCP4 198.51.100.2 127.0.0.1 1000 80\r\n",
        "/x",
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // The ban is the named client's, held where the check after the header
    // looks (the ban table), not in a deny list its packets never match.
    let admin = |path: &str| {
        gateway_tests::client::raw(
            &gw.admin,
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        )
    };
    assert!(
        admin("/admin/bans").contains("\"203.0.113.9\""),
        "{}",
        admin("/admin/bans")
    );
    let deny = admin("/admin/xdp/deny");
    assert!(deny.starts_with("HTTP/1.1 200"), "{deny}");
    assert!(!deny.contains("203.0.113.9"), "{deny}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_trusted_proxies_the_forwarded_client_stands_for_the_peer() {
    let backend = Backend::start("be").await;
    let port = free_port();
    let plain = free_port();
    let gw = gateway(
        &backend,
        &format!(
            r#"[[listeners]]
name = "behind"
listen = "127.0.0.1:{port}"
trusted_proxies = ["127.0.0.1", "10.0.0.0/8"]
[listeners.auto_ban]
auth_failures = 2
[[listeners]]
name = "direct"
listen = "127.0.0.1:{plain}""#
        ),
        r#"["198.51.100.0/24", "2001:db8:dead::/48"]"#,
        "",
    );
    let get = |port: u16, path: &str, xff: &str| {
        exchange_with(
            &format!("127.0.0.1:{port}"),
            b"",
            path,
            &format!("X-Forwarded-For: {xff}\r\n"),
        )
    };
    // The chain is passed on with this hop appended.
    let r = get(port, "/x", "198.51.100.7");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(forwarded_for(&r), "198.51.100.7, 127.0.0.1");
    // The named client meets the route's rules: the nearest untrusted
    // entry counts, so one the client wrote further left cannot dodge them,
    // and trusted hops are skipped.
    for (xff, status) in [
        ("198.51.100.7", 403),
        ("198.51.100.7, 10.1.2.3", 403),
        ("198.51.100.7, 203.0.113.1", 200),
        ("nonsense, 198.51.100.7", 403),
        // Not an address: the walk stops at the last trusted hop.
        ("198.51.100.7, nonsense", 200),
        // Entries with ports (as some proxies write them).
        ("198.51.100.7:4711", 403),
        ("[2001:db8::7]:4711, 198.51.100.7:80", 403),
        ("198.51.100.7, [2001:db8::7]:4711", 200),
        ("198.51.100.7, [2001:db8:dead::7]:4711", 403),
    ] {
        let r = get(port, "/private/x", xff);
        assert!(r.starts_with(&format!("HTTP/1.1 {status}")), "{xff}: {r}");
    }
    // A listener without trusted proxies takes no one's word for it.
    let r = get(plain, "/private/x", "198.51.100.7");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // Auto-ban banned the named client (its 403s above reached the
    // threshold of 2 within the window), not the proxy.
    let r = get(port, "/x", "198.51.100.7");
    assert!(r.starts_with("HTTP/1.1 403"), "banned: {r}");
    let r = get(port, "/x", "192.0.2.1");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // The access log names the client and the proxy it came through.
    let v = gw.access_log_line("\"client.ip\":\"192.0.2.1\"");
    assert_eq!(v["source.ip"], "127.0.0.1", "{v}");
}
