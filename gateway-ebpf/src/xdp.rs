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
//! Every packet read goes through `ptr_at`, which checks `data_end`.
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};
use core::mem;

use aya_ebpf::bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, xdp_action};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::{info, warn};
use gateway_common::{
    ABI_VERSION, Bucket, Budget, Config, Counter, DEFAULT_MAX_RULES, DEFAULT_MAX_SOURCES,
    DROP_SAMPLE, DROP_SRC_ENTRIES, DropEvent, EVENT_RING_BYTES, EVENT_WINDOW_NS, EVENTS_PER_WINDOW,
    ExtValue, Meta, PORT_WORDS, RuleValue, SrcKey, V4_TBL_WORDS, V4Key, V6_MAX_LENS, V6Key, flags,
    slot, stat,
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
static GW_BUCKETS: LruHashMap<SrcKey, Bucket> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOURCES, 0);
#[map]
static GW_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
#[map]
static GW_EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);
#[map]
static GW_BUDGET: PerCpuArray<Budget> = PerCpuArray::with_max_entries(1, 0);
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

#[repr(C)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
    proto: [u8; 2],
}

#[repr(C)]
struct VlanHdr {
    _tci: [u8; 2],
    proto: [u8; 2],
}

#[repr(C)]
struct Ipv4Hdr {
    vihl: u8,
    _tos: u8,
    _tot_len: [u8; 2],
    _id: [u8; 2],
    frag: [u8; 2],
    _ttl: u8,
    proto: u8,
    _csum: [u8; 2],
    src: [u8; 4],
    _dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    _vtcfl: [u8; 4],
    _plen: [u8; 2],
    next: u8,
    _hlim: u8,
    src: [u8; 16],
    _dst: [u8; 16],
}

/// The first 8 bytes of any IPv6 extension header we skip.
#[repr(C)]
struct ExtHdr {
    next: u8,
    len: u8,
    /// Fragment header: offset (13 bits) and flags.
    frag: [u8; 2],
    _rest: [u8; 4],
}

/// The start of a TCP header, up to the flags.
#[repr(C)]
struct TcpHead {
    _sport: [u8; 2],
    dport: [u8; 2],
    _seq: [u8; 4],
    _ack: [u8; 4],
    _off: u8,
    flags: u8,
}

#[repr(C)]
struct UdpHead {
    _sport: [u8; 2],
    dport: [u8; 2],
}

/// The one bounds-checked accessor: a pointer to a `T` at `off` bytes into
/// the packet, or `None` if the packet is shorter.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// What the parser found.
enum Parsed {
    NotIp,
    /// Not TCP/UDP, or a later fragment: no port to check.
    NoPort,
    Error,
    Packet(Pkt),
}

/// The facts the policy needs about one packet.
struct Pkt {
    v6: bool,
    /// Network order; IPv4 in the first four bytes.
    src: [u8; 16],
    dport: u16,
    /// A TCP SYN without ACK: a new connection.
    syn: bool,
}

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (slot, pkt) = match parse(&ctx) {
        Parsed::NotIp => (stat::PASS_NOT_IP, None),
        Parsed::NoPort => (stat::PASS_UNPROTECTED, None),
        Parsed::Error => (stat::PASS_PARSE_ERROR, None),
        Parsed::Packet(p) => (decide(&ctx, &p), Some(p)),
    };
    let n = count(slot, bytes);
    if slot < stat::DROP_DENY_LIST {
        return xdp_action::XDP_PASS;
    }
    if let Some(p) = pkt {
        report(slot, &p, n);
    }
    xdp_action::XDP_DROP
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Error;
    };
    let mut off = mem::size_of::<EthHdr>();
    let mut proto = u16::from_be_bytes(unsafe { (*eth).proto });
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, off) else {
            return Parsed::Error;
        };
        proto = u16::from_be_bytes(unsafe { (*vlan).proto });
        off += mem::size_of::<VlanHdr>();
    }
    match proto {
        ETH_P_IP => parse_v4(ctx, off),
        ETH_P_IPV6 => parse_v6(ctx, off),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, off: usize) -> Parsed {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
        return Parsed::Error;
    };
    let (vihl, frag, proto, src) = unsafe { ((*ip).vihl, (*ip).frag, (*ip).proto, (*ip).src) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < mem::size_of::<Ipv4Hdr>() {
        return Parsed::Error;
    }
    // A later fragment carries no transport header; its first fragment was
    // judged already.
    if u16::from_be_bytes(frag) & 0x1fff != 0 {
        return Parsed::NoPort;
    }
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&src);
    transport(ctx, off + ihl, proto, false, addr)
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, off: usize) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return Parsed::Error;
    };
    let (mut next, src) = unsafe { ((*ip).next, (*ip).src) };
    let mut off = off + mem::size_of::<Ipv6Hdr>();
    for _ in 0..IPV6_MAX_EXT {
        if next == IPPROTO_TCP || next == IPPROTO_UDP {
            return transport(ctx, off, next, true, src);
        }
        let len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT | IPV6_AH => {
                let Some(h) = ptr_at::<ExtHdr>(ctx, off) else {
                    return Parsed::Error;
                };
                let (n, l, frag) = unsafe { ((*h).next, (*h).len, (*h).frag) };
                let len = match next {
                    IPV6_FRAGMENT => {
                        if u16::from_be_bytes(frag) & 0xfff8 != 0 {
                            return Parsed::NoPort;
                        }
                        8
                    }
                    IPV6_AH => (usize::from(l) + 2) * 4,
                    _ => (usize::from(l) + 1) * 8,
                };
                next = n;
                len
            }
            _ => return Parsed::NoPort,
        };
        off += len;
    }
    if next == IPPROTO_TCP || next == IPPROTO_UDP {
        return transport(ctx, off, next, true, src);
    }
    Parsed::Error
}

#[inline(always)]
fn transport(ctx: &XdpContext, off: usize, proto: u8, v6: bool, src: [u8; 16]) -> Parsed {
    let (dport, syn) = match proto {
        IPPROTO_TCP => {
            let Some(t) = ptr_at::<TcpHead>(ctx, off) else {
                return Parsed::Error;
            };
            let (dport, fl) = unsafe { ((*t).dport, (*t).flags) };
            (
                u16::from_be_bytes(dport),
                fl & (TCP_SYN | TCP_ACK) == TCP_SYN,
            )
        }
        IPPROTO_UDP => {
            let Some(u) = ptr_at::<UdpHead>(ctx, off) else {
                return Parsed::Error;
            };
            (u16::from_be_bytes(unsafe { (*u).dport }), false)
        }
        _ => return Parsed::NoPort,
    };
    Parsed::Packet(Pkt {
        v6,
        src,
        dport,
        syn,
    })
}

/// The counter slot of a parsed packet (which says pass or drop).
#[inline(never)]
fn decide(ctx: &XdpContext, p: &Pkt) -> u32 {
    let Some(cfg) = GW_CONFIG.get(0) else {
        return stat::PASS_UNPROTECTED;
    };
    // SAFETY: a plain u32 in .bss; a race only logs the line twice.
    if unsafe { core::ptr::read_volatile(&raw const GW_STARTED) } == 0 {
        started(ctx, cfg.abi);
    }
    if cfg.abi != ABI_VERSION {
        return stat::PASS_UNPROTECTED;
    }
    if cfg.flags & flags::ALL_PORTS == 0 {
        let Some(word) = GW_PORTS.get(u32::from(p.dport >> 6)) else {
            return stat::PASS_UNPROTECTED;
        };
        if word & (1u64 << (p.dport & 63)) == 0 {
            return stat::PASS_UNPROTECTED;
        }
    }
    let verdict = if p.v6 {
        lookup_v6(cfg, &p.src)
    } else {
        lookup_v4(cfg, [p.src[0], p.src[1], p.src[2], p.src[3]])
    };
    match verdict {
        Verdict::Allow => return stat::PASS_ALLOW_LIST,
        Verdict::Deny => return stat::DROP_DENY_LIST,
        Verdict::None => {}
    }
    if cfg.flags & flags::DEFAULT_DENY != 0 {
        return stat::DROP_DEFAULT;
    }
    if cfg.flags & flags::RATE_LIMIT != 0
        && (p.syn || cfg.flags & flags::COUNT_PACKETS != 0)
        && over_rate(cfg, p)
    {
        return stat::DROP_RATE_LIMIT;
    }
    stat::PASS_DEFAULT
}

/// Logs one line the first time the program runs after a load: a
/// start-up diagnostic, never a per-packet log.
#[inline(never)]
fn started(ctx: &XdpContext, abi: u32) {
    // SAFETY: as in `decide`.
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

enum Verdict {
    None,
    Allow,
    Deny,
}

/// Whether `until` (0 = absent, `u64::MAX` = forever) is still in force.
#[inline(always)]
fn live(until: u64, now: &mut u64) -> bool {
    if until == 0 {
        return false;
    }
    if until == u64::MAX {
        return true;
    }
    if *now == 0 {
        *now = unsafe { bpf_ktime_get_ns() };
    }
    until > *now
}

#[inline(never)]
fn lookup_v4(cfg: &Config, src: [u8; 4]) -> Verdict {
    let ip = u32::from_be_bytes(src);
    let Some(word) = GW_V4_TBL.get(ip >> 12) else {
        return Verdict::None;
    };
    let nib = (word >> (((ip >> 8) & 0xf) * 4)) & 0xf;
    if nib == 0 {
        return Verdict::None;
    }
    if nib & slot::ALLOW != 0 {
        return Verdict::Allow;
    }
    let mut deny = nib & slot::DENY != 0;
    let ext_allow = nib & slot::EXT_ALLOW != 0;
    let ext_deny = nib & slot::EXT_DENY != 0;
    // Only an allow entry could change a deny already found.
    if ext_allow || (ext_deny && !deny) {
        let lens = cfg.v4_ext_lens;
        let mut now = 0u64;
        let mut i = 0u32;
        while i <= 32 {
            let len = 32 - i;
            i += 1;
            if lens & (1u64 << len) == 0 {
                continue;
            }
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let key = V4Key {
                len,
                addr: (ip & mask).to_be_bytes(),
            };
            // SAFETY: values are plain data; a concurrent update can at worst
            // show a torn expiry for one packet.
            if let Some(v) = unsafe { GW_V4_EXT.get(&key) } {
                if ext_allow && live(v.allow_until, &mut now) {
                    return Verdict::Allow;
                }
                if live(v.deny_until, &mut now) {
                    deny = true;
                    if !ext_allow {
                        break;
                    }
                }
            }
        }
    }
    if deny { Verdict::Deny } else { Verdict::None }
}

#[inline(never)]
fn lookup_v6(cfg: &Config, src: &[u8; 16]) -> Verdict {
    let n = cfg.v6_nlens as usize;
    if n == 0 {
        return Verdict::None;
    }
    let hi = u64::from_be_bytes([
        src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7],
    ]);
    let lo = u64::from_be_bytes([
        src[8], src[9], src[10], src[11], src[12], src[13], src[14], src[15],
    ]);
    let mut deny = false;
    let mut now = 0u64;
    let mut i = 0usize;
    while i < V6_MAX_LENS {
        if i >= n {
            break;
        }
        let len = u32::from(cfg.v6_lens[i]);
        i += 1;
        let key = v6_key(hi, lo, len);
        // SAFETY: as in `lookup_v4`.
        if let Some(v) = unsafe { GW_V6_EXT.get(&key) } {
            if live(v.allow_until, &mut now) {
                return Verdict::Allow;
            }
            if live(v.deny_until, &mut now) {
                deny = true;
            }
        }
    }
    if deny { Verdict::Deny } else { Verdict::None }
}

/// The key of the `len`-bit prefix of the address `hi:lo`.
#[inline(always)]
fn v6_key(hi: u64, lo: u64, len: u32) -> V6Key {
    let (h, l) = if len >= 128 {
        (hi, lo)
    } else if len > 64 {
        (hi, lo & (u64::MAX << (128 - len)))
    } else if len == 64 {
        (hi, 0)
    } else if len == 0 {
        (0, 0)
    } else {
        (hi & (u64::MAX << (64 - len)), 0)
    };
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&h.to_be_bytes());
    addr[8..].copy_from_slice(&l.to_be_bytes());
    V6Key { len, addr }
}

/// The rate-limit bucket key of `p`'s source (its configured prefix).
#[inline(always)]
fn src_key(cfg: &Config, p: &Pkt) -> SrcKey {
    if p.v6 {
        let hi = u64::from_be_bytes([
            p.src[0], p.src[1], p.src[2], p.src[3], p.src[4], p.src[5], p.src[6], p.src[7],
        ]);
        let lo = u64::from_be_bytes([
            p.src[8], p.src[9], p.src[10], p.src[11], p.src[12], p.src[13], p.src[14], p.src[15],
        ]);
        SrcKey {
            family: 6,
            addr: v6_key(hi, lo, cfg.v6_src_prefix).addr,
        }
    } else {
        let len = cfg.v4_src_prefix;
        let mask = if len == 0 {
            0
        } else if len >= 32 {
            u32::MAX
        } else {
            u32::MAX << (32 - len)
        };
        let ip = u32::from_be_bytes([p.src[0], p.src[1], p.src[2], p.src[3]]) & mask;
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&ip.to_be_bytes());
        SrcKey { family: 4, addr }
    }
}

/// Whether `p` exceeds its source's rate: the generic cell rate algorithm
/// on one shared 64-bit "theoretical arrival time" per source, updated
/// with compare-and-swap so that CPUs racing on one source never admit
/// more than the configured burst and rate (see docs/xdp.md).
#[inline(never)]
fn over_rate(cfg: &Config, p: &Pkt) -> bool {
    let key = src_key(cfg, p);
    let now = unsafe { bpf_ktime_get_ns() };
    let interval = cfg.rl_interval_ns;
    let tolerance = cfg.rl_tolerance_ns;
    let bucket = match GW_BUCKETS.get_ptr_mut(&key) {
        Some(b) => b,
        None => {
            let fresh = Bucket {
                tat_ns: now + interval,
            };
            if GW_BUCKETS
                .insert(&key, &fresh, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                return false;
            }
            // Another CPU created it first: use that one.
            match GW_BUCKETS.get_ptr_mut(&key) {
                Some(b) => b,
                None => return false,
            }
        }
    };
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

/// Adds one packet of `bytes` to `slot`; returns the slot's packet count on
/// this CPU.
#[inline(always)]
fn count(slot: u32, bytes: u64) -> u64 {
    match GW_STATS.get_ptr_mut(slot) {
        Some(c) => unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).packets
        },
        None => 0,
    }
}

/// Sampled bookkeeping of a drop: one in `DROP_SAMPLE` drops (per CPU and
/// reason) adds to the per-source estimate, and each CPU sends at most
/// `EVENTS_PER_WINDOW` events per `EVENT_WINDOW_NS` to userspace.
#[inline(never)]
fn report(slot: u32, p: &Pkt, n: u64) {
    let key = SrcKey {
        family: if p.v6 { 6 } else { 4 },
        addr: if p.v6 {
            p.src
        } else {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&p.src[..4]);
            a
        },
    };
    if n % DROP_SAMPLE == 1 || DROP_SAMPLE == 1 {
        match GW_DROP_SRC.get_ptr_mut(&key) {
            Some(c) => {
                // SAFETY: map values are 8-byte aligned.
                unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(c, DROP_SAMPLE) };
            }
            None => {
                let _ = GW_DROP_SRC.insert(&key, &DROP_SAMPLE, u64::from(BPF_NOEXIST));
            }
        }
    }
    let Some(b) = GW_BUDGET.get_ptr_mut(0) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU value; nothing else runs on this CPU meanwhile.
    unsafe {
        if now.wrapping_sub((*b).window_start_ns) >= EVENT_WINDOW_NS {
            (*b).window_start_ns = now;
            (*b).used = 0;
        }
        if (*b).used >= EVENTS_PER_WINDOW {
            return;
        }
        (*b).used += 1;
    }
    let ev = DropEvent {
        addr: key.addr,
        time_ns: now,
        family: key.family as u8,
        reason: slot as u8,
        port: p.dport,
        _pad: 0,
    };
    let _ = GW_EVENTS.output::<DropEvent>(&ev, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
