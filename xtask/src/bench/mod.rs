//! `cargo xtask bench [http|upstreams|policy|jwt|xdp]`: benchmarks that compare
//! side by side in one run and report ratios (the machines are shared and noisy).

mod http;
mod policy;
mod upstreams;
mod wrk;
mod xdp;

use anyhow::bail;

pub fn run(what: &str, args: &[String]) -> anyhow::Result<()> {
    match what {
        "http" => http::run(args),
        "xdp" => xdp::run(args),
        "upstreams" => upstreams::run(args),
        "policy" => policy::run(args),
        "jwt" => policy::jwt_cost(),
        other => bail!("unknown benchmark {other:?}: expected http, upstreams, policy, jwt or xdp"),
    }
}

/// The `http` bench's floor proxy, run as a process of its own.
pub fn floor_pump(
    listen: std::net::SocketAddr,
    backend: std::net::SocketAddr,
) -> anyhow::Result<()> {
    http::floor::serve(listen, backend)
}

/// Builds the release gateway and the test binaries (demo backend) the
/// benches run.
fn build_release() -> anyhow::Result<()> {
    crate::cmd(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "gateway",
            "-p",
            "gateway-tests",
            "--bins",
        ],
    )
}
