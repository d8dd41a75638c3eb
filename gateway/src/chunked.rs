//! The chunked transfer coding (RFC 9112 §7.1) as a decoder state, shared
//! by the HTTP/1.1 server (`listener::h1`, which reads request bodies and
//! finds the next head where one ends) and the HTTP/1.1 upstream client
//! (`upstream::h1`, which forwards response data). One parser, so the two
//! sides agree byte for byte on where a chunked body ends.
//!
//! Accepted: hex sizes of up to 16 digits, optional whitespace and
//! extensions (`;name=value`) after the size, CRLF or a bare LF as line
//! ends, trailer fields (skipped). Refused: a size line without digits, a
//! CR not followed by LF in it, anything but whitespace or `;` after the
//! digits (`1 0`), control characters in an extension, chunk data not
//! followed by a line end — each a way two parsers could disagree on a
//! chunk's size.

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A chunk-size line: the size so far, its hex digits, what follows
    /// them (`DIGITS`, `SPACE`, `EXTENSION`), and whether a CR was just
    /// read (only LF may follow).
    Size {
        size: u64,
        digits: u8,
        after: u8,
        cr: bool,
    },
    /// Chunk data still to come.
    Data(u64),
    /// The line end after chunk data.
    DataCr,
    DataLf,
    /// Trailer lines; whether the current line is still empty.
    Trailer {
        empty: bool,
    },
    Done,
}

/// What one `Decoder::advance` found at the start of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Framing bytes consumed.
    pub framing: usize,
    /// Then this many bytes of chunk data (for the caller to take).
    pub data: usize,
}

const DIGITS: u8 = 0;
const SPACE: u8 = 1;
const EXTENSION: u8 = 2;

const SIZE: State = State::Size {
    size: 0,
    digits: 0,
    after: DIGITS,
    cr: false,
};

impl Default for Decoder {
    fn default() -> Self {
        Decoder { state: SIZE }
    }
}

impl Decoder {
    /// The body has ended (its last trailer line was read).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing bytes from the start of `input` up to the next
    /// chunk data, the end of `input` or the end of the body, and says how
    /// many bytes after them are chunk data (already counted as consumed).
    pub fn advance(&mut self, input: &[u8]) -> Result<Step, &'static str> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Done => break,
                State::Data(n) => {
                    let take = n.min((input.len() - i) as u64);
                    self.state = if take == n {
                        State::DataCr
                    } else {
                        State::Data(n - take)
                    };
                    return Ok(Step {
                        framing: i,
                        // `take` ≤ `input.len() - i`.
                        data: usize::try_from(take).unwrap_or(input.len() - i),
                    });
                }
                _ => {
                    self.byte(input[i])?;
                    i += 1;
                }
            }
        }
        Ok(Step {
            framing: i,
            data: 0,
        })
    }

    fn byte(&mut self, b: u8) -> Result<(), &'static str> {
        self.state = match self.state {
            State::Size {
                size,
                digits,
                after,
                cr,
            } => match b {
                b'\n' if digits == 0 => return Err("invalid chunk size"),
                b'\n' if size == 0 => State::Trailer { empty: true },
                b'\n' => State::Data(size),
                _ if cr => return Err("a CR in a chunk size line not followed by LF"),
                b'\r' => State::Size {
                    size,
                    digits,
                    after,
                    cr: true,
                },
                _ if after == EXTENSION => {
                    // `;name=value`: printable text.
                    if b.is_ascii_control() && b != b'\t' {
                        return Err("invalid chunk extension");
                    }
                    self.state
                }
                b' ' | b'\t' if digits > 0 => State::Size {
                    size,
                    digits,
                    after: SPACE,
                    cr: false,
                },
                b';' if digits > 0 => State::Size {
                    size,
                    digits,
                    after: EXTENSION,
                    cr: false,
                },
                _ if after == SPACE => return Err("invalid chunk size"),
                _ => match (b as char).to_digit(16) {
                    Some(d) if digits < 16 => State::Size {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                        after: DIGITS,
                        cr: false,
                    },
                    _ => return Err("invalid chunk size"),
                },
            },
            State::DataCr if b == b'\r' => State::DataLf,
            State::DataCr | State::DataLf if b == b'\n' => SIZE,
            State::DataCr | State::DataLf => return Err("chunk data is not followed by CRLF"),
            State::Trailer { empty } => match b {
                b'\r' => self.state,
                b'\n' if empty => State::Done,
                b'\n' => State::Trailer { empty: true },
                _ => State::Trailer { empty: false },
            },
            // Data is handed out in bulk by `advance`; nothing follows Done.
            State::Data(_) | State::Done => self.state,
        };
        Ok(())
    }
}

/// `len` in hex and CRLF, written into `out`: a chunk's size line (the
/// encoding side, for the server's responses and the client's requests).
pub fn size_line(len: usize, out: &mut [u8; 18]) -> &[u8] {
    let mut i = 16;
    let mut n = len;
    loop {
        i -= 1;
        out[i] = crate::hex::DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out[16] = b'\r';
    out[17] = b'\n';
    &out[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_lines() {
        let mut b = [0u8; 18];
        assert_eq!(size_line(0, &mut b), b"0\r\n");
        assert_eq!(size_line(255, &mut b), b"ff\r\n");
        assert_eq!(size_line(usize::MAX, &mut b), b"ffffffffffffffff\r\n");
    }

    /// Decodes `wire` fed in pieces of `piece` bytes: the data, whether the
    /// body ended, and how many bytes it took.
    fn decode(wire: &[u8], piece: usize) -> Result<(Vec<u8>, bool, usize), &'static str> {
        let mut d = Decoder::default();
        let mut data = Vec::new();
        let mut used = 0;
        for chunk in wire.chunks(piece) {
            let mut rest = chunk;
            while !rest.is_empty() && !d.is_done() {
                let s = d.advance(rest)?;
                data.extend_from_slice(&rest[s.framing..s.framing + s.data]);
                used += s.framing + s.data;
                rest = &rest[s.framing + s.data..];
            }
        }
        Ok((data, d.is_done(), used))
    }

    #[test]
    fn decodes_sizes_extensions_trailers_in_any_pieces() {
        let wire = b"5;x=y\r\nhello\r\nA \r\n0123456789\n1 \t;e\r\n!\r\n0\r\nT: v\r\n\r\nNEXT";
        for piece in 1..wire.len() {
            let (data, done, used) = decode(wire, piece).unwrap();
            assert_eq!(data, b"hello0123456789!", "pieces of {piece}");
            assert!(done);
            assert_eq!(used, wire.len() - 4, "stops before what follows the body");
        }
    }

    /// A well-formed chunked encoding of random data with the optional
    /// parts varied: hex case, leading zeros, whitespace and extensions
    /// after sizes, bare-LF line ends, trailer fields.
    fn random_encoding(rng: &mut fastrand::Rng) -> (Vec<u8>, Vec<u8>) {
        let eol = |rng: &mut fastrand::Rng| -> &'static [u8] {
            if rng.u8(0..4) == 0 { b"\n" } else { b"\r\n" }
        };
        let (mut wire, mut data) = (Vec::new(), Vec::new());
        for _ in 0..rng.usize(0..6) {
            let n = rng.usize(1..300);
            let mut size = format!("{}{n:x}", "0".repeat(rng.usize(0..3)));
            if rng.bool() {
                size = size.to_uppercase();
            }
            wire.extend_from_slice(size.as_bytes());
            if rng.u8(0..4) == 0 {
                wire.extend_from_slice(b" \t");
            }
            if rng.u8(0..3) == 0 {
                wire.extend_from_slice(b";name=\"v a\";flag");
            }
            wire.extend_from_slice(eol(rng));
            let chunk: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            wire.extend_from_slice(&chunk);
            data.extend_from_slice(&chunk);
            wire.extend_from_slice(eol(rng));
        }
        wire.extend_from_slice(b"0");
        wire.extend_from_slice(eol(rng));
        for _ in 0..rng.usize(0..3) {
            wire.extend_from_slice(b"X-Trailer: 1");
            wire.extend_from_slice(eol(rng));
        }
        wire.extend_from_slice(eol(rng));
        (wire, data)
    }

    #[test]
    fn random_encodings_decode_to_their_data_in_any_pieces() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..2_000 {
            let (wire, data) = random_encoding(&mut rng);
            let piece = rng.usize(1..=wire.len() + 4);
            let input = [&wire[..], b"GET / HTTP/1.1\r\n"].concat();
            let (got, done, used) = decode(&input, piece).unwrap();
            assert!(
                done && got == data && used == wire.len(),
                "{wire:?} in pieces of {piece}"
            );
        }
    }

    #[test]
    fn mutated_encodings_frame_the_same_in_any_pieces() {
        // Hostile bytes: no panic, nothing read past the input, and the same
        // verdict (data, end, bytes used, or a refusal) however the bytes
        // are split across reads: where a body ends cannot depend on how
        // the network cut it.
        let mut rng = fastrand::Rng::with_seed(12);
        for _ in 0..5_000 {
            let (wire, _) = random_encoding(&mut rng);
            let bad = crate::mutate::mutate(&mut rng, &wire);
            let whole = decode(&bad, bad.len().max(1));
            if let Ok((data, _, used)) = &whole {
                assert!(used <= &bad.len() && data.len() <= *used, "{bad:?}");
            }
            for piece in [1, 2, rng.usize(1..=bad.len().max(1))] {
                let split = decode(&bad, piece);
                assert_eq!(
                    split.as_ref().map_err(|_| ()),
                    whole.as_ref().map_err(|_| ()),
                    "{:?} in pieces of {piece}",
                    String::from_utf8_lossy(&bad)
                );
            }
        }
    }

    #[test]
    fn refuses_malformed_codings() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"12345678901234567\r\n",
            b"1\r\nxy",
            b"1;a\x01\r\n",
            // Read as 0x10 by a parser that drops CRs, as 1 by one that
            // stops at whitespace: refused.
            b"1\r0\r\n",
            b"1 0\r\n",
            b"1 x\r\n",
            b"1\r\r\n",
        ] {
            assert!(
                decode(bad, bad.len()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
