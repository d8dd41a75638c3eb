//! Observability: process logging (`tracing`), Prometheus metrics
//! (`metrics`), and the JSON access log (`access_log`).

pub mod access_log;
pub mod metrics;

use tracing_subscriber::EnvFilter;

/// Sets up process logging to stderr: `RUST_LOG` if set, else `info`,
/// `debug` or `trace` by the number of `-v`.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
