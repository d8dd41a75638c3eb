//! HTTP/1.1 wire pieces shared by the gateway's server (`listener::h1`) and
//! its upstream client (`upstream::h1`), so that both sides read framing
//! headers the same way: `Content-Length` values, `Connection` tokens, and
//! writing a list of buffers whole; and the header maps and names both
//! build for every message, kept for reuse.

use std::cell::RefCell;
use std::io::IoSlice;

use bytes::BytesMut;
use http::HeaderMap;
use http::header::{HeaderName, InvalidHeaderName};

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// A `Content-Length` value: digits only (no sign, no list), surrounding
/// whitespace allowed; `None` for anything else or an overflow.
pub fn content_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// What a `Connection` value lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionTokens {
    pub close: bool,
    pub keep_alive: bool,
    /// Any token but `close` and `keep-alive`: the names of more
    /// hop-by-hop fields, or an upgrade.
    pub other: bool,
}

/// Reads the tokens of a `Connection` value.
pub fn connection_tokens(v: &[u8]) -> ConnectionTokens {
    let mut t = ConnectionTokens::default();
    for token in v.split(|&b| b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            t.close = true;
        } else if token.eq_ignore_ascii_case(b"keep-alive") {
            t.keep_alive = true;
        } else if !token.is_empty() {
            t.other = true;
        }
    }
    t
}

thread_local! {
    /// Emptied header maps kept by this worker thread.
    static SPARE_MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// Most maps kept per thread: enough for every message in flight on a busy
/// worker; beyond that a map is freed.
const SPARE_MAPS_KEPT: usize = 256;

/// Maps grown past this many fields (a rare large head) are freed rather
/// than kept, so that the spare maps stay small.
const SPARE_MAP_MAX_CAPACITY: usize = 48;

/// An empty header map with room for `capacity` fields: one this thread
/// recycled when it has one (no allocation), otherwise a new one. Every
/// HTTP/1.1 message the gateway parses takes its map from here.
pub fn header_map(capacity: usize) -> HeaderMap {
    let spare = SPARE_MAPS.try_with(|s| s.borrow_mut().pop()).ok().flatten();
    match spare {
        Some(mut m) => {
            if m.capacity() < capacity {
                m.reserve(capacity);
            }
            m
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Gives a map that is done with back for `header_map` to hand out again
/// (its fields are dropped now; its allocation is kept).
pub fn recycle_header_map(mut m: HeaderMap) {
    if m.capacity() == 0 || m.capacity() > SPARE_MAP_MAX_CAPACITY {
        return;
    }
    m.clear();
    let _ = SPARE_MAPS.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_MAPS_KEPT {
            s.push(m);
        }
    });
}

/// Size of the read buffers `read_buffer` hands out.
pub const READ_BUFFER: usize = 16 * 1024;

/// Most read buffers kept per thread (1 MiB at most).
const SPARE_BUFFERS_KEPT: usize = 64;

thread_local! {
    /// Emptied read buffers kept by this worker thread.
    static SPARE_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty read buffer of `READ_BUFFER` bytes: one this thread recycled
/// when it has one, otherwise a new one. Connections take one when bytes
/// arrive and give it back when they go idle (`recycle_read_buffer`), so
/// that an idle keep-alive connection holds none and a busy worker does
/// not allocate one per request.
pub fn read_buffer() -> BytesMut {
    SPARE_BUFFERS
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(READ_BUFFER))
}

/// Gives a connection's read buffer back when it is done with it; the
/// buffer is left empty with no allocation. One still shared (a head
/// split off it is in use) or of another size is dropped instead.
pub fn recycle_read_buffer(buf: &mut BytesMut) {
    let mut b = std::mem::take(buf);
    b.clear();
    if !b.try_reclaim(READ_BUFFER) || b.capacity() != READ_BUFFER {
        return;
    }
    let _ = SPARE_BUFFERS.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_BUFFERS_KEPT {
            s.push(b);
        }
    });
}

/// Positions in a head whose names are remembered.
const NAME_SLOTS: usize = 16;

/// Longest spelling remembered; longer names are classified every time.
const NAME_MAX: usize = 32;

/// The header names last parsed at each position of a head, as they were
/// spelled on the wire. A peer tends to send the same fields in the same
/// order, so most names are found by one comparison instead of being
/// classified and lowercased again. A miss costs no allocation: the
/// spelling is kept in the slot.
struct NameCache {
    slots: [Option<NameSlot>; NAME_SLOTS],
}

struct NameSlot {
    spelled: [u8; NAME_MAX],
    len: u8,
    name: HeaderName,
}

impl NameCache {
    const fn new() -> NameCache {
        NameCache {
            slots: [const { None }; NAME_SLOTS],
        }
    }

    /// The name spelled `raw` at `position` in its head.
    fn name(&mut self, position: usize, raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
        let Some(slot) = self.slots.get_mut(position) else {
            return HeaderName::from_bytes(raw);
        };
        if let Some(s) = slot
            && s.spelled[..usize::from(s.len)] == *raw
        {
            return Ok(s.name.clone());
        }
        let name = HeaderName::from_bytes(raw)?;
        if raw.len() <= NAME_MAX {
            let mut spelled = [0u8; NAME_MAX];
            spelled[..raw.len()].copy_from_slice(raw);
            *slot = Some(NameSlot {
                spelled,
                len: raw.len() as u8,
                name: name.clone(),
            });
        }
        Ok(name)
    }
}

thread_local! {
    /// Request header names this worker parsed last.
    static REQUEST_NAMES: RefCell<NameCache> = const { RefCell::new(NameCache::new()) };
    /// Response header names this worker parsed last (from upstreams).
    static RESPONSE_NAMES: RefCell<NameCache> = const { RefCell::new(NameCache::new()) };
}

/// The name of the request header field spelled `raw` at `position` of
/// its head (the server's parser).
pub fn request_header_name(position: usize, raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    REQUEST_NAMES
        .try_with(|c| c.borrow_mut().name(position, raw))
        .unwrap_or_else(|_| HeaderName::from_bytes(raw))
}

/// The same for response heads (the upstream client's parser).
pub fn response_header_name(position: usize, raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    RESPONSE_NAMES
        .try_with(|c| c.borrow_mut().name(position, raw))
        .unwrap_or_else(|_| HeaderName::from_bytes(raw))
}

/// Writes all of `slices` with vectored writes.
pub async fn write_all_vectored(
    w: &mut (impl AsyncWrite + Unpin),
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_names_match_fresh_ones() {
        let mut c = NameCache::new();
        for raw in [
            &b"Content-Type"[..],
            b"content-type",
            b"X-Custom",
            b"x-custom",
            b"Content-Type",
            // Longer than a slot keeps: classified every time, still right.
            b"X-A-Header-Name-Longer-Than-Thirty-Two-Bytes",
        ] {
            for pos in [0, 3, NAME_SLOTS, NAME_SLOTS + 5] {
                let fresh = HeaderName::from_bytes(raw).unwrap();
                assert_eq!(c.name(pos, raw).unwrap(), fresh);
                // Found in the cache the second time.
                assert_eq!(c.name(pos, raw).unwrap(), fresh);
            }
        }
        assert!(c.name(0, b"bad name").is_err());
        assert_eq!(
            c.name(0, b"Content-Type").unwrap(),
            http::header::CONTENT_TYPE
        );
    }

    #[test]
    fn recycled_header_maps_come_back_empty() {
        let mut m = header_map(8);
        m.insert(http::header::HOST, http::HeaderValue::from_static("a"));
        let cap = m.capacity();
        recycle_header_map(m);
        let again = header_map(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
        // A map grown large is freed, not kept.
        let mut big = HeaderMap::with_capacity(SPARE_MAP_MAX_CAPACITY * 2);
        big.insert(http::header::HOST, http::HeaderValue::from_static("a"));
        recycle_header_map(big);
        assert!(header_map(1).capacity() <= SPARE_MAP_MAX_CAPACITY);
    }

    #[test]
    fn read_buffers_are_recycled_whole_or_not_at_all() {
        // Each test runs on its own thread: the spare list starts empty.
        let mut b = read_buffer();
        assert_eq!(b.capacity(), READ_BUFFER);
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\nrest");
        let _ = b.split_to(18).freeze();
        let at = b.as_ptr() as usize - 18;
        recycle_read_buffer(&mut b);
        assert_eq!(b.capacity(), 0, "the connection keeps no buffer");
        let again = read_buffer();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), READ_BUFFER);
        assert_eq!(
            again.as_ptr() as usize,
            at,
            "the same allocation, from its start"
        );

        // Still shared with a head in use: dropped, not kept.
        let mut b = again;
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = b.split_to(18).freeze();
        recycle_read_buffer(&mut b);
        assert_eq!(b.capacity(), 0);
        let fresh = read_buffer();
        let (f, h) = (fresh.as_ptr() as usize, head.as_ptr() as usize);
        assert!(
            f + READ_BUFFER <= h || f >= h + READ_BUFFER,
            "a buffer still shared is not handed out"
        );
        assert_eq!(&head[..], b"GET / HTTP/1.1\r\n\r\n");

        // Other sizes are not kept either.
        let mut odd = BytesMut::with_capacity(READ_BUFFER / 2);
        recycle_read_buffer(&mut odd);
        assert_eq!(read_buffer().capacity(), READ_BUFFER);
    }

    #[test]
    fn content_lengths() {
        assert_eq!(content_length(b" 42 "), Some(42));
        assert_eq!(content_length(b"0"), Some(0));
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"3, 5",
            b"0x10",
            b"99999999999999999999",
        ] {
            assert_eq!(
                content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn connection_values() {
        let t = |close, keep_alive, other| ConnectionTokens {
            close,
            keep_alive,
            other,
        };
        assert_eq!(connection_tokens(b"Close"), t(true, false, false));
        assert_eq!(connection_tokens(b"foo, Keep-Alive"), t(false, true, true));
        assert_eq!(connection_tokens(b"upgrade"), t(false, false, true));
        assert_eq!(connection_tokens(b" keep-alive , "), t(false, true, false));
    }
}
