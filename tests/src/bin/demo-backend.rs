//! The demo backend `cargo xtask run` starts: an echo server on the address
//! given as the first argument (default 127.0.0.1:8081); a second argument
//! delays every answer by that many milliseconds.
use gateway_tests::backend::Backend;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".to_string());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-backend: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let backend = Backend::serve(listener, "demo");
    // An optional second argument delays every answer by that many ms
    // (the slow target of `cargo xtask bench upstreams`).
    if let Some(ms) = std::env::args().nth(2).and_then(|a| a.parse().ok()) {
        backend.set_mode(gateway_tests::backend::Mode::Delay(ms));
    }
    eprintln!("demo-backend: listening on {addr}");
    let _ = tokio::signal::ctrl_c().await;
}
