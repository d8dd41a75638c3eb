//! Request smuggling, looked for by difference: streams of pipelined
//! requests, mutated at random (framing fields spliced in, bytes flipped,
//! bodies cut), go through the real gateway to real hyper backends over
//! HTTP/1.1 and HTTP/2. The gateway and a backend must agree on where every
//! request ends: each request a backend serves comes back to the client as
//! an answer of its own, every answer is either a backend's or the
//! gateway's own problem+json, and the gateway keeps serving. The same
//! holds from the other side (mutated answers from an upstream, answers
//! left half read) and across protocols (an HTTP/2 `content-length` that
//! the frames belie, H2.CL, translated to HTTP/1.1, either way); and an
//! HTTP/2 client that opens and cancels streams at once (rapid reset) is
//! cut off before its streams become upstream requests.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use gateway_tests::backend::Backend;
use gateway_tests::client;
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use gateway_tests::mutate::mutate;

/// Pipelined streams to mutate: bodies framed each way, 100-continue,
/// HTTP/1.0, requests hidden in bodies, through both upstream protocols.
/// `s0000` is the stream's tag (its host), numbered before mutation.
const SEEDS: &[&str] = &[
    "POST /a HTTP/1.1\r\nHost: s0000\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: s0000\r\n\r\n",
    "POST /a HTTP/1.1\r\nHost: s0000\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: s0000\r\n\r\n",
    "POST /h2/a HTTP/1.1\r\nHost: s0000\r\nTransfer-Encoding: chunked\r\n\r\n25\r\nGET /hidden HTTP/1.1\r\nHost: s0000\r\n\r\n\r\n0\r\n\r\nGET /h2/b HTTP/1.1\r\nHost: s0000\r\n\r\n",
    "PUT /h2/a HTTP/1.1\r\nHost: s0000\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabcPOST /b HTTP/1.1\r\nHost: s0000\r\nContent-Length: 0\r\n\r\n",
    "GET /a HTTP/1.0\r\nHost: s0000\r\nConnection: keep-alive\r\n\r\nPOST /a HTTP/1.1\r\nHost: s0000\r\nContent-Length: 37\r\n\r\nGET /hidden HTTP/1.1\r\nHost: s0000\r\n\r\n",
];

/// The gateway with one worker, one listener (its address is returned)
/// and `upstreams_and_routes`. Its clients send whole streams and then
/// close their sending side, expecting answers to what they sent, so the
/// listener keeps serving half-closed clients (`ignore_client_abort`; by
/// default such a request is given up, see `client_abort.rs`).
fn gateway(upstreams_and_routes: &str) -> (Gateway, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(
        &format!(
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
listen = "{listen}"
header_read_timeout = "2s"
ignore_client_abort = true
{upstreams_and_routes}"#
        ),
        &admin,
    );
    (gw, listen)
}

/// `gateway` with one upstream at `addr` (with `settings`, TOML lines of
/// `[[upstreams]]`) for every path.
fn gateway_to(addr: impl std::fmt::Display, settings: &str) -> (Gateway, String) {
    gateway(&format!(
        r#"
[[upstreams]]
name = "u"
targets = ["{addr}"]
{settings}
[[routes]]
name = "all"
upstream = "u"
[routes.match]
path_prefix = "/"
"#
    ))
}

/// Occurrences of a header field line starting with `name` (lowercase, as
/// the gateway writes them). A line break inside a JSON body is escaped,
/// so only real field lines count.
fn fields(raw: &str, name: &str) -> usize {
    raw.matches(&format!("\r\n{name}: ")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_request_streams_frame_alike_in_the_gateway_and_the_backends() {
    let h1 = Backend::start("h1").await;
    let h2 = Backend::start("h2").await;
    let (gw, listen) = gateway(&format!(
        r#"
[[upstreams]]
name = "h1"
targets = ["{h1}"]
[[upstreams]]
name = "h2"
targets = ["{h2}"]
protocol = "http2"
[[routes]]
name = "h2"
upstream = "h2"
[routes.match]
path_prefix = "/h2/"
[[routes]]
name = "h1"
upstream = "h1"
[routes.match]
path_prefix = "/"
"#,
        h1 = h1.addr,
        h2 = h2.addr,
    ));
    let mut rng = fastrand::Rng::with_seed(41);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Per stream: its tag, the backends' answers it got, the bytes sent.
    let mut sent = Vec::new();
    let mut answered = 0;
    while sent.len() < 1_000 && Instant::now() < deadline {
        let tag = format!("s{:04}", sent.len() + 1);
        let seed = SEEDS[sent.len() % SEEDS.len()].replace("s0000", &tag);
        let input = mutate(&mut rng, seed.as_bytes());
        let addr = listen.clone();
        let stream = input.clone();
        // The whole stream, then the end of the client's side: what the
        // gateway has not answered by then it answers or refuses.
        let raw = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let _ = s.write_all(&stream);
            let _ = s.shutdown(Shutdown::Write);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .expect("client thread");
        let shown = String::from_utf8_lossy(&input).into_owned();
        let answers = fields(&raw, "x-request-id");
        let from_backends = fields(&raw, "x-backend");
        let from_gateway = raw
            .matches("\r\ncontent-type: application/problem+json\r\n")
            .count();
        answered += answers;
        assert_eq!(
            answers,
            from_backends + from_gateway,
            "an answer neither a backend's nor the gateway's own (a backend \
             read a request the gateway framed differently)\n{shown:?}\n{raw}"
        );
        sent.push((tag, from_backends, shown, raw));
    }
    assert!(
        sent.len() >= 300,
        "only {} streams in the time allowed",
        sent.len()
    );
    assert!(
        answered >= sent.len(),
        "{answered} answers to {} streams",
        sent.len()
    );
    // Requests a stream left behind reach a backend late (its client was
    // answered on a failure first): counted by tag once all are in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut served = std::collections::HashMap::new();
    for host in h1.hosts().into_iter().chain(h2.hosts()) {
        *served.entry(host).or_insert(0) += 1;
    }
    for (tag, from_backends, shown, raw) in &sent {
        let served = served.get(tag).copied().unwrap_or(0);
        // The last request may reach a backend with a body the client then
        // cut short: it has no answer to come back with.
        assert!(
            served <= from_backends + 1,
            "backends served {served} requests of stream {tag}, its client got \
             {from_backends} of their answers: a request hid inside another\n{shown:?}\n{raw}"
        );
    }
    // Still serving.
    let r = client::get(&format!("http://{listen}/a")).await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
}

/// Answers to mutate: framed each way, an interim answer first, and
/// answers whose bodies hold another answer (for `evil`) that a gateway
/// framing them wrong would hand to the next request on the connection.
const ANSWERS: &[&str] = &[
    "HTTP/1.1 200 OK\r\nX-Seq: {seq}\r\nContent-Length: 5\r\n\r\nhello",
    "HTTP/1.1 200 OK\r\nX-Seq: {seq}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-Seq: {seq}\r\n\r\n",
    "HTTP/1.1 200 OK\r\nX-Seq: {seq}\r\nContent-Length: 53\r\n\r\nHTTP/1.1 200 OK\r\nX-Seq: evil\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nX-Seq: {seq}\r\nTransfer-Encoding: chunked\r\n\r\n35\r\nHTTP/1.1 200 OK\r\nX-Seq: evil\r\nContent-Length: 0\r\n\r\n\r\n0\r\n\r\n",
];

/// A request's token: its number and a check on it, so that a mutation
/// cannot turn one request's token into another's.
fn token(n: u64) -> String {
    format!("{n}-{}", n.wrapping_mul(2_654_435_761) % 1_000_000_007)
}

/// Whether `v` is some request's token.
fn is_token(v: &str) -> bool {
    v.split_once('-')
        .and_then(|(n, _)| n.parse().ok())
        .is_some_and(|n| token(n) == v)
}

/// A backend that answers each request with a mutated answer carrying the
/// request's `X-Seq` token (`/big`: a long answer, not mutated, whose body
/// is answers for `evil`), keeps the connection for the next one, and
/// closes it when none comes within 50 ms (which ends answers framed by
/// the close). Returns its address.
async fn hostile_backend() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        let n = match tokio::time::timeout(
                            Duration::from_millis(50),
                            s.read(&mut chunk),
                        )
                        .await
                        {
                            Ok(Ok(n)) if n > 0 => n,
                            _ => return,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end);
                    let seq = head
                        .split("\r\nx-seq: ")
                        .nth(1)
                        .and_then(|v| v.split("\r\n").next())
                        .unwrap_or("")
                        .to_string();
                    let n: u64 = seq
                        .split('-')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let answer = if head.starts_with("get /big ") {
                        // Far more than the client will read or the
                        // sockets hold, made of answers for `evil`, each
                        // after a run of empty lines: read from almost
                        // anywhere in it, the rest is such an answer.
                        let evil = "HTTP/1.1 200 OK\r\nX-Seq: evil\r\nContent-Length: 0\r\n\r\n";
                        let body = format!("{}{evil}", "\n".repeat(4_000)).repeat(5_000);
                        format!(
                            "HTTP/1.1 200 OK\r\nX-Seq: {seq}\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes()
                    } else {
                        let mut rng = fastrand::Rng::with_seed(n);
                        let answer = ANSWERS[n as usize % ANSWERS.len()].replace("{seq}", &seq);
                        mutate(&mut rng, answer.as_bytes())
                    };
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_upstream_answers_never_reach_another_request() {
    let backend = hostile_backend().await;
    let (gw, listen) = gateway_to(backend, "timeout = \"2s\"");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut sent, mut own) = (0u64, 0);
    while sent < 400 && Instant::now() < deadline {
        sent += 1;
        let mine = token(sent);
        if sent % 10 == 0 {
            // A client that reads the start of a long answer and goes away:
            // the rest must not stay on a pooled connection for the next
            // request to read as its answer.
            let request = format!("GET /big HTTP/1.1\r\nHost: x\r\nX-Seq: {mine}\r\n\r\n");
            let listen = listen.clone();
            tokio::task::spawn_blocking(move || {
                let mut s = TcpStream::connect(&listen).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("read timeout");
                let _ = s.write_all(request.as_bytes());
                let mut start = [0u8; 4096];
                let _ = s.read(&mut start);
            })
            .await
            .expect("client thread");
            continue;
        }
        let request =
            format!("GET /r HTTP/1.1\r\nHost: x\r\nX-Seq: {mine}\r\nConnection: close\r\n\r\n");
        let raw = tokio::task::spawn_blocking({
            let listen = listen.clone();
            move || client::raw(&listen, &request)
        })
        .await
        .expect("client thread");
        // Every token in the answer is this request's own; a 502 (problem+
        // json) or an answer without one is fine.
        for v in raw.split("\r\nx-seq: ").skip(1) {
            let v = v.split("\r\n").next().unwrap_or("");
            assert!(
                v == mine || !(v == "evil" || is_token(v)),
                "request {mine} got an answer meant for {v}:\n{raw}"
            );
            own += usize::from(v == mine);
        }
        assert!(
            raw.starts_with("HTTP/1.1 "),
            "request {mine}: no answer\n{}",
            gw.stderr()
        );
    }
    assert!(sent >= 200, "only {sent} requests in the time allowed");
    // Enough answers survive their mutations to be checked (about a
    // third do).
    assert!(
        own as u64 > sent / 5,
        "{own} of {sent} answers carried their token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_bodies_that_belie_their_length_do_not_desync_the_upstream_connection() {
    // An HTTP/2 request's `content-length` is only a claim: the frames carry
    // the body. Translated to HTTP/1.1, a claim of 40 bytes over a body of
    // 5 would leave the upstream waiting for 35 bytes that the next
    // request's head would then supply (H2.CL smuggling); so must neither
    // be sent on a connection that is used again.
    let b = Backend::start("h1").await;
    let (_gw, listen) = gateway_to(b.addr, "");
    for (claim, data) in [("40", &b"hello"[..]), ("2", &b"hello"[..])] {
        let req = http::Request::post(format!("http://{listen}/claimed"))
            .header("content-length", claim)
            .body(())
            .expect("request");
        let got = client::h2_raw(&listen, req, data).await;
        // Refused (a stream error, or the gateway's 400), never served.
        assert!(
            !matches!(got, Ok((s, _)) if s < 400),
            "content-length {claim} over {} bytes: {got:?}",
            data.len()
        );
        let req = http::Request::get(format!("http://{listen}/next"))
            .body(())
            .expect("request");
        let (status, body) = client::h2_raw(&listen, req, b"")
            .await
            .expect("next request");
        assert_eq!(status, 200, "{body}");
        let echo: serde_json::Value = serde_json::from_str(&body).expect("echo");
        assert_eq!(echo["path"], "/next", "{echo}");
    }
    // Every request the backend read was one the gateway meant: the two
    // that were answered, and at most the refused ones' heads.
    let hosts = b.hosts();
    assert!(hosts.len() <= 4, "{hosts:?}");
}

/// A backend whose every answer claims `content-length: 40` and sends 5
/// bytes (then, over HTTP/1.1, closes the connection): what a broken or
/// hostile upstream can do.
async fn lying_backend(http2: bool) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !http2 {
                    let mut head = [0u8; 4096];
                    let _ = tcp.read(&mut head).await;
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nshort")
                        .await;
                    return;
                }
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let resp = http::Response::builder()
                        .status(200)
                        .header("content-length", "40")
                        .body(())
                        .expect("response");
                    if let Ok(mut body) = respond.send_response(resp, false) {
                        let _ = body.send_data(bytes::Bytes::from_static(b"short"), true);
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_shorter_than_its_length_ends_the_client_connection() {
    // An answer that claims 40 bytes and ends at 5 cannot be finished;
    // were the next answer written on the same connection, the client
    // would read its first 35 bytes as this body.
    for http2 in [false, true] {
        let backend = lying_backend(http2).await;
        let protocol = if http2 { "http2" } else { "http1" };
        let (_gw, listen) = gateway_to(backend, &format!("protocol = \"{protocol}\""));
        let raw = tokio::task::spawn_blocking(move || {
            client::raw(
                &listen,
                "GET /lie HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n",
            )
        })
        .await
        .expect("client thread");
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "{protocol}: {raw}");
        // The first answer's framing is not completed by the next one: the
        // connection ends after the bytes that exist.
        assert_eq!(raw.matches("HTTP/1.1 ").count(), 1, "{protocol}: {raw}");
        assert!(body.len() < 40, "{protocol}: {raw}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_ends_the_connection_not_the_upstream() {
    // CVE-2023-44487: streams opened and cancelled at once cost the client
    // nothing; each must not become an upstream request, and the
    // connection that does it is closed.
    let b = Backend::start("h1").await;
    let (gw, listen) = gateway_to(b.addr, "");
    let tcp = tokio::net::TcpStream::connect(&listen)
        .await
        .expect("connect");
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let driver = tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut cancelled = 0;
    while cancelled < 20_000 && Instant::now() < deadline {
        let req = http::Request::get(format!("http://{listen}/delay/50"))
            .body(())
            .expect("request");
        let Ok(ready) = client.ready().await else {
            break;
        };
        client = ready;
        let Ok((_answer, mut stream)) = client.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        cancelled += 1;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        driver.is_finished(),
        "still open after {cancelled} cancelled streams"
    );
    assert!(cancelled < 20_000, "{cancelled}");
    assert!(
        b.hits() < 100,
        "{} of {cancelled} reached the upstream",
        b.hits()
    );
    // Others are served as before.
    let r = client::get(&format!("http://{listen}/after")).await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
}
