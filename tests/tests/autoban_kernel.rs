//! The L7 → kernel feedback loop end to end: a source that keeps failing
//! authentication is auto-banned, and from then on its packets are dropped
//! by the XDP program (its connection attempts time out rather than being
//! refused at accept), while another source is still served. Needs root;
//! skipped (saying why) otherwise.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use gateway_tests::gateway::run_cli;
use gateway_tests::netns::{Bed, NsGateway, Outcome, Pins, get, skip_reason};

#[test]
fn a_source_failing_auth_is_dropped_in_the_kernel() {
    if let Some(why) = skip_reason() {
        gateway_tests::skip(&why);
        return;
    }
    let bed = Bed::new(2);
    let pins = Pins::new();
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let config = format!(
        r#"
[server]
workers = 1
watch_config = false
shutdown_timeout = "1s"
[admin]
listen = "{admin}"
[access_log]
enabled = false
[[listeners]]
name = "public"
listen = "[::]:8080"
[listeners.auto_ban]
auth_failures = 5
window = "1m"
ttl = "1m"
[[consumers]]
name = "alice"
api_keys = ["sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"]
[[routes]]
name = "private"
[routes.auth]
api_key = {{ header = "x-api-key" }}
[routes.respond]
body = "secret\n"
[xdp]
interfaces = ["gw0", "gw1"]
pin_path = "{pins}"
"#,
        pins = pins.dir.display()
    );
    let _g = NsGateway::start(&bed.gw, &config, admin, &[]);
    let target = |net: u8| SocketAddr::new(IpAddr::from([10, 199, net, 1]), 8080);

    // Five failed authentications from client 0 (no key: 401 each).
    let statuses = bed.clients[0].run(move || {
        (0..5)
            .map(|_| get(None, target(1), "/", Duration::from_secs(2)))
            .collect::<Vec<_>>()
    });
    assert!(statuses.iter().all(|s| *s == Ok(401)), "{statuses:?}");

    // The ban reaches the kernel deny map: new connections from the source
    // now time out (dropped by XDP), not refused or answered.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let o = bed.clients[0].run(move || get(None, target(1), "/", Duration::from_millis(200)));
        if o == Err(Outcome::TimedOut) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "source still reaches the gateway: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = pins.dir.display().to_string();
    let (code, out, err) = run_cli(&["deny", "list", "--pin-path", &dir]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("10.199.1.2"), "the ban is listed: {out}");

    // Another source is unaffected.
    let other = bed.clients[1].run(move || get(None, target(2), "/", Duration::from_secs(2)));
    assert_eq!(other, Ok(401), "client 1 still reaches the gateway");

    // Over IPv6 a source is its /64: five failures from one address ban
    // the network, so another address of it is dropped too, unseen before.
    bed.add_client_addr(0, "fd00:199:1::77");
    let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
    let target6 = SocketAddr::new(v6("fd00:199:1::1"), 8080);
    let statuses = bed.clients[0].run(move || {
        (0..5)
            .map(|_| {
                get(
                    Some(v6("fd00:199:1::2")),
                    target6,
                    "/",
                    Duration::from_secs(2),
                )
            })
            .collect::<Vec<_>>()
    });
    assert!(statuses.iter().all(|s| *s == Ok(401)), "{statuses:?}");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let o = bed.clients[0].run(move || {
            get(
                Some(v6("fd00:199:1::77")),
                target6,
                "/",
                Duration::from_millis(200),
            )
        });
        if o == Err(Outcome::TimedOut) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "another address of the banned /64 still reaches the gateway: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, out, err) = run_cli(&["deny", "list", "--pin-path", &dir]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("fd00:199:1::/64"),
        "the /64 ban is listed: {out}"
    );
    let other = bed.clients[1].run(move || {
        get(
            None,
            SocketAddr::new(v6("fd00:199:2::1"), 8080),
            "/",
            Duration::from_secs(2),
        )
    });
    assert_eq!(other, Ok(401), "client 1's /64 still reaches the gateway");
}
