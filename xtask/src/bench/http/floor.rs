//! The bench's floor: a proxy that does no HTTP work at all. Each client
//! connection gets an upstream connection of its own, and whatever one
//! side sends is written to the other as it comes (one read and one write
//! per message, edge-triggered epoll, one thread). Its user time is close
//! to nothing, so its req/s is the most any proxy with the usual syscall
//! pattern (read the request, write it upstream, read the response, write
//! it back) can reach on this test bed: the rest is the kernel's loopback
//! TCP and the backend sharing the CPU. `floor/nginx` in the summary is
//! the ceiling of `gateway/nginx`.
//!
//! It runs as `xtask floor-pump LISTEN BACKEND`, a process of its own
//! pinned like the other proxies.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;

use anyhow::{Context as _, bail};

/// The listener's epoll token.
const LISTENER: u64 = u64::MAX;

/// One side of a client/upstream pair.
struct End {
    stream: TcpStream,
    /// Index of the other side in the slab.
    peer: usize,
    /// Bytes read from the peer that this side's socket did not take yet.
    pending: Vec<u8>,
}

/// Serves until killed.
pub fn serve(listen: SocketAddr, backend: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("cannot bind {listen}"))?;
    listener.set_nonblocking(true)?;
    // SAFETY: plain syscall; the result is checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        bail!("epoll_create1: {}", std::io::Error::last_os_error());
    }
    add(ep, listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER)?;
    let mut ends: Vec<Option<End>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut closed: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        // SAFETY: `events` outlives the call and its length is passed.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            bail!("epoll_wait: {e}");
        }
        for ev in &events[..n as usize] {
            let (token, flags) = (ev.u64, ev.events);
            if token == LISTENER {
                accept(ep, &listener, backend, &mut ends, &mut free)?;
                continue;
            }
            let i = token as usize;
            if ends.get(i).is_none_or(Option::is_none) {
                continue; // closed earlier in this batch
            }
            let mut ok = true;
            if flags & libc::EPOLLOUT as u32 != 0 {
                ok = flush(&mut ends, i);
            }
            if ok && flags & libc::EPOLLIN as u32 != 0 {
                let eof = flags & libc::EPOLLRDHUP as u32 != 0;
                ok = forward(&mut ends, i, &mut buf, eof);
            }
            if (!ok || flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0)
                && let Some(end) = ends[i].take()
            {
                ends[end.peer] = None;
                closed.extend([i, end.peer]);
            }
        }
        // Slots are reused only after the batch, so a stale event in it
        // never reaches a new connection.
        free.append(&mut closed);
    }
}

fn add(ep: i32, fd: i32, events: u32, token: u64) -> anyhow::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is valid for the call; the result is checked.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        bail!("epoll_ctl: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn accept(
    ep: i32,
    listener: &TcpListener,
    backend: SocketAddr,
    ends: &mut Vec<Option<End>>,
    free: &mut Vec<usize>,
) -> anyhow::Result<()> {
    loop {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("floor-pump: accept: {e}");
                return Ok(());
            }
        };
        // A blocking connect: on loopback it completes at once, and the
        // bench opens its connections before it measures.
        let upstream = match TcpStream::connect(backend) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("floor-pump: connect {backend}: {e}");
                continue;
            }
        };
        let mut slot = || {
            free.pop().unwrap_or_else(|| {
                ends.push(None);
                ends.len() - 1
            })
        };
        let (a, b) = (slot(), slot());
        for (i, peer, s) in [(a, b, client), (b, a, upstream)] {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            let flags = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
            add(ep, s.as_raw_fd(), flags as u32, i as u64)?;
            ends[i] = Some(End {
                stream: s,
                peer,
                pending: Vec::new(),
            });
        }
    }
}

/// Reads what side `i` has and writes it to its peer; false when the pair
/// is done (end of stream or an error). `eof`: the peer has shut down its
/// side, so read on until the end of stream.
fn forward(ends: &mut [Option<End>], i: usize, buf: &mut [u8], eof: bool) -> bool {
    loop {
        let Some(end) = ends[i].as_mut() else {
            return false;
        };
        let n = match end.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        let peer = end.peer;
        let Some(p) = ends[peer].as_mut() else {
            return false;
        };
        if p.pending.is_empty() {
            match p.stream.write(&buf[..n]) {
                Ok(w) => p.pending.extend_from_slice(&buf[w..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    p.pending.extend_from_slice(&buf[..n]);
                }
                Err(_) => return false,
            }
        } else {
            p.pending.extend_from_slice(&buf[..n]);
        }
        // A short read means the socket is drained (edge-triggered: no
        // second read to see EAGAIN, as a proxy that sizes its buffers
        // for whole messages would not make one either).
        if n < buf.len() && !eof {
            return true;
        }
    }
}

/// Writes what side `i` still owes its socket; false on an error.
fn flush(ends: &mut [Option<End>], i: usize) -> bool {
    let Some(end) = ends[i].as_mut() else {
        return false;
    };
    while !end.pending.is_empty() {
        match end.stream.write(&end.pending) {
            Ok(w) => {
                end.pending.drain(..w);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}
