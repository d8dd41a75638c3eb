//! The servers of the test bed, each with a generated configuration in the
//! bench's temporary directory: the backend (nginx `return 200`), the
//! gateway, and nginx as the reference reverse proxy.
//!
//! Everything is set for a steady state on both sides of each proxy: one
//! worker, access logs off, client and upstream keep-alive with no cap on
//! requests per connection (nginx closes a connection after 1000 requests
//! by default, which would make the nginx figures include reconnects the
//! gateway does not make).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

use super::proc::Proc;

const READY: Duration = Duration::from_secs(15);

/// Per-connection request cap, high enough never to be reached in a run.
const KEEPALIVE_REQUESTS: u32 = 100_000_000;

/// A running server and the process whose CPU and memory we measure
/// (nginx's single worker, or the gateway itself).
pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub measured_pid: i32,
}

/// The nginx directives every instance shares: one worker, in the
/// foreground, everything it writes kept in `dir`.
fn nginx_main(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}.log warn;
events {{ worker_connections 4096; }}
"
    )
}

fn nginx_http_common(dir: &Path, name: &str) -> anyhow::Result<String> {
    let tmp = dir.join(format!("{name}-tmp"));
    fs::create_dir_all(&tmp)?;
    let t = tmp.display();
    Ok(format!(
        "    access_log off;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 75s;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
"
    ))
}

fn start_nginx(
    dir: &Path,
    name: &str,
    conf: &str,
    addr: SocketAddr,
    cpu: usize,
) -> anyhow::Result<Server> {
    let path = dir.join(format!("{name}.conf"));
    fs::write(&path, conf).with_context(|| format!("cannot write {}", path.display()))?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join(format!("{name}.log")));
    let mut proc = Proc::spawn(
        &format!("nginx ({name})"),
        cmd,
        cpu,
        &dir.join(format!("{name}.log")),
    )?;
    proc.wait_ready(addr, true, READY)?;
    let measured_pid = super::proc::children(proc.pid())
        .first()
        .copied()
        .context("nginx started no worker")?;
    Ok(Server {
        proc,
        addr,
        measured_pid,
    })
}

/// The backend: nginx answering every request with an empty 200.
pub fn backend(dir: &Path, addr: SocketAddr, cpu: usize) -> anyhow::Result<Server> {
    let conf = format!(
        "{}http {{
{}
    server {{
        listen {addr};
        location / {{ return 200; }}
    }}
}}
",
        nginx_main(dir, "backend"),
        nginx_http_common(dir, "backend")?,
    );
    start_nginx(dir, "backend", &conf, addr, cpu)
}

/// nginx as a reverse proxy to `backend`, with upstream keep-alive.
pub fn nginx_proxy(
    dir: &Path,
    addr: SocketAddr,
    backend: SocketAddr,
    connections: u32,
    cpu: usize,
) -> anyhow::Result<Server> {
    let conf = nginx_proxy_conf(dir, "nginx-proxy", addr, backend, connections)?;
    start_nginx(dir, "nginx-proxy", &conf, addr, cpu)
}

/// The configuration of `nginx_proxy`, its files named after `name`.
pub fn nginx_proxy_conf(
    dir: &Path,
    name: &str,
    addr: SocketAddr,
    backend: SocketAddr,
    connections: u32,
) -> anyhow::Result<String> {
    Ok(format!(
        "{}http {{
{}
    upstream backend {{
        server {backend};
        keepalive {connections};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
",
        nginx_main(dir, name),
        nginx_http_common(dir, name)?,
    ))
}

/// The gateway binary at `bin`, one worker, proxying everything to `backend`.
pub fn gateway(
    name: &str,
    bin: &Path,
    dir: &Path,
    addr: SocketAddr,
    backend: SocketAddr,
    cpu: usize,
) -> anyhow::Result<Server> {
    let path = gateway_conf(name, dir, addr, backend)?;
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("-c").arg(&path).arg("--no-xdp");
    let mut proc = Proc::spawn(name, cmd, cpu, &dir.join(format!("{name}.log")))?;
    proc.wait_ready(addr, false, READY)?;
    let measured_pid = proc.pid();
    Ok(Server {
        proc,
        addr,
        measured_pid,
    })
}

/// The floor proxy (`floor.rs`): this xtask binary, re-run as
/// `xtask floor-pump ADDR BACKEND`.
pub fn floor(
    dir: &Path,
    addr: SocketAddr,
    backend: SocketAddr,
    cpu: usize,
) -> anyhow::Result<Server> {
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("floor-pump")
        .arg(addr.to_string())
        .arg(backend.to_string());
    let mut proc = Proc::spawn("floor", cmd, cpu, &dir.join("floor.log"))?;
    proc.wait_ready(addr, false, READY)?;
    let measured_pid = proc.pid();
    Ok(Server {
        proc,
        addr,
        measured_pid,
    })
}

/// Writes the gateway's configuration for `gateway` and returns its path.
pub fn gateway_conf(
    name: &str,
    dir: &Path,
    addr: SocketAddr,
    backend: SocketAddr,
) -> anyhow::Result<PathBuf> {
    let conf = format!(
        r#"# Generated by `cargo xtask bench http`.
[server]
workers = 1
watch_config = false
shutdown_timeout = "2s"

[access_log]
enabled = false

[[listeners]]
name = "bench"
listen = "{addr}"

[[upstreams]]
name = "backend"
targets = ["{backend}"]

[[routes]]
name = "all"
upstream = "backend"
[routes.match]
path_prefix = "/"
"#
    );
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, conf).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
