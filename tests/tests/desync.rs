//! Request smuggling, looked for by difference: streams of pipelined
//! requests, mutated at random (framing fields spliced in, bytes flipped,
//! bodies cut), go through the real gateway to real hyper backends over
//! HTTP/1.1 and HTTP/2. The gateway and a backend must agree on where every
//! request ends: each request a backend serves comes back to the client as
//! an answer of its own, every answer is either a backend's or the
//! gateway's own problem+json, and the gateway keeps serving.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use gateway_tests::backend::Backend;
use gateway_tests::client;
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use gateway_tests::mutate::mutate;

/// Pipelined streams to mutate: bodies framed each way, 100-continue,
/// HTTP/1.0, a request hidden in a body, through both upstream protocols.
const SEEDS: &[&str] = &[
    "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST /h2/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1e\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\nGET /h2/b HTTP/1.1\r\nHost: x\r\n\r\n",
    "PUT /h2/a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabcPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
];

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
    let port = free_port();
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
listen = "127.0.0.1:{port}"
header_read_timeout = "2s"
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
        ),
        &admin,
    );
    let listen = format!("127.0.0.1:{port}");
    let mut rng = fastrand::Rng::with_seed(41);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut streams, mut answered) = (0, 0);
    while streams < 1_000 && Instant::now() < deadline {
        let input = mutate(&mut rng, SEEDS[streams % SEEDS.len()].as_bytes());
        streams += 1;
        let before = h1.hits() + h2.hits();
        let addr = listen.clone();
        let sent = input.clone();
        // The whole stream, then the end of the client's side: what the
        // gateway has not answered by then it answers or refuses.
        let raw = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let _ = s.write_all(&sent);
            let _ = s.shutdown(Shutdown::Write);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .expect("client thread");
        // A backend's count is in before its answer leaves it.
        let served = h1.hits() + h2.hits() - before;
        let shown = String::from_utf8_lossy(&input);
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
        // The last request may reach a backend with a body the client then
        // cut short: it has no answer to come back with.
        assert!(
            served <= from_backends + 1,
            "backends served {served} requests, the client got {from_backends} \
             of their answers: a request hid inside another\n{shown:?}\n{raw}"
        );
    }
    assert!(streams >= 300, "only {streams} streams in the time allowed");
    assert!(
        answered >= streams,
        "{answered} answers to {streams} streams"
    );
    // Still serving.
    let r = client::get(&format!("http://{listen}/a")).await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
}
