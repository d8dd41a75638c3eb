//! Running `wrk --latency` and reading its report.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::http::proc;

/// How a load run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    pub secs: u64,
    pub cpu: usize,
}

/// What wrk reported.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Report {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    pub p75_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
    pub non_2xx: u64,
}

/// Runs wrk against `url`, pinned to `load.cpu`, and parses its report.
pub fn run(url: &str, load: Load) -> anyhow::Result<Report> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        format!("-t{}", load.threads),
        format!("-c{}", load.connections),
        format!("-d{}s", load.secs),
        "--latency".to_string(),
        url.to_string(),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    proc::pin(&mut cmd, load.cpu);
    let child = cmd.spawn().context("cannot run wrk")?;
    let pid = child.id();
    // wrk bounds itself with -d; this only guards against a hang.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let limit = Duration::from_secs(load.secs + 30);
    let out = match rx.recv_timeout(limit) {
        Ok(r) => r.context("wrk failed")?,
        Err(_) => {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(i32::try_from(pid).unwrap_or(i32::MAX), libc::SIGKILL);
            }
            bail!("wrk did not finish within {limit:?}");
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk {url} failed ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
}

/// Parses wrk 4's text report (with `--latency`).
pub fn parse(text: &str) -> anyhow::Result<Report> {
    let mut r = Report::default();
    let mut seen = (false, false, false);
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [pct, v] if pct.ends_with('%') => {
                let ms = millis(v)?;
                match *pct {
                    "50%" => r.p50_ms = ms,
                    "75%" => r.p75_ms = ms,
                    "90%" => r.p90_ms = ms,
                    "99%" => {
                        r.p99_ms = ms;
                        seen.0 = true;
                    }
                    _ => {}
                }
            }
            [n, "requests", "in", t, ..] => {
                r.requests = n.parse()?;
                r.seconds = millis(t.trim_end_matches(','))? / 1000.0;
                seen.1 = true;
            }
            ["Requests/sec:", v] => {
                r.rps = v.parse()?;
                seen.2 = true;
            }
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                r.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse()?,
            _ => {}
        }
    }
    if seen != (true, true, true) {
        bail!("no latency distribution, request count or request rate found");
    }
    Ok(r)
}

/// wrk's durations (`812.00us`, `1.70ms`, `2.00s`, `1.00m`) in milliseconds.
fn millis(s: &str) -> anyhow::Result<f64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let scale = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" | "" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => bail!("bad duration unit in {s:?}"),
    };
    Ok(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 8s test @ http://127.0.0.1:8080/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.79ms  304.12us   9.87ms   91.02%
    Req/Sec    36.12k     1.01k   38.00k    80.00%
  Latency Distribution
     50%    1.70ms
     75%    1.85ms
     90%    2.10ms
     99%    3.30ms
  289012 requests in 8.00s, 23.15MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  36126.44
Transfer/sec:      2.89MB
";

    #[test]
    fn parses_a_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.requests, 289_012);
        assert!((r.seconds - 8.0).abs() < 1e-9);
        assert!((r.rps - 36126.44).abs() < 1e-9);
        assert!((r.p50_ms - 1.70).abs() < 1e-9);
        assert!((r.p99_ms - 3.30).abs() < 1e-9);
        assert_eq!(r.socket_errors, 3);
        assert_eq!(r.non_2xx, 5);
    }

    #[test]
    fn reads_every_unit() {
        assert!((millis("812.00us").unwrap() - 0.812).abs() < 1e-9);
        assert!((millis("2.00s").unwrap() - 2000.0).abs() < 1e-9);
        assert!((millis("1.00m").unwrap() - 60_000.0).abs() < 1e-9);
        assert!(millis("3parsecs").is_err());
    }

    #[test]
    fn rejects_a_truncated_report() {
        assert!(parse("Running 8s test @ http://127.0.0.1:8080/\n").is_err());
    }
}
