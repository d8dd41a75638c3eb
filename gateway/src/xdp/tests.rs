//! The XDP program on crafted packets through BPF_PROG_TEST_RUN (a real
//! kernel, no interface). Each test loads its own unpinned copy of the
//! program. They need root (or CAP_BPF + CAP_NET_ADMIN) and say so when
//! skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use gateway_common::{
    stat,
    xdp_action::{XDP_DROP, XDP_PASS},
};
use ipnet::{IpNet, Ipv4Net};

use super::config::{Count, Policy, Ports, RateLimit, XdpSettings};
use super::kernel::Loaded;
use super::packet::{self, ACK, SYN};
use super::rules::{Entry, FOREVER, List, Rules, now_ns};

const PORT: u16 = 8080;

/// A freshly loaded program, or `None` (saying why) without privilege.
fn load() -> Option<Loaded> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        gateway_tests::skip("BPF_PROG_TEST_RUN tests need root");
        return None;
    }
    if !super::kernel::object_available() {
        gateway_tests::skip("built with AYA_BUILD_SKIP=1 (no XDP object)");
        return None;
    }
    Some(Loaded::load(None, 4096, 4096).expect("load the XDP program"))
}

fn settings() -> XdpSettings {
    XdpSettings {
        enabled: true,
        ports: Ports::List(vec![PORT, 443]),
        ..XdpSettings::default()
    }
}

fn conf() -> Entry {
    Entry {
        from_config: true,
        cli_until: 0,
    }
}

fn net(s: &str) -> IpNet {
    super::config::parse_cidr(s).unwrap()
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn setup(k: &mut Loaded, s: &XdpSettings, rules: &Rules) {
    k.maps.apply(&Rules::default(), rules, false).unwrap();
    k.maps.set_policy(s).unwrap();
}

fn run(k: &mut Loaded, frame: &[u8]) -> u32 {
    k.test_run(frame, 1).unwrap().0
}

fn counts(k: &Loaded) -> Vec<u64> {
    k.maps.stats().unwrap().iter().map(|c| c.packets).collect()
}

#[test]
fn unconfigured_program_passes_everything() {
    let Some(mut k) = load() else { return };
    assert_eq!(
        run(&mut k, &packet::tcp4(v4("10.0.0.1"), PORT, SYN)),
        XDP_PASS
    );
}

#[test]
fn deny_allow_and_default() {
    let Some(mut k) = load() else { return };
    let mut r = Rules::default();
    r.set(List::Deny, &net("10.0.0.0/8"), conf());
    r.set(List::Allow, &net("10.1.2.3"), conf());
    r.set(List::Deny, &net("192.0.2.128/25"), conf());
    setup(&mut k, &settings(), &r);
    let cases = [
        ("10.9.9.9", XDP_DROP),
        ("10.1.2.3", XDP_PASS), // allowed over denied
        ("10.1.2.4", XDP_DROP),
        ("11.0.0.1", XDP_PASS),    // default allow
        ("192.0.2.200", XDP_DROP), // longer than /24
        ("192.0.2.100", XDP_PASS),
    ];
    for (src, want) in cases {
        assert_eq!(
            run(&mut k, &packet::tcp4(v4(src), PORT, SYN)),
            want,
            "{src}"
        );
        assert_eq!(run(&mut k, &packet::udp4(v4(src), PORT)), want, "{src} udp");
    }
    // Other ports are not enforced.
    assert_eq!(
        run(&mut k, &packet::tcp4(v4("10.9.9.9"), 22, SYN)),
        XDP_PASS
    );
    let c = counts(&k);
    assert_eq!(c[stat::DROP_DENY_LIST as usize], 6);
    assert_eq!(c[stat::PASS_ALLOW_LIST as usize], 2);
    assert_eq!(c[stat::PASS_DEFAULT as usize], 4);
    assert_eq!(c[stat::PASS_UNPROTECTED as usize], 1);

    let mut s = settings();
    s.default_policy = Policy::Deny;
    k.maps.set_policy(&s).unwrap();
    assert_eq!(
        run(&mut k, &packet::tcp4(v4("11.0.0.1"), PORT, SYN)),
        XDP_DROP
    );
    assert_eq!(
        run(&mut k, &packet::tcp4(v4("10.1.2.3"), PORT, SYN)),
        XDP_PASS
    );
    s.ports = Ports::All;
    k.maps.set_policy(&s).unwrap();
    assert_eq!(
        run(&mut k, &packet::tcp4(v4("11.0.0.1"), 22, SYN)),
        XDP_DROP
    );
}

#[test]
fn ipv6_vlan_and_extension_headers() {
    let Some(mut k) = load() else { return };
    let mut r = Rules::default();
    r.set(List::Deny, &net("2001:db8::/32"), conf());
    r.set(List::Allow, &net("2001:db8:1::/48"), conf());
    r.set(List::Deny, &net("10.0.0.0/8"), conf());
    setup(&mut k, &settings(), &r);
    assert_eq!(
        run(&mut k, &packet::tcp6(v6("2001:db8::5"), PORT, SYN)),
        XDP_DROP
    );
    assert_eq!(
        run(&mut k, &packet::tcp6(v6("2001:db8:1::5"), PORT, SYN)),
        XDP_PASS
    );
    assert_eq!(
        run(&mut k, &packet::tcp6(v6("2001:db9::5"), PORT, SYN)),
        XDP_PASS
    );
    assert_eq!(
        run(&mut k, &packet::tcp6_ext(v6("2001:db8::5"), PORT, SYN)),
        XDP_DROP
    );
    let tagged = packet::vlan(&packet::tcp4(v4("10.0.0.1"), PORT, SYN), 7);
    assert_eq!(run(&mut k, &tagged), XDP_DROP);
    let tagged6 = packet::vlan(&packet::tcp6(v6("2001:db8::5"), PORT, SYN), 7);
    assert_eq!(run(&mut k, &tagged6), XDP_DROP);
    // A later fragment carries no ports: not judged.
    assert_eq!(run(&mut k, &packet::fragment4(v4("10.0.0.1"))), XDP_PASS);
    assert_eq!(counts(&k)[stat::PASS_UNPROTECTED as usize], 1);
}

#[test]
fn truncated_and_non_ip_frames_pass() {
    let Some(mut k) = load() else { return };
    let mut r = Rules::default();
    r.set(List::Deny, &net("0.0.0.0/0"), conf());
    r.set(List::Deny, &net("::/0"), conf());
    setup(&mut k, &settings(), &r);
    let full = packet::tcp4(v4("10.0.0.1"), PORT, SYN);
    assert_eq!(run(&mut k, &full), XDP_DROP);
    // Cut inside the IP header, inside the TCP header, and just before the
    // TCP flags: every read past the end is refused, the frame passes.
    for cut in [14 + 10, 14 + 20 + 3, 14 + 20 + 13] {
        assert_eq!(run(&mut k, &full[..cut]), XDP_PASS, "cut at {cut}");
    }
    let full6 = packet::tcp6_ext(v6("2001:db8::1"), PORT, SYN);
    for cut in [14 + 39, 14 + 40 + 7, 14 + 48 + 7, 14 + 56 + 3] {
        assert_eq!(run(&mut k, &full6[..cut]), XDP_PASS, "v6 cut at {cut}");
    }
    // A VLAN tag with nothing behind it.
    let tagged = packet::vlan(&full, 1);
    assert_eq!(run(&mut k, &tagged[..16]), XDP_PASS);
    assert_eq!(run(&mut k, &packet::arp()), XDP_PASS);
    let c = counts(&k);
    assert_eq!(c[stat::PASS_PARSE_ERROR as usize], 8);
    assert_eq!(c[stat::PASS_NOT_IP as usize], 1);
}

#[test]
fn expired_ban_stops_matching() {
    let Some(mut k) = load() else { return };
    let now = now_ns();
    let mut r = Rules::default();
    let ttl = |ns: u64| Entry {
        from_config: false,
        cli_until: now + ns,
    };
    r.set(List::Deny, &net("10.0.0.1"), ttl(150_000_000));
    r.set(List::Deny, &net("10.2.0.0/16"), ttl(150_000_000));
    r.set(List::Deny, &net("2001:db8::1"), ttl(150_000_000));
    r.set(
        List::Deny,
        &net("10.0.0.2"),
        // Expired more than a clock tick ago: the program reads the
        // coarse clock, which may lag by a tick.
        Entry {
            from_config: false,
            cli_until: now - 20_000_000,
        },
    );
    setup(&mut k, &settings(), &r);
    let f1 = packet::tcp4(v4("10.0.0.1"), PORT, SYN);
    let f2 = packet::tcp4(v4("10.2.3.4"), PORT, SYN);
    let f3 = packet::tcp6(v6("2001:db8::1"), PORT, SYN);
    assert_eq!(run(&mut k, &f1), XDP_DROP);
    assert_eq!(run(&mut k, &f2), XDP_DROP);
    assert_eq!(run(&mut k, &f3), XDP_DROP);
    assert_eq!(
        run(&mut k, &packet::tcp4(v4("10.0.0.2"), PORT, SYN)),
        XDP_PASS
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(run(&mut k, &f1), XDP_PASS);
    assert_eq!(run(&mut k, &f2), XDP_PASS);
    assert_eq!(run(&mut k, &f3), XDP_PASS);
}

fn limited(rate: u64, burst: u64, count: Count) -> XdpSettings {
    XdpSettings {
        rate_limit: Some(RateLimit {
            rate,
            burst,
            count,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
        }),
        ..settings()
    }
}

#[test]
fn rate_limit_burst_then_refill() {
    let Some(mut k) = load() else { return };
    // 20 per second (50 ms a token), burst 5, SYNs counted, /24 buckets.
    setup(&mut k, &limited(20, 5, Count::Syn), &Rules::default());
    let a = packet::tcp4(v4("192.0.2.1"), PORT, SYN);
    let b = packet::tcp4(v4("192.0.2.77"), PORT, SYN);
    let other = packet::tcp4(v4("198.51.100.1"), PORT, SYN);
    let start = std::time::Instant::now();
    for i in 0..5 {
        let f = if i % 2 == 0 { &a } else { &b };
        assert_eq!(run(&mut k, f), XDP_PASS, "SYN {i} of the burst");
    }
    assert_eq!(run(&mut k, &a), XDP_DROP, "over the burst");
    assert_eq!(run(&mut k, &b), XDP_DROP, "same /24 bucket");
    assert_eq!(
        run(&mut k, &other),
        XDP_PASS,
        "another source is unaffected"
    );
    // Established traffic (not SYN) is not counted.
    assert_eq!(
        run(&mut k, &packet::tcp4(v4("192.0.2.1"), PORT, ACK)),
        XDP_PASS
    );
    assert_eq!(
        run(&mut k, &packet::tcp4(v4("192.0.2.1"), PORT, SYN | ACK)),
        XDP_PASS
    );
    assert!(
        start.elapsed() < Duration::from_millis(45),
        "test too slow to be meaningful"
    );
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(run(&mut k, &a), XDP_PASS, "one token back after 50 ms");
    assert_eq!(run(&mut k, &a), XDP_DROP);
    assert_eq!(counts(&k)[stat::DROP_RATE_LIMIT as usize], 3);

    // Counting every packet, and allow-listed sources are exempt.
    let mut r = Rules::default();
    r.set(List::Allow, &net("203.0.113.0/24"), conf());
    let mut k2 = load().unwrap();
    setup(&mut k2, &limited(1, 2, Count::Packets), &r);
    let ack = packet::tcp4(v4("198.51.100.9"), PORT, ACK);
    assert_eq!(run(&mut k2, &ack), XDP_PASS);
    assert_eq!(
        run(&mut k2, &packet::udp4(v4("198.51.100.9"), PORT)),
        XDP_PASS
    );
    assert_eq!(run(&mut k2, &ack), XDP_DROP);
    for _ in 0..10 {
        assert_eq!(
            run(&mut k2, &packet::tcp4(v4("203.0.113.5"), PORT, SYN)),
            XDP_PASS
        );
    }
    let v6a = packet::tcp6(v6("2001:db8:0:1::1"), PORT, ACK);
    let v6b = packet::tcp6(v6("2001:db8:0:1::2"), PORT, ACK);
    assert_eq!(run(&mut k2, &v6a), XDP_PASS);
    assert_eq!(run(&mut k2, &v6b), XDP_PASS);
    assert_eq!(run(&mut k2, &v6a), XDP_DROP, "one /64 bucket");
}

#[test]
fn drop_events_are_budgeted() {
    let Some(mut k) = load() else { return };
    let mut r = Rules::default();
    r.set(List::Deny, &net("10.0.0.0/8"), conf());
    setup(&mut k, &settings(), &r);
    let (action, _) = k
        .test_run(&packet::tcp4(v4("10.0.0.9"), PORT, SYN), 1000)
        .unwrap();
    assert_eq!(action, XDP_DROP);
    let ring = k.events.as_mut().unwrap();
    let mut n = 0;
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), std::mem::size_of::<gateway_common::DropEvent>());
        n += 1;
    }
    // Test runs may hop CPUs between batches; each CPU has its own budget.
    let cpus = aya::util::nr_cpus().unwrap() as u64;
    assert!(
        n >= 1 && n <= gateway_common::EVENTS_PER_WINDOW * cpus,
        "{n} events for 1000 drops"
    );
    let top = k.maps.drop_sources();
    assert_eq!(top[0].0, IpAddr::V4(v4("10.0.0.9")));
    assert!(top[0].1 >= 900 && top[0].1 <= 1100, "estimate {}", top[0].1);
}

/// The kernel's constant-time structures give the same answers as an LPM
/// trie (the reference matcher) on random overlapping prefixes with random
/// expiries, across incremental changes.
#[test]
fn kernel_lookup_matches_reference_semantics() {
    let Some(mut k) = load() else { return };
    let mut rng = fastrand::Rng::with_seed(99);
    let bases: Vec<u32> = (0..3).map(|_| rng.u32(..) & 0xffff_0000).collect();
    let now = now_ns();
    let mut rules = Rules::default();
    k.maps.set_policy(&settings()).unwrap();
    for round in 0..4 {
        let mut next = rules.clone();
        for _ in 0..60 {
            let len = rng.u8(12..=32);
            let a = bases[rng.usize(..bases.len())] | (rng.u32(..) & 0xffff);
            let n = IpNet::V4(Ipv4Net::new(a.into(), len).unwrap().trunc());
            let list = if rng.u8(..3) == 0 {
                List::Allow
            } else {
                List::Deny
            };
            let e = match rng.u8(..4) {
                0 => conf(),
                1 => Entry {
                    from_config: false,
                    cli_until: FOREVER,
                },
                2 => Entry {
                    from_config: false,
                    cli_until: now + 3_600_000_000_000,
                },
                // Expired a second ago: the kernel's clock is coarse and
                // cached per jiffy, so it may lag `now` by a tick
                // (docs/xdp.md); an entry that expired 1 ns ago can still
                // match for that long.
                _ => Entry {
                    from_config: false,
                    cli_until: now.saturating_sub(1_000_000_000),
                },
            };
            next.set(list, &n, e);
        }
        // And drop some.
        let keys: Vec<(u32, u8)> = next.v4.keys().copied().collect();
        for key in keys.iter().filter(|_| rng.u8(..4) == 0) {
            next.v4.remove(key);
        }
        k.maps.apply(&rules, &next, false).unwrap();
        rules = next;
        assert_eq!(k.maps.read_rules().unwrap(), rules, "tries hold the rules");
        for _ in 0..300 {
            let ip = bases[rng.usize(..bases.len())] | (rng.u32(..) & 0xffff);
            let want = match rules.verdict(IpAddr::V4(ip.into()), now_ns()) {
                super::rules::Verdict::Deny => XDP_DROP,
                _ => XDP_PASS,
            };
            let got = run(&mut k, &packet::tcp4(ip.into(), PORT, SYN));
            assert_eq!(got, want, "round {round}, {}", Ipv4Addr::from(ip));
        }
    }
}
