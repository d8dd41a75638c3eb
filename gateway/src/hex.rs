//! Lowercase hexadecimal, as the gateway writes it: request ids, chunk
//! size lines, and the digests in Redis keys.

/// The digits, by value.
pub const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes `src` into `out` as two digits per byte, most significant first;
/// `out` holds exactly `2 * src.len()` bytes.
pub fn encode_into(src: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), 2 * src.len());
    for (pair, &b) in out.chunks_exact_mut(2).zip(src) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_format() {
        let src = [0x00, 0x09, 0x9f, 0xa0, 0xff];
        let mut out = [0u8; 10];
        encode_into(&src, &mut out);
        let want: String = src.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(out, want.as_bytes());
    }
}
