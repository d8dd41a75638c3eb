//! Test support: seeded byte-level mutations of valid protocol messages, for
//! the "hostile bytes never panic and never frame ambiguously" tests of the
//! HTTP/1.1 parsers (`listener::h1`, `upstream::h1`, `chunked`) and of the
//! gateway binary end to end. The gateway's unit tests include this file.

/// Bytes that parsers treat specially; mutations favour them over random
/// ones, since they are where two parsers disagree.
const SPECIAL: &[u8] = b"\r\n :;,\t\0\x7f\x80\xff-_0123456789aAfFzZ/?%.";

/// Header lines worth splicing in: framing, hop-by-hop and odd spellings.
const LINES: &[&[u8]] = &[
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"content-length:  7 \r\n",
    b"Content-Length: 5, 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"transfer-encoding: gzip, chunked\r\n",
    b"Transfer-Encoding:\tchunked \r\n",
    b"Transfer_Encoding: chunked\r\n",
    b"Content_Length: 3\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive, x-a\r\n",
    b"Expect: 100-continue\r\n",
    b" folded\r\n",
    b"X-A: \x80\xff\r\n",
    b"\r\n",
    b"\n",
];

/// A copy of `seed` with 1–4 mutations: byte flips to special or random
/// bytes, insertions, deletions, a spliced header line, a duplicated or
/// truncated range.
pub fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let at = rng.usize(0..=b.len());
        let byte = if rng.bool() {
            SPECIAL[rng.usize(0..SPECIAL.len())]
        } else {
            rng.u8(..)
        };
        match rng.u8(0..7) {
            0 if at < b.len() => b[at] = byte,
            1 => b.insert(at, byte),
            2 if at < b.len() => {
                b.remove(at);
            }
            3 => {
                let line = LINES[rng.usize(0..LINES.len())];
                // At a line start when there is one after `at`.
                let at = b[at..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(at, |i| at + i + 1);
                b.splice(at..at, line.iter().copied());
            }
            4 if at < b.len() => {
                let end = rng.usize(at..=b.len().min(at + 40));
                let copy = b[at..end].to_vec();
                b.splice(end..end, copy);
            }
            5 => b.truncate(at),
            _ => b.push(byte),
        }
    }
    b
}
