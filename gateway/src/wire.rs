//! HTTP/1.1 wire pieces shared by the gateway's server (`listener::h1`) and
//! its upstream client (`upstream::h1`), so that both sides read framing
//! headers the same way: `Content-Length` values, `Connection` tokens, and
//! writing a list of buffers whole.

use std::io::IoSlice;

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

/// Whether a `Connection` value lists `close`, and whether it lists
/// `keep-alive`.
pub fn connection_tokens(v: &[u8]) -> (bool, bool) {
    let (mut close, mut keep_alive) = (false, false);
    for token in v.split(|&b| b == b',') {
        let token = token.trim_ascii();
        close |= token.eq_ignore_ascii_case(b"close");
        keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    (close, keep_alive)
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
        assert_eq!(connection_tokens(b"Close"), (true, false));
        assert_eq!(connection_tokens(b"foo, Keep-Alive"), (false, true));
        assert_eq!(connection_tokens(b"upgrade"), (false, false));
    }
}
