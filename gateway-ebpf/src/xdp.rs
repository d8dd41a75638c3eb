//! The gateway's XDP program: per-packet allow/deny and per-source rate
//! limits for the gateway's own ports, before the packet costs a syscall.
//!
//! Order of decisions for one packet:
//! 1. Parse Ethernet (one VLAN tag), IPv4 or IPv6 (skipping extension
//!    headers up to the transport header), and TCP/UDP ports. Anything else,
//!    or anything not addressed to a protected port, passes untouched.
//! 2. Allow list: a match passes (and skips the rate limit).
//! 3. Deny list: a match drops.
//! 4. Default policy: deny drops, allow continues.
//! 5. Rate limit per source prefix (TCP SYNs or all packets): over the
//!    rate drops.
//!
//! Lookups cost the same whatever the size of the lists: IPv4 goes through a
//! table of 4 bits per /24 (`GW_V4_TBL`) that answers permanent prefixes up
//! to /24 at once and says when the exact-match table `GW_V4_EXT` (longer
//! prefixes, entries with an expiry) must be asked, one hash lookup per
//! prefix length present there. IPv6 asks `GW_V6_EXT` once per prefix length
//! present (`Config::v6_lens`). Userspace keeps these structures equal to the
//! allow/deny LPM tries, which are the lists as configured.
//!
//! The path of a packet is a few hundred instructions at most and every
//! nanosecond shows (the benchmark's budget is 50 ns for the whole program),
//! so: everything is inlined (BPF-to-BPF calls and helper calls are the
//! expensive instructions here), addresses travel as integers, and the only
//! clock read is the coarse one, once, when a decision needs time.
//!
//! Every packet read goes through `load`, which checks `data_end`.
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, xdp_action};
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::{info, warn};
use gateway_common::{
    ABI_VERSION, Bucket, Budget, ClockCache, Config, Counter, DEFAULT_MAX_RULES,
    DEFAULT_MAX_SOURCES, DROP_SAMPLE, DROP_SRC_ENTRIES, DropEvent, EVENT_RING_BYTES,
    EVENT_WINDOW_NS, EVENTS_PER_WINDOW, ExtValue, Meta, PORT_WORDS, RuleValue, SrcKey,
    V4_LEN_SLOTS, V4_TBL_WORDS, V4Key, V6_LEN_SLOTS, V6Key, V6Src, flags, slot, stat,
};

#[map]
static GW_CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static GW_META: Array<Meta> = Array::with_max_entries(1, 0);
#[map]
static GW_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
#[map]
static GW_V4_TBL: Array<u64> = Array::with_max_entries(V4_TBL_WORDS, 0);
#[map]
static GW_V4_EXT: HashMap<V4Key, ExtValue> =
    HashMap::with_max_entries(DEFAULT_MAX_RULES, BPF_F_NO_PREALLOC);
#[map]
static GW_V6_EXT: HashMap<V6Key, ExtValue> =
    HashMap::with_max_entries(DEFAULT_MAX_RULES, BPF_F_NO_PREALLOC);
#[map]
static GW_ALLOW_V4: LpmTrie<[u8; 4], RuleValue> = LpmTrie::with_max_entries(DEFAULT_MAX_RULES, 0);
#[map]
static GW_DENY_V4: LpmTrie<[u8; 4], RuleValue> = LpmTrie::with_max_entries(DEFAULT_MAX_RULES, 0);
#[map]
static GW_ALLOW_V6: LpmTrie<[u8; 16], RuleValue> = LpmTrie::with_max_entries(DEFAULT_MAX_RULES, 0);
#[map]
static GW_DENY_V6: LpmTrie<[u8; 16], RuleValue> = LpmTrie::with_max_entries(DEFAULT_MAX_RULES, 0);
#[map]
static GW_BUCKETS4: LruHashMap<u32, Bucket> = LruHashMap::with_max_entries(DEFAULT_MAX_SOURCES, 0);
#[map]
static GW_BUCKETS6: LruHashMap<V6Src, Bucket> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOURCES, 0);
#[map]
static GW_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
#[map]
static GW_EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);
#[map]
static GW_BUDGET: PerCpuArray<Budget> = PerCpuArray::with_max_entries(1, 0);
#[map]
static GW_CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);
#[map]
static GW_DROP_SRC: LruHashMap<SrcKey, u64> = LruHashMap::with_max_entries(DROP_SRC_ENTRIES, 0);

/// Set once the start-up diagnostic has been logged (per load of the
/// program: `.bss` is not pinned).
#[unsafe(no_mangle)]
static mut GW_STARTED: u32 = 0;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// IPv6 extension headers skipped on the way to TCP/UDP.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// At most this many IPv6 extension headers are skipped; a packet with more
/// counts as a parse error (and passes).
const IPV6_MAX_EXT: usize = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The one bounds-checked packet accessor: a pointer to the `T` at `off`
/// bytes into the packet, or `None` if the packet is shorter.
///
/// The header structs below have natural-width fields, so a field is read
/// with one load (an address in one, not four): XDP frames start at least
/// 2-byte aligned, the ISA and the verifier accept misaligned packet loads
/// outside strict-alignment mode, and the JITs that run XDP (x86-64, arm64)
/// execute them natively. Byte-array fields would make LLVM's BPF backend
/// emit byte loads, four to eight times the instructions on the hottest
/// path.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

/// Multi-byte fields are in network order.
#[repr(C)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
    proto: u16,
}

#[repr(C)]
struct VlanHdr {
    _tci: u16,
    proto: u16,
}

#[repr(C)]
struct Ipv4Hdr {
    vihl: u8,
    _tos: u8,
    _tot_len: u16,
    _id: u16,
    frag: u16,
    _ttl: u8,
    proto: u8,
    _csum: u16,
    src: u32,
    _dst: u32,
}

#[repr(C)]
struct Ipv6Hdr {
    _vtcfl: u32,
    _plen: u16,
    next: u8,
    _hlim: u8,
    src: [u64; 2],
    _dst: [u64; 2],
}

/// The first bytes of any IPv6 extension header we skip.
#[repr(C)]
struct ExtHdr {
    next: u8,
    len: u8,
    /// Fragment header: offset (13 bits) and flags.
    frag: u16,
}

/// A TCP header up to the flags (and the window, to round to 16 bytes; a
/// TCP header has at least 20).
#[repr(C)]
struct TcpHead {
    _sport: u16,
    dport: u16,
    _seq: u32,
    _ack: u32,
    _off: u8,
    flags: u8,
    _win: u16,
}

#[repr(C)]
struct UdpHdr {
    _sport: u16,
    dport: u16,
    _len: u16,
    _csum: u16,
}

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let slot = classify(&ctx);
    if let Some(c) = GW_STATS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    if slot < stat::DROP_DENY_LIST {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// The counter slot of a packet, which says pass or drop.
#[inline(always)]
fn classify(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return stat::PASS_PARSE_ERROR;
    };
    // SAFETY: `ptr_at` checked the bounds.
    let mut proto = unsafe { (*eth).proto };
    let mut off = ETH_HLEN;
    if proto == ETH_P_8021Q.to_be() || proto == ETH_P_8021AD.to_be() {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, ETH_HLEN) else {
            return stat::PASS_PARSE_ERROR;
        };
        // SAFETY: as above.
        proto = unsafe { (*vlan).proto };
        off += VLAN_HLEN;
    }
    if proto == ETH_P_IP.to_be() {
        v4(ctx, off)
    } else if proto == ETH_P_IPV6.to_be() {
        v6(ctx, off)
    } else {
        stat::PASS_NOT_IP
    }
}

/// The destination port and whether the packet opens a TCP connection
/// (SYN without ACK), from the transport header at `off`.
#[inline(always)]
fn ports(ctx: &XdpContext, off: usize, proto: u8) -> Option<(u16, bool)> {
    // SAFETY (both arms): `ptr_at` checked the bounds.
    if proto == IPPROTO_TCP {
        let t = ptr_at::<TcpHead>(ctx, off)?;
        let (dport, fl) = unsafe { ((*t).dport, (*t).flags) };
        Some((u16::from_be(dport), fl & (TCP_SYN | TCP_ACK) == TCP_SYN))
    } else {
        let u = ptr_at::<UdpHdr>(ctx, off)?;
        Some((u16::from_be(unsafe { (*u).dport }), false))
    }
}

#[inline(always)]
fn v4(ctx: &XdpContext, off: usize) -> u32 {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
        return stat::PASS_PARSE_ERROR;
    };
    // SAFETY: `ptr_at` checked the bounds.
    let (vihl, frag, proto, src) = unsafe { ((*ip).vihl, (*ip).frag, (*ip).proto, (*ip).src) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < IPV4_HLEN {
        return stat::PASS_PARSE_ERROR;
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return stat::PASS_UNPROTECTED;
    }
    // A later fragment carries no transport header; its first fragment was
    // judged already.
    if frag & 0x1fffu16.to_be() != 0 {
        return stat::PASS_UNPROTECTED;
    }
    let Some((dport, syn)) = ports(ctx, off + ihl, proto) else {
        return stat::PASS_PARSE_ERROR;
    };
    let src = u32::from_be(src);
    let Some(cfg) = policy(ctx, dport) else {
        return stat::PASS_UNPROTECTED;
    };
    let slot = match lookup_v4(cfg, src) {
        ALLOWED => return stat::PASS_ALLOW_LIST,
        DENIED => stat::DROP_DENY_LIST,
        _ if cfg.flags & flags::DEFAULT_DENY != 0 => stat::DROP_DEFAULT,
        _ if counted(cfg, syn) && over_rate_v4(cfg, src) => stat::DROP_RATE_LIMIT,
        _ => return stat::PASS_DEFAULT,
    };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&src.to_be_bytes());
    report(slot, 4, addr, dport);
    slot
}

#[inline(always)]
fn v6(ctx: &XdpContext, off: usize) -> u32 {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return stat::PASS_PARSE_ERROR;
    };
    // SAFETY: `ptr_at` checked the bounds.
    let (mut next, [hi, lo]) = unsafe { ((*ip).next, (*ip).src) };
    let mut off = off + IPV6_HLEN;
    let mut i = 0;
    while i < IPV6_MAX_EXT && next != IPPROTO_TCP && next != IPPROTO_UDP {
        i += 1;
        // Every header we skip starts with the next header's type and,
        // except the fixed-size fragment header, its own length.
        let Some(h) = ptr_at::<ExtHdr>(ctx, off) else {
            return stat::PASS_PARSE_ERROR;
        };
        // SAFETY: as above.
        let (n, l, frag) = unsafe { ((*h).next, (*h).len, (*h).frag) };
        let len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => (usize::from(l) + 1) * 8,
            IPV6_AH => (usize::from(l) + 2) * 4,
            // A later fragment carries no transport header.
            IPV6_FRAGMENT if frag & 0xfff8u16.to_be() != 0 => return stat::PASS_UNPROTECTED,
            IPV6_FRAGMENT => 8,
            _ => return stat::PASS_UNPROTECTED,
        };
        next = n;
        off += len;
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return stat::PASS_PARSE_ERROR;
    }
    let Some((dport, syn)) = ports(ctx, off, next) else {
        return stat::PASS_PARSE_ERROR;
    };
    let (hi, lo) = (u64::from_be(hi), u64::from_be(lo));
    let Some(cfg) = policy(ctx, dport) else {
        return stat::PASS_UNPROTECTED;
    };
    let slot = match lookup_v6(cfg, hi, lo) {
        ALLOWED => return stat::PASS_ALLOW_LIST,
        DENIED => stat::DROP_DENY_LIST,
        _ if cfg.flags & flags::DEFAULT_DENY != 0 => stat::DROP_DEFAULT,
        _ if counted(cfg, syn) && over_rate_v6(cfg, hi, lo) => stat::DROP_RATE_LIMIT,
        _ => return stat::PASS_DEFAULT,
    };
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&hi.to_be_bytes());
    addr[8..].copy_from_slice(&lo.to_be_bytes());
    report(slot, 6, addr, dport);
    slot
}

/// The policy, if packets to `dport` are enforced.
#[inline(always)]
fn policy(ctx: &XdpContext, dport: u16) -> Option<&'static Config> {
    let cfg = GW_CONFIG.get(0)?;
    // SAFETY: a plain u32 in .bss; a race only logs the line twice.
    if unsafe { core::ptr::read_volatile(&raw const GW_STARTED) } == 0 {
        started(ctx, cfg.abi);
    }
    if cfg.abi != ABI_VERSION {
        return None;
    }
    if cfg.flags & flags::ALL_PORTS == 0 {
        let word = GW_PORTS.get(u32::from(dport >> 6))?;
        if word & (1u64 << (dport & 63)) == 0 {
            return None;
        }
    }
    Some(cfg)
}

/// Logs one line the first time the program runs after a load: a
/// start-up diagnostic, never a per-packet log (a subprogram, to keep the
/// logging code off the packet path).
#[inline(never)]
fn started(ctx: &XdpContext, abi: u32) {
    // SAFETY: as in `policy`.
    unsafe { core::ptr::write_volatile(&raw mut GW_STARTED, 1) };
    if abi == ABI_VERSION {
        info!(
            ctx,
            "gateway-xdp: first packet, policy loaded (abi {})", abi
        );
    } else {
        warn!(
            ctx,
            "gateway-xdp: policy map holds abi {}, expected {}: passing all traffic",
            abi,
            ABI_VERSION
        );
    }
}

/// The coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`, one tick of
/// resolution: 1-10 ms). Reading it costs
/// tens of ns on virtual machines (a seqlock over the timekeeper), so each
/// CPU caches it per jiffy: a packet pays for one `jiffies` read, and the
/// clock itself is read at most HZ times a second per CPU. Expiries and
/// rates tolerate a tick of error (docs/xdp.md).
#[inline(always)]
fn clock() -> u64 {
    // SAFETY: helpers without arguments; the cache is this CPU's.
    unsafe {
        let j = bpf_jiffies64();
        match GW_CLOCK.get_ptr_mut(0) {
            Some(c) => {
                if (*c).jiffies != j || (*c).ns == 0 {
                    (*c).jiffies = j;
                    (*c).ns = bpf_ktime_get_coarse_ns();
                }
                (*c).ns
            }
            None => bpf_ktime_get_coarse_ns(),
        }
    }
}

/// The time to compare expiries with: the clock if some entry expires,
/// else 0 (every present entry has an expiry above 0).
#[inline(always)]
fn expiry_clock(cfg: &Config) -> u64 {
    if cfg.flags & flags::TIMED != 0 {
        clock()
    } else {
        0
    }
}

/// Whether the rate limit counts this packet.
#[inline(always)]
fn counted(cfg: &Config, syn: bool) -> bool {
    cfg.flags & flags::RATE_LIMIT != 0 && (syn || cfg.flags & flags::COUNT_PACKETS != 0)
}

/// Verdicts of the list lookups.
const NO_MATCH: u32 = 0;
const ALLOWED: u32 = 1;
const DENIED: u32 = 2;

#[inline(always)]
fn lookup_v4(cfg: &Config, ip: u32) -> u32 {
    let Some(word) = GW_V4_TBL.get(ip >> 12) else {
        return NO_MATCH;
    };
    let nib = (word >> (((ip >> 8) & 0xf) * 4)) & 0xf;
    if nib == 0 {
        return NO_MATCH;
    }
    if nib & slot::ALLOW != 0 {
        return ALLOWED;
    }
    let deny = nib & slot::DENY != 0;
    let want_allow = nib & slot::EXT_ALLOW != 0;
    // Only an allow entry could change a deny already found.
    let want_deny = nib & slot::EXT_DENY != 0 && !deny;
    if !want_allow && !want_deny {
        return if deny { DENIED } else { NO_MATCH };
    }
    // Read before the loop: a lazy read inside it would double the states
    // the verifier explores per iteration.
    let now = expiry_clock(cfg);
    let n = cfg.v4_nslots as usize;
    let mut found = deny;
    let mut i = 0usize;
    while i < V4_LEN_SLOTS && i < n {
        let s = cfg.v4_lens[i];
        i += 1;
        // An empty slot's length matches no key: no branch for it.
        let key = V4Key {
            len: s.len,
            addr: (ip & s.mask).to_be_bytes(),
        };
        // SAFETY: values are plain data; a concurrent update can at worst
        // show a torn expiry for one packet.
        if let Some(v) = unsafe { GW_V4_EXT.get(&key) } {
            if want_allow && v.allow_until > now {
                return ALLOWED;
            }
            if v.deny_until > now {
                found = true;
                if !want_allow {
                    break;
                }
            }
        }
    }
    if found { DENIED } else { NO_MATCH }
}

#[inline(always)]
fn lookup_v6(cfg: &Config, hi: u64, lo: u64) -> u32 {
    let n = cfg.v6_nslots as usize;
    if n == 0 {
        return NO_MATCH;
    }
    let now = expiry_clock(cfg);
    let mut found = false;
    let mut i = 0usize;
    while i < V6_LEN_SLOTS && i < n {
        let s = cfg.v6_lens[i];
        i += 1;
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&(hi & s.mask[0]).to_be_bytes());
        addr[8..].copy_from_slice(&(lo & s.mask[1]).to_be_bytes());
        let key = V6Key { len: s.len, addr };
        // SAFETY: as in `lookup_v4`.
        if let Some(v) = unsafe { GW_V6_EXT.get(&key) } {
            if v.allow_until > now {
                return ALLOWED;
            }
            if v.deny_until > now {
                found = true;
            }
        }
    }
    if found { DENIED } else { NO_MATCH }
}

#[inline(always)]
fn over_rate_v4(cfg: &Config, ip: u32) -> bool {
    let now = clock();
    let key = ip & cfg.v4_src_mask;
    let bucket = match GW_BUCKETS4.get_ptr_mut(&key) {
        Some(b) => b,
        None => {
            let fresh = Bucket {
                tat_ns: now + cfg.rl_interval_ns,
            };
            if GW_BUCKETS4
                .insert(&key, &fresh, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                return false;
            }
            // Another CPU created it first: use that one.
            match GW_BUCKETS4.get_ptr_mut(&key) {
                Some(b) => b,
                None => return false,
            }
        }
    };
    gcra(bucket, now, cfg.rl_interval_ns, cfg.rl_tolerance_ns)
}

#[inline(always)]
fn over_rate_v6(cfg: &Config, hi: u64, lo: u64) -> bool {
    let now = clock();
    let key = V6Src {
        hi: hi & cfg.v6_src_mask[0],
        lo: lo & cfg.v6_src_mask[1],
    };
    let bucket = match GW_BUCKETS6.get_ptr_mut(&key) {
        Some(b) => b,
        None => {
            let fresh = Bucket {
                tat_ns: now + cfg.rl_interval_ns,
            };
            if GW_BUCKETS6
                .insert(&key, &fresh, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                return false;
            }
            match GW_BUCKETS6.get_ptr_mut(&key) {
                Some(b) => b,
                None => return false,
            }
        }
    };
    gcra(bucket, now, cfg.rl_interval_ns, cfg.rl_tolerance_ns)
}

/// Whether a packet at `now` exceeds the bucket: the generic cell rate
/// algorithm on one shared 64-bit "theoretical arrival time", advanced with
/// compare-and-swap, so CPUs racing on one source never admit more than
/// the configured burst and rate (see docs/xdp.md for the error bound).
#[inline(always)]
fn gcra(bucket: *mut Bucket, now: u64, interval: u64, tolerance: u64) -> bool {
    let tat = bucket.cast::<u64>();
    // SAFETY: map values are 8-byte aligned and live for the program run;
    // an aligned 64-bit load is single-copy atomic (LLVM cannot select an
    // atomic load for the generic BPF CPU).
    let mut seen = unsafe { core::ptr::read_volatile(tat) };
    let mut tries = 0;
    while tries < 4 {
        tries += 1;
        let base = if seen > now { seen } else { now };
        let next = base + interval;
        if next - now > tolerance {
            return true;
        }
        // SAFETY: as above.
        let (cur, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                tat, seen, next,
            )
        };
        if swapped {
            return false;
        }
        seen = cur;
    }
    // Lost four races in a row on one source: count as over the rate.
    true
}

/// Sampled bookkeeping of a drop: one in `DROP_SAMPLE` drops per CPU adds
/// to the per-source estimate, and each CPU sends at most
/// `EVENTS_PER_WINDOW` events per `EVENT_WINDOW_NS` to userspace. Once a
/// CPU's budget is spent, only sampled drops look at the clock to see
/// whether a new window has begun, so a flood costs no clock reads.
#[inline(always)]
fn report(slot: u32, family: u8, addr: [u8; 16], port: u16) {
    let Some(b) = GW_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value; nothing else runs on it meanwhile.
    let (sample, emit) = unsafe {
        (*b).drops += 1;
        let sample = (*b).drops % DROP_SAMPLE == 1 || DROP_SAMPLE == 1;
        if (*b).used >= EVENTS_PER_WINDOW
            && sample
            && clock().wrapping_sub((*b).window_start_ns) >= EVENT_WINDOW_NS
        {
            (*b).used = 0;
        }
        let emit = (*b).used < EVENTS_PER_WINDOW;
        if emit {
            if (*b).used == 0 {
                (*b).window_start_ns = clock();
            }
            (*b).used += 1;
        }
        (sample, emit)
    };
    if sample {
        let key = SrcKey {
            family: u32::from(family),
            addr,
        };
        match GW_DROP_SRC.get_ptr_mut(&key) {
            // SAFETY: map values are 8-byte aligned.
            Some(c) => unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(c, DROP_SAMPLE);
            },
            None => {
                let _ = GW_DROP_SRC.insert(&key, &DROP_SAMPLE, u64::from(BPF_NOEXIST));
            }
        }
    }
    if emit {
        let ev = DropEvent {
            addr,
            // SAFETY: as above.
            time_ns: unsafe { (*b).window_start_ns },
            family,
            reason: slot as u8,
            port,
            _pad: 0,
        };
        let _ = GW_EVENTS.output::<DropEvent>(&ev, 0);
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
