//! A tiny authoritative DNS server over UDP on 127.0.0.1 for discovery
//! tests: A, AAAA and SRV records from a table the test changes while it
//! runs, TTL 1, NXDOMAIN for unknown names, and SERVFAIL on demand.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// One record.
#[derive(Debug, Clone)]
pub enum Record {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
}

#[derive(Default)]
struct Table {
    records: HashMap<String, Vec<Record>>,
    failing: bool,
}

/// A running server; stops when dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    table: Arc<Mutex<Table>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = sock.local_addr().expect("dns addr");
        let table = Arc::new(Mutex::new(Table::default()));
        let t = table.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                if let Some(resp) = answer(&buf[..n], &t) {
                    let _ = sock.send_to(&resp, peer).await;
                }
            }
        });
        DnsServer { addr, table, task }
    }

    /// Replaces the records of `name`.
    pub fn set(&self, name: &str, records: Vec<Record>) {
        self.table
            .lock()
            .unwrap()
            .records
            .insert(key(name), records);
    }

    /// Answer SERVFAIL to everything while `on`.
    pub fn fail(&self, on: bool) {
        self.table.lock().unwrap().failing = on;
    }
}

fn answer(q: &[u8], table: &Mutex<Table>) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels, type, class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).into_owned());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = &q[12..i + 4];
    let name = key(&labels.join("."));
    let t = table.lock().ok()?;
    let (rcode, records): (u8, Vec<Record>) = if t.failing {
        (2, Vec::new())
    } else {
        match t.records.get(&name) {
            None => (3, Vec::new()),
            Some(rs) => (
                0,
                rs.iter()
                    .filter(|r| {
                        matches!(
                            (r, qtype),
                            (Record::A(_), 1) | (Record::Aaaa(_), 28) | (Record::Srv { .. }, 33)
                        )
                    })
                    .cloned()
                    .collect(),
            ),
        }
    };
    drop(t);
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q[0..2]);
    // QR, AA, RD copied, RA; rcode.
    out.push(0x84 | (q[2] & 0x01));
    out.push(0x80 | rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for r in records {
        out.extend_from_slice(&[0xc0, 0x0c]);
        let (rtype, rdata) = match r {
            Record::A(ip) => (1u16, ip.octets().to_vec()),
            Record::Aaaa(ip) => (28, ip.octets().to_vec()),
            Record::Srv {
                priority,
                weight,
                port,
                target,
            } => {
                let mut d = Vec::new();
                d.extend_from_slice(&priority.to_be_bytes());
                d.extend_from_slice(&weight.to_be_bytes());
                d.extend_from_slice(&port.to_be_bytes());
                for l in key(&target).split('.') {
                    d.push(l.len() as u8);
                    d.extend_from_slice(l.as_bytes());
                }
                d.push(0);
                (33, d)
            }
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}
