//! The access log: one JSON line per request with Elastic Common Schema
//! field names, written by a dedicated thread so the data path never blocks
//! on the terminal or the disk. When the writer falls behind by more than
//! `QUEUE` lines, lines are dropped and counted rather than delaying traffic.

use std::io::Write;
use std::net::IpAddr;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::AccessLogTarget;

const QUEUE: usize = 65_536;

/// One request, as logged.
#[derive(Serialize)]
pub struct Entry<'a> {
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    #[serde(rename = "http.request.method")]
    pub method: &'a str,
    #[serde(rename = "url.path")]
    pub path: &'a str,
    #[serde(rename = "url.query", skip_serializing_if = "Option::is_none")]
    pub query: Option<&'a str>,
    #[serde(rename = "http.version")]
    pub version: &'a str,
    #[serde(rename = "http.response.status_code")]
    pub status: u16,
    /// Nanoseconds, as ECS defines `event.duration`.
    #[serde(rename = "event.duration")]
    pub duration_ns: u64,
    #[serde(rename = "client.ip")]
    pub client_ip: IpAddr,
    /// The network peer, when the client is another it speaks for.
    #[serde(rename = "source.ip", skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<IpAddr>,
    #[serde(
        rename = "user_agent.original",
        skip_serializing_if = "Option::is_none"
    )]
    pub user_agent: Option<&'a str>,
    #[serde(rename = "trace.id")]
    pub request_id: &'a str,
    #[serde(rename = "http.request.id")]
    pub http_request_id: &'a str,
    #[serde(rename = "gateway.listener")]
    pub listener: &'a str,
    #[serde(rename = "gateway.route", skip_serializing_if = "Option::is_none")]
    pub route: Option<&'a str>,
    #[serde(rename = "gateway.upstream", skip_serializing_if = "Option::is_none")]
    pub upstream: Option<&'a str>,
    #[serde(rename = "error.type", skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// The authenticated consumer.
    #[serde(rename = "user.name", skip_serializing_if = "Option::is_none")]
    pub user_name: Option<&'a str>,
    /// The verified client certificate's SHA-256 (mutual TLS).
    #[serde(
        rename = "tls.client.hash.sha256",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_cert_sha256: Option<&'a str>,
    /// ... and its subject.
    #[serde(rename = "tls.client.subject", skip_serializing_if = "Option::is_none")]
    pub client_cert_subject: Option<&'a str>,
}

/// A handle to the writer thread.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
}

impl AccessLog {
    /// Starts the writer for `target`.
    pub fn start(target: &AccessLogTarget) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Ok(line) = rx.recv() {
                    buf.extend_from_slice(&line);
                    // Batch whatever else is queued into one write.
                    while buf.len() < 60 * 1024 {
                        match rx.recv_timeout(Duration::ZERO) {
                            Ok(l) => buf.extend_from_slice(&l),
                            Err(_) => break,
                        }
                    }
                    if out.write_all(&buf).and_then(|_| out.flush()).is_err() {
                        metrics::counter!("gateway_access_log_dropped_total").increment(1);
                    }
                    buf.clear();
                }
            })?;
        Ok(AccessLog { tx })
    }

    /// Queues one entry; never blocks.
    pub fn log(&self, entry: &Entry<'_>) {
        let mut line = match serde_json::to_vec(entry) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            metrics::counter!("gateway_access_log_dropped_total").increment(1);
        }
    }
}

/// RFC 3339 timestamp with milliseconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
