//! The allow and deny lists as data, wherever they are enforced: entries
//! with their origin (config file or `gateway deny|allow add`) and expiry,
//! the reference matcher (any live entry of a list containing the address
//! is a match; an allow match wins over a deny match), and the compilation
//! into the kernel's constant-time lookup structures (see gateway-ebpf).
//!
//! Times are `CLOCK_MONOTONIC` nanoseconds, the clock of the kernel's
//! `bpf_ktime_get_ns`, so expiries written here mean the same in the kernel.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use gateway_common::{ExtValue, slot};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An expiry that never comes.
pub const FOREVER: u64 = u64::MAX;

/// Which list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum List {
    Allow,
    Deny,
}

impl List {
    pub fn name(self) -> &'static str {
        match self {
            List::Allow => "allow",
            List::Deny => "deny",
        }
    }
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// One prefix's membership in one list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Listed in the config file (never expires).
    pub from_config: bool,
    /// Added at run time: until when (0: not added; `FOREVER`: no expiry).
    pub cli_until: u64,
}

impl Entry {
    /// Until when the entry matches (0: it does not exist).
    pub fn until(&self) -> u64 {
        if self.from_config {
            FOREVER
        } else {
            self.cli_until
        }
    }

    pub fn is_present(&self) -> bool {
        self.until() != 0
    }

    /// Present and not expired at `now`.
    pub fn live(&self, now: u64) -> bool {
        let u = self.until();
        u == FOREVER || u > now
    }
}

/// A prefix's membership in both lists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pair {
    pub allow: Entry,
    pub deny: Entry,
}

impl Pair {
    pub fn get(&self, list: List) -> Entry {
        match list {
            List::Allow => self.allow,
            List::Deny => self.deny,
        }
    }

    fn get_mut(&mut self, list: List) -> &mut Entry {
        match list {
            List::Allow => &mut self.allow,
            List::Deny => &mut self.deny,
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.allow.is_present() && !self.deny.is_present()
    }
}

/// The outcome of the lists for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Neither list matches: the default policy applies.
    None,
    Allow,
    Deny,
}

/// Both lists, both families. Keys are `(address with host bits zero,
/// prefix length)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub v4: BTreeMap<(u32, u8), Pair>,
    pub v6: BTreeMap<(u128, u8), Pair>,
}

/// The IPv4 address inside an IPv4-mapped IPv6 address, else `ip`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

pub fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

pub fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

fn key4(net: &Ipv4Net) -> (u32, u8) {
    (u32::from(net.network()), net.prefix_len())
}

fn key6(net: &Ipv6Net) -> (u128, u8) {
    (u128::from(net.network()), net.prefix_len())
}

/// The prefix a key stands for.
pub fn net4((addr, len): (u32, u8)) -> IpNet {
    IpNet::V4(Ipv4Net::new(addr.into(), len).unwrap_or_default())
}

/// The prefix a key stands for.
pub fn net6((addr, len): (u128, u8)) -> IpNet {
    IpNet::V6(Ipv6Net::new(addr.into(), len).unwrap_or_default())
}

/// Whether an IPv4 entry of prefix length `len` needs the exact-match table
/// (the /24 table answers only permanent prefixes of /24 or shorter).
fn is_ext4(len: u8, e: Entry) -> bool {
    e.is_present() && (len > 24 || e.until() != FOREVER)
}

/// The /24-table bits an IPv4 entry contributes to the slots it touches.
fn bits4(len: u8, p: &Pair) -> u8 {
    let mut b = 0u64;
    if p.allow.is_present() {
        b |= if is_ext4(len, p.allow) {
            slot::EXT_ALLOW
        } else {
            slot::ALLOW
        };
    }
    if p.deny.is_present() {
        b |= if is_ext4(len, p.deny) {
            slot::EXT_DENY
        } else {
            slot::DENY
        };
    }
    b as u8
}

impl Rules {
    /// The entry of `net` in `list`.
    pub fn entry(&self, list: List, net: &IpNet) -> Entry {
        match net.trunc() {
            IpNet::V4(n) => self.v4.get(&key4(&n)).map(|p| p.get(list)),
            IpNet::V6(n) => self.v6.get(&key6(&n)).map(|p| p.get(list)),
        }
        .unwrap_or_default()
    }

    /// Sets the entry of `net` in `list` (an absent entry removes it).
    pub fn set(&mut self, list: List, net: &IpNet, e: Entry) {
        fn put<K: Ord + Copy>(m: &mut BTreeMap<K, Pair>, k: K, list: List, e: Entry) {
            let p = m.entry(k).or_default();
            *p.get_mut(list) = e;
            if p.is_empty() {
                m.remove(&k);
            }
        }
        match net.trunc() {
            IpNet::V4(n) => put(&mut self.v4, key4(&n), list, e),
            IpNet::V6(n) => put(&mut self.v6, key6(&n), list, e),
        }
    }

    /// These rules with the config-file part replaced by `allow` and
    /// `deny` (run-time entries are kept).
    pub fn with_config(&self, allow: &[IpNet], deny: &[IpNet]) -> Rules {
        let mut r = self.clone();
        for p in r.v4.values_mut().chain(r.v6.values_mut()) {
            p.allow.from_config = false;
            p.deny.from_config = false;
        }
        r.v4.retain(|_, p| !p.is_empty());
        r.v6.retain(|_, p| !p.is_empty());
        for (list, nets) in [(List::Allow, allow), (List::Deny, deny)] {
            for n in nets {
                let mut e = r.entry(list, n);
                e.from_config = true;
                r.set(list, n, e);
            }
        }
        r
    }

    /// Drops run-time entries expired at `now`; true if any was.
    pub fn reap(&mut self, now: u64) -> bool {
        let mut changed = false;
        for p in self.v4.values_mut().chain(self.v6.values_mut()) {
            for e in [&mut p.allow, &mut p.deny] {
                if e.cli_until != 0 && e.cli_until != FOREVER && e.cli_until <= now {
                    e.cli_until = 0;
                    changed = true;
                }
            }
        }
        self.v4.retain(|_, p| !p.is_empty());
        self.v6.retain(|_, p| !p.is_empty());
        changed
    }

    /// Whether some entry expires.
    pub fn has_timed(&self) -> bool {
        self.v4
            .values()
            .chain(self.v6.values())
            .flat_map(|p| [p.allow.until(), p.deny.until()])
            .any(|u| u != 0 && u != FOREVER)
    }

    /// The earliest run-time expiry still to come.
    pub fn next_expiry(&self) -> Option<u64> {
        self.v4
            .values()
            .chain(self.v6.values())
            .flat_map(|p| [p.allow.cli_until, p.deny.cli_until])
            .filter(|&u| u != 0 && u != FOREVER)
            .min()
    }

    /// Every entry of `list`, in address order.
    pub fn list(&self, list: List) -> Vec<(IpNet, Entry)> {
        let v4 = self.v4.iter().map(|(k, p)| (net4(*k), p.get(list)));
        let v6 = self.v6.iter().map(|(k, p)| (net6(*k), p.get(list)));
        v4.chain(v6).filter(|(_, e)| e.is_present()).collect()
    }

    /// The reference semantics, by brute force over every prefix length.
    pub fn verdict(&self, ip: IpAddr, now: u64) -> Verdict {
        let (mut allow, mut deny) = (false, false);
        let mut see = |p: &Pair| {
            allow |= p.allow.live(now);
            deny |= p.deny.live(now);
        };
        match canonical(ip) {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for len in 0..=32u8 {
                    if let Some(p) = self.v4.get(&(a & mask4(len), len)) {
                        see(p);
                    }
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for len in 0..=128u8 {
                    if let Some(p) = self.v6.get(&(a & mask6(len), len)) {
                        see(p);
                    }
                }
            }
        }
        if allow {
            Verdict::Allow
        } else if deny {
            Verdict::Deny
        } else {
            Verdict::None
        }
    }

    /// A matcher for the accept path: one hash lookup per prefix length
    /// present.
    pub fn matcher(&self) -> Matcher {
        let mut m = Matcher::default();
        for (&(a, l), p) in &self.v4 {
            m.v4.insert((a, l), *p);
        }
        for (&(a, l), p) in &self.v6 {
            m.v6.insert((a, l), *p);
        }
        m.v4_lens = self
            .v4
            .keys()
            .map(|k| k.1)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        m.v6_lens = self
            .v6
            .keys()
            .map(|k| k.1)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        m.v4_lens.sort_unstable_by(|a, b| b.cmp(a));
        m.v6_lens.sort_unstable_by(|a, b| b.cmp(a));
        m
    }

    // ---- The kernel's lookup structures ----

    /// The `GW_V4_EXT` value of an IPv4 key, if it needs one.
    pub fn ext4(&self, k: (u32, u8)) -> Option<ExtValue> {
        let p = self.v4.get(&k)?;
        (is_ext4(k.1, p.allow) || is_ext4(k.1, p.deny)).then(|| ExtValue {
            allow_until: p.allow.until(),
            deny_until: p.deny.until(),
        })
    }

    /// The `GW_V6_EXT` value of an IPv6 key (every IPv6 entry has one).
    pub fn ext6(&self, k: (u128, u8)) -> Option<ExtValue> {
        self.v6.get(&k).map(|p| ExtValue {
            allow_until: p.allow.until(),
            deny_until: p.deny.until(),
        })
    }

    /// Bit `n`: `GW_V4_EXT` holds keys of prefix length `n`.
    pub fn v4_ext_lens(&self) -> u64 {
        self.v4
            .keys()
            .filter(|k| self.ext4(**k).is_some())
            .fold(0, |acc, k| acc | (1 << k.1))
    }

    /// Prefix lengths present in `GW_V6_EXT`, longest first.
    pub fn v6_lens(&self) -> Vec<u8> {
        let mut l: Vec<u8> = self.v6.keys().map(|k| k.1).collect();
        l.sort_unstable_by(|a, b| b.cmp(a));
        l.dedup();
        l
    }

    /// The `GW_V4_TBL` words of the block `addr/len` (`len` <= 20; one
    /// word covers a /20: 16 slots of 4 bits, one per /24).
    pub fn v4_words(&self, addr: u32, len: u8) -> Vec<u64> {
        debug_assert!(len <= 20);
        let start = addr & mask4(len);
        let end = start | !mask4(len);
        let slots = 1usize << (24 - len);
        let first = start >> 8;
        let mut base = 0u8;
        for l in 0..=len {
            if let Some(p) = self.v4.get(&(start & mask4(l), l)) {
                base |= bits4(l, p);
            }
        }
        let mut nib = vec![base; slots];
        for (&(a, l), p) in self.v4.range((start, 0)..=(end, 32)) {
            if l <= len {
                continue;
            }
            let b = bits4(l, p);
            let s = ((a >> 8) - first) as usize;
            let n = if l <= 24 { 1usize << (24 - l) } else { 1 };
            for x in &mut nib[s..s + n] {
                *x |= b;
            }
        }
        nib.chunks(16)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u64, |w, (i, &n)| w | (u64::from(n) << (4 * i)))
            })
            .collect()
    }
}

/// A run-time change to a list (`gateway deny|allow add|del`, or the admin
/// API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// Add (or renew) a run-time entry that expires at `until` (`FOREVER`:
    /// never).
    Add { until: u64 },
    /// Remove the run-time entry.
    Del,
}

/// "in 9m 59s", "expired" or "never" for an expiry at `until`.
pub fn remaining(until: u64, now: u64) -> String {
    if until == FOREVER {
        "never".into()
    } else if until <= now {
        "expired".into()
    } else {
        let secs = (until - now).div_ceil(1_000_000_000);
        format!(
            "in {}",
            humantime::format_duration(std::time::Duration::from_secs(secs))
        )
    }
}

/// `ttl` from now as an expiry (zero: never).
pub fn expiry(ttl: std::time::Duration, now: u64) -> u64 {
    if ttl.is_zero() {
        FOREVER
    } else {
        now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))
    }
}

impl Rules {
    /// `rules` after `edit` of `net` in `list`, and what to tell the user;
    /// an error when there is nothing to delete.
    pub fn edit(
        &self,
        list: List,
        net: &IpNet,
        edit: Edit,
        now: u64,
    ) -> Result<(Rules, String), String> {
        let e = self.entry(list, net);
        let name = list.name();
        let mut new = self.clone();
        match edit {
            Edit::Add { until } => {
                new.set(
                    list,
                    net,
                    Entry {
                        from_config: e.from_config,
                        cli_until: until,
                    },
                );
                let note = if e.from_config {
                    " (also listed in the config file)"
                } else {
                    ""
                };
                Ok((
                    new,
                    format!(
                        "{name} {net}: added, expires {}{note}",
                        remaining(until, now)
                    ),
                ))
            }
            Edit::Del if e.cli_until == 0 && e.from_config => Err(format!(
                "{net} is in the config file's [xdp] {name} list: remove it there and reload"
            )),
            Edit::Del if e.cli_until == 0 => Err(format!("{net} is not in the {name} list")),
            Edit::Del => {
                new.set(
                    list,
                    net,
                    Entry {
                        from_config: e.from_config,
                        cli_until: 0,
                    },
                );
                let msg = if e.from_config {
                    format!("{name} {net}: run-time entry removed; the config file still lists it")
                } else {
                    format!("{name} {net}: removed")
                };
                Ok((new, msg))
            }
        }
    }
}

/// The blocks (`addr`, `len` <= 20) of `GW_V4_TBL` that `keys` touch, without
/// blocks nested in others.
pub fn v4_blocks(keys: impl IntoIterator<Item = (u32, u8)>) -> Vec<(u32, u8)> {
    let mut all: Vec<(u32, u8)> = keys
        .into_iter()
        .map(|(a, l)| {
            let l = l.min(20);
            (a & mask4(l), l)
        })
        .collect();
    all.sort_unstable_by_key(|&(a, l)| (l, a));
    all.dedup();
    let mut kept: HashSet<(u32, u8)> = HashSet::new();
    let mut out = Vec::new();
    for (a, l) in all {
        if (0..l).any(|pl| kept.contains(&(a & mask4(pl), pl))) {
            continue;
        }
        kept.insert((a, l));
        out.push((a, l));
    }
    out
}

/// Hash-per-prefix-length matcher over a snapshot of the rules (the
/// userspace fallback's accept-time check).
#[derive(Debug, Default, Clone)]
pub struct Matcher {
    v4: HashMap<(u32, u8), Pair>,
    v6: HashMap<(u128, u8), Pair>,
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
}

impl Matcher {
    pub fn verdict(&self, ip: IpAddr, now: u64) -> Verdict {
        let mut deny = false;
        match canonical(ip) {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for &l in &self.v4_lens {
                    if let Some(p) = self.v4.get(&(a & mask4(l), l)) {
                        if p.allow.live(now) {
                            return Verdict::Allow;
                        }
                        deny |= p.deny.live(now);
                    }
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for &l in &self.v6_lens {
                    if let Some(p) = self.v6.get(&(a & mask6(l), l)) {
                        if p.allow.live(now) {
                            return Verdict::Allow;
                        }
                        deny |= p.deny.live(now);
                    }
                }
            }
        }
        if deny { Verdict::Deny } else { Verdict::None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        crate::xdp::config::parse_cidr(s).unwrap()
    }

    fn cli(until: u64) -> Entry {
        Entry {
            from_config: false,
            cli_until: until,
        }
    }

    const CONF: Entry = Entry {
        from_config: true,
        cli_until: 0,
    };

    #[test]
    fn allow_wins_and_expiry() {
        let mut r = Rules::default();
        r.set(List::Deny, &net("10.0.0.0/8"), CONF);
        r.set(List::Allow, &net("10.1.2.3"), CONF);
        r.set(List::Deny, &net("192.0.2.0/24"), cli(100));
        r.set(List::Deny, &net("2001:db8::/32"), CONF);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let m = r.matcher();
        for (addr, now, want) in [
            ("10.9.9.9", 0, Verdict::Deny),
            ("10.1.2.3", 0, Verdict::Allow),
            ("11.0.0.1", 0, Verdict::None),
            ("192.0.2.1", 99, Verdict::Deny),
            ("192.0.2.1", 100, Verdict::None),
            ("::ffff:10.9.9.9", 0, Verdict::Deny),
            ("2001:db8::1", 0, Verdict::Deny),
            ("2001:db9::1", 0, Verdict::None),
        ] {
            assert_eq!(r.verdict(ip(addr), now), want, "{addr} at {now}");
            assert_eq!(m.verdict(ip(addr), now), want, "{addr} at {now} (matcher)");
        }
    }

    #[test]
    fn config_replacement_keeps_runtime_entries() {
        let mut r = Rules::default();
        r.set(List::Deny, &net("10.0.0.0/8"), CONF);
        r.set(
            List::Deny,
            &net("10.0.0.0/8"),
            Entry {
                from_config: true,
                cli_until: FOREVER,
            },
        );
        r.set(List::Deny, &net("10.2.0.0/16"), CONF);
        r.set(List::Allow, &net("10.3.0.0/16"), cli(FOREVER));
        let r2 = r.with_config(&[], &[net("172.16.0.0/12")]);
        assert_eq!(r2.entry(List::Deny, &net("10.0.0.0/8")), cli(FOREVER));
        assert!(!r2.entry(List::Deny, &net("10.2.0.0/16")).is_present());
        assert_eq!(r2.entry(List::Allow, &net("10.3.0.0/16")), cli(FOREVER));
        assert_eq!(r2.entry(List::Deny, &net("172.16.0.0/12")), CONF);
        assert_eq!(r2.v4.len(), 3);
    }

    #[test]
    fn reap() {
        let mut r = Rules::default();
        r.set(List::Deny, &net("10.0.0.1"), cli(50));
        r.set(List::Deny, &net("10.0.0.2"), cli(150));
        r.set(
            List::Deny,
            &net("10.0.0.3"),
            Entry {
                from_config: true,
                cli_until: 50,
            },
        );
        assert_eq!(r.next_expiry(), Some(50));
        assert!(r.reap(100));
        assert_eq!(r.v4.len(), 2);
        assert_eq!(r.next_expiry(), Some(150));
        assert!(!r.reap(100));
    }

    /// Looks an address up the way the XDP program does, in the compiled
    /// structures.
    fn kernel_verdict(r: &Rules, words: &HashMap<u32, u64>, ip: u32, now: u64) -> Verdict {
        let w = words.get(&(ip >> 12)).copied().unwrap_or(0);
        let nib = (w >> (((ip >> 8) & 0xf) * 4)) & 0xf;
        if nib & slot::ALLOW != 0 {
            return Verdict::Allow;
        }
        let mut deny = nib & slot::DENY != 0;
        let lens = r.v4_ext_lens();
        if nib & (slot::EXT_ALLOW | slot::EXT_DENY) != 0 {
            for len in (0..=32u8).rev() {
                if lens & (1 << len) == 0 {
                    continue;
                }
                if let Some(v) = r.ext4((ip & mask4(len), len)) {
                    let live = |u: u64| u == FOREVER || u > now;
                    if nib & slot::EXT_ALLOW != 0 && v.allow_until != 0 && live(v.allow_until) {
                        return Verdict::Allow;
                    }
                    deny |= v.deny_until != 0 && live(v.deny_until);
                }
            }
        }
        if deny { Verdict::Deny } else { Verdict::None }
    }

    /// The compiled IPv4 structures agree with the reference on random
    /// prefixes and addresses, and incremental block rewrites agree with a
    /// full rebuild.
    #[test]
    fn compiled_v4_matches_reference() {
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..20 {
            let mut r = Rules::default();
            // Cluster addresses in a few /16s so prefixes overlap a lot.
            let bases: Vec<u32> = (0..3).map(|_| rng.u32(..) & 0xffff_0000).collect();
            for _ in 0..40 {
                let len = rng.u8(8..=32);
                let a = bases[rng.usize(..bases.len())] | (rng.u32(..) & 0xffff);
                let list = if rng.bool() { List::Allow } else { List::Deny };
                let e = match rng.u8(..3) {
                    0 => CONF,
                    1 => cli(FOREVER),
                    _ => cli(rng.u64(1..1000)),
                };
                r.set(
                    list,
                    &IpNet::V4(Ipv4Net::new(a.into(), len).unwrap().trunc()),
                    e,
                );
            }
            let mut words = HashMap::new();
            for (a, l) in v4_blocks(r.v4.keys().copied()) {
                for (i, w) in r.v4_words(a, l).into_iter().enumerate() {
                    words.insert((a >> 12) + i as u32, w);
                }
            }
            for _ in 0..2000 {
                let ip = bases[rng.usize(..bases.len())] | (rng.u32(..) & 0xffff);
                let now = rng.u64(0..1100);
                assert_eq!(
                    kernel_verdict(&r, &words, ip, now),
                    r.verdict(IpAddr::V4(ip.into()), now),
                    "round {round}, ip {}",
                    std::net::Ipv4Addr::from(ip)
                );
            }
        }
    }

    #[test]
    fn blocks_drop_nested() {
        let b = v4_blocks([
            (0x0a00_0000, 8),
            (0x0a01_0200, 24),
            (0x0b00_0001, 32),
            (0x0b00_0002, 32),
        ]);
        assert_eq!(b, vec![(0x0a00_0000, 8), (0x0b00_0000, 20)]);
    }

    #[test]
    fn words_of_a_block() {
        let mut r = Rules::default();
        r.set(List::Deny, &net("10.0.0.0/22"), CONF);
        r.set(List::Allow, &net("10.0.1.7"), CONF);
        r.set(List::Deny, &net("10.0.0.0/8"), cli(5));
        let w = r.v4_words(0x0a00_0000, 20);
        assert_eq!(w.len(), 1);
        let d = slot::DENY | slot::EXT_DENY;
        let expect = d | ((d | slot::EXT_ALLOW) << 4) | (d << 8) | (d << 12);
        let rest: u64 = (4..16).fold(0, |acc, i| acc | (slot::EXT_DENY << (4 * i)));
        assert_eq!(w[0], expect | rest);
    }
}
