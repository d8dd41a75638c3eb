//! `cargo xtask bench [http|xdp|policy]`: benchmarks that compare side by side in
//! one run and report ratios (the machines are shared and noisy).

mod http;
mod policy;
mod xdp;

use anyhow::bail;

pub fn run(what: &str, args: &[String]) -> anyhow::Result<()> {
    match what {
        "http" => http::run(args),
        "xdp" => xdp::run(args),
        "policy" => policy::run(args),
        other => bail!("unknown benchmark {other:?}: expected http, xdp or policy"),
    }
}
