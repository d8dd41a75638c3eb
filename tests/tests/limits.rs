//! Connection-level limits: header read timeout (408), request body read
//! timeout and whole-request timeout (408), idle keep-alive timeout, send timeout (a client that
//! stops reading, over HTTP/1.1 and HTTP/2), response stalls (an upstream
//! that stops mid-body), max connections per listener, and the memory an
//! idle keep-alive connection costs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use gateway_tests::backend::Backend;
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;

fn start(backend: &Backend) -> (Gateway, String) {
    start_to(&backend.addr.to_string())
}

fn start_to(upstream: &str) -> (Gateway, String) {
    start_with(upstream, "")
}

/// The listener of `start_to` with `extra` keys.
fn start_with(upstream: &str, extra: &str) -> (Gateway, String) {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
[server]
workers = 1
watch_config = false
[admin]
listen = "{admin}"
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
header_read_timeout = "400ms"
body_read_timeout = "400ms"
idle_timeout = "1s"
send_timeout = "1s"
max_connections = 3
{extra}
[[upstreams]]
name = "be"
targets = ["{b}"]
[[routes]]
name = "all"
upstream = "be"
"#,
        b = upstream
    );
    (Gateway::start(&config, &admin), format!("127.0.0.1:{port}"))
}

/// An upstream that answers each of its first 4 connections with a head
/// and 3 of 100 bytes, then nothing (for 10 s); its address.
fn stalling_upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(4) {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc");
            held.push(c);
        }
        std::thread::sleep(Duration::from_secs(10));
    });
    upstream
}

/// Reads until EOF or `limit`; returns what was read and how long it took.
fn read_all(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_head_gets_408() {
    let backend = Backend::start("be").await;
    let (_gw, addr) = start(&backend);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let (resp, took) = read_all(&mut s, Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(
        resp.contains("application/problem+json") && resp.contains("\"status\":408"),
        "{resp}"
    );
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(backend.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_body_gets_408() {
    let backend = Backend::start("be").await;
    let (_gw, addr) = start(&backend);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly a little")
        .unwrap();
    let (resp, took) = read_all(&mut s, Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("application/problem+json"), "{resp}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickling_past_request_timeout_gets_408() {
    let backend = Backend::start("be").await;
    let (_gw, addr) = start_with(&backend.addr.to_string(), "request_timeout = \"1s\"");
    // A byte every 200 ms: never a pause of body_read_timeout (400 ms), but
    // not the whole body within request_timeout either.
    let chunks = (0..15)
        .map(|_| (Duration::from_millis(200), b"x".to_vec()))
        .collect();
    let (resp, took) = tokio::task::spawn_blocking(move || {
        gateway_tests::client::trickle(&addr, "POST /x HTTP/1.1\r\nHost: x\r\n", chunks)
    })
    .await
    .unwrap();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("request_timeout"), "{resp}");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "408 after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_after_idle_timeout() {
    let backend = Backend::start("be").await;
    let (_gw, addr) = start(&backend);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // The response arrives at once; then the connection idles. It must
    // outlive the 400 ms header timeout and close near the 1 s idle timeout.
    let (resp, took) = read_all(&mut s, Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        !resp.contains("HTTP/1.1 408") && !resp.contains("\"status\":408"),
        "no 408 on an idle connection: {resp}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused() {
    let backend = Backend::start("be").await;
    let (_gw, addr) = start(&backend);
    let held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(&addr).unwrap();
    let _ = extra.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n");
    let (resp, _) = read_all(&mut extra, Duration::from_secs(3));
    assert!(
        resp.is_empty(),
        "the fourth connection is closed unanswered: {resp}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let mut again = TcpStream::connect(&addr).unwrap();
    again
        .write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (resp, _) = read_all(&mut again, Duration::from_secs(3));
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "served once others closed: {resp}"
    );
}

/// Sends `request` on a connection with a small receive buffer and then
/// reads nothing: the gateway's writes find the socket full, and after
/// send_timeout (1 s) it closes the connection, freeing what the response
/// holds upstream (what its kernel already holds still trickles out, so the
/// client is not read to the end).
fn expect_cut_off_when_not_reading(gw: &Gateway, addr: &str, request: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(4096)
        .unwrap();
    s.write_all(request).unwrap();
    let started = Instant::now();
    let m = wait_for_metric(gw, "gateway_send_timeouts_total 1");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "cut off after {took:?}");
    assert!(
        m.contains("gateway_active_connections{listener=\"main\"} 0"),
        "the connection is gone: {m}"
    );
}

/// The metrics once they contain `line` (within 5 s).
fn wait_for_metric(gw: &Gateway, line: &str) -> String {
    let metrics = || {
        gateway_tests::client::raw(
            &gw.admin,
            "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    };
    let started = Instant::now();
    let mut m = metrics();
    while !m.contains(line) && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        m = metrics();
    }
    assert!(m.contains(line), "{m}");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    let backend = Backend::start("be").await;
    let (gw, addr) = start(&backend);
    expect_cut_off_when_not_reading(
        &gw,
        &addr,
        b"GET /bytes/67108864 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_mid_body_is_cut_off_after_send_timeout() {
    let upstream = stalling_upstream();
    let (gw, addr) = start_to(&upstream);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (resp, took) = read_all(&mut s, Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("abc"), "what came, then the end: {resp}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "cut off after {took:?}"
    );
    let m = gateway_tests::client::raw(
        &gw.admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(m.contains("gateway_response_stalls_total 1"), "{m}");
}

/// An h2c request for `path`: the preface, SETTINGS and, when `wide`,
/// the largest stream window and a connection WINDOW_UPDATE to match (so
/// that flow control does not stall the gateway first; else the default
/// 64 KiB windows), and HEADERS with END_STREAM.
fn h2c_request_bytes(path: &str, wide: bool) -> Vec<u8> {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    if wide {
        // SETTINGS_INITIAL_WINDOW_SIZE = 2^31 - 1.
        out.extend(frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
        out.extend(frame(0x8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    } else {
        out.extend(frame(0x4, 0, 0, &[]));
    }
    // HPACK: :method GET, :scheme http (static), :path and :authority as
    // literals with indexed names.
    let mut block = vec![0x82, 0x86, 0x44, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x41, 1, b'x']);
    out.extend(frame(0x1, 0x5, 1, &block));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_is_cut_off_after_send_timeout() {
    let backend = Backend::start("be").await;
    let (gw, addr) = start(&backend);
    expect_cut_off_when_not_reading(&gw, &addr, &h2c_request_bytes("/bytes/67108864", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_mid_body_resets_its_http2_stream_after_send_timeout() {
    let upstream = stalling_upstream();
    let (gw, addr) = start_to(&upstream);
    let client = gateway_tests::client::h2c();
    let started = Instant::now();
    let resp = client
        .request(
            http::Request::get(format!("http://{addr}/x"))
                .body(http_body_util::Full::<bytes::Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(
        Duration::from_secs(5),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("the stream ends");
    assert!(body.is_err(), "the stream is reset, not ended as complete");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "cut off after {took:?}"
    );
    let m = gateway_tests::client::raw(
        &gw.admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(m.contains("gateway_response_stalls_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_whose_client_grants_no_window_frees_its_upstream_after_send_timeout() {
    let backend = Backend::start("be").await;
    let (gw, addr) = start(&backend);
    let admin = |path: &str| {
        gateway_tests::client::raw(
            &gw.admin,
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        )
    };
    let in_flight = || {
        let text = admin("/admin/upstreams");
        let body = &text[text.find("\r\n\r\n").map_or(0, |i| i + 4)..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        v["upstreams"][0]["targets"][0]["in_flight"].as_u64()
    };
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&h2c_request_bytes("/bytes/1048576", false))
        .unwrap();
    // The client reads everything the gateway sends, so the socket never
    // fills, but it grants no window beyond the first 64 KiB.
    let mut r = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
    });
    let started = Instant::now();
    while in_flight() != Some(1) && started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(in_flight(), Some(1), "the stream holds its target");
    let m = wait_for_metric(&gw, "gateway_send_timeouts_total 1");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "cut off after {took:?}");
    assert_eq!(in_flight(), Some(0), "the upstream side is freed");
    assert!(
        m.contains("gateway_active_connections{listener=\"main\"} 1"),
        "the connection stays: {m}"
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_announce_the_listeners_stream_limit() {
    let backend = Backend::start("be").await;
    let (_gw, addr) = start_with(
        &backend.addr.to_string(),
        "http2_max_concurrent_streams = 7",
    );
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&h2c_request_bytes("/x", false)).unwrap();
    // The server's first frame is its SETTINGS.
    let mut head = [0u8; 9];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[3], 0x4, "SETTINGS first: {head:?}");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    let max_streams = payload
        .chunks(6)
        .find(|p| p[..2] == [0, 3])
        .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
    assert_eq!(max_streams, Some(7), "{payload:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closes_after_max_requests_per_connection() {
    let backend = Backend::start("be").await;
    let (_gw, addr) = start_with(&backend.addr.to_string(), "max_requests_per_connection = 2");
    // HTTP/1.1: the second answer says close, and the connection ends.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (resp, took) = read_all(&mut s, Duration::from_secs(5));
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
    assert_eq!(resp.matches("connection: close").count(), 1, "{resp}");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");

    // HTTP/2: GOAWAY after the second stream; the client's connection ends.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    for path in ["/a", "/b"] {
        let resp = send
            .send_request(
                http::Request::get(format!("http://x{path}"))
                    .body(http_body_util::Full::<bytes::Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("the gateway ends the connection")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_answers_no_ping_is_closed_after_the_keepalive_timeout() {
    let backend = Backend::start("be").await;
    let (_gw, addr) = start_with(
        &backend.addr.to_string(),
        "http2_keepalive_interval = \"300ms\"\nhttp2_keepalive_timeout = \"300ms\"",
    );
    let mut s = TcpStream::connect(&addr).unwrap();
    // A stream in flight for 3 s (so the idle timeout does not apply); the
    // client reads but never answers the gateway's PING.
    s.write_all(&h2c_request_bytes("/delay/3000", false))
        .unwrap();
    let started = Instant::now();
    let (_, took) = read_all(&mut s, Duration::from_secs(6));
    let took = took.max(started.elapsed());
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(2500),
        "closed after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_client_that_never_finishes_the_close_is_cut_off() {
    let backend = Backend::start("be").await;
    let (_gw, addr) = start(&backend);
    let mut s = TcpStream::connect(&addr).unwrap();
    // Preface and SETTINGS, one request, then nothing: the client reads
    // but never answers the PING of hyper's graceful close.
    s.write_all(&h2c_request_bytes("/x", false)).unwrap();
    let started = Instant::now();
    let (_, took) = read_all(&mut s, Duration::from_secs(8));
    let took = took.max(started.elapsed());
    // idle_timeout (1 s), then at most idle_timeout more.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(3500),
        "closed after {took:?}"
    );
}

/// Connections of the idle-memory test, opened one after another (the
/// gateway's memory grows in 2 MiB huge pages: thousands keep the
/// rounding small).
const IDLE_CONNECTIONS: usize = 2000;

/// Anonymous resident memory a waiting keep-alive connection may cost the
/// gateway. Measured: about 15 KiB (debug and release builds alike); 24
/// KiB before read buffers were let go between requests and connection
/// stages boxed, 17 KiB before `upstream::uploading` stopped holding the
/// exchange twice.
const IDLE_CONNECTION_BYTES: usize = 20 * 1024;

/// Sends one request on a new connection, reads the whole answer and
/// leaves the connection open.
fn served_connection(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /idle HTTP/1.1\r\nHost: idle\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        assert!(text.starts_with("http/1.1 200"), "{text}");
        let length: usize = text[..end]
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        if got.len() >= end + 4 + length {
            return s;
        }
    }
}

fn rss_anon_kib(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("RssAnon")
}

/// A keep-alive connection waiting for its next request holds no read
/// buffer and no request state: many of them, each served once and left
/// open, grow the gateway's memory by a few KiB each. One at a time, so
/// that what a request needs while it runs counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hold_no_buffers() {
    let backend = Backend::start("be").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
[server]
workers = 1
watch_config = false
[admin]
listen = "{admin}"
[access_log]
enabled = false
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
idle_timeout = "60s"
[[upstreams]]
name = "be"
targets = ["{b}"]
[[routes]]
name = "all"
upstream = "be"
"#,
        b = backend.addr
    );
    let gw = Gateway::start(&config, &admin);
    let pid = gw.child.id();
    let addr = format!("127.0.0.1:{port}");
    let per_connection = tokio::task::spawn_blocking(move || {
        // Whatever the first requests make once (pools, caches) first.
        let _warm: Vec<TcpStream> = (0..8).map(|_| served_connection(&addr)).collect();
        let before = rss_anon_kib(pid);
        let held: Vec<TcpStream> = (0..IDLE_CONNECTIONS)
            .map(|_| served_connection(&addr))
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let after = rss_anon_kib(pid);
        drop(held);
        after.saturating_sub(before) * 1024 / IDLE_CONNECTIONS
    })
    .await
    .unwrap();
    eprintln!("{per_connection} bytes of memory per idle keep-alive connection");
    assert!(
        per_connection < IDLE_CONNECTION_BYTES,
        "{per_connection} bytes of memory per idle keep-alive connection"
    );
}
