//! Clients for tests: a hyper client (HTTP/1.1 or h2c) that returns the
//! whole response, and raw TCP for requests no well-behaved client sends.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (panics with the body if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP/1.1 client.
pub fn http1() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c (prior knowledge) client.
pub fn h2c() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends `req` and collects the response (10 s limit).
pub async fn send(client: &Client<HttpConnector, Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
    let fut = async {
        let resp = client.request(req).await.expect("request failed");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("request timed out")
}

/// GET `url` over HTTP/1.1.
pub async fn get(url: &str) -> Reply {
    send(
        &http1(),
        Request::get(url).body(Full::default()).expect("request"),
    )
    .await
}

/// Sends raw bytes to `addr` and reads until the peer closes or 5 s pass.
pub fn raw(addr: &str, request: &str) -> String {
    let mut s = match std::net::TcpStream::connect(addr) {
        Ok(s) => s,
        Err(_) => return String::new(),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(request.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response to a raw request.
pub fn raw_status(addr: &str, request: &str) -> Option<u16> {
    raw(addr, request).split_whitespace().nth(1)?.parse().ok()
}

/// Sends `head` (a request line and fields, each ending in CRLF) with the
/// `Content-Length` of `chunks`, then each chunk after its pause, and reads
/// one answer (until its `Content-Length` is in, or the peer closes, or
/// 10 s pass). Returns it and how long it took to start coming, from the
/// head's write. Blocking: call it from a thread.
pub fn trickle(addr: &str, head: &str, chunks: Vec<(Duration, Vec<u8>)>) -> (String, Duration) {
    let len: usize = chunks.iter().map(|(_, c)| c.len()).sum();
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut r = s.try_clone().expect("clone");
    let started = std::time::Instant::now();
    s.write_all(format!("{head}Content-Length: {len}\r\n\r\n").as_bytes())
        .expect("write head");
    // The writer may be cut off when the gateway answers early.
    let writer = std::thread::spawn(move || {
        for (pause, chunk) in chunks {
            std::thread::sleep(pause);
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut took = None;
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        took.get_or_insert_with(|| started.elapsed());
        out.extend_from_slice(&buf[..n]);
        // One answer is all we wait for.
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|l| body.len() >= l) {
                break;
            }
        }
    }
    let _ = writer.join();
    (
        String::from_utf8_lossy(&out).into_owned(),
        took.unwrap_or_default(),
    )
}

/// Sends one HTTP/2 request on a new h2c connection, with the `h2` crate
/// (which lets a test send what hyper's client would not): no body, or
/// `data` as the body whatever its `content-length` says, in two DATA
/// frames 100 ms apart (so that the first goes upstream before the second
/// ends the stream). Its status and body, or why there is none.
pub async fn h2_raw(
    addr: &str,
    req: http::Request<()>,
    data: &'static [u8],
) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let (answer, mut body) = client
        .send_request(req, data.is_empty())
        .map_err(|e| e.to_string())?;
    if !data.is_empty() {
        body.send_data(Bytes::from_static(data), false)
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        body.send_data(Bytes::new(), true)
            .map_err(|e| e.to_string())?;
    }
    let resp = answer.await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let mut recv = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        out.extend_from_slice(&chunk);
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    Ok((status, String::from_utf8_lossy(&out).into_owned()))
}
