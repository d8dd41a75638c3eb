//! Plain `#[repr(C)]` data shared by the XDP program (`gateway-ebpf`) and the
//! userspace gateway: map names, map keys, map values and constants. Every
//! struct is laid out without implicit padding (explicit `_pad` fields where
//! needed; checked by the size assertions at the bottom), so both sides agree
//! byte for byte.
//!
//! Addresses are stored in network byte order (`[u8; N]`), times in
//! nanoseconds of `CLOCK_MONOTONIC` (the program compares them with the
//! coarse clock, `bpf_ktime_get_coarse_ns`, cached per jiffy).
#![no_std]

/// Bumped whenever a map's layout or meaning changes. A gateway that finds
/// pinned maps of another version discards them instead of misreading them.
pub const ABI_VERSION: u32 = 1;

/// Map names. Userspace pins each map as `<pin dir>/<name>`.
pub mod maps {
    /// `Array<Config>`, one entry: policy written by userspace.
    pub const CONFIG: &str = "GW_CONFIG";
    /// `Array<Meta>`, one entry: ABI version and rule generation.
    pub const META: &str = "GW_META";
    /// `Array<u64>`, `PORT_WORDS` entries: bitmap of protected ports.
    pub const PORTS: &str = "GW_PORTS";
    /// `Array<u64>`, `V4_TBL_WORDS` entries: 4 bits per IPv4 /24 (`slot::*`).
    pub const V4_TBL: &str = "GW_V4_TBL";
    /// `HashMap<V4Key, ExtValue>`: IPv4 entries the table cannot answer
    /// alone (prefixes longer than /24, and entries with an expiry).
    pub const V4_EXT: &str = "GW_V4_EXT";
    /// `HashMap<V6Key, ExtValue>`: every IPv6 entry.
    pub const V6_EXT: &str = "GW_V6_EXT";
    /// `LpmTrie<[u8; 4], RuleValue>`: the IPv4 allow list as configured
    /// and added (the source of truth the lookup structures derive from).
    pub const ALLOW_V4: &str = "GW_ALLOW_V4";
    /// `LpmTrie<[u8; 4], RuleValue>`: the IPv4 deny list.
    pub const DENY_V4: &str = "GW_DENY_V4";
    /// `LpmTrie<[u8; 16], RuleValue>`: the IPv6 allow list.
    pub const ALLOW_V6: &str = "GW_ALLOW_V6";
    /// `LpmTrie<[u8; 16], RuleValue>`: the IPv6 deny list.
    pub const DENY_V6: &str = "GW_DENY_V6";
    /// `LruHashMap<u32, Bucket>`: rate-limit state per IPv4 source prefix
    /// (host order).
    pub const BUCKETS4: &str = "GW_BUCKETS4";
    /// `LruHashMap<V6Src, Bucket>`: rate-limit state per IPv6 source prefix.
    pub const BUCKETS6: &str = "GW_BUCKETS6";
    /// `PerCpuArray<Counter>`, `stat::COUNT` entries.
    pub const STATS: &str = "GW_STATS";
    /// `RingBuf` of `DropEvent`s (sampled, budgeted per CPU).
    pub const EVENTS: &str = "GW_EVENTS";
    /// `PerCpuArray<Budget>`, one entry: the drop-event budget.
    pub const BUDGET: &str = "GW_BUDGET";
    /// `PerCpuArray<ClockCache>`, one entry: the program's clock cache
    /// (not pinned).
    pub const CLOCK: &str = "GW_CLOCK";
    /// `LruHashMap<SrcKey, u64>`: estimated drops per source (sampled).
    pub const DROP_SRC: &str = "GW_DROP_SRC";

    /// Every map userspace pins, in a stable order.
    pub const PINNED: [&str; 16] = [
        CONFIG, META, PORTS, V4_TBL, V4_EXT, V6_EXT, ALLOW_V4, DENY_V4, ALLOW_V6, DENY_V6,
        BUCKETS4, BUCKETS6, STATS, EVENTS, BUDGET, DROP_SRC,
    ];
}

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "gateway_xdp";

/// Entries of the protected-port bitmap (65536 bits).
pub const PORT_WORDS: u32 = 65536 / 64;
/// Entries of the IPv4 /24 table: 2^24 slots of 4 bits, 16 per word (8 MiB).
pub const V4_TBL_WORDS: u32 = 1 << 20;
/// Default capacity of each rule map (tries and exact-match tables).
pub const DEFAULT_MAX_RULES: u32 = 262_144;
/// Default capacity of the rate-limit bucket map (sources tracked at once).
pub const DEFAULT_MAX_SOURCES: u32 = 131_072;
/// Capacity of the per-source drop estimate map.
pub const DROP_SRC_ENTRIES: u32 = 4096;
/// Size of the drop-event ring buffer.
pub const EVENT_RING_BYTES: u32 = 64 * 1024;
/// Slots of `Config::v4_lens`: every IPv4 prefix length (0..=32) fits.
pub const V4_LEN_SLOTS: usize = 40;
/// Slots of `Config::v6_lens`: the most distinct IPv6 prefix lengths.
pub const V6_LEN_SLOTS: usize = 32;
/// The prefix length of an empty slot of `Config::v4_lens`/`v6_lens`: no
/// key has it, so looking it up finds nothing.
pub const NO_LEN: u32 = 0xff;

/// Bits of one IPv4 /24 slot in `V4_TBL`.
pub mod slot {
    /// A permanent allow entry of /24 or shorter covers the slot.
    pub const ALLOW: u64 = 1;
    /// A permanent deny entry of /24 or shorter covers the slot.
    pub const DENY: u64 = 2;
    /// `V4_EXT` holds allow entries that may match inside the slot.
    pub const EXT_ALLOW: u64 = 4;
    /// `V4_EXT` holds deny entries that may match inside the slot.
    pub const EXT_DENY: u64 = 8;
}

/// `Config::flags`.
pub mod flags {
    /// Drop packets to protected ports that match neither list.
    pub const DEFAULT_DENY: u32 = 1;
    /// Enforce on every port, not only the protected ones.
    pub const ALL_PORTS: u32 = 2;
    /// The per-source rate limit is on.
    pub const RATE_LIMIT: u32 = 4;
    /// The rate limit counts every packet (else only TCP SYNs).
    pub const COUNT_PACKETS: u32 = 8;
    /// Some list entry expires: compare expiries with the clock. Set by
    /// the rule writers (the others by the policy writer).
    pub const TIMED: u32 = 16;
}

/// The policy, written by userspace (one entry of `CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `ABI_VERSION` once userspace has written the entry; the program
    /// passes everything while it is anything else.
    pub abi: u32,
    /// `flags::*`.
    pub flags: u32,
    /// Nanoseconds per token: 1e9 / rate.
    pub rl_interval_ns: u64,
    /// How far ahead of now the bucket may run: burst * `rl_interval_ns`.
    pub rl_tolerance_ns: u64,
    /// The source prefix a bucket covers, IPv4: the mask (host order).
    pub v4_src_mask: u32,
    pub _pad: u32,
    /// The same for IPv6 (two host-order halves).
    pub v6_src_mask: [u64; 2],
    /// Default expiry of `gateway deny add` without `--ttl` (0 = never).
    pub ban_ttl_ns: u64,
    /// Slots of `v4_lens` in use (the rest are not read).
    pub v4_nslots: u32,
    /// Slots of `v6_lens` in use.
    pub v6_nslots: u32,
    /// Prefix lengths present in `V4_EXT`, one per slot, with their masks
    /// (so the program computes no mask). A length keeps its slot while
    /// present, so a reader racing a rewrite sees the slots of lengths that
    /// stay unchanged.
    pub v4_lens: [LenSlot4; V4_LEN_SLOTS],
    /// The same for `V6_EXT`.
    pub v6_lens: [LenSlot6; V6_LEN_SLOTS],
}

/// One IPv4 prefix length the program looks up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LenSlot4 {
    /// `NO_LEN` for an empty slot.
    pub len: u32,
    /// Host order.
    pub mask: u32,
}

/// One IPv6 prefix length the program looks up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LenSlot6 {
    /// `NO_LEN` for an empty slot.
    pub len: u32,
    pub _pad: u32,
    /// Two host-order halves.
    pub mask: [u64; 2],
}

impl LenSlot4 {
    pub const EMPTY: LenSlot4 = LenSlot4 {
        len: NO_LEN,
        mask: 0,
    };
}

impl LenSlot6 {
    pub const EMPTY: LenSlot6 = LenSlot6 {
        len: NO_LEN,
        _pad: 0,
        mask: [0; 2],
    };
}

impl Default for Config {
    fn default() -> Self {
        Config {
            abi: 0,
            flags: 0,
            rl_interval_ns: 0,
            rl_tolerance_ns: 0,
            v4_src_mask: 0,
            _pad: 0,
            v6_src_mask: [0; 2],
            ban_ttl_ns: 0,
            v4_nslots: 0,
            v6_nslots: 0,
            v4_lens: [LenSlot4::EMPTY; V4_LEN_SLOTS],
            v6_lens: [LenSlot6::EMPTY; V6_LEN_SLOTS],
        }
    }
}

/// Bookkeeping shared by every writer of the pinned maps (one entry of `META`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub abi: u32,
    pub _pad: u32,
    /// Bumped by every change to the rule maps, so a process that caches
    /// the rules knows when another one changed them.
    pub generation: u64,
}

/// Key of `V4_EXT`: a prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V4Key {
    pub len: u32,
    /// Network order, host bits zero.
    pub addr: [u8; 4],
}

/// Key of `V6_EXT`: a prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V6Key {
    pub len: u32,
    /// Network order, host bits zero.
    pub addr: [u8; 16],
}

/// Value of `V4_EXT`/`V6_EXT`: until when the prefix is in each list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtValue {
    /// 0: not in the allow list; `u64::MAX`: no expiry; else the
    /// monotonic time (ns) at which the entry stops matching.
    pub allow_until: u64,
    /// The same for the deny list.
    pub deny_until: u64,
}

/// Value of the allow/deny LPM tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// Added at run time (`gateway deny|allow add`): until when (0: not
    /// added at run time; `u64::MAX`: no expiry).
    pub cli_until: u64,
    /// 1 if the entry comes from the config file (never expires).
    pub from_config: u32,
    pub _pad: u32,
}

impl RuleValue {
    /// Until when the entry matches (0: it does not).
    pub const fn until(&self) -> u64 {
        if self.from_config != 0 {
            u64::MAX
        } else {
            self.cli_until
        }
    }
}

/// A source prefix (rate-limit buckets, drop statistics).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcKey {
    /// 4 or 6.
    pub family: u32,
    /// Network order; IPv4 uses the first four bytes. Host bits zero.
    pub addr: [u8; 16],
}

/// Key of the IPv6 rate-limit buckets: a source prefix, host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V6Src {
    pub hi: u64,
    pub lo: u64,
}

/// A rate-limit bucket (generic cell rate algorithm): the theoretical
/// arrival time of the next conforming packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tat_ns: u64,
}

/// A per-CPU counter slot of `STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Per-CPU budget of drop events (`BUDGET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    pub window_start_ns: u64,
    /// Events sent in the current window.
    pub used: u64,
    /// Drops seen (for sampling).
    pub drops: u64,
}

/// A CPU's cache of the coarse clock, refreshed once per jiffy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockCache {
    pub jiffies: u64,
    pub ns: u64,
}

/// Drop events a CPU may emit per `EVENT_WINDOW_NS`.
pub const EVENTS_PER_WINDOW: u64 = 8;
/// The drop-event budget window: 100 ms.
pub const EVENT_WINDOW_NS: u64 = 100_000_000;
/// One drop in this many (per CPU) updates `DROP_SRC`, by this
/// many.
pub const DROP_SAMPLE: u64 = 16;

/// A sampled drop, sent through `EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// Network order; IPv4 uses the first four bytes.
    pub addr: [u8; 16],
    /// When the CPU's event window began (coarse monotonic ns).
    pub time_ns: u64,
    /// 4 or 6.
    pub family: u8,
    /// The `stat` slot the packet was counted in.
    pub reason: u8,
    /// Destination port, host order.
    pub port: u16,
    pub _pad: u32,
}

/// XDP program return values used here (`enum xdp_action`).
pub mod xdp_action {
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
}

/// Counter slots in the per-CPU statistics array, each with the labels
/// `gateway_xdp_packets_total` exports.
pub mod stat {
    /// Not IPv4/IPv6: passed.
    pub const PASS_NOT_IP: u32 = 0;
    /// IP, but not to a protected port (or not TCP/UDP, or a later
    /// fragment): passed.
    pub const PASS_UNPROTECTED: u32 = 1;
    /// Protected port, no list entry matched, default allow, within rate.
    pub const PASS_DEFAULT: u32 = 2;
    /// Protected port, the source is on the allow list.
    pub const PASS_ALLOW_LIST: u32 = 3;
    /// Truncated or malformed headers: passed (the stack drops them).
    pub const PASS_PARSE_ERROR: u32 = 4;
    /// Dropped: the source is on the deny list.
    pub const DROP_DENY_LIST: u32 = 5;
    /// Dropped: default deny.
    pub const DROP_DEFAULT: u32 = 6;
    /// Dropped: over the per-source rate.
    pub const DROP_RATE_LIMIT: u32 = 7;
    /// Number of counter slots.
    pub const COUNT: u32 = 8;

    /// `(action, reason)` labels of each slot.
    pub const LABELS: [(&str, &str); COUNT as usize] = [
        ("pass", "not_ip"),
        ("pass", "unprotected"),
        ("pass", "default"),
        ("pass", "allow_list"),
        ("pass", "parse_error"),
        ("drop", "deny_list"),
        ("drop", "default_deny"),
        ("drop", "rate_limit"),
    ];
}

// No implicit padding: every size is the sum of its fields.
const _: () = {
    assert!(
        core::mem::size_of::<Config>()
            == 4 + 4 + 8 + 8 + 4 + 4 + 16 + 8 + 4 + 4 + 8 * V4_LEN_SLOTS + 24 * V6_LEN_SLOTS
    );
    assert!(core::mem::size_of::<LenSlot4>() == 8);
    assert!(core::mem::size_of::<LenSlot6>() == 24);
    assert!(core::mem::size_of::<Meta>() == 16);
    assert!(core::mem::size_of::<V4Key>() == 8);
    assert!(core::mem::size_of::<V6Key>() == 20);
    assert!(core::mem::size_of::<ExtValue>() == 16);
    assert!(core::mem::size_of::<RuleValue>() == 16);
    assert!(core::mem::size_of::<SrcKey>() == 20);
    assert!(core::mem::size_of::<Bucket>() == 8);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<Budget>() == 24);
    assert!(core::mem::size_of::<V6Src>() == 16);
    assert!(core::mem::size_of::<ClockCache>() == 16);
    assert!(core::mem::size_of::<DropEvent>() == 32);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data without padding; every bit pattern is valid.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Meta {}
    unsafe impl aya::Pod for V4Key {}
    unsafe impl aya::Pod for V6Key {}
    unsafe impl aya::Pod for ExtValue {}
    unsafe impl aya::Pod for RuleValue {}
    unsafe impl aya::Pod for SrcKey {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for Budget {}
    unsafe impl aya::Pod for V6Src {}
    unsafe impl aya::Pod for ClockCache {}
    unsafe impl aya::Pod for DropEvent {}
}
