//! HTTP benchmark: wrk against the backend directly, through the gateway and
//! through nginx set up as an equivalent reverse proxy, interleaved over
//! rounds, on the test bed of `shared/PERF.md`:
//!
//! - backend: nginx `return 200`, one worker;
//! - the proxy under test and the backend share one CPU (`--server-cpu`),
//!   wrk runs on another (`--client-cpu`); loopback only;
//! - upstream keep-alive, access logs off, one worker everywhere.
//!
//! Each run reports req/s, p50 and p99 latency, the CPU each server process
//! used per request (utime and stime from `/proc/PID/stat` over the run,
//! divided by the requests wrk completed) and its peak RSS (`VmHWM`). The
//! summary takes medians over rounds; the last line is
//! `gateway/nginx: rps X.XX p99 Y.YY`. Raw results go to `target/bench/`.
//! See docs/bench.md.

pub(super) mod floor;
mod idle;
mod instructions;
mod peers;
pub(super) mod proc;
mod syscalls;

use super::wrk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde::Serialize;

use peers::Server;
use proc::CpuTime;

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench http",
    about = "wrk against the backend directly, through the gateway and through nginx",
    after_help = "Examples:\n  cargo xtask bench\n  cargo xtask bench http --quick\n  cargo xtask bench http --rounds 5 --duration 10\n  cargo xtask bench http --no-build --compare-with /tmp/gateway.before"
)]
struct Args {
    /// Seconds per measured run [default: 8, 2 with --quick].
    #[arg(long, short = 'd', value_parser = parse_secs)]
    duration: Option<u64>,
    /// Open connections wrk keeps (also nginx's upstream keepalive).
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: u32,
    /// wrk threads.
    #[arg(long, short = 't', default_value_t = 1)]
    threads: u32,
    /// Rounds; each runs every target once, in a rotating order [default: 3, 1 with --quick].
    #[arg(long, short = 'r')]
    rounds: Option<u32>,
    /// Seconds of unmeasured load on each target before the first round.
    #[arg(long, value_parser = parse_secs, default_value = "1")]
    warmup: u64,
    /// A short smoke run: 2 s runs, one round.
    #[arg(long)]
    quick: bool,
    /// CPU for the backend and the proxy under test.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// CPU for wrk.
    #[arg(long, default_value_t = 0)]
    client_cpu: usize,
    /// Use target/release/gateway as it is instead of building it.
    #[arg(long)]
    no_build: bool,
    /// Also measure this gateway binary (say, a build from before a change),
    /// interleaved with the others, and print the current one's ratios to it.
    /// May be given more than once.
    #[arg(long, value_name = "GATEWAY_BINARY")]
    compare_with: Vec<PathBuf>,
    /// Targets to measure (direct, gateway, nginx, floor); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// After the rounds, count each server's syscalls per request with
    /// `perf stat` over one extra 3 s run per target (needs linux-perf).
    #[arg(long)]
    syscalls: bool,
    /// Instead of the timed rounds, count user-space instructions per
    /// request under callgrind (valgrind) for the gateway, each
    /// --compare-with build and nginx: slow, but deterministic on a busy
    /// machine.
    #[arg(long)]
    instructions: bool,
    /// Before the rounds, open this many keep-alive connections to a fresh
    /// process of each proxy one by one (one request each, left open) and report its
    /// memory per idle connection; 0 skips it. Memory grows in 2 MiB
    /// steps for the gateway (transparent huge pages): keep it in the
    /// thousands.
    #[arg(long, default_value_t = 2000)]
    idle_connections: usize,
}

fn parse_secs(s: &str) -> Result<u64, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    match n.parse::<u64>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a whole number of seconds (such as 8 or 8s)"
        )),
    }
}

/// What is measured in one row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Gateway,
    Nginx,
    /// The floor proxy (`floor.rs`): no HTTP work, the bed's ceiling.
    Floor,
    /// The n-th `--compare-with` binary.
    Baseline(usize),
}

const FIXED: [(Kind, &str); 4] = [
    (Kind::Direct, "direct"),
    (Kind::Gateway, "gateway"),
    (Kind::Nginx, "nginx"),
    (Kind::Floor, "floor"),
];

/// A target: where wrk sends load and which processes we watch.
struct Target {
    kind: Kind,
    label: String,
    url: String,
    /// The proxy's server (None for the backend measured directly).
    proxy: Option<Server>,
}

/// CPU used per request, microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct PerRequest {
    user_us: f64,
    sys_us: f64,
}

impl PerRequest {
    fn of(cpu: CpuTime, requests: u64) -> PerRequest {
        let n = requests.max(1) as f64;
        PerRequest {
            user_us: cpu.user.as_secs_f64() * 1e6 / n,
            sys_us: cpu.sys.as_secs_f64() * 1e6 / n,
        }
    }

    fn total(self) -> f64 {
        self.user_us + self.sys_us
    }
}

/// One wrk run against one target.
#[derive(Debug, Clone, Serialize)]
struct Run {
    #[serde(skip)]
    kind: Kind,
    target: String,
    round: u32,
    #[serde(flatten)]
    wrk: wrk::Report,
    /// The proxy's own CPU per request.
    proxy_cpu: Option<PerRequest>,
    /// The backend's CPU per request.
    backend_cpu: PerRequest,
    /// The proxy's peak RSS so far, KiB.
    proxy_peak_rss_kib: Option<u64>,
}

/// Medians over the rounds of one target.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    #[serde(skip)]
    kind: Kind,
    target: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    proxy_cpu: Option<PerRequest>,
    backend_cpu: PerRequest,
    proxy_peak_rss_kib: Option<u64>,
}

#[derive(Serialize)]
struct Results<'a> {
    unix_time: u64,
    /// `/proc/loadavg`'s 1-minute figure before and after: above about 1
    /// other work shared the CPUs and absolute figures are low.
    load_before: Option<f64>,
    load_after: Option<f64>,
    duration_s: u64,
    connections: u32,
    threads: u32,
    rounds: u32,
    server_cpu: usize,
    client_cpu: usize,
    runs: &'a [Run],
    summary: &'a [Summary],
    gateway_over_nginx: Option<Ratio>,
    floor_over_nginx: Option<Ratio>,
    gateway_over_baselines: BTreeMap<String, Ratio>,
    /// `--syscalls`: by target, the measured process's syscalls per request
    /// (the backend's for `direct`).
    syscalls_per_request: &'a BTreeMap<String, BTreeMap<String, f64>>,
    /// By proxy, bytes of anonymous RSS per idle keep-alive connection.
    idle_connection_bytes: &'a BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Ratio {
    rps: f64,
    p99: f64,
    cpu_per_request: Option<f64>,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let args =
        Args::try_parse_from(std::iter::once("bench-http".to_string()).chain(args.iter().cloned()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let secs = args.duration.unwrap_or(if args.quick { 2 } else { 8 });
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    for o in &args.only {
        if !FIXED.iter().any(|(_, l)| l == o) {
            bail!("unknown target {o:?} in --only: expected direct, gateway, nginx or floor");
        }
    }
    let mut kinds: Vec<(Kind, String)> = FIXED
        .iter()
        .filter(|(_, l)| args.only.is_empty() || args.only.iter().any(|o| o == l))
        .map(|&(k, l)| (k, l.to_string()))
        .collect();
    let mut baseline_bins = Vec::new();
    for (i, p) in args.compare_with.iter().enumerate() {
        let bin =
            std::fs::canonicalize(p).with_context(|| format!("--compare-with {}", p.display()))?;
        let mut label: String = bin
            .file_name()
            .map(|f| f.to_string_lossy().chars().take(12).collect())
            .unwrap_or_default();
        if label.is_empty() || kinds.iter().any(|(_, l)| *l == label) {
            label = format!("baseline{}", i + 1);
        }
        kinds.push((Kind::Baseline(i), label));
        baseline_bins.push(bin);
    }
    let cpus = proc::online_cpus();
    for (what, cpu) in [
        ("--server-cpu", args.server_cpu),
        ("--client-cpu", args.client_cpu),
    ] {
        if cpu >= cpus {
            bail!("{what} {cpu}: this machine has CPUs 0..{}", cpus - 1);
        }
    }
    if args.server_cpu == args.client_cpu {
        eprintln!(
            "bench: warning: wrk shares CPU {} with the servers; figures will be lower",
            args.client_cpu
        );
    }
    for tool in ["nginx", "wrk"] {
        if which(tool).is_none() {
            bail!("{tool} is not installed (`cargo xtask setup` installs it)");
        }
    }

    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let gateway_bin = target_dir.join("release/gateway");
    if kinds.iter().any(|(k, _)| *k == Kind::Gateway) {
        if args.no_build {
            if !gateway_bin.exists() {
                bail!(
                    "{} does not exist; build it or drop --no-build",
                    gateway_bin.display()
                );
            }
        } else {
            build_gateway()?;
        }
    }

    let dir = proc::TempDir::new("gateway-bench")?;
    let addrs = proc::free_ports(4 + baseline_bins.len())?;
    let cpu = args.server_cpu;
    eprintln!(
        "bench: servers on cpu {cpu}, wrk -t{} -c{} -d{secs}s on cpu {}; {rounds} round(s); work dir {}",
        args.threads,
        args.connections,
        args.client_cpu,
        dir.path().display()
    );
    let load_before = proc::load_average();
    if let Some(l) = load_before.filter(|l| *l > 1.0) {
        eprintln!(
            "bench: note: load average {l:.2} before the run; other work shares the CPUs, so trust the ratios more than the absolute figures"
        );
    }
    let backend = peers::backend(dir.path(), addrs[0], cpu)?;
    let load = wrk::Load {
        threads: args.threads,
        connections: args.connections,
        secs,
        cpu: args.client_cpu,
    };
    if args.instructions {
        let mut subjects = Vec::new();
        for (kind, label) in &kinds {
            let (program, args_, addr) = match *kind {
                Kind::Direct | Kind::Floor => continue,
                Kind::Gateway | Kind::Baseline(_) => {
                    let (bin, addr) = match *kind {
                        Kind::Baseline(i) => (baseline_bins[i].clone(), addrs[4 + i]),
                        _ => (gateway_bin.clone(), addrs[1]),
                    };
                    let conf = peers::gateway_conf(label, dir.path(), addr, backend.addr)?;
                    let a = vec!["run".into(), "-c".into(), conf.into(), "--no-xdp".into()];
                    (bin, a, addr)
                }
                Kind::Nginx => {
                    let name = "nginx-callgrind";
                    let conf = format!(
                        "master_process off;\n{}",
                        peers::nginx_proxy_conf(
                            dir.path(),
                            name,
                            addrs[2],
                            backend.addr,
                            args.connections
                        )?
                    );
                    let path = dir.path().join(format!("{name}.conf"));
                    std::fs::write(&path, conf)?;
                    let p = dir.path().as_os_str().to_owned();
                    let a = vec!["-p".into(), p, "-c".into(), path.into()];
                    (PathBuf::from("nginx"), a, addrs[2])
                }
            };
            subjects.push(instructions::Subject {
                label: label.clone(),
                program,
                args: args_,
                addr,
            });
        }
        return count_instructions(&subjects, dir.path(), load, cpu, &target_dir);
    }
    // The proxy of each kind on its address (none for `direct`).
    let start = |kind: Kind| -> anyhow::Result<Option<Server>> {
        Ok(match kind {
            Kind::Direct => None,
            Kind::Gateway => Some(peers::gateway(
                "gateway",
                &gateway_bin,
                dir.path(),
                addrs[1],
                backend.addr,
                cpu,
            )?),
            Kind::Nginx => Some(peers::nginx_proxy(
                dir.path(),
                addrs[2],
                backend.addr,
                args.connections,
                cpu,
            )?),
            Kind::Floor => Some(peers::floor(dir.path(), addrs[3], backend.addr, cpu)?),
            Kind::Baseline(i) => Some(peers::gateway(
                &format!("baseline{}", i + 1),
                &baseline_bins[i],
                dir.path(),
                addrs[4 + i],
                backend.addr,
                cpu,
            )?),
        })
    };

    // Memory per idle connection, on a process of its own that is stopped
    // before the rounds: one that has served load keeps the memory it
    // freed and new connections would reuse it unseen, and the rounds'
    // peak RSS stays theirs.
    let mut idle_bytes = BTreeMap::new();
    if args.idle_connections > 0 {
        for (kind, label) in kinds.iter().filter(|(k, _)| *k != Kind::Floor) {
            let Some(p) = start(*kind)? else { continue };
            proc::probe(p.addr).with_context(|| format!("{label} does not answer"))?;
            let b = idle::bytes_per_connection(p.measured_pid, p.addr, args.idle_connections)
                .with_context(|| format!("idle connections to {label}"))?;
            idle_bytes.insert(label.clone(), b);
        }
    }

    let mut targets = Vec::new();
    for (kind, label) in &kinds {
        let proxy = start(*kind)?;
        let addr = proxy.as_ref().map_or(backend.addr, |s| s.addr);
        proc::probe(addr).with_context(|| format!("{label} does not answer"))?;
        targets.push(Target {
            kind: *kind,
            label: label.clone(),
            url: format!("http://{addr}/"),
            proxy,
        });
    }

    eprintln!("bench: warming up ({}s per target)", args.warmup);
    for t in &targets {
        wrk::run(
            &t.url,
            wrk::Load {
                secs: args.warmup,
                ..load
            },
        )?;
    }

    println!(
        "{:<12} {:>5} {:>10} {:>8} {:>8} {:>26} {:>22} {:>10}",
        "target",
        "round",
        "req/s",
        "p50",
        "p99",
        "proxy CPU/req (user+sys)",
        "backend CPU/req",
        "proxy RSS"
    );
    let mut runs = Vec::new();
    for round in 0..rounds {
        // Rotate the order so that no target always runs first or last.
        let n = targets.len();
        for i in 0..n {
            let t = &mut targets[(i + round as usize) % n];
            let r = measure(t, &backend, load, round + 1)?;
            println!(
                "{:<12} {:>5} {:>10.0} {:>8} {:>8} {:>26} {:>22} {:>10}",
                r.target,
                r.round,
                r.wrk.rps,
                ms(r.wrk.p50_ms),
                ms(r.wrk.p99_ms),
                r.proxy_cpu.map_or_else(|| "-".to_string(), cpu_cell),
                cpu_cell(r.backend_cpu),
                r.proxy_peak_rss_kib.map_or_else(|| "-".to_string(), mib),
            );
            if r.wrk.socket_errors > 0 || r.wrk.non_2xx > 0 {
                eprintln!(
                    "bench: warning: {} round {}: {} socket errors, {} non-2xx responses",
                    r.target, r.round, r.wrk.socket_errors, r.wrk.non_2xx
                );
            }
            runs.push(r);
        }
    }
    let mut syscall_counts = BTreeMap::new();
    if args.syscalls {
        if syscalls::available() {
            for t in &targets {
                let pid = t
                    .proxy
                    .as_ref()
                    .map_or(backend.measured_pid, |s| s.measured_pid);
                let (_, per_req) =
                    syscalls::per_request(pid, &t.url, wrk::Load { secs: 3, ..load }, dir.path())?;
                syscall_counts.insert(t.label.clone(), per_req);
            }
        } else {
            eprintln!(
                "bench: perf cannot count syscall tracepoints here (apt-get install linux-perf, as root); no --syscalls figures"
            );
        }
    }
    for t in &mut targets {
        if let Some(p) = &mut t.proxy {
            p.proc.stop();
        }
    }
    drop(backend);

    let summary: Vec<Summary> = kinds.iter().map(|(k, l)| summarize(*k, l, &runs)).collect();
    println!();
    println!(
        "Medians over {rounds} round(s), wrk -t{} -c{} -d{secs}s; CPU in µs per request:",
        args.threads, args.connections
    );
    println!();
    println!(
        "| target       |    req/s |     p50 |     p99 | proxy CPU/req (user+sys) | backend CPU/req | proxy peak RSS |"
    );
    println!(
        "|--------------|---------:|--------:|--------:|-------------------------:|----------------:|---------------:|"
    );
    for s in &summary {
        println!(
            "| {:<12} | {:>8.0} | {:>7} | {:>7} | {:>24} | {:>15} | {:>14} |",
            s.target,
            s.rps,
            ms(s.p50_ms),
            ms(s.p99_ms),
            s.proxy_cpu.map_or_else(|| "-".to_string(), cpu_cell),
            format!("{:.1}", s.backend_cpu.total()),
            s.proxy_peak_rss_kib.map_or_else(|| "-".to_string(), mib),
        );
    }
    println!();
    if !idle_bytes.is_empty() {
        let cells: Vec<String> = idle_bytes
            .iter()
            .map(|(l, b)| format!("{l} {:.1} KiB", b / 1024.0))
            .collect();
        println!(
            "Memory per idle keep-alive connection ({} opened one by one, anonymous RSS): {}",
            args.idle_connections,
            cells.join(", ")
        );
        println!();
    }
    if !syscall_counts.is_empty() {
        println!("Syscalls per request (perf stat, one extra 3 s run each; direct = the backend):");
        for (label, per_req) in &syscall_counts {
            println!("  {label:<12} {}", syscalls::describe(per_req));
        }
        println!();
    }

    let find = |k: Kind| summary.iter().find(|s| s.kind == k);
    let ratio = |a: &Summary, b: &Summary| Ratio {
        rps: a.rps / b.rps,
        p99: a.p99_ms / b.p99_ms,
        cpu_per_request: match (a.proxy_cpu, b.proxy_cpu) {
            (Some(x), Some(y)) if y.total() > 0.0 => Some(x.total() / y.total()),
            _ => None,
        },
    };
    let over_nginx = find(Kind::Gateway)
        .zip(find(Kind::Nginx))
        .map(|(g, n)| ratio(g, n));
    let floor_over_nginx = find(Kind::Floor)
        .zip(find(Kind::Nginx))
        .map(|(f, n)| ratio(f, n));
    let over_baselines: BTreeMap<String, Ratio> = match find(Kind::Gateway) {
        Some(g) => summary
            .iter()
            .filter(|s| matches!(s.kind, Kind::Baseline(_)))
            .map(|b| (b.target.clone(), ratio(g, b)))
            .collect(),
        None => BTreeMap::new(),
    };

    let out_dir = target_dir.join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let json = serde_json::to_string_pretty(&Results {
        unix_time,
        load_before,
        load_after: proc::load_average(),
        duration_s: secs,
        connections: args.connections,
        threads: args.threads,
        rounds,
        server_cpu: args.server_cpu,
        client_cpu: args.client_cpu,
        runs: &runs,
        summary: &summary,
        gateway_over_nginx: over_nginx,
        floor_over_nginx,
        gateway_over_baselines: over_baselines.clone(),
        syscalls_per_request: &syscall_counts,
        idle_connection_bytes: &idle_bytes,
    })?;
    let stamped = out_dir.join(format!("http-{unix_time}.json"));
    std::fs::write(&stamped, &json)?;
    std::fs::write(out_dir.join("http-latest.json"), &json)?;
    println!("Raw results: {}", stamped.display());

    for (label, r) in &over_baselines {
        println!(
            "gateway/{label}: rps {:.2} p99 {:.2} cpu/req {}",
            r.rps,
            r.p99,
            r.cpu_per_request
                .map_or_else(|| "-".to_string(), |c| format!("{c:.2}"))
        );
    }
    if let Some(r) = floor_over_nginx {
        println!(
            "floor/nginx: rps {:.2} p99 {:.2} (the most any proxy reaches on this bed)",
            r.rps, r.p99
        );
    }
    if let Some(r) = over_nginx {
        println!("gateway/nginx: rps {:.2} p99 {:.2}", r.rps, r.p99);
    }
    Ok(())
}

/// `--instructions`: each subject under callgrind in turn, then a table and
/// `gateway/X: instructions R` lines.
fn count_instructions(
    subjects: &[instructions::Subject],
    dir: &Path,
    load: wrk::Load,
    cpu: usize,
    target_dir: &Path,
) -> anyhow::Result<()> {
    if !instructions::available() {
        bail!("--instructions needs valgrind (apt-get install valgrind)");
    }
    let mut counts = Vec::new();
    for s in subjects {
        eprintln!("bench: {} under callgrind", s.label);
        counts.push(instructions::measure(s, dir, load, cpu)?);
    }
    println!();
    println!(
        "User-space instructions per request (callgrind; wrk -t{} -c{} -d{}s):",
        load.threads, load.connections, load.secs
    );
    println!();
    println!("| target       | requests | instructions/request |");
    println!("|--------------|---------:|---------------------:|");
    for c in &counts {
        println!(
            "| {:<12} | {:>8} | {:>20.0} |",
            c.target, c.requests, c.per_request
        );
    }
    println!();
    let out_dir = target_dir.join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join("instructions-latest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&counts)?)?;
    println!("Raw results: {}", path.display());
    if let Some(g) = counts.iter().find(|c| c.target == "gateway") {
        for c in counts.iter().filter(|c| c.target != "gateway") {
            println!(
                "gateway/{}: instructions {:.2}",
                c.target,
                g.per_request / c.per_request
            );
        }
    }
    Ok(())
}

/// `cargo build --release -p gateway` (xtask's `main` has already dropped
/// the variables `cargo run` set for it, which would force rebuilds).
fn build_gateway() -> anyhow::Result<()> {
    eprintln!("bench: building the gateway (release)");
    let mut cmd =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--release", "-p", "gateway"]);
    let status = cmd.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("`cargo build --release -p gateway` failed ({status})");
    }
    Ok(())
}

/// One wrk run against `t`, with the CPU its processes used meanwhile.
fn measure(t: &mut Target, backend: &Server, load: wrk::Load, round: u32) -> anyhow::Result<Run> {
    let proxy_pid = t.proxy.as_ref().map(|s| s.measured_pid);
    let proxy_before = proxy_pid.map(CpuTime::of).transpose()?;
    let backend_before = CpuTime::of(backend.measured_pid)?;
    let report = wrk::run(&t.url, load)?;
    let backend_used = CpuTime::of(backend.measured_pid)?.since(backend_before);
    let proxy_used = match (proxy_pid, proxy_before) {
        (Some(pid), Some(before)) => Some(CpuTime::of(pid)?.since(before)),
        _ => None,
    };
    if let Some(p) = &mut t.proxy {
        p.proc.check_alive()?;
    }
    if report.requests == 0 {
        bail!("{}: wrk completed no request", t.label);
    }
    Ok(Run {
        kind: t.kind,
        target: t.label.clone(),
        round,
        proxy_cpu: proxy_used.map(|c| PerRequest::of(c, report.requests)),
        backend_cpu: PerRequest::of(backend_used, report.requests),
        proxy_peak_rss_kib: proxy_pid.and_then(proc::peak_rss_kib),
        wrk: report,
    })
}

fn summarize(kind: Kind, label: &str, runs: &[Run]) -> Summary {
    let mine: Vec<&Run> = runs.iter().filter(|r| r.kind == kind).collect();
    let med = |f: &dyn Fn(&Run) -> f64| median(mine.iter().map(|r| f(r)).collect());
    let proxy_cpu = mine.first().and_then(|r| r.proxy_cpu).map(|_| PerRequest {
        user_us: med(&|r| r.proxy_cpu.map_or(0.0, |c| c.user_us)),
        sys_us: med(&|r| r.proxy_cpu.map_or(0.0, |c| c.sys_us)),
    });
    Summary {
        kind,
        target: label.to_string(),
        rps: med(&|r| r.wrk.rps),
        p50_ms: med(&|r| r.wrk.p50_ms),
        p99_ms: med(&|r| r.wrk.p99_ms),
        proxy_cpu,
        backend_cpu: PerRequest {
            user_us: med(&|r| r.backend_cpu.user_us),
            sys_us: med(&|r| r.backend_cpu.sys_us),
        },
        proxy_peak_rss_kib: mine.iter().filter_map(|r| r.proxy_peak_rss_kib).max(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn ms(v: f64) -> String {
    format!("{v:.2}ms")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn cpu_cell(c: PerRequest) -> String {
    format!("{:.1} ({:.1}+{:.1})", c.total(), c.user_us, c.sys_us)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| Path::new(p).is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("8s"), Ok(8));
        assert_eq!(parse_secs("10"), Ok(10));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("1.5s").is_err());
    }
}
