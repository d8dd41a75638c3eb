//! `cargo xtask bench xdp`: what the XDP fast path costs and what it saves.
//!
//! (a) The program's cost per packet through BPF_PROG_TEST_RUN, for passed,
//!     denied and rate-limited packets, against deny lists of 1, 1k and
//!     100k entries and as many rate-limit buckets (`gateway xdp bench`,
//!     hidden, does the measuring: it needs the program and its maps).
//! (b) A network-namespace test bed: wrk in one namespace sends legitimate
//!     requests through the gateway (proxying to the demo backend) while
//!     another namespace opens TCP connections from a denied range at a
//!     fixed, throttled rate. Four runs: unflooded and flooded, with XDP and
//!     with userspace-only enforcement (accept, then close). The gateway and
//!     the backend share one CPU, wrk and the flooder the other (on veth,
//!     XDP's drops run in the sender's softirq, so the flood is throttled
//!     and pinned rather than run flat out: flat out it would measure the
//!     generator). Reported: req/s, the share of the unflooded figure kept,
//!     and the gateway's own CPU time per denied attempt (/proc/PID/stat).
//!
//! Ends with `xdp: pass X ns, deny Y ns, ratelimit Z ns; flood kept P%
//! (userspace-only Q%)`. Needs root (namespaces, XDP, BPF_PROG_TEST_RUN).
//! Test traffic stays inside the namespaces (10.199.x.y).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench xdp",
    about = "XDP program cost per packet, and request throughput under a denied flood",
    after_help = "Examples:\n  cargo xtask bench xdp\n  cargo xtask bench xdp --quick\n  cargo xtask bench xdp --rate 20000 --duration 8"
)]
struct Args {
    /// BPF_PROG_TEST_RUN repetitions per figure.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Largest deny list (and bucket map) measured.
    #[arg(long, default_value_t = 100_000)]
    entries: u32,
    /// Seconds per wrk run [default: 8, 3 with --quick].
    #[arg(long, short = 'd')]
    duration: Option<u64>,
    /// Rounds of (unflooded, flooded) runs per mode [default: 3, 1 with --quick].
    #[arg(long, short = 'r')]
    rounds: Option<u32>,
    /// Denied connection attempts per second.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// wrk connections.
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: u32,
    /// CPU for the gateway and the backend.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// CPU for wrk and the flooder.
    #[arg(long, default_value_t = 0)]
    client_cpu: usize,
    /// Only part (a).
    #[arg(long)]
    no_flood: bool,
    /// Short runs and 100k test runs per figure: a smoke test.
    #[arg(long)]
    quick: bool,
    /// Use target/release binaries as they are.
    #[arg(long)]
    no_build: bool,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut argv = vec!["cargo xtask bench xdp".to_string()];
    argv.extend(args.iter().cloned());
    let a = Args::parse_from(argv);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the XDP benchmark needs root (network namespaces, XDP, BPF_PROG_TEST_RUN)");
    }
    if !a.no_build {
        super::build_release()?;
    }
    let gateway = PathBuf::from("target/release/gateway");
    let repeat = if a.quick {
        a.repeat.min(100_000)
    } else {
        a.repeat
    };

    // (a)
    let out = Command::new(&gateway)
        .args([
            "xdp",
            "bench",
            "--repeat",
            &repeat.to_string(),
            "--max-entries",
            &a.entries.to_string(),
        ])
        .output()
        .context("cannot run the gateway binary")?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    if !out.status.success() {
        bail!(
            "gateway xdp bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let result = text
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .context("no result line from gateway xdp bench")?;
    let field = |k: &str| -> f64 {
        result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (pass, deny, ratelimit) = (field("pass"), field("deny"), field("ratelimit"));
    let ipv6 = format!(
        "xdp ipv6: pass {:.0} ns, deny {:.0} ns",
        field("pass6"),
        field("deny6")
    );
    if a.no_flood {
        println!("{ipv6}");
        println!("xdp: pass {pass:.0} ns, deny {deny:.0} ns, ratelimit {ratelimit:.0} ns");
        return Ok(());
    }

    // (b)
    let secs = a.duration.unwrap_or(if a.quick { 3 } else { 8 });
    let rounds = a.rounds.unwrap_or(if a.quick { 1 } else { 3 });
    let bed = Bed::new(&a, &gateway)?;
    println!();
    println!(
        "flood test bed: wrk -t1 -c{} -d{secs}s on cpu {}, gateway (1 worker) and backend on cpu {}, \
         {} denied connection attempts/s from 40 addresses (cpu {}); median of {rounds} rounds",
        a.connections, a.client_cpu, a.server_cpu, a.rate, a.client_cpu
    );
    println!(
        "{:<26} {:>8} {:>11} {:>12} {:>14} {:>14}",
        "mode", "req/s", "attempts/s", "gateway cpu", "per attempt", "cpus busy"
    );
    let mut kept = [f64::NAN; 2];
    for (i, xdp) in [true, false].into_iter().enumerate() {
        let g = bed.start_gateway(xdp)?;
        // Warm up the connection pools and caches.
        bed.wrk(1)?;
        // Alternate quiet and flooded runs (the machine is shared and
        // noisy); report the run with the median request rate of each.
        let mut quiet = Vec::new();
        let mut flooded = Vec::new();
        for _ in 0..rounds {
            quiet.push(bed.measure(&g, secs, 0)?);
            flooded.push(bed.measure(&g, secs, a.rate)?);
        }
        drop(g);
        let (quiet, flooded) = (median(quiet), median(flooded));
        let mode = if xdp { "XDP" } else { "userspace only" };
        let per_attempt = if flooded.attempts > 0 {
            let expected = quiet.cpu_per_request() * flooded.requests as f64;
            ((flooded.cpu - expected).max(0.0) / flooded.attempts as f64) * 1e9
        } else {
            f64::NAN
        };
        let busy = |r: &Run| {
            r.busy
                .iter()
                .map(|b| format!("{b:.0}%"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{:<26} {:>8.0} {:>11} {:>11.1}% {:>14} {:>14}",
            format!("{mode}, no flood"),
            quiet.rps,
            "-",
            quiet.cpu / quiet.secs * 100.0,
            "-",
            busy(&quiet)
        );
        println!(
            "{:<26} {:>8.0} {:>11.0} {:>11.1}% {:>11.0} ns {:>14}",
            format!("{mode}, flood"),
            flooded.rps,
            flooded.attempts as f64 / flooded.secs,
            flooded.cpu / flooded.secs * 100.0,
            per_attempt,
            busy(&flooded)
        );
        kept[i] = flooded.rps / quiet.rps * 100.0;
    }
    println!("{ipv6}");
    println!(
        "xdp: pass {pass:.0} ns, deny {deny:.0} ns, ratelimit {ratelimit:.0} ns; flood kept {:.0}% (userspace-only {:.0}%)",
        kept[0], kept[1]
    );
    Ok(())
}

/// A unique name for this run's namespaces.
fn name(tag: &str) -> String {
    format!("xb{tag}{}", std::process::id())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The flood comes from 10.199.2.10-49; the config denies 10.199.2.0/24.
const FLOOD_SOURCES: u32 = 40;

/// The namespaces (deleted on drop, which also removes their veths), the
/// backend, the pin directory.
struct Bed {
    names: Vec<String>,
    dir: tempfile_dir::TempDir,
    gateway: PathBuf,
    pins: PathBuf,
    backend: Option<Child>,
    server_cpu: usize,
    client_cpu: usize,
    connections: u32,
}

/// A minimal temporary directory (xtask has no tempfile dependency).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> std::io::Result<TempDir> {
            let p = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Ok(TempDir(p))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Bed {
    fn new(a: &Args, gateway: &Path) -> anyhow::Result<Bed> {
        let mut bed = Bed {
            names: Vec::new(),
            dir: tempfile_dir::TempDir::new("xdp-bench")?,
            gateway: gateway.to_path_buf(),
            pins: PathBuf::from(format!("/sys/fs/bpf/xdp-bench-{}", std::process::id())),
            backend: None,
            server_cpu: a.server_cpu,
            client_cpu: a.client_cpu,
            connections: a.connections,
        };
        let (gw, cl, fl) = (name("g"), name("c"), name("f"));
        for n in [&gw, &cl, &fl] {
            ip(&["netns", "add", n])?;
            bed.names.push(n.clone());
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        for (i, peer) in [&cl, &fl].into_iter().enumerate() {
            let (g, p) = (format!("gw{i}"), format!("p{i}"));
            ip(&[
                "link", "add", &g, "netns", &gw, "type", "veth", "peer", "name", &p, "netns", peer,
            ])?;
            ip(&[
                "-n",
                &gw,
                "addr",
                "add",
                &format!("10.199.{}.1/24", i + 1),
                "dev",
                &g,
            ])?;
            ip(&[
                "-n",
                peer,
                "addr",
                "add",
                &format!("10.199.{}.2/24", i + 1),
                "dev",
                &p,
            ])?;
            ip(&["-n", &gw, "link", "set", &g, "up"])?;
            ip(&["-n", peer, "link", "set", &p, "up"])?;
        }
        for k in 0..FLOOD_SOURCES {
            ip(&[
                "-n",
                &fl,
                "addr",
                "add",
                &format!("10.199.2.{}/24", 10 + k),
                "dev",
                "p1",
            ])?;
        }
        // The backend, on the gateway's CPU.
        let mut cmd = Command::new("taskset");
        cmd.args([
            "-c",
            &a.server_cpu.to_string(),
            "target/release/demo-backend",
            "127.0.0.1:18081",
        ]);
        let backend = in_netns(&gw, &mut cmd)?
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the demo backend")?;
        bed.backend = Some(backend);
        Ok(bed)
    }

    fn config(&self) -> String {
        format!(
            r#"[server]
workers = 1
watch_config = false
shutdown_timeout = "1s"
[admin]
listen = "127.0.0.1:19901"
[access_log]
enabled = false
[[listeners]]
name = "public"
listen = "0.0.0.0:8080"
max_connections = 100000
[[upstreams]]
name = "backend"
targets = ["127.0.0.1:18081"]
[[routes]]
name = "api"
upstream = "backend"
[routes.match]
path_prefix = "/"
[xdp]
interfaces = ["gw0", "gw1"]
pin_path = "{}"
deny = ["10.199.2.0/24"]
"#,
            self.pins.display()
        )
    }

    fn start_gateway(&self, xdp: bool) -> anyhow::Result<GatewayProc> {
        let path = self.dir.path().join("gateway.toml");
        std::fs::write(&path, self.config())?;
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &self.server_cpu.to_string()])
            .arg(&self.gateway)
            .arg("run")
            .arg("-c")
            .arg(&path);
        if !xdp {
            cmd.arg("--no-xdp");
        }
        let log = File::create(self.dir.path().join(format!("gateway-{xdp}.log")))?;
        let child = in_netns(&self.names[0], &mut cmd)?
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start the gateway")?;
        let g = GatewayProc {
            child,
            pins: self.pins.clone(),
        };
        // Ready when a request goes through.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.names[1],
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "1",
                ])
                .arg("http://10.199.1.1:8080/ready")
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the gateway did not come up (log in {})",
                    self.dir.path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(g)
    }

    /// Runs wrk for `secs` from the client namespace on the client CPU:
    /// requests completed.
    fn wrk(&self, secs: u64) -> anyhow::Result<u64> {
        let out = Command::new("taskset")
            .args(["-c", &self.client_cpu.to_string()])
            .args(["ip", "netns", "exec", &self.names[1], "wrk", "-t1"])
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{secs}s"))
            .arg("http://10.199.1.1:8080/bench")
            .output()
            .context("cannot run wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| {
                let l = l.trim();
                let n = l.split_whitespace().next()?;
                l.contains("requests in").then(|| n.parse().ok())?
            })
            .with_context(|| format!("no result from wrk: {text}"))
    }

    /// One wrk run with `rate` denied attempts per second meanwhile.
    fn measure(&self, g: &GatewayProc, secs: u64, rate: u64) -> anyhow::Result<Run> {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU64::new(0));
        let flooder = (rate > 0).then(|| {
            let ns = PathBuf::from("/run/netns").join(&self.names[2]);
            let (stop, attempts) = (stop.clone(), attempts.clone());
            let cpu = self.client_cpu;
            let limit = Duration::from_secs(secs + 2);
            std::thread::spawn(move || flood(&ns, cpu, rate, limit, &stop, &attempts))
        });
        let cpu0 = g.cpu_secs();
        let busy0 = cpu_busy();
        let start = Instant::now();
        let requests = self.wrk(secs)?;
        let took = start.elapsed().as_secs_f64();
        let cpu = g.cpu_secs() - cpu0;
        let busy = busy_share(&busy0, &cpu_busy());
        stop.store(true, Ordering::Relaxed);
        if let Some(f) = flooder {
            f.join()
                .map_err(|_| anyhow::anyhow!("flooder panicked"))??;
        }
        Ok(Run {
            busy,
            rps: requests as f64 / secs as f64,
            requests,
            attempts: attempts.load(Ordering::Relaxed),
            cpu,
            secs: took,
        })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut b) = self.backend.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
        remove_pins(&self.pins);
        for n in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// (busy, total) jiffies of each CPU, from /proc/stat.
fn cpu_busy() -> Vec<(u64, u64)> {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().sum();
            // idle and iowait are not busy.
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

fn busy_share(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let total = a.1.saturating_sub(b.1).max(1) as f64;
            a.0.saturating_sub(b.0) as f64 / total * 100.0
        })
        .collect()
}

/// Removes a pin directory, links first.
fn remove_pins(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort_by_key(|p| !p.to_string_lossy().contains("/link_"));
    for f in files {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir(dir);
}

struct Run {
    /// Busy share of each CPU over the run.
    busy: Vec<f64>,
    rps: f64,
    requests: u64,
    attempts: u64,
    /// Gateway CPU seconds (user + system) over the run.
    cpu: f64,
    secs: f64,
}

/// The run with the median request rate.
fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

impl Run {
    fn cpu_per_request(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.cpu / self.requests as f64
        }
    }
}

struct GatewayProc {
    child: Child,
    pins: PathBuf,
}

impl GatewayProc {
    /// utime + stime of the gateway process, in seconds.
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces).
        let rest = stat.rsplit_once(')').map_or("", |r| r.1);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        ticks as f64 / hz
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The next mode starts from nothing pinned.
        remove_pins(&self.pins);
    }
}

/// `cmd` set to enter the network namespace `name` (and only that: the
/// mount namespace stays, so /sys/fs/bpf is the host's) before it runs.
fn in_netns<'a>(name: &str, cmd: &'a mut Command) -> anyhow::Result<&'a mut Command> {
    let f = File::open(Path::new("/run/netns").join(name))
        .with_context(|| format!("no namespace {name}"))?;
    // SAFETY: only setns(2), async-signal-safe, on a descriptor opened
    // before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Opens TCP connections to 10.199.2.1:8080 from the flood namespace at
/// `rate` per second (paced per millisecond), from 40 source addresses in
/// turn, each closed (with a reset, no TIME_WAIT) 50 ms later; until `stop`
/// or `limit`. Runs on `cpu`.
fn flood(
    ns: &Path,
    cpu: usize,
    rate: u64,
    limit: Duration,
    stop: &AtomicBool,
    attempts: &AtomicU64,
) -> anyhow::Result<()> {
    let f = File::open(ns)?;
    // SAFETY: setns(2) and sched_setaffinity(2) for this thread only.
    unsafe {
        if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
    let dst = sockaddr(u32::from_be_bytes([10, 199, 2, 1]), 8080);
    let mut open: std::collections::VecDeque<(Instant, i32)> = std::collections::VecDeque::new();
    let start = Instant::now();
    let mut sent = 0u64;
    let mut k = 0u32;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let src = sockaddr(
                u32::from_be_bytes([10, 199, 2, 10 + (k % FLOOD_SOURCES) as u8]),
                0,
            );
            k = k.wrapping_add(1);
            // SAFETY: plain socket calls on a descriptor we own.
            unsafe {
                let fd = libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                );
                if fd < 0 {
                    break;
                }
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as u32,
                );
                let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
                libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len);
                libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len);
                open.push_back((Instant::now(), fd));
            }
            sent += 1;
        }
        attempts.store(sent, Ordering::Relaxed);
        while open
            .front()
            .is_some_and(|(t, _)| t.elapsed() > Duration::from_millis(50))
        {
            if let Some((_, fd)) = open.pop_front() {
                // SAFETY: our descriptor.
                unsafe { libc::close(fd) };
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for (_, fd) in open {
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn sockaddr(ip: u32, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: ip.to_be() },
        sin_zero: [0; 8],
    }
}
