//! HTTP/1.1 connections to targets, pooled per target and per worker: each
//! `Target` holds one last-in first-out list of idle connections for each
//! worker thread, so a request takes the most recently used connection of
//! the target the balancer chose, made on its own runtime, with one
//! uncontended lock and without a pool-wide map keyed by address. (HTTP/2
//! upstreams, which multiplex, go through hyper-util's client instead.)
//!
//! A connection goes back to its list when the response body has been read
//! to its end (`release`, when `h1::H1Body` is dropped); a response dropped half-read
//! takes its connection with it. Idle connections older than
//! `pool_idle_timeout` are dropped when found, and by `sweep` once a second.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::h1;
use super::target::Target;

/// An idle connection and when it became idle.
#[derive(Debug)]
pub struct Idle {
    conn: h1::Conn,
    since: Instant,
}

/// Idle lists, one per worker.
pub type IdleLists = Box<[Mutex<Vec<Idle>>]>;

static WORKERS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Sets how many workers serve requests (once, at start-up).
pub fn set_workers(n: usize) {
    WORKERS.store(n.max(1), Ordering::Relaxed);
}

/// Marks the calling thread as worker `i`.
pub fn enter_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// Empty idle lists for a new target.
pub fn idle_lists() -> IdleLists {
    (0..WORKERS.load(Ordering::Relaxed))
        .map(|_| Mutex::new(Vec::new()))
        .collect()
}

fn my_list(target: &Target) -> Option<&Mutex<Vec<Idle>>> {
    let i = WORKER.with(Cell::get);
    target.idle.get(i % target.idle.len().max(1))
}

/// What making a connection can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
}

/// Pool settings of the upstream a connection belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

/// Where a response's connection goes back to once its body has ended.
#[derive(Debug, Clone)]
pub struct ReturnTo {
    pub target: Arc<Target>,
    pub settings: Settings,
}

/// The most recently used idle connection to `target` that is still
/// usable, if any.
pub fn checkout(target: &Target, settings: Settings) -> Option<h1::Conn> {
    let list = my_list(target)?;
    let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
    while let Some(i) = idle.pop() {
        if i.since.elapsed() <= settings.idle_timeout && i.conn.is_usable() {
            return Some(i.conn);
        }
    }
    None
}

/// A new connection to `target`.
pub async fn connect(target: &Target, settings: Settings) -> Result<h1::Conn, ConnectError> {
    let stream = tokio::time::timeout(
        settings.connect_timeout,
        tokio::net::TcpStream::connect(target.addr.as_str()),
    )
    .await
    .map_err(|_| ConnectError::Timeout(settings.connect_timeout))??;
    stream.set_nodelay(true)?;
    Ok(h1::Conn::new(stream))
}

/// Gives a connection whose exchange ended cleanly back to its target.
pub fn release(to: &ReturnTo, conn: h1::Conn) {
    let Some(list) = my_list(&to.target) else {
        return;
    };
    let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < to.settings.max_idle {
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

/// Drops `target`'s idle connections older than `idle_timeout`.
pub fn sweep(target: &Target, idle_timeout: Duration) {
    for list in target.idle.iter() {
        let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|i| i.since.elapsed() <= idle_timeout);
    }
}
