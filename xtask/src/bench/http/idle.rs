//! Memory per idle keep-alive connection: `n` client connections opened
//! one after another, each sends one request, reads the answer and stays
//! open; the proxy's anonymous resident memory (`RssAnon`) grows by so
//! much per connection. One at a time, so that what a request needs while
//! it runs is counted once, not `n` times (an allocator keeps freed memory
//! resident). Kernel socket memory is not counted, for either proxy.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Bytes of the proxy process's anonymous RSS per idle connection.
pub fn bytes_per_connection(pid: i32, addr: SocketAddr, n: usize) -> anyhow::Result<f64> {
    let before = rss_anon_kib(pid)?;
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut s =
            TcpStream::connect(addr).with_context(|| format!("connection {i} to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        read_answer(&mut s).with_context(|| format!("connection {i} to {addr}"))?;
        held.push(s);
    }
    // Let deferred work (timers, pool returns) settle before reading.
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_anon_kib(pid)?;
    drop(held);
    Ok(after.saturating_sub(before) as f64 * 1024.0 / n as f64)
}

/// Reads one answer to a GET: a `200` head and a `Content-Length` body.
fn read_answer(s: &mut TcpStream) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("closed before a whole answer");
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("answered {:?}", head.lines().next().unwrap_or_default());
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("answer without content-length")?;
        if buf.len() >= end + 4 + length {
            return Ok(());
        }
    }
}

fn rss_anon_kib(pid: i32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no RssAnon in /proc/{pid}/status"))
}
