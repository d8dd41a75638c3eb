//! Header hygiene between client and upstream: hop-by-hop headers removed
//! both ways, `X-Forwarded-For/-Proto/-Host` and `Via` added on the way in.

use std::net::{IpAddr, Ipv4Addr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

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

static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (standard names
    // compare as small integers) is far cheaper than ten hashed removals.
    // `Connection` is itself hop-by-hop, so the names it lists are covered.
    if !h
        .keys()
        .any(|n| HOP_BY_HOP.contains(n) || *n == PROXY_CONNECTION)
    {
        return;
    }
    // Names listed in Connection are hop-by-hop too.
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(&PROXY_CONNECTION);
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Adds the forwarding headers for a request from `client` received over
/// `tls` (or not) for `host`.
pub fn add_forwarding(
    h: &mut HeaderMap,
    client: IpAddr,
    tls: bool,
    host: Option<&HeaderValue>,
    via: &'static str,
) {
    let mut ip = itoa_ip(client);
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            let mut s = String::with_capacity(prev.len() + 2 + ip.len());
            s.push_str(prev);
            s.push_str(", ");
            s.push_str(&ip);
            s
        }
        None => std::mem::take(&mut ip),
    };
    // Hands the string's buffer over instead of copying it (same validation).
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    if let Some(host) = host
        && !h.contains_key(&X_FORWARDED_HOST)
    {
        h.insert(X_FORWARDED_HOST.clone(), host.clone());
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
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::TE).is_none());
        assert!(h.get("x-keep").is_some());
    }

    #[test]
    fn strips_proxy_connection_and_keeps_the_rest() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        strip_hop_by_hop(&mut h);
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
            "127.0.0.1".parse().unwrap(),
            true,
            None,
            "1.1 gateway",
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h[header::VIA], "1.1 gateway");
    }
}
