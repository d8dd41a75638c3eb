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

/// A free TCP port on 127.0.0.1 (bound then released; the OS does not hand
/// it out again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}
