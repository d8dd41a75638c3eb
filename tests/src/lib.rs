//! Test harness for the end-to-end tests: real hyper backends on ephemeral
//! ports (`backend`), the real gateway binary started on a generated config
//! (`gateway`), small clients (`client`), a tiny DNS server (`dns`), a
//! real redis-server (`redis`), a real OpenID Connect provider (`idp`) and
//! network namespaces for the XDP tests (`netns`).

pub mod backend;
pub mod client;
pub mod dns;
pub mod gateway;
pub mod idp;
pub mod netns;
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

/// A free TCP port on 127.0.0.1 (bound then released; the OS does not hand
/// it out again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}
