//! Prerequisites, installed only when missing. Each check is a quick local
//! look (dpkg status, a binary on PATH), so a machine that has everything
//! passes through in well under a second.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Debian packages the build, the tests and the benches use.
const PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22 (see ../shared/TOOLCHAIN.md).
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Test and bench peers.
    "redis-server",
    "nginx-light",
    "wrk",
    "iproute2",
];

pub fn all() -> anyhow::Result<()> {
    debian_packages()?;
    rust_src()?;
    bpf_linker()?;
    idp_packages()?;
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let sudo = !is_root();
    let run = |args: &[&str]| {
        if sudo {
            let mut a = vec!["apt-get"];
            a.extend_from_slice(args);
            cmd("sudo", &a)
        } else {
            cmd("apt-get", args)
        }
    };
    run(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    run(&args).context("apt-get install failed (root or sudo is needed to install packages)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup is needed to build the eBPF program")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is not installed (`rustup toolchain install nightly`; keep its LLVM at 22)"
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    cmd(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker against LLVM 22 (about a minute)");
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

/// The Node.js packages of the test identity provider (`tests/idp`), from
/// its committed lock file, when they are not installed yet.
fn idp_packages() -> anyhow::Result<()> {
    if std::path::Path::new("tests/idp/node_modules/oidc-provider").exists() {
        return Ok(());
    }
    eprintln!("xtask: installing the test identity provider (npm ci in tests/idp)");
    cmd(
        "npm",
        &["ci", "--prefix", "tests/idp", "--no-audit", "--no-fund"],
    )
    .context("npm ci failed (Node.js 20+ and npm are needed for the auth tests)")
}
