//! The `[xdp]` policy where XDP is not used (`--no-xdp`): the same allow
//! and deny lists and per-source rate limit, enforced at accept. Runs
//! unprivileged on loopback (127.0.0.0/8 is all local, so sources can be
//! picked by binding).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use gateway_tests::free_port;
use gateway_tests::gateway::{Gateway, run_cli};

fn config(port: u16, admin: u16, xdp: &str) -> String {
    format!(
        r#"
[server]
workers = 1
watch_config = false

[admin]
listen = "127.0.0.1:{admin}"

[access_log]
enabled = false

[[listeners]]
name = "public"
listen = "127.0.0.1:{port}"

[[routes]]
name = "ok"
[routes.match]
path_prefix = "/"
[routes.respond]
status = 200
body = "ok\n"

[xdp]
{xdp}
"#
    )
}

/// GETs `/` from `src`: the status, or `None` when the gateway closed the
/// connection without answering.
fn get_from(src: &str, port: u16) -> Option<u16> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(src.parse::<IpAddr>().unwrap(), 0).into())
        .unwrap();
    s.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let mut s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
}

fn start(xdp: &str) -> (Gateway, u16) {
    let (port, admin) = (free_port(), free_port());
    let g = Gateway::start(&config(port, admin, xdp), &format!("127.0.0.1:{admin}"));
    (g, port)
}

#[test]
fn lists_are_enforced_at_accept() {
    let (g, port) = start(
        r#"interfaces = ["lo"]
deny = ["127.0.0.0/24"]
allow = ["127.0.0.1"]"#,
    );
    assert_eq!(
        get_from("127.0.0.1", port),
        Some(200),
        "allowed over denied"
    );
    assert_eq!(
        get_from("127.0.0.2", port),
        None,
        "denied: closed at accept"
    );
    assert_eq!(get_from("127.0.1.1", port), Some(200), "on no list");
    let said = g.stderr();
    assert_eq!(
        said.matches("XDP disabled (--no-xdp)").count(),
        1,
        "says so once: {said}"
    );
    let metrics = gateway_tests::client::raw(
        &g.admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        metrics.contains(r#"gateway_xdp_userspace_refused_total{reason="denied"} 1"#),
        "{metrics}"
    );
}

#[test]
fn default_deny_and_reload() {
    let (g, port) = start("default_policy = \"deny\"\nallow = [\"127.0.0.3\"]");
    assert_eq!(get_from("127.0.0.1", port), None);
    assert_eq!(get_from("127.0.0.3", port), Some(200));
    // A reload applies the new lists to the next connection.
    let text = std::fs::read_to_string(&g.config).unwrap();
    g.write_config(&text.replace("\"127.0.0.3\"", "\"127.0.0.1\""));
    let (code, out, err) = run_cli(&["reload", "-c", g.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(get_from("127.0.0.1", port), Some(200));
    assert_eq!(get_from("127.0.0.3", port), None);
}

#[test]
fn rate_limit_per_source() {
    let (_g, port) = start("[xdp.rate_limit]\nrate = 1\nburst = 3");
    for i in 0..3 {
        assert_eq!(
            get_from("127.0.0.5", port),
            Some(200),
            "request {i} of the burst"
        );
    }
    assert_eq!(get_from("127.0.0.5", port), None, "over the rate");
    assert_eq!(get_from("127.0.0.6", port), Some(200), "another source");
}

#[test]
fn config_problems_have_locations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        config(
            1,
            2,
            "deny = [\"10.0.0.1/8\"]\n[xdp.rate_limit]\nrate = 10\nipv6_prefix = 200",
        ),
    )
    .unwrap();
    let (code, out, _) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    let p = path.display();
    assert!(
        out.contains(&format!(
            "{p}:25:9: invalid CIDR \"10.0.0.1/8\": host bits are set (did you mean 10.0.0.0/8?)"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{p}:28:15: ipv6_prefix must be 0..=128")),
        "{out}"
    );
}

#[test]
fn cli_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let pins = dir.path().join("none");
    let pins = pins.to_str().unwrap();
    let (code, _, err) = run_cli(&["deny", "add", "300.1.1.1", "--pin-path", pins]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid CIDR \"300.1.1.1\""), "{err}");
    let (code, _, err) = run_cli(&["deny", "add", "192.0.2.1/24", "--pin-path", pins]);
    assert_ne!(code, 0);
    assert!(err.contains("did you mean 192.0.2.0/24?"), "{err}");
    let (code, _, err) = run_cli(&["deny", "list", "--pin-path", pins]);
    assert_ne!(code, 0);
    assert!(err.contains("no pinned XDP maps"), "{err}");
    let (code, _, err) = run_cli(&[
        "allow",
        "add",
        "10.0.0.0/8",
        "--ttl",
        "soon",
        "--pin-path",
        pins,
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no pinned XDP maps") || err.contains("invalid --ttl"),
        "{err}"
    );
}

#[test]
fn cli_edits_a_userspace_gateway_through_its_admin_listener() {
    let (g, port) = start("deny = [\"127.0.0.8\"]");
    let cfg = g.config.to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let none = dir.path().join("none");
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["-c", &cfg, "--pin-path", none.to_str().unwrap()]);
        run_cli(&a)
    };
    assert_eq!(get_from("127.0.0.7", port), Some(200));
    let (code, out, err) = cli(&["deny", "add", "127.0.0.7", "--ttl", "10m"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("deny 127.0.0.7/32: added, expires in 10m"),
        "{out}"
    );
    assert_eq!(get_from("127.0.0.7", port), None, "refused at once");
    let (_, out, _) = cli(&["deny", "list"]);
    assert!(
        out.contains("127.0.0.7/32") && out.contains("run time (expires in "),
        "{out}"
    );
    assert!(
        out.contains("127.0.0.8/32") && out.contains("config"),
        "{out}"
    );
    let (code, _, err) = cli(&["deny", "del", "127.0.0.8"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("in the config file's [xdp] deny list"),
        "{err}"
    );
    let (code, out, err) = cli(&["deny", "del", "127.0.0.7"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(get_from("127.0.0.7", port), Some(200));
    let (code, _, err) = cli(&["deny", "del", "127.0.0.7"]);
    assert_ne!(code, 0);
    assert!(err.contains("not in the deny list"), "{err}");
    // IPv6 prefixes travel URL-encoded.
    let (code, out, err) = cli(&["allow", "add", "2001:db8::/32"]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, out, _) = cli(&["allow", "list"]);
    assert!(out.contains("2001:db8::/32"), "{out}");
}

#[test]
fn without_privilege_the_same_policy_is_enforced_in_userspace() {
    let (port, admin) = (free_port(), free_port());
    // A pin directory of its own: this gateway must not disturb others'.
    let pins = format!("/sys/fs/bpf/gateway-test-unpriv-{port}");
    let g = Gateway::start_unprivileged(
        &config(
            port,
            admin,
            &format!("interfaces = [\"lo\"]\npin_path = \"{pins}\"\ndeny = [\"127.0.0.2\"]"),
        ),
        &format!("127.0.0.1:{admin}"),
    );
    let said = g.stderr();
    assert_eq!(
        said.matches("XDP unavailable (").count(),
        1,
        "says so once: {said}"
    );
    assert!(
        said.contains("enforcing [xdp] allow/deny and rate limits in userspace"),
        "{said}"
    );
    assert!(
        said.contains("not running as root") || said.contains("needs root"),
        "{said}"
    );
    assert_eq!(get_from("127.0.0.2", port), None, "denied at accept");
    assert_eq!(get_from("127.0.0.1", port), Some(200));
    assert!(!std::path::Path::new(&pins).exists(), "nothing pinned");
}
