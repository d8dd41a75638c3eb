//! Proxying through the real gateway binary: forwarding headers, request ids,
//! HTTP/2 both sides, direct responses, streaming, and every error status the
//! gateway generates itself (problem+json).

use std::time::Duration;

use bytes::Bytes;
use gateway_tests::backend::Backend;
use gateway_tests::client::{self, Reply};
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use http::Request;
use http_body_util::Full;

struct Env {
    gw: Gateway,
    base: String,
    listen: String,
}

/// A gateway with routes to backend `b` (h1), `b2` (h2c), an unreachable
/// upstream, a slow route with a short timeout, a route that edits response
/// headers, and a direct response.
fn start(b: &Backend, b2: &Backend, extra: &str) -> Env {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let dead = free_port();
    let config = format!(
        r#"
[server]
workers = 2
watch_config = false
[admin]
listen = "{admin}"
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
max_body_bytes = "64KiB"
max_header_bytes = "8KiB"
max_headers = 40
[[upstreams]]
name = "one"
targets = ["{b}"]
[[upstreams]]
name = "h2"
targets = ["{b2}"]
protocol = "http2"
[[upstreams]]
name = "dead"
targets = ["127.0.0.1:{dead}"]
connect_timeout = "1s"
[[routes]]
name = "direct"
[routes.match]
hosts = ["127.0.0.1", "x"]
path = "/direct"
[routes.respond]
status = 201
body = "made here"
[[routes]]
name = "h2"
upstream = "h2"
strip_prefix = "/h2"
[routes.match]
hosts = ["127.0.0.1", "x"]
path_prefix = "/h2/"
[[routes]]
name = "dead"
upstream = "dead"
[routes.match]
hosts = ["127.0.0.1", "x"]
path_prefix = "/dead/"
[[routes]]
name = "slow"
upstream = "one"
timeout = "300ms"
[routes.match]
hosts = ["127.0.0.1", "x"]
path_prefix = "/delay/"
[[routes]]
name = "small"
upstream = "one"
max_body_bytes = 10
[routes.match]
hosts = ["127.0.0.1", "x"]
path_prefix = "/small/"
[[routes]]
name = "getonly"
upstream = "one"
[routes.match]
hosts = ["127.0.0.1", "x"]
path_prefix = "/getonly/"
methods = ["GET"]
[[routes]]
name = "edits"
upstream = "one"
[routes.match]
hosts = ["127.0.0.1", "x"]
path_prefix = "/edits/"
[routes.response_headers]
remove = ["x-backend-secret"]
set = {{ "content-type" = "application/vnd.edited+json" }}
add = {{ "x-backend" = "gateway", "x-added" = "a" }}
[[routes]]
name = "all"
upstream = "one"
[routes.match]
hosts = ["127.0.0.1", "x"]
path_prefix = "/"
methods = ["GET", "POST", "HEAD"]
[routes.request_headers]
set = {{ "x-added" = "yes" }}
remove = ["x-drop-me"]
[routes.response_headers]
set = {{ "x-resp" = "1" }}
remove = ["x-backend-secret"]
{extra}
"#,
        b = b.addr,
        b2 = b2.addr,
    );
    let gw = Gateway::start(&config, &admin);
    Env {
        gw,
        base: format!("http://127.0.0.1:{port}"),
        listen: format!("127.0.0.1:{port}"),
    }
}

fn assert_problem(r: &Reply, status: u16) -> serde_json::Value {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let p = r.json();
    assert_eq!(p["status"], status);
    assert!(p["type"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(p["detail"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(
        p["request_id"].as_str(),
        r.header("x-request-id"),
        "problem carries the request id"
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_with_standard_headers() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    let req = Request::get(format!("{}/echo?q=1", env.base))
        .header("x-forwarded-for", "192.0.2.9")
        .header("x-drop-me", "1")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .body(Full::default())
        .unwrap();
    let r = client::send(&client::http1(), req).await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    let h = &echo["headers"];
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(h["x-forwarded-for"], "192.0.2.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], env.listen.as_str());
    assert_eq!(h["via"], "1.1 gateway");
    assert_eq!(h["x-added"], "yes");
    assert!(h.get("x-drop-me").is_none());
    assert!(
        h.get("x-hop").is_none(),
        "headers named in Connection are hop-by-hop"
    );
    assert!(h.get("connection").is_none(), "Connection is hop-by-hop");
    let rid = r
        .header("x-request-id")
        .expect("request id on the response");
    assert_eq!(rid.len(), 32);
    assert_eq!(
        h["x-request-id"], rid,
        "the upstream sees the same request id"
    );
    assert_eq!(r.header("x-resp"), Some("1"));
    assert_eq!(
        r.header("x-backend-secret"),
        None,
        "removed by the route's response_headers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_header_edits_remove_set_and_add() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    // What the backend sends, unedited.
    let direct = client::get(&format!("http://{}/edits/x", b.addr)).await;
    assert_eq!(direct.header("x-backend-secret"), Some("hunter2"));
    assert_eq!(direct.header("content-type"), Some("application/json"));
    assert_eq!(direct.header("x-backend"), Some("one"));

    for c in [client::http1(), client::h2c()] {
        let r = client::send(
            &c,
            Request::get(format!("{}/edits/x", env.base))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["path"], "/edits/x");
        // remove: gone.
        assert!(
            r.headers.get("x-backend-secret").is_none(),
            "{:?}",
            r.headers
        );
        // set: the backend's value replaced, not joined.
        let ct: Vec<_> = r.headers.get_all("content-type").iter().collect();
        assert_eq!(ct, ["application/vnd.edited+json"], "{:?}", r.headers);
        // add: appended after the backend's value; a new header too.
        let tags: Vec<_> = r.headers.get_all("x-backend").iter().collect();
        assert_eq!(tags, ["one", "gateway"], "{:?}", r.headers);
        assert_eq!(r.header("x-added"), Some("a"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_a_client_request_id_and_logs_it() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    let req = Request::get(format!("{}/x", env.base))
        .header("x-request-id", "client-id-42")
        .header("user-agent", "probe/1")
        .body(Full::default())
        .unwrap();
    let r = client::send(&client::http1(), req).await;
    assert_eq!(r.header("x-request-id"), Some("client-id-42"));
    assert_eq!(r.json()["headers"]["x-request-id"], "client-id-42");
    // The access log line is written asynchronously.
    let v = env.gw.access_log_line("client-id-42");
    assert_eq!(v["http.request.method"], "GET");
    assert_eq!(v["url.path"], "/x");
    assert_eq!(v["http.response.status_code"], 200);
    assert_eq!(v["client.ip"], "127.0.0.1");
    assert!(v.get("source.ip").is_none(), "the client is the peer: {v}");
    assert_eq!(v["user_agent.original"], "probe/1");
    assert_eq!(v["trace.id"], "client-id-42");
    assert_eq!(v["gateway.route"], "all");
    assert_eq!(v["gateway.upstream"], "one");
    assert!(v["event.duration"].as_u64().is_some_and(|d| d > 0));
    assert!(v["@timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_on_both_sides() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    // h2c client -> gateway -> h1 upstream.
    let r = client::send(
        &client::h2c(),
        Request::get(format!("{}/a", env.base))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "HTTP/1.1");
    assert_eq!(
        r.json()["headers"]["host"],
        env.listen.as_str(),
        "h2 :authority becomes Host upstream"
    );
    // h1 client -> gateway -> h2 upstream: the request's host is the
    // `:authority` (not the target's address), with no second `Host`.
    let r = client::raw(
        &env.listen,
        "GET /h2/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let echo: serde_json::Value =
        serde_json::from_str(r.split_once("\r\n\r\n").map_or("", |(_, b)| b)).unwrap();
    assert_eq!(echo["version"], "HTTP/2.0", "{r}");
    assert_eq!(echo["path"], "/b");
    assert_eq!(echo["authority"], "x", "{echo}");
    assert!(echo["headers"].get("host").is_none(), "{echo}");
    // h2c both ways.
    let r = client::send(
        &client::h2c(),
        Request::get(format!("{}/h2/c", env.base))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.json()["version"], "HTTP/2.0");

    // An HTTP/2 client may send one `cookie` field per pair; an HTTP/1.1
    // upstream gets them joined into one (RFC 9113 §8.2.3), an HTTP/2 one
    // gets them as they came.
    for (path, want) in [("/a", "a=1; b=2"), ("/h2/a", "b=2")] {
        let req = Request::get(format!("{}{path}", env.base))
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .unwrap();
        let (status, body) = client::h2_raw(&env.listen, req, b"").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        // (The echo keeps the last of several fields.)
        assert_eq!(echo["headers"]["cookie"], want, "{path}: {echo}");
    }
    // `te: trailers` (gRPC's) goes on to an HTTP/2 upstream, not to an
    // HTTP/1.1 one (hop-by-hop there).
    for (path, want) in [("/h2/te", Some("trailers")), ("/te", None)] {
        let req = Request::get(format!("{}{path}", env.base))
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (_, body) = client::h2_raw(&env.listen, req, b"").await.unwrap();
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["headers"]["te"].as_str(), want, "{path}: {echo}");
    }
    // Requests for different hosts share the target's HTTP/2 connection
    // (one per worker; this gateway has two): clients choosing hosts
    // cannot make the gateway open more.
    assert!(b2.connections() <= 2, "{}", b2.connections());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_that_went_away_is_dialed_again() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    assert_eq!(client::get(&format!("{}/h2/a", env.base)).await.status, 200);
    // Its connection closed and nothing listening: 502.
    let addr = b2.kill().await;
    assert_eq!(client::get(&format!("{}/h2/b", env.base)).await.status, 502);
    // Back on the same address: the next request dials it again.
    let b2 = Backend::start_at(addr, "two").await;
    let r = client::get(&format!("{}/h2/c", env.base)).await;
    assert_eq!(r.status, 200, "{}", env.gw.stderr());
    assert_eq!(r.json()["version"], "HTTP/2.0");
    assert_eq!(b2.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_a_failed_http2_dial_fail_with_it() {
    // A target that drops SYNs: the first request's dial times out; those
    // that waited for it fail with it, not after a dial each in turn.
    let hole = gateway_tests::backend::Blackhole::start();
    let (gw, port) = h2_gateway(
        hole.addr,
        "connect_timeout = \"700ms\"\nretry = { max_retries = 0 }",
    );
    let url = format!("http://127.0.0.1:{port}/x");
    let started = std::time::Instant::now();
    let answers = statuses_of(
        (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { client::get(&url).await.status })
            })
            .collect(),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(answers, [502; 4], "{}", gw.stderr());
    assert!(
        took < Duration::from_millis(2_000),
        "{took:?} (4 dials in turn: 2.8 s)"
    );
}

/// The statuses the tasks' requests got, in order.
async fn statuses_of(tasks: Vec<tokio::task::JoinHandle<http::StatusCode>>) -> Vec<u16> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task").as_u16());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_upstream_connection_is_let_go() {
    // One connection while requests keep coming, whatever hosts they name;
    // after `pool_idle_timeout` without one, a new one (a middlebox may
    // have dropped the old).
    let b2 = Backend::start("two").await;
    let (gw, port) = h2_gateway(b2.addr, "pool_idle_timeout = \"1s\"");
    let listen = format!("127.0.0.1:{port}");
    for host in ["a.example", "b.example", "c.example:8443"] {
        let head = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let listen = listen.clone();
        let r = tokio::task::spawn_blocking(move || client::raw(&listen, &head))
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}\n{}", gw.stderr());
        assert!(r.contains(&format!("\"authority\":\"{host}\"")), "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b2.connections(), 1);
    let url = format!("http://{listen}/x");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(client::get(&url).await.status, 200);
    assert_eq!(b2.connections(), 2);
}

/// An HTTP/2 backend that hangs once it has a request: the handshake
/// done, its connection is never polled again, so it answers neither the
/// request nor PINGs (a frozen process, or a host gone behind a live
/// middlebox). Returns its address and the count of connections accepted.
async fn hung_http2_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let first = conn.accept().await;
                std::future::pending::<()>().await;
                drop((conn, first));
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_that_stops_answering_pings_is_let_go() {
    // With keep-alive PINGs, a request on a hung connection fails when its
    // PING goes unanswered (well before the 10 s timeout), and the next
    // request dials a new connection.
    let (backend, accepted) = hung_http2_backend().await;
    let (gw, port) = h2_gateway(
        backend,
        "timeout = \"10s\"\nretry = { max_retries = 0 }\nhttp2_keepalive_interval = \"300ms\"\nhttp2_keepalive_timeout = \"300ms\"",
    );
    let url = format!("http://127.0.0.1:{port}/x");
    let started = std::time::Instant::now();
    let r = client::get(&url).await;
    let took = started.elapsed();
    assert_eq!(r.status, 502, "{}", gw.stderr());
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    let r = client::get(&url).await;
    assert_eq!(r.status, 502);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Without PINGs the same request waits for the upstream timeout.
    let (backend, _) = hung_http2_backend().await;
    let (gw, port) = h2_gateway(backend, "timeout = \"1500ms\"\nretry = { max_retries = 0 }");
    let started = std::time::Instant::now();
    let r = client::get(&format!("http://127.0.0.1:{port}/x")).await;
    assert_eq!(r.status, 504, "{}", gw.stderr());
    assert!(started.elapsed() >= Duration::from_millis(1400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_beyond_a_connections_limit_go_on_another_connection() {
    // A backend that allows 2 streams per connection and answers each after
    // 700 ms. Six requests at once: with at most 2 streams per connection
    // the gateway dials 3 connections and all answer together, instead of
    // queueing in waves behind the backend's limit (2.1 s on one
    // connection).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .max_concurrent_streams(2)
                    .handshake::<_, Bytes>(tcp)
                    .await
                else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                        let resp = http::Response::builder()
                            .status(200)
                            .body(())
                            .expect("response");
                        let _ = respond.send_response(resp, true);
                    });
                }
            });
        }
    });
    let (gw, port) = h2_gateway(
        backend,
        "http2_max_concurrent_streams = 2\nretry = { max_retries = 0 }",
    );
    let url = format!("http://127.0.0.1:{port}/x");
    let wave = |n: usize| {
        (0..n)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { client::get(&url).await.status })
            })
            .collect::<Vec<_>>()
    };
    let started = std::time::Instant::now();
    let answers = statuses_of(wave(6)).await;
    let took = started.elapsed();
    assert_eq!(answers, [200; 6], "{}", gw.stderr());
    assert!(took < Duration::from_millis(1_300), "took {took:?}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    // Their streams done, the same connections take the next requests.
    assert_eq!(statuses_of(wave(4)).await, [200; 4]);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_whose_client_left_gives_its_place_back() {
    // One stream per connection. The first response never ends; its client
    // leaves after the head. Its stream's place is given back with the
    // response body, so the next request goes on the same connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let endless = req.uri().path() == "/endless";
                    let resp = http::Response::builder()
                        .status(200)
                        .body(())
                        .expect("response");
                    let Ok(mut body) = respond.send_response(resp, false) else {
                        continue;
                    };
                    let _ = body.send_data(Bytes::from_static(b"first"), !endless);
                    if endless {
                        // Held open until the gateway resets the stream.
                        tokio::spawn(async move {
                            let _ = std::future::poll_fn(|cx| body.poll_reset(cx)).await;
                        });
                    }
                }
            });
        }
    });
    let (gw, port) = h2_gateway(
        backend,
        "http2_max_concurrent_streams = 1\nretry = { max_retries = 0 }",
    );
    let listen = format!("127.0.0.1:{port}");
    let head = tokio::task::spawn_blocking({
        let listen = listen.clone();
        move || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect(&listen).expect("connect");
            s.write_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).expect("read");
            String::from_utf8_lossy(&buf[..n]).into_owned()
            // The client leaves here, mid-body.
        }
    })
    .await
    .expect("client");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{}", gw.stderr());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client::get(&format!("http://{listen}/next")).await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_response() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    let r = client::get(&format!("{}/direct", env.base)).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "made here");
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_bodies_both_ways() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    let big = 5 * 1024 * 1024;
    let r = client::get(&format!("{}/bytes/{big}", env.base)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big);
    let body = Bytes::from(vec![b'y'; 60 * 1024]);
    let r = client::send(
        &client::http1(),
        Request::post(format!("{}/upload", env.base))
            .body(Full::new(body))
            .unwrap(),
    )
    .await;
    assert_eq!(r.json()["body_len"], 60 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_are_problem_json() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    let c = client::http1();

    // 404: no route for this host.
    let r = client::send(
        &c,
        Request::get(format!("{}/x", env.base))
            .header("host", "nowhere.example")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    let p = assert_problem(&r, 404);
    assert!(p["detail"].as_str().unwrap().contains("/x"), "{p}");

    // 405 with Allow: routes match the path, none the method.
    let r = client::send(
        &c,
        Request::delete(format!("{}/getonly/x", env.base))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_problem(&r, 405);
    let allow = r.header("allow").unwrap_or_default().to_string();
    assert!(
        allow.contains("GET") && !allow.contains("DELETE"),
        "{allow}"
    );

    // 502: nothing listens on the upstream's port.
    let r = client::get(&format!("{}/dead/x", env.base)).await;
    let p = assert_problem(&r, 502);
    assert!(p["detail"].as_str().unwrap().contains("dead"), "{p}");

    // 504: the upstream answers after the route's 300 ms timeout.
    let t = std::time::Instant::now();
    let r = client::get(&format!("{}/delay/2000", env.base)).await;
    assert_problem(&r, 504);
    assert!(t.elapsed() < Duration::from_millis(1500));

    // 413: declared length over the route's limit, and streamed over the listener's.
    let r = client::send(
        &c,
        Request::post(format!("{}/small/x", env.base))
            .body(Full::new(Bytes::from_static(b"more than ten bytes")))
            .unwrap(),
    )
    .await;
    assert_problem(&r, 413);
    let r = client::send(
        &c,
        Request::post(format!("{}/big", env.base))
            .body(Full::new(Bytes::from(vec![0u8; 100 * 1024])))
            .unwrap(),
    )
    .await;
    assert_problem(&r, 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_body_over_limit_is_413_to_either_upstream_protocol() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    // Chunked, so the limit is only discovered while streaming: the
    // route's (10 bytes) to an HTTP/1.1 upstream, the listener's (64 KiB)
    // to an HTTP/2 one, whose client only says it reset the stream.
    let chunk = "a".repeat(8000);
    for (path, chunks) in [("/small/x", 3), ("/h2/x", 10)] {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        for _ in 0..chunks {
            req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        req.push_str("0\r\n\r\n");
        let resp = client::raw(&env.listen, &req);
        assert!(resp.starts_with("HTTP/1.1 413"), "{path}: {resp}");
    }
    // Neither counts against the upstreams.
    let m = client::get(&format!("http://{}/metrics", env.gw.admin))
        .await
        .text();
    assert!(!m.contains("gateway_upstream_errors_total"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    // Too large (limit 8 KiB).
    let big = "v".repeat(9000);
    let resp = client::raw(
        &env.listen,
        &format!("GET /x HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
    );
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert!(resp.contains("application/problem+json"), "{resp}");
    // Too many (limit 40).
    let many: String = (0..50).map(|i| format!("X-H{i}: 1\r\n")).collect();
    let resp = client::raw(
        &env.listen,
        &format!("GET /x HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
    );
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert!(resp.contains("application/problem+json"), "{resp}");
    // Far too large: refused by the HTTP parser itself, still 431.
    let huge = "v".repeat(40_000);
    let resp = client::raw(
        &env.listen,
        &format!("GET /x HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n"),
    );
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_target_authority_is_the_one_host() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    // Routed by the target's authority, forwarded with it: the Host the
    // client also sent is ignored (RFC 9112 §3.2.2).
    let resp = client::raw(
        &env.listen,
        "GET http://x/abs HTTP/1.1\r\nHost: private.example\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body = &resp[resp.find("\r\n\r\n").expect("head end") + 4..];
    let v: serde_json::Value = serde_json::from_str(body).expect("json");
    assert_eq!(v["headers"]["host"], "x", "{v}");
    assert_eq!(v["headers"]["x-forwarded-host"], "x", "{v}");
    assert_eq!(v["path"], "/abs");
    // An authority no route serves is not rescued by a Host that one does.
    let resp = client::raw(
        &env.listen,
        "GET http://private.example/abs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    assert_eq!(b.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_rejected_and_closed() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    let attempts = [
        // CL.TE
        "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        // TE.CL with an obfuscated Transfer-Encoding
        "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
        // Conflicting Content-Length values
        "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        // Unsupported transfer coding
        "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        // A Content-Length that is not a number
        "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nabcde",
        // Two hosts (routing and the upstream could read different ones)
        "GET /x HTTP/1.1\r\nHost: x\r\nHost: private.example\r\n\r\n",
        // HTTP/1.1 without a host
        "GET /x HTTP/1.1\r\nAccept: */*\r\n\r\n",
        // User information in the request target
        "GET http://u:p@x/x HTTP/1.1\r\nHost: x\r\n\r\n",
        // A method no route names as such, which an upstream may read as POST
        "post /x HTTP/1.1\r\nHost: x\r\n\r\n",
        // A Host that is no host (an upstream may read "x" or nothing)
        "GET /x HTTP/1.1\r\nHost: x y\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: u@x\r\n\r\n",
    ];
    for a in attempts {
        // A second request follows on the same connection; it must not be served.
        let resp = client::raw(
            &env.listen,
            &format!("{a}GET /second HTTP/1.1\r\nHost: x\r\n\r\n"),
        );
        assert!(resp.starts_with("HTTP/1.1 400"), "{a:?} -> {resp}");
        assert_eq!(
            resp.matches("HTTP/1.1").count(),
            1,
            "connection closed after the 400: {resp}"
        );
        assert!(resp.contains("application/problem+json"), "{a:?} -> {resp}");
        assert!(resp.contains("\"status\":400"), "{a:?} -> {resp}");
    }
    assert_eq!(b.hits(), 0, "nothing reached the backend");

    // Pipelined behind good requests (in the same write): those are
    // answered, the attempt gets its 400, and nothing after it is served.
    for first in [
        "GET /one HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        "POST /one HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let resp = client::raw(
            &env.listen,
            &format!(
                "{first}{}GET /second HTTP/1.1\r\nHost: x\r\n\r\n",
                attempts[0]
            ),
        );
        let statuses: Vec<&str> = resp.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
        assert_eq!(statuses, ["200", "400"], "{first:?} -> {resp}");
        assert!(
            resp.contains("both Content-Length and Transfer-Encoding"),
            "{resp}"
        );
    }
    assert_eq!(b.hits(), 3, "only the good requests reached the backend");
    let m = client::get(&format!("http://{}/metrics", env.gw.admin))
        .await
        .text();
    assert!(m.contains("gateway_smuggling_rejected_total 8"), "{m}");
}

/// The value of the metric line that starts with `series` (name and
/// labels), if /metrics has one.
async fn metric(env: &Env, series: &str) -> Option<f64> {
    let text = client::get(&format!("http://{}/metrics", env.gw.admin))
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_counts_upstream_errors() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");
    let series = r#"gateway_upstream_errors_total{upstream="dead",kind="upstream_connect"}"#;
    assert_eq!(metric(&env, series).await, None, "nothing failed yet");
    for _ in 0..3 {
        // Connection refused (nothing listens), retried once, then 502.
        let r = client::get(&format!("{}/dead/x", env.base)).await;
        assert_problem(&r, 502);
    }
    // Counted once per request (not per try), before the answer is sent.
    assert_eq!(metric(&env, series).await, Some(3.0));
    // Answers from a reachable upstream count nothing, even a 404.
    assert_eq!(
        client::get(&format!("{}/status/404", env.base))
            .await
            .status,
        404
    );
    let m = client::get(&format!("http://{}/metrics", env.gw.admin))
        .await
        .text();
    let errors: Vec<_> = m
        .lines()
        .filter(|l| l.starts_with("gateway_upstream_errors_total{"))
        .collect();
    assert_eq!(errors, [format!("{series} 3")], "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_is_502_and_the_upstream_timeout_504() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    // Connects to it never complete.
    let hole = gateway_tests::backend::Blackhole::start();
    let env = start(
        &b,
        &b2,
        &format!(
            r#"
[[upstreams]]
name = "hole"
targets = ["{hole}"]
connect_timeout = "400ms"
timeout = "5s"
[upstreams.retry]
max_retries = 0
[[routes]]
name = "hole"
upstream = "hole"
[routes.match]
hosts = ["127.0.0.1", "x"]
path_prefix = "/hole/"
[[routes]]
name = "hole-short"
upstream = "hole"
timeout = "150ms"
[routes.match]
hosts = ["127.0.0.1", "x"]
path_prefix = "/hole-short/"
"#,
            hole = hole.addr
        ),
    );

    // The connect hangs: 502 once connect_timeout expires, not before (a
    // refused connect would answer at once) and long before `timeout`.
    let t = std::time::Instant::now();
    let r = client::get(&format!("{}/hole/x", env.base)).await;
    let took = t.elapsed();
    let p = assert_problem(&r, 502);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("cannot connect to upstream \"hole\""),
        "{p}"
    );
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_millis(1500),
        "502 after {took:?}, connect_timeout is 400ms"
    );

    // A route timeout shorter than the connect timeout ends it first: 504.
    let t = std::time::Instant::now();
    let r = client::get(&format!("{}/hole-short/x", env.base)).await;
    let took = t.elapsed();
    let p = assert_problem(&r, 504);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("did not answer within"),
        "{p}"
    );
    assert!(
        took >= Duration::from_millis(120) && took < Duration::from_millis(1000),
        "504 after {took:?}, the route's timeout is 150ms"
    );

    for (kind, n) in [("upstream_connect", 1.0), ("upstream_timeout", 1.0)] {
        let series = format!(r#"gateway_upstream_errors_total{{upstream="hole",kind="{kind}"}}"#);
        assert_eq!(metric(&env, &series).await, Some(n), "{series}");
    }
}

/// Timeouts on a kept upstream connection: each exchange ends by its own
/// route's deadline, whatever the connection's earlier exchanges had (the
/// connection keeps one timer for its life).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_exchange_on_a_kept_connection_has_its_own_deadline() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    // /long/... and /short/... both reach upstream "one" as /...
    let routes: String = [("long", "5s"), ("short", "300ms")]
        .map(|(name, timeout)| {
            format!(
                "[[routes]]\nname = \"{name}\"\nupstream = \"one\"\ntimeout = \"{timeout}\"\n\
                 strip_prefix = \"/{name}\"\n[routes.match]\nhosts = [\"127.0.0.1\", \"x\"]\n\
                 path_prefix = \"/{name}/\"\n"
            )
        })
        .concat();
    let env = start(&b, &b2, &routes);
    // One client connection, so that the gateway's worker reuses its
    // upstream connection between these requests.
    let c = client::http1();
    let get = |path: &str| {
        let req = Request::get(format!("{}{path}", env.base))
            .body(Full::default())
            .unwrap();
        let c = &c;
        async move {
            let t = std::time::Instant::now();
            let r = client::send(c, req).await;
            (r, t.elapsed())
        }
    };
    // A short deadline after a long one: 504 by the short one.
    let (r, _) = get("/long/delay/10").await;
    assert_eq!(r.status, 200);
    let (r, took) = get("/short/delay/3000").await;
    assert_problem(&r, 504);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(2000),
        "504 after {took:?}, the route's timeout is 300ms"
    );
    // A long deadline after a short one: the answer after the short
    // deadline would have passed still comes through.
    let (r, _) = get("/short/delay/10").await;
    assert_eq!(r.status, 200);
    let (r, took) = get("/long/delay/700").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(took >= Duration::from_millis(650), "{took:?}");
    // And once more short: its deadline is its own, not the long one's.
    let (r, took) = get("/short/delay/3000").await;
    assert_problem(&r, 504);
    assert!(took < Duration::from_millis(2000), "504 after {took:?}");
}

/// Waits (up to 5 s) until `path` holds at least `n` lines; returns them.
async fn log_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} has {} lines, want {n}:\n{text}",
            path.display(),
            text.lines().count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_to_a_file_has_one_line_per_request() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    // A relative path: next to the config file.
    let mut env = start(&b, &b2, "[access_log]\npath = \"access.log\"\n");
    let log = env.gw.dir.path().join("access.log");
    let c = client::http1();
    let send = |method: &str, target: &str, host: Option<&str>, id: &str| {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{target}", env.base))
            .header("x-request-id", id)
            .header("user-agent", "log-probe/1");
        if let Some(h) = host {
            req = req.header("host", h);
        }
        client::send(&c, req.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
    };
    // (request id, method, path, query, status, route, upstream, error)
    let want = [
        (
            "log-1",
            "GET",
            "/a",
            Some("x=1"),
            200,
            Some("all"),
            Some("one"),
            None,
        ),
        (
            "log-2",
            "POST",
            "/b",
            None,
            200,
            Some("all"),
            Some("one"),
            None,
        ),
        (
            "log-3",
            "GET",
            "/status/404",
            None,
            404,
            Some("all"),
            Some("one"),
            None,
        ),
        (
            "log-4",
            "GET",
            "/dead/x",
            None,
            502,
            Some("dead"),
            Some("dead"),
            Some("upstream_connect"),
        ),
        (
            "log-5",
            "GET",
            "/direct",
            None,
            201,
            Some("direct"),
            None,
            None,
        ),
        (
            "log-6",
            "DELETE",
            "/x",
            None,
            404,
            None,
            None,
            Some("no_route"),
        ),
    ];
    for (id, method, path, query, status, ..) in want {
        let target = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let host = (id == "log-6").then_some("nowhere.example");
        let r = send(method, &target, host, id).await;
        assert_eq!(r.status, status, "{id}: {}", r.text());
    }

    let lines = log_lines(&log, want.len()).await;
    assert_eq!(lines.len(), want.len(), "one line per request: {lines:#?}");
    for (line, (id, method, path, query, status, route, upstream, error)) in lines.iter().zip(want)
    {
        // In request order: each was answered before the next was sent.
        assert_eq!(line["trace.id"], id, "{line}");
        assert_eq!(line["http.request.id"], id, "{line}");
        assert_eq!(line["http.request.method"], method, "{line}");
        assert_eq!(line["url.path"], path, "{line}");
        assert_eq!(line["url.query"].as_str(), query, "{line}");
        assert_eq!(line["http.response.status_code"], status, "{line}");
        assert_eq!(line["http.version"], "1.1", "{line}");
        assert_eq!(line["client.ip"], "127.0.0.1", "{line}");
        assert_eq!(line["user_agent.original"], "log-probe/1", "{line}");
        assert_eq!(line["gateway.listener"], "main", "{line}");
        assert_eq!(line["gateway.route"].as_str(), route, "{line}");
        assert_eq!(line["gateway.upstream"].as_str(), upstream, "{line}");
        assert_eq!(line["error.type"].as_str(), error, "{line}");
        assert!(
            line["event.duration"].as_u64().is_some_and(|d| d > 0),
            "{line}"
        );
        assert!(
            line["@timestamp"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
    assert_eq!(env.gw.stdout(), "", "nothing goes to stdout");

    // Stop this gateway; another one appends to the same file (an absolute
    // path this time) and leaves the earlier lines alone.
    env.gw.signal(libc::SIGTERM);
    assert!(
        env.gw
            .wait_exit(Duration::from_secs(5))
            .is_some_and(|s| s.success())
    );
    let env2 = start(
        &b,
        &b2,
        &format!("[access_log]\npath = \"{}\"\n", log.display()),
    );
    let r = client::send(
        &client::http1(),
        Request::get(format!("{}/again", env2.base))
            .header("x-request-id", "log-7")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let after = log_lines(&log, want.len() + 1).await;
    assert_eq!(after.len(), want.len() + 1, "{after:#?}");
    assert_eq!(after[..want.len()], lines[..], "earlier lines kept");
    assert_eq!(after[want.len()]["trace.id"], "log-7");
    assert_eq!(after[want.len()]["url.path"], "/again");
}

/// Reads from `s` until a blank line ends a head; returns it.
fn read_head(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => out.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connection_semantics() {
    use std::io::{Read, Write};
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let env = start(&b, &b2, "");

    // Expect: 100-continue: the interim answer comes before the body is sent.
    let mut s = std::net::TcpStream::connect(&env.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let interim = read_head(&mut s);
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    s.write_all(b"hello").unwrap();
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest.contains("\"body_len\":5"), "{rest}");

    // HTTP/1.0 closes by default and keeps the connection when asked to.
    let one = client::raw(&env.listen, "GET /x HTTP/1.0\r\nHost: x\r\n\r\n");
    assert!(one.starts_with("HTTP/1.0 200"), "{one}");
    assert!(one.contains("\r\nconnection: close\r\n"), "{one}");
    let two = client::raw(
        &env.listen,
        "GET /a HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(two.starts_with("HTTP/1.0 200"), "{two}");
    assert!(two.contains("\r\nconnection: keep-alive\r\n"), "{two}");
    assert!(two.contains("HTTP/1.1 200"), "second request served: {two}");

    // HEAD keeps the upstream's length and sends no body; 204 has neither;
    // the connection goes on after both; every response has a Date.
    let r = client::raw(
        &env.listen,
        "HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /status/204 HTTP/1.1\r\nHost: x\r\n\r\nGET /direct HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let parts: Vec<&str> = r.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(parts.len(), 3, "{r}");
    assert!(parts[0].starts_with("200"), "{r}");
    let len: usize = parts[0]
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(len > 0, "HEAD keeps the length: {r}");
    assert!(
        parts[0].ends_with("\r\n\r\n"),
        "no body after a HEAD head: {r}"
    );
    assert!(parts[1].starts_with("204"), "{r}");
    assert!(!parts[1].contains("content-length"), "{r}");
    assert!(parts[1].ends_with("\r\n\r\n"), "{r}");
    assert!(
        parts[2].starts_with("201") && parts[2].ends_with("made here"),
        "{r}"
    );
    for p in &parts {
        assert!(p.contains("\r\ndate: "), "{p}");
    }

    // A body the gateway did not read (answered without it) closes the
    // connection after the answer: the body is never taken for a head.
    let r = client::raw(
        &env.listen,
        "POST /direct HTTP/1.1\r\nHost: x\r\nContent-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 201"), "{r}");
    assert!(r.contains("\r\nconnection: close\r\n"), "{r}");
    assert_eq!(r.matches("HTTP/1.1").count(), 1, "{r}");

    // A malformed chunked body is the client's error: 400, then closed.
    let r = client::raw(
        &env.listen,
        "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("malformed chunked request body"), "{r}");
    assert_eq!(r.matches("HTTP/1.1").count(), 1, "{r}");
    // So it is when the body is already streaming to an HTTP/2 upstream,
    // whose client only says it reset the stream (not a 502).
    let r = client::raw(
        &env.listen,
        "POST /h2/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("malformed chunked request body"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_fields_with_underscores_are_passed_dropped_or_refused_per_listener() {
    let b = Backend::start("one").await;
    let b2 = Backend::start("two").await;
    let (drop_port, reject_port) = (free_port(), free_port());
    let env = start(
        &b,
        &b2,
        &format!(
            r#"
[[listeners]]
name = "drops"
listen = "127.0.0.1:{drop_port}"
headers_with_underscores = "drop"
[[listeners]]
name = "refuses"
listen = "127.0.0.1:{reject_port}"
headers_with_underscores = "reject"
"#
        ),
    );
    let send = |base: String, h2: bool| async move {
        let req = Request::get(format!("{base}/x"))
            .header("x_consumer", "admin")
            .header("x-plain", "kept")
            .body(Full::default())
            .unwrap();
        let c = if h2 { client::h2c() } else { client::http1() };
        client::send(&c, req).await
    };
    for h2 in [false, true] {
        // Allowed (the default): passed on as sent.
        let r = send(env.base.clone(), h2).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["headers"]["x_consumer"], "admin");

        let r = send(format!("http://127.0.0.1:{drop_port}"), h2).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = &r.json()["headers"];
        assert!(seen.get("x_consumer").is_none(), "dropped: {seen}");
        assert_eq!(seen["x-plain"], "kept");

        let hits = b.hits();
        let r = send(format!("http://127.0.0.1:{reject_port}"), h2).await;
        let p = assert_problem(&r, 400);
        assert!(
            p["detail"].as_str().unwrap().contains("\"x_consumer\""),
            "{p}"
        );
        assert_eq!(b.hits(), hits, "a refused request reaches no upstream");
    }
    let m = client::get(&format!("http://{}/metrics", env.gw.admin))
        .await
        .text();
    assert!(
        m.contains("gateway_headers_with_underscores_total{action=\"dropped\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("gateway_headers_with_underscores_total{action=\"rejected\"} 2"),
        "{m}"
    );
}

/// An HTTP/2 backend answering every request as a gRPC server does: a
/// data frame, then trailers with `grpc-status`.
async fn grpc_like_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let resp = http::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .body(())
                        .expect("response");
                    let Ok(mut body) = respond.send_response(resp, false) else {
                        continue;
                    };
                    let _ = body.send_data(Bytes::from_static(b"\0\0\0\0\x02hi"), false);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    trailers.insert("grpc-message", http::HeaderValue::from_static("ok"));
                    let _ = body.send_trailers(trailers);
                }
            });
        }
    });
    addr
}

/// A gateway with one worker and one HTTP/2 upstream at `backend` (with
/// `settings`, TOML lines of `[[upstreams]]`) for every path.
fn h2_gateway(backend: std::net::SocketAddr, settings: &str) -> (Gateway, u16) {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(
        &format!(
            r#"
[server]
workers = 1
[admin]
listen = "{admin}"
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
[[upstreams]]
name = "h2"
targets = ["{backend}"]
protocol = "http2"
{settings}
[[routes]]
name = "h2"
upstream = "h2"
[routes.match]
path_prefix = "/"
"#
        ),
        &admin,
    );
    (gw, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_unprocessed_is_tried_again_whatever_the_method() {
    // RFC 9113 §8.7: REFUSED_STREAM says the request was not processed
    // (a server draining, or at its stream limit), so even a POST may go
    // again. This backend refuses every other stream.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend = listener.local_addr().expect("addr");
    let streams = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if seen
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                        .is_multiple_of(2)
                    {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let resp = http::Response::builder().status(201).body(()).unwrap();
                    let _ = respond.send_response(resp, true);
                }
            });
        }
    });
    let (gw, port) = h2_gateway(backend, "");
    // (A body the gateway streams cannot be sent twice; this one is empty.)
    let r = client::send(
        &client::http1(),
        Request::post(format!("http://127.0.0.1:{port}/orders"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", gw.stderr());
    assert_eq!(streams.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_that_closes_connections_after_a_few_streams_loses_no_request() {
    // As nginx's `keepalive_requests` does for HTTP/2: GOAWAY after three
    // streams on each connection; the gateway dials again and no request
    // fails.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut served = 0;
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let resp = http::Response::builder().status(200).body(()).unwrap();
                    let _ = respond.send_response(resp, true);
                    served += 1;
                    if served == 3 {
                        conn.graceful_shutdown();
                    }
                }
            });
        }
    });
    // Three streams per connection is far below nginx's 1000: a request
    // may meet two refusals, so retries are not the default's one.
    let (gw, port) = h2_gateway(backend, "retry = { max_retries = 3, budget_percent = 100 }");
    let url = format!("http://127.0.0.1:{port}/x");
    // Three clients at once, so that requests are in flight when a GOAWAY
    // comes.
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for i in 0..10 {
                    let r = client::get(&url).await;
                    if r.status != 200 {
                        failed.push(format!("request {i}: {} {}", r.status, r.text()));
                    }
                }
                failed
            })
        })
        .collect();
    for c in clients {
        let failed = c.await.expect("client");
        assert!(failed.is_empty(), "{failed:?}\n{}", gw.stderr());
    }
    // (A connection may take more than three streams before its GOAWAY
    // arrives.)
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_pass_through_http2_both_sides() {
    let backend = grpc_like_backend().await;
    let (_gw, port) = h2_gateway(backend, "");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::post(format!("http://127.0.0.1:{port}/pkg.Svc/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (answer, mut send) = client.send_request(req, false).unwrap();
    send.send_data(Bytes::from_static(b"\0\0\0\0\0"), true)
        .unwrap();
    let resp = answer.await.expect("answer");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        data.extend_from_slice(&chunk.expect("data"));
    }
    assert_eq!(data, b"\0\0\0\0\x02hi");
    let trailers = body.trailers().await.expect("trailers").expect("some");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
}
