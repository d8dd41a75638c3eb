//! Policy benchmark: the gateway with its phase-4 policy on, against nginx
//! as a plain reverse proxy, in one run, on the test bed of
//! `shared/PERF.md` (backend nginx `return 200` with one worker; the proxy
//! under test on the same CPU; wrk on another; loopback; upstream
//! keep-alive; access logs off; one worker everywhere).
//!
//! Targets, interleaved over rounds (medians reported):
//! - `nginx`: nginx 1 worker, `proxy_pass` with upstream keepalive, no
//!   modules beyond the proxy;
//! - `gateway`: one worker, no policy (to show what the policy costs);
//! - `gateway+policy`: one worker, metrics recorded (admin listener on), a
//!   API-key authentication (`[routes.auth]`, one consumer) and a local
//!   GCRA limit keyed by the consumer that never refuses;
//! - `gateway+redis`: the same limit with `backend = "redis"` (a
//!   redis-server on the server CPU).
//!
//! Last lines: `gateway+policy/gateway: rps X.XX p99 Y.YY`,
//! `gateway+policy/nginx: rps X.XX p99 Y.YY` and
//! `redis-limit/local-limit: rps X.XX p99 Y.YY`, then the cost of one
//! uncached RS256 verification, `jwt RS256 verify: X us per token` (also
//! alone: `cargo xtask bench jwt`). Logs and configs go to
//! `target/bench-policy/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::http::proc::Proc;

/// Options: `--duration SECS` (8), `--rounds N` (3), `--quick` (2 s, one
/// round), `--no-build`, `--server-cpu N` (1), `--client-cpu N` (0).
struct Opts {
    secs: u64,
    rounds: u32,
    build: bool,
    server_cpu: usize,
    client_cpu: usize,
}

fn opts(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        secs: 8,
        rounds: 3,
        build: true,
        server_cpu: 1,
        client_cpu: 0,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> anyhow::Result<u64> {
            it.next()
                .and_then(|v| v.trim_end_matches('s').parse().ok())
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--duration" | "-d" => o.secs = val("--duration")?.max(1),
            "--rounds" | "-r" => o.rounds = u32::try_from(val("--rounds")?.max(1))?,
            "--server-cpu" => o.server_cpu = usize::try_from(val("--server-cpu")?)?,
            "--client-cpu" => o.client_cpu = usize::try_from(val("--client-cpu")?)?,
            "--quick" => {
                o.secs = 2;
                o.rounds = 1;
            }
            "--no-build" => o.build = false,
            "-h" | "--help" => {
                println!(
                    "cargo xtask bench policy [--duration SECS] [--rounds N] [--quick] [--no-build] [--server-cpu N] [--client-cpu N]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other:?} (see --help)"),
        }
    }
    Ok(o)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} is not listening on port {port} after 15 s")
}

/// Starts `program` on `cpu`: tied to our lifetime and stopped (with any
/// children: nginx's workers) when dropped, as in the HTTP bench.
fn spawn_on(
    cpu: usize,
    name: &'static str,
    program: &Path,
    args: &[&str],
    log: &Path,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    Proc::spawn(name, cmd, cpu, log)
}

fn nginx_conf(dir: &Path, body: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         keepalive_requests 1000000;\n{body}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// The gateway's config: no policy (`Limit::None`), or the limit counted
/// in process or in Redis on `port`.
#[derive(Clone, Copy)]
enum Limit {
    None,
    Local,
    Redis(u16),
}

fn gateway_config(port: u16, admin: u16, backend: u16, limit: Limit) -> String {
    let (backend_kind, redis_section) = match limit {
        Limit::Redis(p) => (
            "redis",
            format!("[redis]\nurl = \"redis://127.0.0.1:{p}\"\npool_size = 2\n"),
        ),
        _ => ("local", String::new()),
    };
    // The consumer's key is "bench-key", stored as its SHA-256.
    let consumers = match limit {
        Limit::None => "",
        _ => {
            "[[consumers]]\nname = \"bench\"\napi_keys = [\"sha256:b0962662e937d44c699c8305d90cbf190b3150c59b13863d1380b5cc3c711bb7\"]\n"
        }
    };
    let policy = match limit {
        Limit::None => String::new(),
        _ => format!(
            r#"[routes.auth]
api_key = {{ header = "x-api-key" }}
[routes.rate_limit]
key = "consumer"
backend = "{backend_kind}"
limits = [{{ requests = 1000000000, per = "1s" }}, {{ requests = 1000000000, per = "1h" }}]
"#
        ),
    };
    format!(
        r#"[server]
workers = 1
watch_config = false
[admin]
listen = "127.0.0.1:{admin}"
[access_log]
enabled = false
{redis_section}
{consumers}
[[listeners]]
name = "bench"
listen = "127.0.0.1:{port}"
[[upstreams]]
name = "backend"
targets = ["127.0.0.1:{backend}"]
[[routes]]
name = "bench"
upstream = "backend"
[routes.match]
path_prefix = "/"
{policy}"#
    )
}

/// user + system CPU of `pid` and its children, from /proc (clock ticks).
fn cpu_ticks(pid: u32) -> u64 {
    let read = |p: &str| -> Option<(u64, u32)> {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields after the name: state(0) ppid(1) ... utime(11) stime(12).
        let ppid = f.get(1)?.parse().ok()?;
        Some((
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
            ppid,
        ))
    };
    let mut total = read(&pid.to_string()).map_or(0, |(t, _)| t);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(n) = name.to_str() else { continue };
            if n.bytes().all(|b| b.is_ascii_digit())
                && let Some((t, ppid)) = read(n)
                && ppid == pid
            {
                total += t;
            }
        }
    }
    total
}

#[derive(Debug, Clone, Copy, Default)]
struct Report {
    rps: f64,
    p99_ms: f64,
    cpu_us_per_req: f64,
    errors: u64,
}

fn wrk(o: &Opts, url: &str, secs: u64, watched: u32) -> anyhow::Result<Report> {
    let before = cpu_ticks(watched);
    let out = Command::new("taskset")
        .args(["-c", &o.client_cpu.to_string(), "wrk", "-t1", "-c64"])
        .arg(format!("-d{secs}s"))
        .args(["--latency", "-H", "x-api-key: bench-key", url])
        .output()
        .context("cannot run wrk")?;
    let after = cpu_ticks(watched);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let w = super::wrk::parse(&text)?;
    let mut r = Report {
        rps: w.rps,
        p99_ms: w.p99_ms,
        errors: w.non_2xx + w.socket_errors,
        ..Report::default()
    };
    let requests = w.requests;
    // /proc/PID/stat counts in USER_HZ, 100 on Linux.
    let hz = 100.0;
    r.cpu_us_per_req = (after.saturating_sub(before)) as f64 / hz * 1e6 / requests.max(1) as f64;
    Ok(r)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = opts(args)?;
    if o.build {
        super::build_release()?;
    }
    let gateway = PathBuf::from("target/release/gateway");
    if !gateway.exists() {
        bail!("{} is missing; run without --no-build", gateway.display());
    }
    let dir = PathBuf::from("target/bench-policy");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let nginx = PathBuf::from("/usr/sbin/nginx");

    // Backend: nginx `return 200`.
    let be_port = free_port()?;
    let be_conf = nginx_conf(
        &dir.join("backend"),
        &format!(
            "  server {{ listen 127.0.0.1:{be_port}; location / {{ return 200 \"ok\\n\"; }} }}"
        ),
    )?;
    let _backend = spawn_on(
        o.server_cpu,
        "backend",
        &nginx,
        &["-c", be_conf.to_str().unwrap_or_default()],
        &dir.join("backend.log"),
    )?;
    wait_listening(be_port, "backend nginx")?;

    // nginx as a plain reverse proxy.
    let ng_port = free_port()?;
    let ng_conf = nginx_conf(
        &dir.join("nginx"),
        &format!(
            "  upstream be {{ server 127.0.0.1:{be_port}; keepalive 64; }}\n  \
             server {{ listen 127.0.0.1:{ng_port}; location / {{ proxy_pass http://be; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
    )?;
    let ng = spawn_on(
        o.server_cpu,
        "nginx",
        &nginx,
        &["-c", ng_conf.to_str().unwrap_or_default()],
        &dir.join("nginx.log"),
    )?;
    wait_listening(ng_port, "nginx proxy")?;

    // Redis for the shared limit.
    let redis_port = free_port()?;
    let redis_dir = dir.join("redis");
    std::fs::create_dir_all(&redis_dir)?;
    let port_s = redis_port.to_string();
    let _redis = spawn_on(
        o.server_cpu,
        "redis",
        Path::new("redis-server"),
        &[
            "--port",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            redis_dir.to_str().unwrap_or("."),
        ],
        &dir.join("redis.log"),
    )?;
    wait_listening(redis_port, "redis-server")?;

    let mut gateways = Vec::new();
    for (label, limit) in [
        ("gateway", Limit::None),
        ("gateway+policy", Limit::Local),
        ("gateway+redis", Limit::Redis(redis_port)),
    ] {
        let port = free_port()?;
        let admin = free_port()?;
        let conf = dir.join(format!("{}.toml", label.replace('+', "-")));
        std::fs::write(&conf, gateway_config(port, admin, be_port, limit))?;
        let p = spawn_on(
            o.server_cpu,
            "gateway",
            &gateway,
            &["run", "--no-xdp", "-c", conf.to_str().unwrap_or_default()],
            &dir.join(format!("{}.log", label.replace('+', "-"))),
        )?;
        wait_listening(port, label)?;
        gateways.push((label, port, p));
    }

    let mut targets: Vec<(&str, String, u32)> = vec![(
        "nginx",
        format!("http://127.0.0.1:{ng_port}/"),
        ng.pid().unsigned_abs(),
    )];
    for (label, port, p) in &gateways {
        targets.push((
            label,
            format!("http://127.0.0.1:{port}/"),
            p.pid().unsigned_abs(),
        ));
    }

    eprintln!("xtask: warming up");
    for (_, url, pid) in &targets {
        wrk(&o, url, 1, *pid)?;
    }
    let mut results: Vec<Vec<Report>> = vec![Vec::new(); targets.len()];
    for round in 0..o.rounds {
        // Rotate the order so no target always runs first.
        for k in 0..targets.len() {
            let i = (k + round as usize) % targets.len();
            let (label, url, pid) = &targets[i];
            let r = wrk(&o, url, o.secs, *pid)?;
            eprintln!(
                "round {}: {label:<15} {:>9.0} req/s  p99 {:>6.2} ms  cpu {:>5.1} us/req{}",
                round + 1,
                r.rps,
                r.p99_ms,
                r.cpu_us_per_req,
                if r.errors > 0 {
                    format!("  ({} errors!)", r.errors)
                } else {
                    String::new()
                }
            );
            results[i].push(r);
        }
    }
    let summary: Vec<Report> = results
        .iter()
        .map(|rs| Report {
            rps: median(rs.iter().map(|r| r.rps).collect()),
            p99_ms: median(rs.iter().map(|r| r.p99_ms).collect()),
            cpu_us_per_req: median(rs.iter().map(|r| r.cpu_us_per_req).collect()),
            errors: rs.iter().map(|r| r.errors).sum(),
        })
        .collect();
    println!(
        "{:<15} {:>10} {:>10} {:>14}",
        "target", "req/s", "p99 ms", "cpu us/req"
    );
    for ((label, _, _), s) in targets.iter().zip(&summary) {
        println!(
            "{label:<15} {:>10.0} {:>10.2} {:>14.1}",
            s.rps, s.p99_ms, s.cpu_us_per_req
        );
    }
    if summary.iter().any(|s| s.errors > 0) {
        eprintln!("xtask: some runs had non-2xx answers or socket errors; see the round lines");
    }
    let (ng, plain, local, redis) = (summary[0], summary[1], summary[2], summary[3]);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "gateway+policy/gateway: rps {:.2} p99 {:.2}",
        ratio(local.rps, plain.rps),
        ratio(local.p99_ms, plain.p99_ms)
    );
    println!(
        "gateway+policy/nginx: rps {:.2} p99 {:.2}",
        ratio(local.rps, ng.rps),
        ratio(local.p99_ms, ng.p99_ms)
    );
    println!(
        "redis-limit/local-limit: rps {:.2} p99 {:.2}",
        ratio(redis.rps, local.rps),
        ratio(redis.p99_ms, local.p99_ms)
    );
    jwt_cost()
}

/// JWT (RS256) verification cost per request: a token not seen before
/// (the verified-token cache spares repeats), measured by the gateway's own
/// verification code in a release build (`rs256_verification_cost`).
/// Prints `jwt RS256 verify: X us per token ...`.
pub fn jwt_cost() -> anyhow::Result<()> {
    eprintln!("xtask: measuring RS256 verification (release test build)");
    let out = Command::new("cargo")
        .args([
            "test",
            "--release",
            "-p",
            "gateway",
            "--lib",
            "auth::jwt::tests::rs256_verification_cost",
            "--",
            "--exact",
            "--nocapture",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run cargo test")?;
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("the RS256 measurement failed:\n{text}");
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("jwt RS256 verify:"))
        .context("the RS256 measurement printed no figure")?;
    println!("{line}");
    Ok(())
}
