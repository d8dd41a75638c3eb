//! gateway: an eBPF-accelerated API gateway.
//!
//! A request flows through the phases in `proxy` (see `proxy/mod.rs` for the
//! one driver); each feature is a module that plugs into a phase and owns its
//! config section. See `docs/architecture.md`.

pub mod admin;
pub mod auth;
pub mod chunked;
pub mod config;
pub mod error;
pub mod hex;
pub mod listener;
/// The hostile-byte mutations the end-to-end tests also use (one copy).
#[cfg(test)]
#[path = "../../tests/src/mutate.rs"]
mod mutate;
pub mod observe;
pub mod pem;
pub mod policy;
pub mod prehashed;

pub mod proxy;
pub mod reload;
pub mod respond;
pub mod router;
pub mod server;
pub mod upstream;
pub mod wire;
pub mod xdp;
