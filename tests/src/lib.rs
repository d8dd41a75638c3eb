//! Test harness for the end-to-end tests: real hyper backends on ephemeral
//! ports (`backend`), the real gateway binary started on a generated config
//! (`gateway`), small clients (`client`), a tiny DNS server (`dns`), a
//! real redis-server (`redis`), a real OpenID Connect provider (`idp`),
//! network namespaces for the XDP tests (`netns`) and hostile-byte
//! mutations of protocol messages (`mutate`).

pub mod backend;
pub mod client;
pub mod dns;
pub mod gateway;
pub mod idp;
pub mod mutate;
pub mod netns;
pub mod pki;
pub mod redis;

/// Says that the calling test skips its checks, and why: on stderr, and as
/// a line in the file named by `GATEWAY_TEST_SKIPS` (set by `cargo xtask
/// test`, which lists the skipped tests and counts them as skipped rather
/// than passed). Call it, then return from the test.
pub fn skip(why: &str) {
    use std::io::Write as _;
    eprintln!("skipped: {why}");
    if let Some(path) = std::env::var_os("GATEWAY_TEST_SKIPS")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        // One write, so lines of tests running at once do not interleave.
        let line = format!("{}: {why}\n", std::thread::current().name().unwrap_or("?"));
        let _ = f.write_all(line.as_bytes());
    }
}

/// A free TCP port on 127.0.0.1 for a process the test starts (the gateway,
/// Redis), which binds it later.
///
/// Taken below the kernel's ephemeral range (32768 and up by default), so
/// that no outgoing connection (a client's, or the gateway's to an
/// upstream) can take it between now and the bind, as happened with ports
/// the kernel handed out for `bind(0)`; never the same one twice in a
/// process, and each test process starts elsewhere in the range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = u16::try_from(LOW + n).expect("port range fits u16");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOW} and {}", LOW + SPAN);
}
