//! Syscalls per request (`--syscalls`): `perf stat` counts the
//! `syscalls:sys_enter_*` tracepoints of one process during a wrk run.
//! Counting (not sampling) costs the traced process little, but it is done
//! in a separate run so that it cannot disturb the measured rounds.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::bench::wrk;

/// Whether `perf` can count syscall tracepoints here.
pub fn available() -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("<not"))
}

/// Syscalls of `pid` per request of one wrk run against `url`, by name.
pub fn per_request(
    pid: i32,
    url: &str,
    load: wrk::Load,
    dir: &Path,
) -> anyhow::Result<(u64, BTreeMap<String, f64>)> {
    let out = dir.join(format!("perf-stat-{pid}.csv"));
    let mut perf = Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-e",
            "syscalls:sys_enter_*",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&out)
        .args(["--", "sleep", &(load.secs + 1).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run perf")?;
    // Let perf attach before the load starts; the idle edges cost nothing.
    std::thread::sleep(Duration::from_millis(500));
    let report = wrk::run(url, load);
    let status = perf.wait()?;
    let report = report?;
    if !status.success() {
        bail!("perf stat failed ({status})");
    }
    let text = std::fs::read_to_string(&out).context("perf wrote no counts")?;
    let n = report.requests.max(1) as f64;
    let counts = parse(&text)
        .into_iter()
        .map(|(name, c)| (name, c as f64 / n))
        .collect();
    Ok((report.requests, counts))
}

/// `perf stat -x,` lines (`COUNT,UNIT,EVENT,...`) to counts by syscall name,
/// leaving out those that did not occur.
fn parse(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(',');
            let count = f.next()?.trim().parse::<u64>().ok()?;
            let event = f.nth(1)?;
            let name = event.strip_prefix("syscalls:sys_enter_")?;
            (count > 0).then(|| (name.to_string(), count))
        })
        .collect()
}

/// "4.55: recvfrom 2.00, writev 2.00, write 0.43, …" (the five largest).
pub fn describe(per_req: &BTreeMap<String, f64>) -> String {
    let total: f64 = per_req.values().sum();
    let mut v: Vec<(&String, &f64)> = per_req.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    let top: Vec<String> = v
        .iter()
        .take(5)
        .map(|(k, c)| format!("{k} {c:.2}"))
        .collect();
    format!("{total:.2}: {}", top.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_csv() {
        let text = "# started on Mon Nov 23 18:12:08 2026\n\n\
            65945,,syscalls:sys_enter_recvfrom,5000,100.00,,\n\
            0,,syscalls:sys_enter_read,5000,100.00,,\n\
            <not counted>,,syscalls:sys_enter_open,0,100.00,,\n\
            14041,,syscalls:sys_enter_write,5000,100.00,,\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m["recvfrom"], 65945);
        assert_eq!(m["write"], 14041);
        let per: BTreeMap<String, f64> = [("a".to_string(), 2.0), ("b".to_string(), 0.5)].into();
        assert_eq!(describe(&per), "2.50: a 2.00, b 0.50");
    }
}
