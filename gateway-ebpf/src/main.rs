//! The gateway's XDP program (`xdp.rs`), built for the bpf target by
//! gateway/build.rs. Host builds (`cargo clippy --workspace`) get an empty
//! binary, since the program needs the bpf target and a nightly compiler.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The bpf target has no compare-and-swap in `core::sync::atomic` (its spec
// says `atomic-cas: false`), but the kernel has BPF_CMPXCHG and BPF_ADD
// since 5.12 and LLVM emits them from the intrinsics.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
