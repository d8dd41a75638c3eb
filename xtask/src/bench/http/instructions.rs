//! `--instructions`: user-space instructions per request, counted by
//! callgrind over a bounded wrk run, for the gateway, each `--compare-with`
//! build and nginx.
//!
//! Unlike CPU time, an instruction count does not depend on what else the
//! machine runs, so it resolves changes of a few per cent in the proxies'
//! own code on a shared, noisy machine (repeat runs agree within about
//! 0.3%). It leaves out the kernel, and valgrind runs the process some 50
//! times slower, so requests batch differently than at full speed: compare
//! these figures with each other, not with the CPU columns.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::proc::Proc;
use crate::bench::wrk;

/// Whether valgrind's callgrind and callgrind_control are installed.
pub fn available() -> bool {
    ["valgrind", "callgrind_control"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A server to run under callgrind: its label, program and arguments, and
/// the address it listens on.
pub struct Subject {
    pub label: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize)]
pub struct Count {
    pub target: String,
    pub requests: u64,
    pub instructions: u64,
    pub per_request: f64,
}

/// Runs `s` under callgrind on `cpu`: warms it up, zeroes the counters,
/// runs `load`, dumps the counters and stops it.
pub fn measure(s: &Subject, dir: &Path, load: wrk::Load, cpu: usize) -> anyhow::Result<Count> {
    let prefix = dir.join(format!("callgrind.{}", s.label));
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}.%p", prefix.display()))
        .arg("--dump-instr=no")
        .arg(&s.program)
        .args(&s.args);
    let log = dir.join(format!("callgrind-{}.log", s.label));
    let mut proc = Proc::spawn(&format!("{} (callgrind)", s.label), cmd, cpu, &log)?;
    proc.wait_ready(s.addr, false, Duration::from_secs(120))?;
    let url = format!("http://{}/", s.addr);
    wrk::run(&url, wrk::Load { secs: 2, ..load })?;
    let pid = proc.pid().to_string();
    control(&["-z", &pid])?;
    let report = wrk::run(&url, load)?;
    control(&["-d", &pid])?;
    let dump = PathBuf::from(format!("{}.{pid}.1", prefix.display()));
    // Callgrind acts on commands when the program runs: poke an idle server
    // until the dump is complete (it ends with a totals line).
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&dump).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("totals:")) {
            break;
        }
        let _ = super::proc::probe(s.addr);
        std::thread::sleep(Duration::from_millis(200));
    }
    proc.check_alive()?;
    proc.stop();
    if text.is_empty() {
        bail!("callgrind wrote no {}", dump.display());
    }
    let instructions = text
        .lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .with_context(|| format!("no summary line in {}", dump.display()))?;
    if report.requests == 0 {
        bail!("{}: wrk completed no request under callgrind", s.label);
    }
    Ok(Count {
        target: s.label.clone(),
        requests: report.requests,
        instructions,
        per_request: instructions as f64 / report.requests as f64,
    })
}

fn control(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("callgrind_control")
        .args(args)
        .output()
        .context("cannot run callgrind_control")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
