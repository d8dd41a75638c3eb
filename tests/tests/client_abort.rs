//! A client that closes its connection while its request is served: the
//! request is given up with its upstream exchange (`499` in the access log,
//! as nginx does), unless the listener sets `ignore_client_abort`.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A backend that reads a request head, writes `answer` (maybe nothing, or
/// a response head and part of a body) and holds the connection; it counts
/// the connections the gateway has closed on it.
struct Holding {
    addr: std::net::SocketAddr,
    closed: Arc<AtomicUsize>,
}

async fn holding_backend(answer: &'static [u8]) -> Holding {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let closed = Arc::new(AtomicUsize::new(0));
    let count = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
                // Held until the gateway closes it.
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Holding { addr, closed }
}

/// A gateway with one route to `backend`; `listener` adds lines to the
/// listener's section.
fn gateway(backend: std::net::SocketAddr, listener: &str) -> (Gateway, String) {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(
        &format!(
            r#"
[server]
workers = 1
[admin]
listen = "{admin}"
[access_log]
enabled = true
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
{listener}
[[upstreams]]
name = "be"
targets = ["{backend}"]
timeout = "20s"
[upstreams.retry]
max_retries = 0
[[routes]]
name = "all"
upstream = "be"
[routes.match]
path_prefix = "/"
"#
        ),
        &admin,
    );
    (gw, format!("127.0.0.1:{port}"))
}

/// Waits up to 5 s for `n` closed backend connections.
async fn wait_closed(b: &Holding, n: usize) -> Duration {
    let started = Instant::now();
    while b.closed.load(Ordering::SeqCst) < n {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the gateway still holds the upstream exchange"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

async fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    let text = gateway_tests::client::get(&format!("http://{}/metrics", gw.admin))
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_response_gives_the_upstream_exchange_up() {
    let b = holding_backend(b"").await;
    let (gw, listen) = gateway(b.addr, "");
    let mut s = TcpStream::connect(&listen).expect("connect");
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    wait_closed(&b, 1).await;
    let line = gw.access_log_line("/slow");
    assert_eq!(line["http.response.status_code"], 499, "{line}");
    assert_eq!(
        metric(&gw, r#"gateway_client_aborts_total{phase="waiting"}"#).await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_response_gives_the_upstream_exchange_up() {
    // A streamed answer whose upstream goes quiet (SSE, a long poll).
    let b = holding_backend(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello\n\r\n",
    )
    .await;
    let (gw, listen) = gateway(b.addr, "");
    let mut s = TcpStream::connect(&listen).expect("connect");
    s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("hello") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    // Before: held until `send_timeout` (60 s).
    wait_closed(&b, 1).await;
    assert_eq!(
        metric(&gw, r#"gateway_client_aborts_total{phase="response"}"#).await,
        Some(1.0)
    );
    // Logged when its head went out.
    assert_eq!(
        gw.access_log_line("/events")["http.response.status_code"],
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_is_answered_only_with_ignore_client_abort() {
    // The client sends its request and closes its sending side; the
    // backend answers after 400 ms.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let half_closed = |listen: String| {
        tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(&listen).expect("connect");
            s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            s.shutdown(Shutdown::Write).expect("shutdown");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let (gw, listen) = gateway(backend, "ignore_client_abort = true");
    let answer = half_closed(listen).await.expect("client");
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        gw.stderr()
    );
    assert!(answer.ends_with("ok"), "{answer}");

    let (gw, listen) = gateway(backend, "");
    let answer = half_closed(listen).await.expect("client");
    assert_eq!(answer, "", "given up, nothing sent");
    assert_eq!(gw.access_log_line("/x")["http.response.status_code"], 499);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_while_another_waits_is_kept_and_answered() {
    // The watch reads what arrives while a request waits: a pipelined
    // request is kept for its turn, not taken for a departure.
    let b = gateway_tests::backend::Backend::start("be").await;
    let (gw, listen) = gateway(b.addr, "");
    let answers = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&listen).expect("connect");
        s.write_all(b"GET /delay/400 HTTP/1.1\r\nHost: one\r\n\r\n")
            .expect("write");
        std::thread::sleep(Duration::from_millis(150));
        s.write_all(b"GET /second HTTP/1.1\r\nHost: two\r\nConnection: close\r\n\r\n")
            .expect("write");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("client");
    assert_eq!(
        answers.matches("HTTP/1.1 200").count(),
        2,
        "{answers}\n{}",
        gw.stderr()
    );
    let (one, two) = (
        answers.find("\"host\":\"one\"").expect("first answer"),
        answers.find("\"host\":\"two\"").expect("second answer"),
    );
    assert!(one < two, "answered in order: {answers}");
    assert_eq!(
        metric(&gw, r#"gateway_client_aborts_total{phase="waiting"}"#).await,
        None
    );
}
