//! `cargo xtask bench upstreams`: three-target pools through the gateway.
//!
//! 1. Balancer overhead. One gateway (one worker) with three identical
//!    pools of the same three demo backends, balanced by round robin, least
//!    request and consistent hashing (ring, on a header that a wrk script
//!    varies per request). wrk runs against each in interleaved rounds;
//!    the medians are printed with the gateway's own CPU per request (from
//!    /proc/PID/stat) and the ratios against round robin.
//! 2. A slow target. The third backend answers 200 ms late: round robin
//!    without outlier detection, against least request with outlier
//!    detection (`slow_threshold`), and the two fast targets alone for
//!    reference; printed as
//!    `slow-target p99: outlier-detection X ms, without Y ms`, measured
//!    after a 1 s warm-up in which outlier detection ejects the slow target.
//!
//! Options: `--duration SECS` (each wrk run, default 5), `--rounds N`
//! (default 3), `--connections N` (default 64). When `taskset` exists, the
//! gateway and backends share cpu 1 and wrk runs on cpu 0, as in PERF.md.
//! Self-contained: it shares nothing with the http bench.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

struct Opts {
    duration: u64,
    rounds: usize,
    connections: u32,
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        duration: 5,
        rounds: 3,
        connections: 64,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .with_context(|| format!("{a} needs a value"))
                .and_then(|v| v.parse::<u64>().with_context(|| format!("{a} {v}")))
        };
        match a.as_str() {
            "--duration" => o.duration = val()?.max(1),
            "--rounds" => o.rounds = usize::try_from(val()?.max(1))?,
            "--connections" => o.connections = u32::try_from(val()?.max(1))?,
            other => bail!("unknown option {other:?} (--duration, --rounds, --connections)"),
        }
    }
    Ok(o)
}

/// Processes killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn has(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A command, pinned to `cpu` when taskset exists.
fn pinned(cpu: Option<&str>, program: &Path) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on {addr}")
}

fn wait_ready(admin: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the gateway was not ready within 10 s")
}

/// (utime + stime) of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm field: state is field 3, utime 14, stime 15.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    Some(ticks / hz)
}

/// One wrk run.
#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p99_ms: f64,
    requests: f64,
    /// Gateway CPU per request, µs.
    cpu_us: f64,
    errors: f64,
}

fn wrk(
    o: &Opts,
    cpu: Option<&str>,
    script: &Path,
    url: &str,
    gateway_pid: u32,
) -> anyhow::Result<Run> {
    let before = cpu_seconds(gateway_pid).unwrap_or(0.0);
    let mut cmd = pinned(cpu, Path::new("wrk"));
    let out = cmd
        .args(["-t1", &format!("-c{}", o.connections)])
        .arg(format!("-d{}s", o.duration))
        .args(["--latency", "--timeout", "5s", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("cannot run wrk")?;
    let after = cpu_seconds(gateway_pid).unwrap_or(0.0);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let w = super::wrk::parse(&text)?;
    let mut run = Run {
        rps: w.rps,
        p99_ms: w.p99_ms,
        requests: w.requests as f64,
        cpu_us: f64::NAN,
        errors: (w.non_2xx + w.socket_errors) as f64,
    };
    if run.requests > 0.0 {
        run.cpu_us = (after - before) / run.requests * 1e6;
    }
    Ok(run)
}

/// "N of M": requests the slow target served in the slow-outlier pool.
fn slow_share(admin: SocketAddr, slow: &str) -> String {
    let mut out = String::new();
    if let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_secs(1)) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ =
            s.write_all(b"GET /admin/upstreams HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let _ = s.read_to_string(&mut out);
    }
    // Without a JSON parser here: find the pool, then each target's count.
    let Some(pool) = out.split("\"name\":\"slow-outlier\"").nth(1) else {
        return "?".into();
    };
    let (mut total, mut on_slow) = (0u64, 0u64);
    for t in pool.split("\"address\":\"").skip(1).take(3) {
        let requests = t
            .split("\"requests\":")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        total += requests;
        if t.starts_with(slow) {
            on_slow = requests;
        }
    }
    format!("{on_slow} of {total}")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

const CONFIG: &str = r#"
[server]
workers = 1
watch_config = false
[admin]
listen = "127.0.0.1:{admin}"
[access_log]
enabled = false
[[listeners]]
name = "bench"
listen = "127.0.0.1:{port}"

[[upstreams]]
name = "rr"
targets = ["{f1}", "{f2}", "{f3}"]
[[upstreams]]
name = "lr"
balance = "least_request"
targets = ["{f1}", "{f2}", "{f3}"]
[[upstreams]]
name = "hash"
balance = "ring_hash"
hash_key = "header:x-user"
targets = ["{f1}", "{f2}", "{f3}"]

[[upstreams]]
name = "slow-without"
targets = ["{f1}", "{f2}", "{slow}"]
[upstreams.outlier]
enabled = false
[[upstreams]]
name = "slow-outlier"
balance = "least_request"
targets = ["{f1}", "{f2}", "{slow}"]
[upstreams.outlier]
slow_threshold = "50ms"
consecutive_slow = 3
base_ejection = "60s"
[[upstreams]]
name = "fast-only"
targets = ["{f1}", "{f2}"]
"#;

fn route(name: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nupstream = \"{name}\"\nstrip_prefix = \"/{name}\"\n[routes.match]\npath_prefix = \"/{name}/\"\n"
    )
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    if !has("wrk") {
        bail!("wrk is not installed (cargo xtask setup installs it)");
    }
    super::build_release()?;
    let (server_cpu, client_cpu) = if has("taskset") {
        (Some("1"), Some("0"))
    } else {
        (None, None)
    };
    let bin = PathBuf::from("target/release");
    let dir = std::env::temp_dir().join(format!("gateway-bench-upstreams-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let mut procs = Procs(Vec::new());
    let mut addr = |delay: Option<u32>| -> anyhow::Result<SocketAddr> {
        let a: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut cmd = pinned(server_cpu, &bin.join("demo-backend"));
        cmd.arg(a.to_string());
        if let Some(ms) = delay {
            cmd.arg(ms.to_string());
        }
        procs.0.push(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start demo-backend")?,
        );
        wait_listening(a, "demo-backend")?;
        Ok(a)
    };
    let (f1, f2, f3, slow) = (addr(None)?, addr(None)?, addr(None)?, addr(Some(200))?);
    let port = free_port()?;
    let admin = free_port()?;
    let mut config = CONFIG
        .replace("{admin}", &admin.to_string())
        .replace("{port}", &port.to_string())
        .replace("{f1}", &f1.to_string())
        .replace("{f2}", &f2.to_string())
        .replace("{f3}", &f3.to_string())
        .replace("{slow}", &slow.to_string());
    for r in [
        "rr",
        "lr",
        "hash",
        "slow-without",
        "slow-outlier",
        "fast-only",
    ] {
        config.push_str(&route(r));
    }
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, config)?;
    let script = dir.join("keys.lua");
    std::fs::write(
        &script,
        "math.randomseed(42)\nrequest = function()\n  return wrk.format(nil, nil, { [\"x-user\"] = tostring(math.random(1, 100000)) })\nend\n",
    )?;
    let gateway = pinned(server_cpu, &bin.join("gateway"))
        .args(["run", "--no-xdp", "-c"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join("gateway.log"))?))
        .spawn()
        .context("cannot start the gateway")?;
    let pid = gateway.id();
    procs.0.push(gateway);
    wait_ready(format!("127.0.0.1:{admin}").parse()?)?;
    let base = format!("http://127.0.0.1:{port}");

    eprintln!(
        "bench upstreams: {} rounds of {} s, {} connections{}",
        o.rounds,
        o.duration,
        o.connections,
        if server_cpu.is_some() {
            "; gateway and backends on cpu 1, wrk on cpu 0"
        } else {
            ""
        }
    );
    // Warm up the keep-alive pools.
    for r in ["rr", "lr", "hash"] {
        let warm = Opts {
            duration: 1,
            rounds: 1,
            connections: o.connections,
        };
        wrk(
            &warm,
            client_cpu,
            &script,
            &format!("{base}/{r}/bytes/2"),
            pid,
        )?;
    }

    // 1. Balancer overhead, interleaved rounds.
    let names = ["rr", "lr", "hash"];
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); names.len()];
    for _ in 0..o.rounds {
        for (i, r) in names.iter().enumerate() {
            runs[i].push(wrk(
                &o,
                client_cpu,
                &script,
                &format!("{base}/{r}/bytes/2"),
                pid,
            )?);
        }
    }
    let med = |i: usize, f: fn(&Run) -> f64| median(runs[i].iter().map(f).collect());
    println!("balancer            req/s     p99 ms   gateway CPU µs/req   errors");
    let labels = ["round robin", "least request", "ring hash"];
    for (i, label) in labels.iter().enumerate() {
        println!(
            "{label:<16} {:>9.0} {:>10.2} {:>20.1} {:>8.0}",
            med(i, |r| r.rps),
            med(i, |r| r.p99_ms),
            med(i, |r| r.cpu_us),
            runs[i].iter().map(|r| r.errors).sum::<f64>()
        );
    }
    println!(
        "overhead vs round robin (CPU/req): least-request {:.3}x, ring-hash {:.3}x; (req/s): least-request {:.3}x, ring-hash {:.3}x",
        med(1, |r| r.cpu_us) / med(0, |r| r.cpu_us),
        med(2, |r| r.cpu_us) / med(0, |r| r.cpu_us),
        med(1, |r| r.rps) / med(0, |r| r.rps),
        med(2, |r| r.rps) / med(0, |r| r.rps),
    );

    // 2. One of three targets answers 200 ms late. A 1 s warm-up per pool
    //    first: with outlier detection, the slow target is ejected within it
    //    (after three slow answers); what is measured is the steady state.
    for r in ["slow-outlier", "slow-without", "fast-only"] {
        let warm = Opts {
            duration: 1,
            rounds: 1,
            connections: o.connections,
        };
        wrk(
            &warm,
            client_cpu,
            &script,
            &format!("{base}/{r}/bytes/2"),
            pid,
        )?;
    }
    let mut p99 = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..o.rounds {
        for (i, r) in ["slow-outlier", "slow-without", "fast-only"]
            .iter()
            .enumerate()
        {
            p99[i].push(wrk(&o, client_cpu, &script, &format!("{base}/{r}/bytes/2"), pid)?.p99_ms);
        }
    }
    let rounds = |v: &Vec<f64>| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "slow-target rounds (p99 ms): outlier-detection [{}], without [{}], fast only [{}]",
        rounds(&p99[0]),
        rounds(&p99[1]),
        rounds(&p99[2])
    );
    let [with, without, fast] = p99.map(median);
    let share = slow_share(format!("127.0.0.1:{admin}").parse()?, &slow.to_string());
    println!(
        "fast targets only p99: {fast:.2} ms; the slow target took {share} requests of the outlier-detection pool"
    );
    println!("slow-target p99: outlier-detection {with:.2} ms, without {without:.2} ms");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
