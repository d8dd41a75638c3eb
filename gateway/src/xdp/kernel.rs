//! The kernel side as seen from userspace: loading the embedded XDP
//! program, its maps (pinned under the pin directory so that rules, buckets
//! and counters outlive the process), attaching through pinned bpf_links
//! (replaced atomically by the next gateway, so enforcement has no gap), and
//! keeping the program's lookup structures equal to the rule lists.
//!
//! Every writer of the pinned maps (the gateway, `gateway deny|allow ...`)
//! holds an exclusive `flock` on the pin directory while it writes, and
//! bumps `Meta::generation` after, so a process that caches the rules
//! knows when to read them again.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions};
use gateway_common::{
    ABI_VERSION, Bucket, Config, Counter, ExtValue, LenSlot4, LenSlot6, Meta, NO_LEN, PORT_WORDS,
    RuleValue, SrcKey, V4Key, V6_LEN_SLOTS, V6Key, V6Src, flags, maps, stat,
};

use crate::xdp::config::{Count, Mode, Policy, Ports, XdpSettings};
use crate::xdp::rules::{Entry, List, Rules, mask4, mask6, v4_blocks};

/// The XDP program, built by build.rs (empty when built with AYA_BUILD_SKIP=1).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-xdp"));

/// Whether this binary carries the XDP program.
pub fn object_available() -> bool {
    !OBJECT.is_empty()
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `dir`'s parent is on a bpffs, mounting one on /sys/fs/bpf
/// if that is where it should be and nothing is mounted there.
fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if parent.starts_with(root) && !is_bpffs(root) {
        let target = CString::new(root.as_os_str().as_bytes())?;
        // SAFETY: mount(2) with valid C strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "/sys/fs/bpf is not a bpf filesystem and mounting one failed: {}",
                std::io::Error::last_os_error()
            );
        }
        tracing::info!("mounted a bpf filesystem on /sys/fs/bpf");
        if parent != root {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        return Ok(());
    }
    if is_bpffs(parent) {
        Ok(())
    } else {
        bail!("{} is not on a bpf filesystem", parent.display())
    }
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) into a zeroed struct we own.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == BPF_FS_MAGIC
    }
}

/// An exclusive `flock` on the pin directory, held while writing maps.
pub struct PinLock(File);

impl PinLock {
    pub fn acquire(dir: &Path) -> anyhow::Result<PinLock> {
        let f = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "cannot lock {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(PinLock(f))
    }
}

impl Drop for PinLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Treats "no such element" as success (deleting what is already gone).
fn gone_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(m: Map, name: &str) -> anyhow::Result<T> {
    T::try_from(m).with_context(|| format!("map {name} has an unexpected type or layout"))
}

/// Userspace handles to the program's maps.
pub struct Maps {
    config: Array<MapData, Config>,
    meta: Array<MapData, Meta>,
    ports: Array<MapData, u64>,
    v4_tbl: Array<MapData, u64>,
    v4_ext: HashMap<MapData, V4Key, ExtValue>,
    v6_ext: HashMap<MapData, V6Key, ExtValue>,
    allow_v4: LpmTrie<MapData, [u8; 4], RuleValue>,
    deny_v4: LpmTrie<MapData, [u8; 4], RuleValue>,
    allow_v6: LpmTrie<MapData, [u8; 16], RuleValue>,
    deny_v6: LpmTrie<MapData, [u8; 16], RuleValue>,
    pub buckets4: HashMap<MapData, u32, Bucket>,
    pub buckets6: HashMap<MapData, V6Src, Bucket>,
    stats: PerCpuArray<MapData, Counter>,
    drop_src: HashMap<MapData, SrcKey, u64>,
}

impl Maps {
    fn build(mut get: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Maps> {
        macro_rules! m {
            ($name:expr) => {
                typed(get($name)?, $name)?
            };
        }
        Ok(Maps {
            config: m!(maps::CONFIG),
            meta: m!(maps::META),
            ports: m!(maps::PORTS),
            v4_tbl: m!(maps::V4_TBL),
            v4_ext: m!(maps::V4_EXT),
            v6_ext: m!(maps::V6_EXT),
            allow_v4: m!(maps::ALLOW_V4),
            deny_v4: m!(maps::DENY_V4),
            allow_v6: m!(maps::ALLOW_V6),
            deny_v6: m!(maps::DENY_V6),
            buckets4: m!(maps::BUCKETS4),
            buckets6: m!(maps::BUCKETS6),
            stats: m!(maps::STATS),
            drop_src: m!(maps::DROP_SRC),
        })
    }

    /// Opens the maps pinned under `dir` (for the CLI).
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Maps> {
        Self::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("cannot open pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        })
    }

    fn take(ebpf: &mut Ebpf) -> anyhow::Result<Maps> {
        Self::build(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("the XDP object has no map {name}"))
        })
    }

    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(self.config.get(&0, 0)?)
    }

    pub fn meta(&self) -> anyhow::Result<Meta> {
        Ok(self.meta.get(&0, 0)?)
    }

    fn bump_generation(&mut self) -> anyhow::Result<u64> {
        let mut m = self.meta()?;
        m.abi = ABI_VERSION;
        m.generation += 1;
        self.meta.set(0, m, 0)?;
        Ok(m.generation)
    }

    /// The rule lists as stored in the tries.
    pub fn read_rules(&self) -> anyhow::Result<Rules> {
        let mut r = Rules::default();
        let entry = |v: RuleValue| Entry {
            from_config: v.from_config != 0,
            cli_until: v.cli_until,
        };
        for (list, trie) in [(List::Allow, &self.allow_v4), (List::Deny, &self.deny_v4)] {
            for item in trie.iter() {
                let (k, v) = item?;
                let net = ipnet::Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8)?;
                r.set(list, &net.into(), entry(v));
            }
        }
        for (list, trie) in [(List::Allow, &self.allow_v6), (List::Deny, &self.deny_v6)] {
            for item in trie.iter() {
                let (k, v) = item?;
                let net = ipnet::Ipv6Net::new(Ipv6Addr::from(k.data()), k.prefix_len() as u8)?;
                r.set(list, &net.into(), entry(v));
            }
        }
        Ok(r)
    }

    /// Changes the maps from holding `old` to holding `new`, in an order
    /// that never leaves out an entry present in both: additions before
    /// removals, lookup structures before the tries on removal. With
    /// `force`, every entry is rewritten and stray exact-match entries are
    /// removed (used at start-up, to repair whatever a crash left).
    pub fn apply(&mut self, old: &Rules, new: &Rules, force: bool) -> anyhow::Result<()> {
        let lens6 = new.v6_lens();
        if lens6.len() > V6_LEN_SLOTS {
            bail!(
                "too many distinct IPv6 prefix lengths ({}; at most {V6_LEN_SLOTS})",
                lens6.len()
            );
        }
        let keys4: BTreeSet<(u32, u8)> = old
            .v4
            .keys()
            .chain(new.v4.keys())
            .copied()
            .filter(|k| force || old.v4.get(k) != new.v4.get(k))
            .collect();
        let keys6: BTreeSet<(u128, u8)> = old
            .v6
            .keys()
            .chain(new.v6.keys())
            .copied()
            .filter(|k| force || old.v6.get(k) != new.v6.get(k))
            .collect();
        if keys4.is_empty() && keys6.is_empty() && !force {
            return Ok(());
        }
        let e4 = |r: &Rules, k, l| r.v4.get(&k).map(|p| p.get(l)).unwrap_or_default();
        let e6 = |r: &Rules, k, l| r.v6.get(&k).map(|p| p.get(l)).unwrap_or_default();
        let value = |e: Entry| RuleValue {
            cli_until: e.cli_until,
            from_config: u32::from(e.from_config),
            _pad: 0,
        };

        // 1. The tries gain new and changed entries.
        for &(a, l) in &keys4 {
            for list in [List::Allow, List::Deny] {
                let (o, n) = (e4(old, (a, l), list), e4(new, (a, l), list));
                if n.is_present() && (force || o != n) {
                    self.trie4(list).insert(
                        &LpmKey::new(u32::from(l), a.to_be_bytes()),
                        value(n),
                        0,
                    )?;
                }
            }
        }
        for &(a, l) in &keys6 {
            for list in [List::Allow, List::Deny] {
                let (o, n) = (e6(old, (a, l), list), e6(new, (a, l), list));
                if n.is_present() && (force || o != n) {
                    self.trie6(list).insert(
                        &LpmKey::new(u32::from(l), a.to_be_bytes()),
                        value(n),
                        0,
                    )?;
                }
            }
        }
        // 2. The exact-match tables gain theirs.
        for &k in &keys4 {
            if let Some(v) = new.ext4(k)
                && (force || old.ext4(k) != Some(v))
            {
                self.v4_ext.insert(v4key(k), v, 0)?;
            }
        }
        for &k in &keys6 {
            if let Some(v) = new.ext6(k)
                && (force || old.ext6(k) != Some(v))
            {
                self.v6_ext.insert(v6key(k), v, 0)?;
            }
        }
        // 3. Look up every length either side has, while both may be live.
        let mut union6: Vec<u8> = old.v6_lens();
        union6.extend(&lens6);
        union6.sort_unstable_by(|a, b| b.cmp(a));
        union6.dedup();
        if union6.len() > V6_LEN_SLOTS {
            union6 = lens6.clone();
        }
        self.set_lens(
            old.v4_ext_lens() | new.v4_ext_lens(),
            &union6,
            old.has_timed() || new.has_timed(),
        )?;
        // 4. The /24 table.
        for (a, l) in v4_blocks(keys4.iter().copied()) {
            for (i, w) in new.v4_words(a, l).into_iter().enumerate() {
                self.v4_tbl.set((a >> 12) + i as u32, w, 0)?;
            }
        }
        // 5. The exact-match tables lose what is gone.
        for &k in &keys4 {
            if new.ext4(k).is_none() && (force || old.ext4(k).is_some()) {
                gone_ok(self.v4_ext.remove(&v4key(k)))?;
            }
        }
        for &k in &keys6 {
            if new.ext6(k).is_none() && (force || old.ext6(k).is_some()) {
                gone_ok(self.v6_ext.remove(&v6key(k)))?;
            }
        }
        if force {
            let stray4: Vec<V4Key> = self
                .v4_ext
                .keys()
                .filter_map(Result::ok)
                .filter(|k| {
                    let key = (u32::from_be_bytes(k.addr), k.len as u8);
                    new.ext4(key).is_none()
                })
                .collect();
            for k in stray4 {
                gone_ok(self.v4_ext.remove(&k))?;
            }
            let stray6: Vec<V6Key> = self
                .v6_ext
                .keys()
                .filter_map(Result::ok)
                .filter(|k| {
                    let key = (u128::from_be_bytes(k.addr), k.len as u8);
                    new.ext6(key).is_none()
                })
                .collect();
            for k in stray6 {
                gone_ok(self.v6_ext.remove(&k))?;
            }
        }
        // 6. Exactly the lengths present.
        self.set_lens(new.v4_ext_lens(), &lens6, new.has_timed())?;
        // 7. The tries lose what is gone.
        for &(a, l) in &keys4 {
            for list in [List::Allow, List::Deny] {
                let (o, n) = (e4(old, (a, l), list), e4(new, (a, l), list));
                if !n.is_present() && (force || o.is_present()) {
                    gone_ok(
                        self.trie4(list)
                            .remove(&LpmKey::new(u32::from(l), a.to_be_bytes())),
                    )?;
                }
            }
        }
        for &(a, l) in &keys6 {
            for list in [List::Allow, List::Deny] {
                let (o, n) = (e6(old, (a, l), list), e6(new, (a, l), list));
                if !n.is_present() && (force || o.is_present()) {
                    gone_ok(
                        self.trie6(list)
                            .remove(&LpmKey::new(u32::from(l), a.to_be_bytes())),
                    )?;
                }
            }
        }
        self.bump_generation()?;
        Ok(())
    }

    fn trie4(&mut self, list: List) -> &mut LpmTrie<MapData, [u8; 4], RuleValue> {
        match list {
            List::Allow => &mut self.allow_v4,
            List::Deny => &mut self.deny_v4,
        }
    }

    fn trie6(&mut self, list: List) -> &mut LpmTrie<MapData, [u8; 16], RuleValue> {
        match list {
            List::Allow => &mut self.allow_v6,
            List::Deny => &mut self.deny_v6,
        }
    }

    /// Makes the prefix lengths the program looks up exactly `v4` (bit
    /// `n`: length `n`) and `v6`, keeping each length that stays in the slot
    /// it had (see `Config::v4_lens`); `timed`: some entry expires.
    fn set_lens(&mut self, v4: u64, v6: &[u8], timed: bool) -> anyhow::Result<()> {
        let mut c = self.config()?;
        if timed {
            c.flags |= flags::TIMED;
        } else {
            c.flags &= !flags::TIMED;
        }
        let want4: Vec<u8> = (0..=32u8).filter(|l| v4 & (1 << l) != 0).collect();
        let mut lens4: Vec<u32> = c.v4_lens.iter().map(|s| s.len).collect();
        let n4 = assign_slots(&mut lens4, &want4)?;
        for (slot, &len) in c.v4_lens.iter_mut().zip(&lens4) {
            *slot = if len == NO_LEN {
                LenSlot4::EMPTY
            } else {
                LenSlot4 {
                    len,
                    mask: mask4(len as u8),
                }
            };
        }
        let mut lens6: Vec<u32> = c.v6_lens.iter().map(|s| s.len).collect();
        let n6 = assign_slots(&mut lens6, v6)?;
        for (slot, &len) in c.v6_lens.iter_mut().zip(&lens6) {
            *slot = if len == NO_LEN {
                LenSlot6::EMPTY
            } else {
                LenSlot6 {
                    len,
                    _pad: 0,
                    mask: halves(mask6(len as u8)),
                }
            };
        }
        let before = self.config()?;
        // Grow the slot counts with the write that fills new slots; shrink
        // them only once the slots beyond are empty (they are: assigned
        // lengths never move).
        c.v4_nslots = n4 as u32;
        c.v6_nslots = n6 as u32;
        if c != before {
            self.config.set(0, c, 0)?;
        }
        Ok(())
    }

    /// Writes the policy of `s` (keeping the rule-derived fields) and the
    /// protected ports.
    pub fn set_policy(&mut self, s: &XdpSettings) -> anyhow::Result<()> {
        // Ports first: the policy switch below may start enforcing them.
        let mut words = vec![0u64; PORT_WORDS as usize];
        if let Ports::List(ports) = &s.ports {
            for &p in ports {
                words[usize::from(p >> 6)] |= 1 << (p & 63);
            }
        }
        for (i, w) in words.into_iter().enumerate() {
            let i = i as u32;
            if self.ports.get(&i, 0)? != w {
                self.ports.set(i, w, 0)?;
            }
        }
        let mut c = self.config()?;
        c.abi = ABI_VERSION;
        // Keep what the rule writers own.
        c.flags &= flags::TIMED;
        if s.default_policy == Policy::Deny {
            c.flags |= flags::DEFAULT_DENY;
        }
        if s.ports == Ports::All {
            c.flags |= flags::ALL_PORTS;
        }
        match s.rate_limit {
            Some(rl) => {
                c.flags |= flags::RATE_LIMIT;
                if rl.count == Count::Packets {
                    c.flags |= flags::COUNT_PACKETS;
                }
                c.rl_interval_ns = 1_000_000_000 / rl.rate.max(1);
                c.rl_tolerance_ns = c.rl_interval_ns.saturating_mul(rl.burst);
                c.v4_src_mask = mask4(rl.ipv4_prefix);
                c.v6_src_mask = halves(mask6(rl.ipv6_prefix));
            }
            None => {
                c.rl_interval_ns = 0;
                c.rl_tolerance_ns = 0;
            }
        }
        c.ban_ttl_ns = u64::try_from(s.ban_ttl.as_nanos()).unwrap_or(u64::MAX);
        self.config.set(0, c, 0)?;
        let mut m = self.meta()?;
        if m.abi != ABI_VERSION {
            m.abi = ABI_VERSION;
            self.meta.set(0, m, 0)?;
        }
        Ok(())
    }

    /// Packet and byte counters per `stat` slot, summed over CPUs.
    pub fn stats(&self) -> anyhow::Result<Vec<Counter>> {
        (0..stat::COUNT)
            .map(|i| {
                let per_cpu = self.stats.get(&i, 0)?;
                Ok(per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                }))
            })
            .collect()
    }

    /// Estimated drops per source, most first.
    pub fn drop_sources(&self) -> Vec<(IpAddr, u64)> {
        let mut v: Vec<(IpAddr, u64)> = self
            .drop_src
            .iter()
            .filter_map(Result::ok)
            .map(|(k, n)| (src_ip(&k), n))
            .collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// Puts exactly the lengths `want` into `slots`: a length already present
/// keeps its slot, absent ones are emptied, new ones take the lowest free
/// slots. Returns the number of slots in use (up to the last one used).
fn assign_slots(slots: &mut [u32], want: &[u8]) -> anyhow::Result<usize> {
    for s in slots.iter_mut() {
        if *s != NO_LEN && !want.iter().any(|&w| u32::from(w) == *s) {
            *s = NO_LEN;
        }
    }
    for &l in want {
        let l = u32::from(l);
        if slots.contains(&l) {
            continue;
        }
        match slots.iter_mut().find(|s| **s == NO_LEN) {
            Some(s) => *s = l,
            None => bail!("too many distinct prefix lengths (at most {})", slots.len()),
        }
    }
    Ok(slots
        .iter()
        .rposition(|&s| s != NO_LEN)
        .map_or(0, |i| i + 1))
}

/// A 128-bit value as two host-order halves (high first).
fn halves(v: u128) -> [u64; 2] {
    [(v >> 64) as u64, v as u64]
}

fn v4key((a, l): (u32, u8)) -> V4Key {
    V4Key {
        len: u32::from(l),
        addr: a.to_be_bytes(),
    }
}

fn v6key((a, l): (u128, u8)) -> V6Key {
    V6Key {
        len: u32::from(l),
        addr: a.to_be_bytes(),
    }
}

/// The address of a `SrcKey` / `DropEvent`.
pub fn src_ip(k: &SrcKey) -> IpAddr {
    addr_of(k.family, &k.addr)
}

pub fn addr_of(family: u32, a: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

/// A loaded (not necessarily attached) program with its maps.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub events: Option<RingBuf<MapData>>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Loaded {
    /// Loads the program. With `pin_dir`, maps pinned there are reused and
    /// missing ones are created and pinned; without, every map is fresh.
    pub fn load(
        pin_dir: Option<&Path>,
        max_rules: u32,
        max_sources: u32,
    ) -> anyhow::Result<Loaded> {
        if OBJECT.is_empty() {
            bail!("this gateway binary was built without its XDP program (AYA_BUILD_SKIP)");
        }
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            for name in maps::PINNED {
                loader.map_pin_path(name, Cow::Owned(dir.join(name)));
            }
        }
        for name in [
            maps::V4_EXT,
            maps::V6_EXT,
            maps::ALLOW_V4,
            maps::DENY_V4,
            maps::ALLOW_V6,
            maps::DENY_V6,
        ] {
            loader.map_max_entries(name, max_rules);
        }
        loader.map_max_entries(maps::BUCKETS4, max_sources);
        loader.map_max_entries(maps::BUCKETS6, max_sources);
        let mut ebpf = loader.load(OBJECT).context("cannot load the XDP object")?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("XDP program log unavailable: {e}");
                None
            }
        };
        let maps = Maps::take(&mut ebpf)?;
        let events = ebpf
            .take_map(maps::EVENTS)
            .map(|m| typed::<RingBuf<MapData>>(m, maps::EVENTS))
            .transpose()?;
        let prog: &mut Xdp = ebpf
            .program_mut(gateway_common::PROGRAM)
            .context("the XDP object has no program")?
            .try_into()?;
        prog.load().context("the kernel refused the XDP program")?;
        Ok(Loaded {
            ebpf,
            maps,
            events,
            logger,
        })
    }

    pub fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(gateway_common::PROGRAM)
            .context("the XDP object has no program")?
            .try_into()?)
    }

    /// Runs the program on `packet` `repeat` times (BPF_PROG_TEST_RUN):
    /// the XDP action of the last run and the mean time per run.
    pub fn test_run(&mut self, packet: &[u8], repeat: u32) -> anyhow::Result<(u32, Duration)> {
        let r = self.program()?.test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::default()
        })?;
        Ok((r.return_value, r.duration))
    }

    /// Instructions the verifier processed to accept the program (its
    /// distance from the 1M limit).
    pub fn verified_insns(&mut self) -> Option<u32> {
        self.program()
            .ok()?
            .info()
            .ok()?
            .verified_instruction_count()
    }

    /// Forwards what the program logged to `tracing`.
    pub fn flush_log(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }
}

/// The bpf_link pin of `iface` under `dir`.
pub fn link_pin(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("link_{iface}"))
}

/// Interfaces with a pinned link under `dir`.
pub fn pinned_links(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("link_"))
                .map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

/// The interface index an XDP bpf_link is attached to (0 once the
/// interface is gone).
fn link_ifindex(fd: &impl AsFd) -> Option<u32> {
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8
    // whose `xdp.ifindex` comes first.
    let mut info = [0u64; 8];
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = Attr {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: bpf(2) with an attr and buffer that live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if rc != 0 {
        return None;
    }
    Some(info[2] as u32)
}

/// Opens a pinned BPF object (BPF_OBJ_GET).
fn obj_get(path: &Path) -> Option<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: bpf(2) with an attr that lives across the call; a
    // non-negative result is a new descriptor we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn ifindex(iface: &str) -> u32 {
    let Ok(c) = CString::new(iface) else {
        return 0;
    };
    // SAFETY: a valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// Attaches `loaded`'s program to `iface`: takes over the pinned link if
/// there is one (an atomic program replacement: no packet goes unchecked),
/// else attaches in `mode` and pins the new link.
pub fn attach(loaded: &mut Loaded, dir: &Path, iface: &str, mode: Mode) -> anyhow::Result<()> {
    let path = link_pin(dir, iface);
    let index = ifindex(iface);
    if index == 0 {
        bail!("no interface named {iface:?}");
    }
    if path.exists() {
        // A link whose interface went away (or was re-created) is defunct:
        // drop its pin and attach afresh.
        let live = obj_get(&path).and_then(|fd| link_ifindex(&fd)) == Some(index);
        if !live {
            tracing::warn!("link pin {} is stale; attaching afresh", path.display());
            let _ = std::fs::remove_file(&path);
        } else {
            let pinned = PinnedLink::from_pin(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let fd: FdLink = pinned.into();
            let prog = loaded.program()?;
            let link = XdpLink::try_from(fd)?;
            let id = prog
                .attach_to_link(link)
                .with_context(|| format!("cannot replace the program on {iface}"))?;
            // Close our descriptor; the pin keeps the link.
            drop(prog.take_link(id)?);
            return Ok(());
        }
    }
    let flags = match mode {
        Mode::Auto => XdpMode::Default,
        Mode::Native => XdpMode::Driver,
        Mode::Skb => XdpMode::Skb,
    };
    let prog = loaded.program()?;
    let id = prog
        .attach(iface, flags)
        .with_context(|| format!("cannot attach XDP to {iface} ({mode:?} mode)"))?;
    let link = prog.take_link(id)?;
    let fd: FdLink = link.try_into().map_err(|e| {
        anyhow!("the kernel attached {iface} without a bpf_link ({e}): cannot pin it")
    })?;
    fd.pin(&path)
        .with_context(|| format!("cannot pin {}", path.display()))?;
    Ok(())
}

/// Removes `iface`'s link pin: the program comes off the interface once
/// no process holds the link.
pub fn detach(dir: &Path, iface: &str) -> std::io::Result<()> {
    match std::fs::remove_file(link_pin(dir, iface)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Prepares `dir` for use: a bpffs below, the directory itself, and no
/// pinned maps of another ABI version (those are removed, with a warning).
pub fn prepare_pin_dir(dir: &Path) -> anyhow::Result<()> {
    ensure_bpffs(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let meta = dir.join(maps::META);
    if meta.exists() {
        let abi = MapData::from_pin(&meta)
            .ok()
            .and_then(|d| Map::from_map_data(d).ok())
            .and_then(|m| Array::<MapData, Meta>::try_from(m).ok())
            .and_then(|a| a.get(&0, 0).ok())
            .map(|m| m.abi);
        if abi != Some(ABI_VERSION) && abi != Some(0) {
            tracing::warn!(
                "pinned XDP maps in {} have ABI {abi:?}, this gateway {ABI_VERSION}: discarding them (run-time rules and counters are lost)",
                dir.display()
            );
            for name in maps::PINNED {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
    }
    Ok(())
}

/// Removes everything under `dir` (links first) and `dir` itself; returns
/// the interfaces detached.
pub fn remove_all(dir: &Path) -> anyhow::Result<Vec<String>> {
    let links = pinned_links(dir);
    for l in &links {
        detach(dir, l).with_context(|| format!("cannot remove the link pin of {l}"))?;
    }
    for name in maps::PINNED {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {name}"));
            }
            _ => {}
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))?
        }
        _ => {}
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_keep_their_slots() {
        let mut slots = vec![NO_LEN; 8];
        assert_eq!(assign_slots(&mut slots, &[32, 24]).unwrap(), 2);
        assert_eq!(&slots[..3], &[32, 24, NO_LEN]);
        // 32 goes, 16 comes: 24 stays where it was, 16 takes the hole.
        assert_eq!(assign_slots(&mut slots, &[24, 16]).unwrap(), 2);
        assert_eq!(&slots[..3], &[16, 24, NO_LEN]);
        assert_eq!(assign_slots(&mut slots, &[16]).unwrap(), 1);
        assert_eq!(assign_slots(&mut slots, &[]).unwrap(), 0);
        let many: Vec<u8> = (0..9).collect();
        assert!(assign_slots(&mut slots, &many).is_err());
    }

    #[test]
    fn halves_split_high_first() {
        assert_eq!(halves(mask6(64)), [u64::MAX, 0]);
        assert_eq!(halves(mask6(72)), [u64::MAX, 0xff00_0000_0000_0000]);
    }
}
