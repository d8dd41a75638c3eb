//! `gateway xdp bench` (hidden; `cargo xtask bench xdp` runs it): the cost
//! of the whole program per packet through BPF_PROG_TEST_RUN, for passed,
//! denied and rate-limited packets, against deny lists and bucket maps of
//! growing size. Needs root; attaches nothing and pins nothing.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use gateway_common::{Bucket, V6Src, xdp_action};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::config::{Count, Policy, Ports, RateLimit, XdpSettings};
use super::kernel::Loaded;
use super::packet;
use super::rules::{Entry, List, Rules};

const PORT: u16 = 8080;

/// One size's figures, ns per packet.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// Passed, no rate limit configured.
    pub pass_plain: f64,
    pub pass: f64,
    /// Denied by a listed single address (the exact-match table).
    pub deny: f64,
    /// Denied by a listed /24 (the /24 table alone).
    pub deny_prefix: f64,
    pub ratelimit: f64,
    /// The same over IPv6: passed (a SYN through its /64's bucket), denied
    /// by a listed /128, denied by a listed /48, rate-limited.
    pub pass6: f64,
    pub deny6: f64,
    pub deny6_prefix: f64,
    pub ratelimit6: f64,
}

fn settings(rate: u64, burst: u64) -> XdpSettings {
    XdpSettings {
        enabled: true,
        default_policy: Policy::Allow,
        ports: Ports::List(vec![PORT]),
        rate_limit: Some(RateLimit {
            rate,
            burst,
            count: Count::Syn,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }),
        ..XdpSettings::default()
    }
}

/// Sources the deny list never covers by chance.
fn reserved(a: Ipv4Addr) -> bool {
    let o = a.octets();
    (o[0] == 198 && o[1] & 0xfe == 18) || (o[0] == 203 && o[1] == 0 && o[2] == 113)
}

/// A deny list of `n` entries: four in five single addresses, one in five
/// /24s, random, plus 203.0.113.7/32 and 198.19.200.0/24 (the probes).
/// 198.18.0.0/16 is never listed (the passed and rate-limited sources).
pub fn deny_list(n: u32, seed: u64) -> Rules {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut r = Rules::default();
    let e = Entry {
        from_config: true,
        cli_until: 0,
    };
    for probe in [DENIED_EXACT, DENIED_PREFIX] {
        r.set(
            List::Deny,
            &probe.parse().unwrap_or_else(|_| unreachable!()),
            e,
        );
    }
    let mut added = 2;
    while added < n {
        let a = Ipv4Addr::from(rng.u32(0x0100_0000..0xe000_0000));
        if reserved(a) {
            continue;
        }
        let len = if rng.u8(..5) == 0 { 24 } else { 32 };
        let net = IpNet::V4(Ipv4Net::new(a, len).unwrap_or_default().trunc());
        if r.entry(List::Deny, &net).is_present() {
            continue;
        }
        r.set(List::Deny, &net, e);
        added += 1;
    }
    r
}

/// The probes of `deny_list`.
const DENIED_EXACT: &str = "203.0.113.7/32";
const DENIED_PREFIX: &str = "198.19.200.0/24";
const DENIED_EXACT6: &str = "2001:db8:7::7/128";
const DENIED_PREFIX6: &str = "2001:db8:48::/48";

/// Adds `n` IPv6 entries to `r` the same way (four in five /128s, one in
/// five /48s, random in 2000::/3), plus the two IPv6 probes. 2001:db8::/32
/// (the probes' and the passed sources' range) is never listed otherwise.
fn add_deny_list6(r: &mut Rules, n: u32, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let e = Entry {
        from_config: true,
        cli_until: 0,
    };
    for probe in [DENIED_EXACT6, DENIED_PREFIX6] {
        r.set(
            List::Deny,
            &probe.parse().unwrap_or_else(|_| unreachable!()),
            e,
        );
    }
    let mut added = 2;
    while added < n {
        let a = Ipv6Addr::from(rng.u128(0x2000_u128 << 112..0x4000_u128 << 112));
        if a.segments()[..2] == [0x2001, 0x0db8] {
            continue;
        }
        let len = if rng.u8(..5) == 0 { 48 } else { 128 };
        let net = IpNet::V6(Ipv6Net::new(a, len).unwrap_or_default().trunc());
        if r.entry(List::Deny, &net).is_present() {
            continue;
        }
        r.set(List::Deny, &net, e);
        added += 1;
    }
}

/// Fills the bucket map with `n` sources (outside 198.18.0.0/15).
fn fill_buckets(loaded: &mut Loaded, n: u32) -> anyhow::Result<()> {
    for i in 0..n {
        loaded
            .maps
            .buckets4
            .insert(0x0a00_0000u32 + i, Bucket { tat_ns: 0 }, 0)?;
        loaded.maps.buckets6.insert(
            V6Src {
                hi: 0x2a00_0000_0000_0000u64 + u64::from(i),
                lo: 0,
            },
            Bucket { tat_ns: 0 },
            0,
        )?;
    }
    Ok(())
}

/// The lowest mean of three runs of `repeat`, checking the action.
fn measure(loaded: &mut Loaded, frame: &[u8], repeat: u32, want: u32) -> anyhow::Result<f64> {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let (action, d) = loaded.test_run(frame, repeat)?;
        if action != want && std::env::var_os("XDP_NOCHECK").is_none() {
            bail!("the program returned {action}, expected {want}");
        }
        best = best.min(d);
    }
    Ok(best.as_nanos() as f64)
}

/// Measures one list size.
pub fn figures(entries: u32, repeat: u32) -> anyhow::Result<Figures> {
    let max = (entries + entries / 4 + 1024).max(gateway_common::DEFAULT_MAX_RULES);
    let mut loaded = Loaded::load(None, max, max)?;
    let mut rules = deny_list(entries, 42);
    add_deny_list6(&mut rules, entries, 43);
    loaded.maps.apply(&Rules::default(), &rules, false)?;
    fill_buckets(&mut loaded, entries)?;

    // Passed without a rate limit: parse and list lookups only.
    let mut plain = settings(1, 1);
    plain.rate_limit = None;
    loaded.maps.set_policy(&plain)?;
    let pass_plain = measure(
        &mut loaded,
        &packet::tcp4(Ipv4Addr::new(198, 18, 0, 1), PORT, packet::SYN),
        repeat,
        xdp_action::XDP_PASS,
    )?;
    // Passed: a SYN that goes through every check, including a bucket update
    // that never runs out.
    loaded
        .maps
        .set_policy(&settings(1_000_000_000, 1_000_000_000))?;
    let pass = measure(
        &mut loaded,
        &packet::tcp4(Ipv4Addr::new(198, 18, 0, 1), PORT, packet::SYN),
        repeat,
        xdp_action::XDP_PASS,
    )?;
    let deny = measure(
        &mut loaded,
        &packet::tcp4(Ipv4Addr::new(203, 0, 113, 7), PORT, packet::SYN),
        repeat,
        xdp_action::XDP_DROP,
    )?;
    let deny_prefix = measure(
        &mut loaded,
        &packet::tcp4(Ipv4Addr::new(198, 19, 200, 9), PORT, packet::SYN),
        repeat,
        xdp_action::XDP_DROP,
    )?;
    // Rate-limited: one SYN per second, burst one; the first run passes.
    loaded.maps.set_policy(&settings(1, 1))?;
    let frame = packet::tcp4(Ipv4Addr::new(198, 18, 0, 2), PORT, packet::SYN);
    loaded.test_run(&frame, 1)?;
    let ratelimit = measure(&mut loaded, &frame, repeat, xdp_action::XDP_DROP)?;

    // IPv6, with the same lists.
    loaded
        .maps
        .set_policy(&settings(1_000_000_000, 1_000_000_000))?;
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap_or(Ipv6Addr::UNSPECIFIED);
    let pass6 = measure(
        &mut loaded,
        &packet::tcp6(v6("2001:db8:1::1"), PORT, packet::SYN),
        repeat,
        xdp_action::XDP_PASS,
    )?;
    let deny6 = measure(
        &mut loaded,
        &packet::tcp6(v6("2001:db8:7::7"), PORT, packet::SYN),
        repeat,
        xdp_action::XDP_DROP,
    )?;
    let deny6_prefix = measure(
        &mut loaded,
        &packet::tcp6(v6("2001:db8:48:9::9"), PORT, packet::SYN),
        repeat,
        xdp_action::XDP_DROP,
    )?;
    loaded.maps.set_policy(&settings(1, 1))?;
    let frame = packet::tcp6(v6("2001:db8:2::2"), PORT, packet::SYN);
    loaded.test_run(&frame, 1)?;
    let ratelimit6 = measure(&mut loaded, &frame, repeat, xdp_action::XDP_DROP)?;
    Ok(Figures {
        pass_plain,
        pass,
        deny,
        deny_prefix,
        ratelimit,
        pass6,
        deny6,
        deny6_prefix,
        ratelimit6,
    })
}

/// The cost of parsing alone: a frame that is not IP.
fn baseline(repeat: u32) -> anyhow::Result<(f64, Option<u32>)> {
    let mut loaded = Loaded::load(None, 1024, 1024)?;
    let ns = measure(&mut loaded, &packet::arp(), repeat, xdp_action::XDP_PASS)?;
    Ok((ns, loaded.verified_insns()))
}

/// Prints the tables (IPv4, then IPv6) and, last, `result pass=X deny=Y
/// ratelimit=Z pass6=A deny6=B` for the largest size.
pub fn run(repeat: u32, max_entries: u32) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the XDP benchmark needs root (BPF_PROG_TEST_RUN)");
    }
    let mut sizes = vec![1, 1_000, max_entries];
    sizes.sort_unstable();
    sizes.dedup();
    println!("xdp program cost per packet (BPF_PROG_TEST_RUN, {repeat} runs, best of 3), ns");
    let (base, insns) = baseline(repeat).context("baseline")?;
    if let Some(n) = insns {
        println!("verifier: {n} instructions processed (limit 1000000)");
    }
    println!("not IP (parse only): {base:.1}");
    println!(
        "{:>10} {:>12} {:>8} {:>10} {:>11} {:>10}",
        "deny list", "pass, no rl", "pass", "deny /32", "deny in /24", "ratelimit"
    );
    let mut all = Vec::new();
    for n in sizes {
        let f = figures(n, repeat).with_context(|| format!("{n} entries"))?;
        println!(
            "{:>10} {:>12.1} {:>8.1} {:>10.1} {:>11.1} {:>10.1}",
            n, f.pass_plain, f.pass, f.deny, f.deny_prefix, f.ratelimit
        );
        all.push((n, f));
    }
    println!("IPv6 (the same lists, as many IPv6 entries again):");
    println!(
        "{:>10} {:>8} {:>10} {:>11} {:>10}",
        "deny list", "pass", "deny /128", "deny in /48", "ratelimit"
    );
    for (n, f) in &all {
        println!(
            "{:>10} {:>8.1} {:>10.1} {:>11.1} {:>10.1}",
            n, f.pass6, f.deny6, f.deny6_prefix, f.ratelimit6
        );
    }
    if let Some((_, f)) = all.last() {
        println!(
            "result pass={:.1} deny={:.1} ratelimit={:.1} pass6={:.1} deny6={:.1}",
            f.pass, f.deny, f.ratelimit, f.pass6, f.deny6
        );
    }
    Ok(())
}
