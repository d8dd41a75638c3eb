//! The processes a bench starts: spawned pinned to one CPU, tied to our
//! lifetime (`PR_SET_PDEATHSIG`), stopped on drop, and read from `/proc`
//! for CPU time and peak memory.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Restricts the process about to `exec` to `cpu` (as `taskset -c`) and asks
/// the kernel to SIGTERM it if we die first, so no run leaves strays behind.
pub fn pin(cmd: &mut Command, cpu: usize) {
    // SAFETY: the closure runs between fork and exec and only makes two
    // async-signal-safe system calls on stack data.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The CPUs this process may run on.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A server we started. Dropping it stops it (SIGTERM, then SIGKILL), and
/// its children with it.
pub struct Proc {
    pub name: String,
    child: Child,
    /// Where its stdout and stderr go, shown when it fails.
    pub log: PathBuf,
    /// Its program's file name, as `/proc/PID/comm` shows it.
    program: String,
    stopped: bool,
}

impl Proc {
    /// Starts `cmd` on `cpu`, its output appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, cpu: usize, log: &Path) -> anyhow::Result<Proc> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        pin(&mut cmd, cpu);
        let program: String = Path::new(cmd.get_program())
            .file_name()
            .map(|f| f.to_string_lossy().chars().take(15).collect())
            .unwrap_or_default();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            program,
            stopped: false,
        })
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    /// Fails with the tail of its log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); its log ({}) ends with:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Waits until `addr` accepts connections (and, for a forking server,
    /// until it has a child), for at most `limit`.
    pub fn wait_ready(
        &mut self,
        addr: SocketAddr,
        want_child: bool,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            let up = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
            if up && (!want_child || !children(self.pid()).is_empty()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not accept connections on {addr} within {limit:?}; its log ({}) ends with:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to five seconds' grace, then SIGKILL for it and any child
    /// it left behind.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let kids = children(self.pid());
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = self.child.try_wait() {
            eprintln!("bench: {} ignored SIGTERM; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for k in kids {
            // Only what is still the same program: the pid may have been reused.
            if comm(k).as_deref() == Some(self.program.as_str()) {
                signal(k, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The pids whose parent is `pid` (nginx's workers).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(fields) = stat_fields(p)
            && fields.get(1).and_then(|s| s.parse::<i32>().ok()) == Some(pid)
        {
            out.push(p);
        }
    }
    out.sort_unstable();
    out
}

/// A process's command name (`/proc/PID/comm`).
fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// `/proc/PID/stat` from field 3 (state) on; the command name, which may
/// hold spaces, is cut off.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// CPU time a process (all its threads) has used so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub sys: Duration,
}

impl CpuTime {
    pub fn of(pid: i32) -> anyhow::Result<CpuTime> {
        let f = stat_fields(pid).with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        // Fields 14 and 15 of stat(5), counted from 3 here.
        let ticks = |i: usize| -> anyhow::Result<u64> {
            f.get(i)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("malformed /proc/{pid}/stat"))
        };
        let hz = clock_ticks();
        let to_dur = |t: u64| Duration::from_secs_f64(t as f64 / hz);
        Ok(CpuTime {
            user: to_dur(ticks(11)?),
            sys: to_dur(ticks(12)?),
        })
    }

    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            sys: self.sys.saturating_sub(earlier.sys),
        }
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Peak resident set size (`VmHWM`), KiB.
pub fn peak_rss_kib(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The 1-minute load average.
pub fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `n` loopback addresses nobody listens on right now.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<_, _>>()
        .context("cannot find a free loopback port")?;
    held.iter()
        .map(|l| l.local_addr().map_err(Into::into))
        .collect()
}

/// One `GET /` over a fresh connection; fails unless the answer is 200.
pub fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let head = String::from_utf8_lossy(&buf);
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") {
        bail!("GET http://{addr}/ answered {status:?}, expected 200");
    }
    Ok(())
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A directory removed (with everything in it) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
