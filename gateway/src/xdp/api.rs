//! The lists through the admin listener, for gateways where the CLI cannot
//! reach pinned maps (userspace enforcement) — and a client for it.
//!
//! - `GET /admin/xdp/deny` (or `allow`): the live entries, as JSON.
//! - `POST /admin/xdp/deny?cidr=203.0.113.7&ttl=10m`: add a run-time entry
//!   (`ttl` optional: `[xdp] ban_ttl` for deny, never for allow).
//! - `DELETE /admin/xdp/deny?cidr=203.0.113.7`: remove it.
//!
//! Parameters are URL-encoded (`2001%3Adb8%3A%3A%2F32`).

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::Enforcer;
use super::config::parse_cidr;
use super::rules::{FOREVER, List, now_ns, remaining};

/// Handles a request under `/admin/xdp/`.
pub fn handle(
    enforcer: &Enforcer,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> (StatusCode, Value) {
    let list = match path.strip_prefix("/admin/xdp/") {
        Some("deny") => List::Deny,
        Some("allow") => List::Allow,
        _ => return (StatusCode::NOT_FOUND, json!({"status": "not found"})),
    };
    let param = |name: &str| {
        query?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| decode(v))
    };
    match *method {
        Method::GET => match enforcer.entries(list) {
            Ok(entries) => {
                let now = now_ns();
                let entries: Vec<Value> = entries
                    .into_iter()
                    .map(|(net, e)| {
                        json!({
                            "cidr": net.to_string(),
                            "config": e.from_config,
                            "runtime": e.cli_until != 0,
                            "expires": (e.cli_until != 0 && e.cli_until != FOREVER && !e.from_config)
                                .then(|| remaining(e.cli_until, now)),
                        })
                    })
                    .collect();
                (
                    StatusCode::OK,
                    json!({"list": list.name(), "entries": entries}),
                )
            }
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"status": "error", "message": e}),
            ),
        },
        Method::POST | Method::DELETE => {
            let Some(cidr) = param("cidr") else {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"status": "error", "message": "missing ?cidr="}),
                );
            };
            let net = match parse_cidr(&cidr) {
                Ok(n) => n,
                Err(m) => {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"status": "error", "message": m}),
                    );
                }
            };
            let ttl = match param("ttl").map(|t| humantime::parse_duration(&t)) {
                None => None,
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"status": "error", "message": format!("invalid ttl: {e}")}),
                    );
                }
            };
            match enforcer.edit(list, &net, *method == Method::DELETE, ttl) {
                Ok(msg) => (StatusCode::OK, json!({"status": "ok", "message": msg})),
                Err(msg) => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"status": "error", "message": msg}),
                ),
            }
        }
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"status": "method not allowed"}),
        ),
    }
}

/// Percent-decoding of a query value (`+` is a space).
fn decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encoding of a query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (c as char).to_string(),
            _ => format!("%{c:02X}"),
        })
        .collect()
}

/// Sends `method path` to the admin listener at `addr`: the JSON answer,
/// or an error with the gateway's message.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<Value> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("cannot reach the gateway's admin listener at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).unwrap_or("");
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if status == "200" {
        return Ok(v);
    }
    match v.get("message").and_then(Value::as_str) {
        Some(m) => bail!("{m}"),
        None => bail!(
            "HTTP {status} from the admin listener (does this gateway have the XDP admin API?): {}",
            body.trim()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_coding() {
        assert_eq!(encode("2001:db8::/32"), "2001%3Adb8%3A%3A%2F32");
        assert_eq!(decode("2001%3Adb8%3A%3A%2F32"), "2001:db8::/32");
        assert_eq!(decode("10.0.0.0%2f8"), "10.0.0.0/8");
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("1%"), "1%");
    }
}
