//! `gateway xdp bench` (hidden; `cargo xtask bench xdp` runs it): the cost
//! of the whole program per packet through BPF_PROG_TEST_RUN, for passed,
//! denied and rate-limited packets, against deny lists and bucket maps of
//! growing size. Needs root; attaches nothing and pins nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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
    /// Passed, no rate limit configured (IPv4).
    pub pass_plain: f64,
    pub v4: Family,
    pub v6: Family,
}

/// One address family's figures, ns per packet.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// A SYN through every check, its bucket never running out.
    pub pass: f64,
    /// Denied by a listed single address (/32, /128).
    pub deny: f64,
    /// Denied by a listed prefix (/24: the IPv4 /24 table alone; /48).
    pub deny_prefix: f64,
    pub ratelimit: f64,
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

/// A deny list of `n` IPv4 and `n` IPv6 entries: four in five single
/// addresses, one in five /24s (/48s), random, each family with its two
/// probes (`V4.deny`, `V4.deny_prefix`, and the same for `V6`).
/// 198.18.0.0/16 and 2001:db8::/32 are never listed otherwise (the passed
/// and rate-limited sources).
pub fn deny_list(n: u32, seed: u64) -> Rules {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut r = Rules::default();
    add_denied(&mut r, n, &V4, &mut rng, |rng| {
        let a = Ipv4Addr::from(rng.u32(0x0100_0000..0xe000_0000));
        let len = if rng.u8(..5) == 0 { 24 } else { 32 };
        (!reserved(a)).then(|| IpNet::V4(Ipv4Net::new(a, len).unwrap_or_default().trunc()))
    });
    add_denied(&mut r, n, &V6, &mut rng, |rng| {
        let a = Ipv6Addr::from(rng.u128(0x2000_u128 << 112..0x4000_u128 << 112));
        let len = if rng.u8(..5) == 0 { 48 } else { 128 };
        (a.segments()[..2] != [0x2001, 0x0db8])
            .then(|| IpNet::V6(Ipv6Net::new(a, len).unwrap_or_default().trunc()))
    });
    r
}

/// Adds `family`'s two denied probes and random entries from `draw` (none:
/// draw again) to `r`, `n` in all.
fn add_denied(
    r: &mut Rules,
    n: u32,
    family: &Probes,
    rng: &mut fastrand::Rng,
    mut draw: impl FnMut(&mut fastrand::Rng) -> Option<IpNet>,
) {
    let e = Entry {
        from_config: true,
        cli_until: 0,
    };
    let prefix = IpNet::new(family.deny_prefix, family.deny_prefix_len)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(family.deny_prefix));
    for net in [IpNet::from(family.deny), prefix] {
        r.set(List::Deny, &net, e);
    }
    let mut added = 2;
    while added < n {
        let Some(net) = draw(rng) else { continue };
        if r.entry(List::Deny, &net).is_present() {
            continue;
        }
        r.set(List::Deny, &net, e);
        added += 1;
    }
}

/// One family's probe sources: passed, denied exactly, denied by prefix,
/// rate-limited.
struct Probes {
    pass: IpAddr,
    deny: IpAddr,
    /// An address inside the prefix of `deny_prefix_len` that is listed.
    deny_prefix: IpAddr,
    deny_prefix_len: u8,
    limited: IpAddr,
}

const V4: Probes = Probes {
    pass: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
    deny: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
    deny_prefix: IpAddr::V4(Ipv4Addr::new(198, 19, 200, 9)),
    deny_prefix_len: 24,
    limited: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
};

const V6: Probes = Probes {
    pass: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1)),
    deny: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 7)),
    deny_prefix: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x48, 9, 0, 0, 0, 9)),
    deny_prefix_len: 48,
    limited: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2)),
};

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
    let rules = deny_list(entries, 42);
    loaded.maps.apply(&Rules::default(), &rules, false)?;
    fill_buckets(&mut loaded, entries)?;

    // Passed without a rate limit: parse and list lookups only.
    let mut plain = settings(1, 1);
    plain.rate_limit = None;
    loaded.maps.set_policy(&plain)?;
    let pass_plain = measure(&mut loaded, &syn(V4.pass), repeat, xdp_action::XDP_PASS)?;
    Ok(Figures {
        pass_plain,
        v4: family(&mut loaded, &V4, repeat)?,
        v6: family(&mut loaded, &V6, repeat)?,
    })
}

/// A SYN to the protected port from `src`.
fn syn(src: IpAddr) -> Vec<u8> {
    match src {
        IpAddr::V4(a) => packet::tcp4(a, PORT, packet::SYN),
        IpAddr::V6(a) => packet::tcp6(a, PORT, packet::SYN),
    }
}

/// Measures one family's probes against the loaded lists.
fn family(loaded: &mut Loaded, p: &Probes, repeat: u32) -> anyhow::Result<Family> {
    // Passed: a SYN that goes through every check, including a bucket update
    // that never runs out.
    loaded
        .maps
        .set_policy(&settings(1_000_000_000, 1_000_000_000))?;
    let pass = measure(loaded, &syn(p.pass), repeat, xdp_action::XDP_PASS)?;
    let deny = measure(loaded, &syn(p.deny), repeat, xdp_action::XDP_DROP)?;
    let deny_prefix = measure(loaded, &syn(p.deny_prefix), repeat, xdp_action::XDP_DROP)?;
    // Rate-limited: one SYN per second, burst one; the first run passes.
    loaded.maps.set_policy(&settings(1, 1))?;
    let frame = syn(p.limited);
    loaded.test_run(&frame, 1)?;
    let ratelimit = measure(loaded, &frame, repeat, xdp_action::XDP_DROP)?;
    Ok(Family {
        pass,
        deny,
        deny_prefix,
        ratelimit,
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
            n, f.pass_plain, f.v4.pass, f.v4.deny, f.v4.deny_prefix, f.v4.ratelimit
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
            n, f.v6.pass, f.v6.deny, f.v6.deny_prefix, f.v6.ratelimit
        );
    }
    if let Some((_, f)) = all.last() {
        println!(
            "result pass={:.1} deny={:.1} ratelimit={:.1} pass6={:.1} deny6={:.1}",
            f.v4.pass, f.v4.deny, f.v4.ratelimit, f.v6.pass, f.v6.deny
        );
    }
    Ok(())
}
