//! Header hygiene between client and upstream: hop-by-hop headers removed
//! both ways, `X-Forwarded-For/-Proto/-Host` and `Via` added on the way in.

use std::net::{IpAddr, Ipv4Addr};

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies drop.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `TE`'s place in `HOP_BY_HOP`.
const TE_BIT: usize = 4;

static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// `X-Forwarded-Client-Cert`: the client certificate a proxy verified, in
/// Envoy's format.
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Removes hop-by-hop headers, including those named in `Connection`, and
/// with `client_cert`, a client-sent `X-Forwarded-Client-Cert`.
pub fn strip_hop_by_hop(h: &mut HeaderMap, client_cert: bool) {
    // One pass over the names (standard names compare as small integers)
    // finds which are present; only those are removed (each removal
    // hashes). Most messages carry none, or only `Connection: keep-alive`.
    // Bits: the hop-by-hop names, `Proxy-Connection`, then this one.
    const XFCC: u16 = 1 << 9;
    let mut present = 0u16;
    for n in h.keys() {
        // Every hop-by-hop name is 2 (`te`) to 19 bytes long and starts
        // with one of these letters: most names are ruled out by a byte.
        let s = n.as_str().as_bytes();
        match s.first() {
            Some(b'c' | b'k' | b'p' | b't' | b'u') if s.len() <= 19 => {}
            Some(b'x')
                if client_cert
                    && s.len() == X_FORWARDED_CLIENT_CERT.as_str().len()
                    && *n == X_FORWARDED_CLIENT_CERT =>
            {
                present |= XFCC;
                continue;
            }
            _ => continue,
        }
        if let Some(i) = HOP_BY_HOP.iter().position(|x| x == n) {
            present |= 1 << i;
        } else if *n == PROXY_CONNECTION {
            present |= 1 << HOP_BY_HOP.len();
        }
    }
    if present == 0 {
        return;
    }
    if present & XFCC != 0 {
        h.remove(&X_FORWARDED_CLIENT_CERT);
    }
    // `TE: trailers` is the one TE an HTTP/2 hop carries, and gRPC servers
    // look for it (Envoy keeps it, nginx's grpc_pass sends it): it stays,
    // and the HTTP/1.1 client leaves it out (`upstream::h1::encode_head`).
    let te_trailers = present & (1 << TE_BIT) != 0
        && h.get_all(header::TE)
            .iter()
            .all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers"));
    // Names listed in Connection are hop-by-hop too; `close` and
    // `keep-alive` (the usual values) name nothing else to remove.
    if present & 1 != 0 {
        let mut named: Vec<HeaderName> = Vec::new();
        for v in h.get_all(header::CONNECTION) {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") || token.eq_ignore_ascii_case("keep-alive") {
                    continue;
                }
                // The message's framing and target are not the sender's to
                // drop this way.
                if let Ok(n) = HeaderName::from_bytes(token.as_bytes())
                    && n != header::CONTENT_LENGTH
                    && n != header::HOST
                    && !(te_trailers && n == header::TE)
                {
                    named.push(n);
                }
            }
        }
        for n in named {
            h.remove(n);
        }
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 && !(te_trailers && i == TE_BIT) {
            h.remove(n);
        }
    }
    if present & (1 << HOP_BY_HOP.len()) != 0 {
        h.remove(&PROXY_CONNECTION);
    }
}

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A client address as `X-Forwarded-For` writes it (made once per
/// connection).
pub fn client_text(ip: IpAddr) -> HeaderValue {
    // Hands the string's buffer over instead of copying it (same validation).
    HeaderValue::from_maybe_shared(bytes::Bytes::from(itoa_ip(ip)))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Adds the forwarding headers for a request from `client` (its
/// `client_text`) received over `tls` (or not) for `host`.
pub fn add_forwarding(
    h: &mut HeaderMap,
    client: &HeaderValue,
    tls: bool,
    host: Option<&HeaderValue>,
    via: &'static str,
) {
    // One lookup per name (each hashes it).
    match h.entry(&X_FORWARDED_FOR) {
        Entry::Occupied(mut e) => {
            if let Ok(prev) = e.get().to_str() {
                let ip = client.as_bytes();
                let mut s = Vec::with_capacity(prev.len() + 2 + ip.len());
                s.extend_from_slice(prev.as_bytes());
                s.extend_from_slice(b", ");
                s.extend_from_slice(ip);
                if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(s)) {
                    e.insert(v);
                }
            }
        }
        Entry::Vacant(e) => {
            e.insert(client.clone());
        }
    }
    h.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    if let Some(host) = host
        && let Entry::Vacant(e) = h.entry(&X_FORWARDED_HOST)
    {
        e.insert(host.clone());
    }
    h.append(header::VIA, HeaderValue::from_static(via));
}

fn itoa_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_text(v4),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4_text(v4),
    }
}

/// Dotted-quad text written by hand: `Display` goes through the formatting
/// machinery, several times the cost, on every proxied request.
fn v4_text(v4: Ipv4Addr) -> String {
    let mut s = String::with_capacity(15);
    for (i, o) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if o >= 100 {
            s.push(char::from(b'0' + o / 100));
        }
        if o >= 10 {
            s.push(char::from(b'0' + o / 10 % 10));
        }
        s.push(char::from(b'0' + o % 10));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::TE).is_none());
        assert!(h.get("x-keep").is_some());
    }

    #[test]
    fn keeps_te_trailers_only() {
        assert_eq!(HOP_BY_HOP[TE_BIT], header::TE);
        for (te, kept) in [
            ("trailers", true),
            (" Trailers ", true),
            ("trailers, gzip", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static("te"));
            h.insert(header::TE, HeaderValue::from_static(te));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.contains_key(header::TE), kept, "{te:?}");
            assert!(!h.contains_key(header::CONNECTION));
        }
    }

    #[test]
    fn strips_a_client_certificate_claim_only_when_asked() {
        let claim = || {
            let mut h = HeaderMap::new();
            h.insert(
                &X_FORWARDED_CLIENT_CERT,
                HeaderValue::from_static("Hash=00"),
            );
            h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
            h
        };
        let mut h = claim();
        strip_hop_by_hop(&mut h, true);
        assert!(h.get(&X_FORWARDED_CLIENT_CERT).is_none(), "{h:?}");
        assert!(h.get("x-forwarded-for").is_some());
        let mut h = claim();
        strip_hop_by_hop(&mut h, false);
        assert!(h.get(&X_FORWARDED_CLIENT_CERT).is_some());
    }

    #[test]
    fn strips_proxy_connection_and_keeps_the_rest() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("proxy-connection").is_none());
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn formats_addresses_like_display() {
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "9.99.100.199",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(itoa_ip(ip), a);
        }
        for o in 0..=255u8 {
            let v4 = Ipv4Addr::new(o, 255 - o, o / 3, 7);
            assert_eq!(v4_text(v4), v4.to_string());
        }
        assert_eq!(itoa_ip("::ffff:1.2.3.4".parse().unwrap()), "1.2.3.4");
        assert_eq!(itoa_ip("2001:db8::1".parse().unwrap()), "2001:db8::1");
    }

    #[test]
    fn appends_to_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarding(
            &mut h,
            &client_text("127.0.0.1".parse().unwrap()),
            true,
            None,
            "1.1 gateway",
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h[header::VIA], "1.1 gateway");
    }
}
