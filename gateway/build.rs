//! Builds the XDP program (`gateway-ebpf`) with the nightly toolchain and
//! bpf-linker, so that `src/xdp` can embed it. `AYA_BUILD_SKIP=1` skips this
//! for userspace-only checks (the embedded object is then empty and the
//! gateway falls back to userspace enforcement).
use std::process::Command;

use anyhow::{Context as _, bail};

/// The LLVM major version bpf-linker is built against (Debian's llvm-22-dev).
const LLVM_MAJOR: &str = "22";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../gateway-common/src");
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR not set")?;
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Leave an empty object behind so `include_bytes_aligned!` compiles.
        std::fs::write(format!("{out_dir}/gateway-xdp"), [])?;
    } else {
        check_toolchain()?;
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gateway-ebpf",
            root_dir: "../gateway-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Fails early with a message that says what to do when the nightly
/// toolchain's LLVM does not match bpf-linker's, or bpf-linker is missing.
fn check_toolchain() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-vV"])
        .output()
        .context("running `rustup run nightly rustc -vV` (is rustup installed?)")?;
    if !out.status.success() {
        bail!("the nightly toolchain is missing: run `cargo xtask setup`");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let llvm = text
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "nightly rustc uses LLVM {llvm}, but bpf-linker is built against LLVM {LLVM_MAJOR}; \
             do not `rustup update nightly` on this machine (see ../shared/TOOLCHAIN.md)"
        );
    }
    if which_bpf_linker().is_none() {
        bail!("bpf-linker not found on PATH: run `cargo xtask setup`");
    }
    Ok(())
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}
