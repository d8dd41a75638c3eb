//! Project tasks. `cargo xtask run` and `cargo xtask test` are the two
//! commands a newcomer needs: each installs what is missing (idempotently,
//! and quickly when everything is present) before it builds.

mod bench;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites (rust-src, llvm-22-dev, bpf-linker, redis, nginx, wrk).
    Setup,
    /// Build everything, start the demo backend and run the gateway on conf/gateway.toml.
    Run {
        /// Extra arguments for `gateway run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite (formatting, lints, unit, integration, kernel tests).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Benchmarks: `http` (default; gateway vs nginx vs direct), `upstreams`, `policy` or `xdp`.
    Bench {
        /// Which benchmark: http, upstreams, policy, jwt or xdp.
        #[arg(default_value = "http")]
        what: String,
        /// Extra arguments for that benchmark.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The `http` bench's floor proxy (see xtask/src/bench/http/floor.rs).
    #[command(hide = true)]
    FloorPump {
        listen: std::net::SocketAddr,
        backend: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    clean_cargo_env();
    let root = project_root();
    std::env::set_current_dir(&root).with_context(|| format!("cannot enter {}", root.display()))?;
    match cli.task {
        Task::Setup => setup::all(),
        Task::Run { args } => run(&args),
        Task::Test { filter } => test(filter.as_deref()),
        Task::Bench { what, args } => {
            setup::all()?;
            bench::run(&what, &args)
        }
        Task::FloorPump { listen, backend } => bench::floor_pump(listen, backend),
    }
}

/// Drops the variables `cargo run` sets for xtask itself, so the cargo
/// commands xtask runs see the same environment as a plain `cargo build`:
/// ring's build script watches `CARGO_MANIFEST_DIR`, and passing it on would
/// rebuild ring, rustls and the gateway on every call.
fn clean_cargo_env() {
    let inherited: Vec<_> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.starts_with("CARGO_PKG_")
                || matches!(
                    k.as_str(),
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                )
        })
        .collect();
    for k in inherited {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::remove_var(k) };
    }
}

/// The workspace root (xtask lives one level below it).
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command, failing with its name if it fails.
pub fn cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn run(args: &[String]) -> anyhow::Result<()> {
    setup::all()?;
    cmd(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "gateway",
            "-p",
            "gateway-tests",
            "--bins",
        ],
    )?;
    let mut backend = Command::new("target/release/demo-backend")
        .arg("127.0.0.1:8081")
        .spawn()
        .context("cannot start the demo backend")?;
    eprintln!(
        "xtask: demo backend on 127.0.0.1:8081; gateway on conf/gateway.toml (Ctrl-C stops both)"
    );
    let mut gw_args = vec![
        "run".to_string(),
        "-c".to_string(),
        "conf/gateway.toml".to_string(),
    ];
    gw_args.extend(args.iter().cloned());
    let status = Command::new("target/release/gateway")
        .args(&gw_args)
        .status();
    let _ = backend.kill();
    let _ = backend.wait();
    let status = status.context("cannot start the gateway")?;
    if !status.success() {
        bail!("gateway exited with {status}");
    }
    Ok(())
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    setup::all()?;
    cmd("cargo", &["fmt", "--all", "--", "--check"])
        .context("run `cargo fmt --all` to fix formatting")?;
    // Default members only: the eBPF crate builds for its own target (through
    // gateway/build.rs), not the host.
    cmd(
        "cargo",
        &["clippy", "--all-targets", "--", "-D", "warnings"],
    )?;
    // Build the binaries the end-to-end tests start.
    cmd(
        "cargo",
        &["build", "-p", "gateway", "-p", "gateway-tests", "--bins"],
    )?;
    let mut args = vec!["test"];
    if let Some(f) = filter {
        args.push(f);
    }
    cargo_test_counted(&args)
}

/// Runs `cargo <args>`, passing its output through, and ends with one line
/// that totals every test binary's result: `tests: N passed, N failed, N skipped`.
fn cargo_test_counted(args: &[&str]) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    // Tests that skip their checks (no root, say) append a line here; see
    // `gateway_tests::skip`.
    let skips = std::env::current_dir()
        .context("current directory")?
        .join("target/test-skips.txt");
    let _ = std::fs::remove_file(&skips);
    let mut child = Command::new("cargo")
        .args(args)
        .env("GATEWAY_TEST_SKIPS", &skips)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(['.', ';']) {
                    let mut words = part.split_whitespace();
                    if let (Some(n), Some(what)) = (words.next(), words.next())
                        && let Ok(n) = n.parse::<u64>()
                    {
                        match what {
                            "passed" => passed += n,
                            "failed" => failed += n,
                            "ignored" => ignored += n,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    let skipped: Vec<String> = std::fs::read_to_string(&skips)
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default();
    if !skipped.is_empty() {
        println!("skipped tests (they passed without checking anything):");
        for line in &skipped {
            println!("  {line}");
        }
    }
    let n = skipped.len() as u64;
    let (passed, ignored) = (passed.saturating_sub(n), ignored + n);
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}
