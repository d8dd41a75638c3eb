//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load
//! balancer in front of the gateway sends first on each connection, naming
//! the client it accepted the connection from. On a listener with
//! `proxy_protocol = true` every connection must start with one; the
//! client's address it names then stands for the connection's peer
//! everywhere (forwarding headers, access rules, rate limits, auto-ban, the
//! access log).
//!
//! The header is peeked at and then read exactly, so that nothing after it
//! (a TLS handshake, an HTTP request) is taken from the socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The version 2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 header is at most this long, CRLF included.
const V1_MAX: usize = 107;
/// The longest version 2 header accepted (addresses and TLVs); load
/// balancers send far less.
const V2_MAX: usize = 1024;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("PROXY protocol header longer than {0} bytes")]
    TooLong(usize),
    #[error("the connection closed before its PROXY protocol header ended")]
    Closed,
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Missing => "missing",
            Error::Malformed(_) => "malformed",
            Error::TooLong(_) => "too_long",
            Error::Closed => "closed",
            Error::Timeout(_) => "timeout",
            Error::Io(_) => "io",
        }
    }
}

/// Reads the PROXY header off the front of `io` within `limit`. Returns the
/// client's address, or `None` when the header names none (a `LOCAL`
/// connection, such as the balancer's own health check, or `UNKNOWN`): the
/// connection's own peer then stands.
pub async fn read(io: &mut TcpStream, limit: Duration) -> Result<Option<SocketAddr>, Error> {
    tokio::time::timeout(limit, read_header(io))
        .await
        .map_err(|_| Error::Timeout(limit))?
}

async fn read_header(io: &mut TcpStream) -> Result<Option<SocketAddr>, Error> {
    let mut buf = [0u8; V2_MAX];
    let mut seen = 0;
    loop {
        let n = io.peek(&mut buf).await?;
        if n == 0 {
            return Err(Error::Closed);
        }
        if let Some((addr, len)) = parse(&buf[..n])? {
            io.read_exact(&mut buf[..len]).await?;
            return Ok(addr);
        }
        // Incomplete: peeking again returns at once with the same bytes,
        // so wait a little for the rest (balancers send the header in one
        // segment; this is the rare case).
        if n == seen {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen = n;
    }
}

/// Parses a PROXY header at the front of `buf`: `Ok(None)` while it is
/// incomplete, else the client's address (see `read`) and the header's
/// length.
pub fn parse(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, Error> {
    let sig = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig] == V2_SIGNATURE[..sig] {
        return if buf.len() < 16 {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let prefix = buf.len().min(6);
    if buf[..prefix] == b"PROXY "[..prefix] {
        return parse_v1(buf);
    }
    Err(Error::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, Error> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(Error::TooLong(V1_MAX))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| Error::Malformed("not ASCII"))?;
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    if family == "UNKNOWN" {
        return Ok(Some((None, end + 2)));
    }
    let v4 = match family {
        "TCP4" => true,
        "TCP6" => false,
        _ => return Err(Error::Malformed("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(Error::Malformed("not four addresses and ports"));
    };
    let ip = |s: &str| -> Result<IpAddr, Error> {
        let ip: IpAddr = s.parse().map_err(|_| Error::Malformed("bad address"))?;
        if ip.is_ipv4() != v4 {
            return Err(Error::Malformed("address of the other family"));
        }
        Ok(ip)
    };
    let port = |s: &str| -> Result<u16, Error> {
        if s.is_empty() || s.len() > 5 || (s.len() > 1 && s.starts_with('0')) {
            return Err(Error::Malformed("bad port"));
        }
        s.parse().map_err(|_| Error::Malformed("bad port"))
    };
    let source = ip(src)?;
    ip(dst)?;
    let sport = port(sport)?;
    port(dport)?;
    Ok(Some((Some(SocketAddr::new(source, sport)), end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, Error> {
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(Error::Malformed("version 2 signature with another version"));
    }
    let local = match version_command & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Error::Malformed("command is neither LOCAL nor PROXY")),
    };
    let family = buf[13];
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX {
        return Err(Error::TooLong(V2_MAX));
    }
    if buf.len() < len {
        return Ok(None);
    }
    if local {
        return Ok(Some((None, len)));
    }
    let a = &buf[16..len];
    let source = match family {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            if a.len() < 12 {
                return Err(Error::Malformed("IPv4 address block too short"));
            }
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        // TCP over IPv6.
        0x21 => {
            if a.len() < 36 {
                return Err(Error::Malformed("IPv6 address block too short"));
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // UNSPEC, UDP, unix sockets: no TCP client to stand for the peer.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => None,
        _ => return Err(Error::Malformed("unknown address family")),
    };
    Ok(Some((source, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[test]
    fn version_1() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n";
        let (addr, len) = parse(h).unwrap().unwrap();
        assert_eq!(addr, Some("203.0.113.7:56324".parse().unwrap()));
        assert_eq!(&h[len..len + 3], b"GET");
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 80\r\n";
        let (addr, len) = parse(h).unwrap().unwrap();
        assert_eq!(addr, Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(len, h.len());
        let h = b"PROXY UNKNOWN whatever follows\r\n";
        assert_eq!(parse(h).unwrap().unwrap(), (None, h.len()));
        // Incomplete, then complete.
        assert!(parse(b"PRO").unwrap().is_none());
        assert!(parse(b"PROXY TCP4 203.0.113.7 10.0").unwrap().is_none());
    }

    #[test]
    fn version_1_refusals() {
        for bad in [
            &b"PROXY TCP5 1.2.3.4 1.2.3.5 1 2\r\n"[..],
            b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2 3\r\n",
            b"PROXY TCP4 2001:db8::1 1.2.3.5 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.5 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.5 01 2\r\n",
            b"PROXY TCP4 1.2.3.256 1.2.3.5 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(Error::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY ".to_vec(), vec![b'x'; 200]].concat();
        assert!(matches!(parse(&long), Err(Error::TooLong(V1_MAX))));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Err(Error::Missing)
        ));
    }

    #[test]
    fn version_2() {
        let mut addrs = vec![203, 0, 113, 7, 10, 0, 0, 1];
        addrs.extend_from_slice(&56324u16.to_be_bytes());
        addrs.extend_from_slice(&443u16.to_be_bytes());
        // A TLV after the addresses is skipped.
        addrs.extend_from_slice(&[0x04, 0, 2, 0xaa, 0xbb]);
        let mut h = v2(1, 0x11, &addrs);
        let len = h.len();
        h.extend_from_slice(b"GET");
        assert_eq!(
            parse(&h).unwrap().unwrap(),
            (Some("203.0.113.7:56324".parse().unwrap()), len)
        );
        // Every prefix is incomplete, not wrong.
        for cut in 1..len {
            assert!(parse(&h[..cut]).unwrap().is_none(), "{cut}");
        }
        let ip6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mut addrs = ip6.octets().to_vec();
        addrs.extend_from_slice(&[0; 16]);
        addrs.extend_from_slice(&4000u16.to_be_bytes());
        addrs.extend_from_slice(&80u16.to_be_bytes());
        let h = v2(1, 0x21, &addrs);
        assert_eq!(
            parse(&h).unwrap().unwrap(),
            (Some("[2001:db8::1]:4000".parse().unwrap()), h.len())
        );
        // LOCAL: the balancer's own connection.
        let h = v2(0, 0x00, &[]);
        assert_eq!(parse(&h).unwrap().unwrap(), (None, 16));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Random tails after each kind of start, and every truncation of
        // the valid headers: an answer (incomplete, a header, a refusal),
        // never a panic, and never a length past the input.
        let mut rng = fastrand::Rng::with_seed(7);
        let starts: [&[u8]; 4] = [b"", b"PROXY ", b"PROXY TCP4 ", &V2_SIGNATURE[..]];
        for i in 0..20_000 {
            let mut buf = starts[i % starts.len()].to_vec();
            if buf.len() == 12 {
                buf.push(0x20 | rng.u8(0..3));
                buf.push([0x00, 0x11, 0x21, 0x12, 0x31, 0x77][rng.usize(0..6)]);
                // A length the random tail may or may not cover.
                buf.extend_from_slice(&[0, rng.u8(0..60)]);
            }
            let n = rng.usize(0..80);
            buf.extend((0..n).map(|_| {
                if rng.bool() {
                    rng.u8(..)
                } else {
                    b" 0123456789.:\r\n"[rng.usize(0..15)]
                }
            }));
            if let Ok(Some((_, len))) = parse(&buf) {
                assert!(len <= buf.len(), "{buf:?}");
            }
        }
    }

    #[test]
    fn version_2_refusals() {
        let mut other_version = v2(1, 0x11, &[0; 12]);
        other_version[12] = 0x11;
        for (bad, why) in [
            (other_version, "version 1 after a version 2 signature"),
            (v2(2, 0x11, &[0; 12]), "command 2"),
            (v2(1, 0x11, &[0; 8]), "IPv4 block of 8 bytes"),
            (v2(1, 0x21, &[0; 12]), "IPv6 block of 12 bytes"),
            (v2(1, 0x77, &[0; 12]), "family 0x77"),
        ] {
            assert!(matches!(parse(&bad), Err(Error::Malformed(_))), "{why}");
        }
        assert!(matches!(
            parse(&v2(1, 0x11, &vec![0; 2000])),
            Err(Error::TooLong(V2_MAX))
        ));
    }
}
