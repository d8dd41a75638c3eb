//! Plain `#[repr(C)]` data shared by the XDP program (`gateway-ebpf`) and the
//! userspace gateway: map keys, map values and constants. No implicit padding.
#![no_std]

/// Counter slots in the per-CPU statistics array.
pub mod stat {
    /// Packets passed to the network stack.
    pub const PASSED: u32 = 0;
    /// Number of counter slots.
    pub const COUNT: u32 = 1;
}
