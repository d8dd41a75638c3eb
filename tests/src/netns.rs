//! Network namespaces joined by veth pairs, for the XDP end-to-end tests,
//! and the real gateway run inside one of them.
//!
//! Every name carries the test process's pid and a counter, so parallel
//! tests never collide; every namespace, veth (deleted with its namespace)
//! and bpffs pin directory is removed on drop, also when the test fails.
//! Addresses are 10.199.N.x and fd00:199:N::x, only ever inside the
//! namespaces created here.
//!
//! Only the network namespace is switched (`setns`), never the mount
//! namespace (`ip netns exec` would remount /sys and hide /sys/fs/bpf, where
//! the gateway pins its maps and links).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: `{prefix}{pid}x{n}`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Why the kernel tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, XDP)".into());
    }
    let ok = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Some("`ip netns` does not work here (iproute2 missing?)".into());
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Some("no network namespace support".into());
    }
    None
}

/// Runs `ip args...`, panicking with its output on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = unique(prefix);
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a);
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread inside this namespace (sockets it opens stay
    /// in the namespace).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }

    /// Starts `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        let f = File::open(self.path()).expect("open netns");
        // SAFETY: the closure only calls setns(2), which is
        // async-signal-safe, on a descriptor opened before fork.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &Path) {
    let f = File::open(path).expect("open netns");
    // SAFETY: setns(2) on a descriptor we own, for this thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// A gateway namespace with `n` client namespaces, client `i` joined to
/// the gateway by a veth pair: `gw{i}` (10.199.{i+1}.1/24,
/// fd00:199:{i+1}::1/64) and `c{i}` (10.199.{i+1}.2/24,
/// fd00:199:{i+1}::2/64).
pub struct Bed {
    pub clients: Vec<NetNs>,
    pub gw: NetNs,
}

impl Bed {
    pub fn new(n: usize) -> Bed {
        let gw = NetNs::new("xgw");
        let clients: Vec<NetNs> = (0..n).map(|_| NetNs::new("xc")).collect();
        for (i, c) in clients.iter().enumerate() {
            let net = i + 1;
            let (g, cl) = (format!("gw{i}"), format!("c{i}"));
            ip(&[
                "link", "add", &g, "netns", &gw.name, "type", "veth", "peer", "name", &cl, "netns",
                &c.name,
            ]);
            gw.ip(&["addr", "add", &format!("10.199.{net}.1/24"), "dev", &g]);
            gw.ip(&[
                "addr",
                "add",
                &format!("fd00:199:{net}::1/64"),
                "dev",
                &g,
                "nodad",
            ]);
            c.ip(&["addr", "add", &format!("10.199.{net}.2/24"), "dev", &cl]);
            c.ip(&[
                "addr",
                "add",
                &format!("fd00:199:{net}::2/64"),
                "dev",
                &cl,
                "nodad",
            ]);
            gw.ip(&["link", "set", &g, "up"]);
            c.ip(&["link", "set", &cl, "up"]);
        }
        Bed { clients, gw }
    }

    /// Adds `addr/24` (or `/64`) to client `i`'s interface, as another
    /// source address.
    pub fn add_client_addr(&self, i: usize, addr: &str) {
        let pfx = if addr.contains(':') { "64" } else { "24" };
        self.clients[i].ip(&[
            "addr",
            "add",
            &format!("{addr}/{pfx}"),
            "dev",
            &format!("c{i}"),
            "nodad",
        ]);
    }
}

/// A bpffs directory for one gateway's pins, removed (links first) on drop.
pub struct Pins {
    pub dir: PathBuf,
}

impl Pins {
    pub fn new() -> Pins {
        Pins {
            dir: PathBuf::from("/sys/fs/bpf").join(unique("gwtest")),
        }
    }
}

impl Default for Pins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        // Links first: the program comes off the interface before its maps go.
        files.sort_by_key(|p| !p.to_string_lossy().contains("/link_"));
        for f in files {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// How a connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Connected,
    Refused,
    TimedOut,
    Other,
}

/// Connects from `src` (any local address if `None`) to `dst` within
/// `timeout` (call inside the namespace).
pub fn connect(
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> (Outcome, Option<std::net::TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None).expect("socket");
    if let Some(a) = src {
        s.bind(&SocketAddr::new(a, 0).into()).expect("bind source");
    }
    // Close without TIME_WAIT: tests open many short connections.
    let _ = s.set_linger(Some(Duration::ZERO));
    match s.connect_timeout(&dst.into(), timeout) {
        Ok(()) => (Outcome::Connected, Some(s.into())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => (Outcome::Refused, None),
        Err(e)
            if e.kind() == std::io::ErrorKind::TimedOut
                || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            (Outcome::TimedOut, None)
        }
        Err(_) => (Outcome::Other, None),
    }
}

/// GETs `path` over a fresh connection from `src`: the status code, or how
/// the connection failed (call inside the namespace).
pub fn get(
    src: Option<IpAddr>,
    dst: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<u16, Outcome> {
    let (o, s) = connect(src, dst, timeout);
    let mut s = s.ok_or(o)?;
    let _ = s.set_read_timeout(Some(timeout));
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|_| Outcome::Other)?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(Outcome::Other)
}

/// The gateway binary running inside a namespace on a written config;
/// stopped (SIGTERM, then SIGKILL) on drop.
pub struct NsGateway {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Admin address inside the namespace.
    pub admin: SocketAddr,
    ns_path: PathBuf,
}

impl NsGateway {
    /// Starts `gateway run -c CONFIG extra...` in `ns` and waits (10 s) for
    /// `/readyz` on `admin` (an address inside `ns`).
    pub fn start(ns: &NetNs, config: &str, admin: SocketAddr, extra: &[&str]) -> NsGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).expect("write config");
        Self::start_in(ns, dir, path, admin, extra)
    }

    /// Stops the gateway and starts another on the same config file (a
    /// restart, or an upgrade).
    pub fn restart(&mut self, ns: &NetNs, extra: &[&str]) {
        stop(&mut self.child);
        self.child = spawn(ns, self.dir.path(), &self.config, extra);
        self.wait_ready();
    }

    fn start_in(
        ns: &NetNs,
        dir: tempfile::TempDir,
        path: PathBuf,
        admin: SocketAddr,
        extra: &[&str],
    ) -> NsGateway {
        let child = spawn(ns, dir.path(), &path, extra);
        let mut gw = NsGateway {
            child,
            dir,
            config: path,
            admin,
            ns_path: ns.path(),
        };
        gw.wait_ready();
        gw
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "gateway exited early ({status}); stderr:\n{}",
                    self.stderr()
                );
            }
            if self.admin_get("/readyz").0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gateway not ready within 10 s; stderr:\n{}", self.stderr());
    }

    /// GETs `path` from the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        self.admin_request("GET", path)
    }

    /// POSTs (no body) to `path` on the admin listener: (status, body).
    pub fn admin_post(&self, path: &str) -> (u16, String) {
        self.admin_request("POST", path)
    }

    fn admin_request(&self, method: &'static str, path: &str) -> (u16, String) {
        let admin = self.admin;
        let ns = self.ns_path.clone();
        let path = path.to_string();
        std::thread::spawn(move || {
            enter(&ns);
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1))
            else {
                return (0, String::new());
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(req.as_bytes());
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            let status = out
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
            (status, body)
        })
        .join()
        .unwrap_or((0, String::new()))
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Stops the gateway (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        stop(&mut self.child);
    }
}

fn spawn(ns: &NetNs, dir: &Path, config: &Path, extra: &[&str]) -> Child {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .expect("log file");
    ns.command(crate::gateway::binary())
        .arg("run")
        .arg("-c")
        .arg(config)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("start the gateway binary (cargo xtask test builds it)")
}

fn stop(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for NsGateway {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}
