//! Path normalization before routing, so that `/admin/../public`, `/%61dmin`
//! and `//admin` cannot dodge a route's policy.
//!
//! The result is the one canonical spelling of a path (RFC 3986 §6.2.2):
//! - `%XX` escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded and the hex of every other escape is uppercased;
//! - bytes that may not appear raw in a path (space, `"`, `<`, `>`, `[`,
//!   `]`, `^`, `` ` ``, `{`, `|`, `}` and non-ASCII) are percent-encoded;
//! - repeated slashes are merged;
//! - `.` and `..` segments are removed (RFC 3986 §5.2.4), after decoding, so
//!   `%2e%2e` is a `..` too.
//!
//! It is an error (the gateway answers 400) for the path to contain an
//! encoded slash (`%2F`), an encoded backslash (`%5C`), an encoded or raw
//! control byte (including `%00`), a raw backslash, a malformed escape, a
//! `..` that climbs above the root, or a segment that is empty, `.` or `..`
//! before `;` parameters (`/..;/admin`, `/;x/admin`): servlet containers
//! drop the parameters and then resolve such a segment, so the gateway
//! and the upstream would see different paths. Normalizing is idempotent, and a path
//! that is already canonical is returned borrowed, without allocating.

use std::borrow::Cow;

/// Why a path could not be normalized safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    #[error("path does not start with '/'")]
    NotAbsolute,
    #[error("malformed percent-escape")]
    MalformedEscape,
    #[error("encoded slash (%2F)")]
    EncodedSlash,
    #[error("encoded backslash (%5C)")]
    EncodedBackslash,
    #[error("encoded control byte (%{0:02X})")]
    EncodedControl(u8),
    #[error("backslash")]
    Backslash,
    #[error("control byte 0x{0:02X}")]
    ControlByte(u8),
    #[error("'..' climbs above the root")]
    AboveRoot,
    #[error("a segment that is empty, '.' or '..' before ';' parameters")]
    DotSegmentParams,
}

/// What to do with one input byte (or escape).
enum Class {
    /// Copy as is.
    Keep,
    /// Percent-encode (may not appear raw in a path).
    Encode,
    /// Start of a `%XX` escape.
    Escape,
}

fn class(b: u8) -> Result<Class, NormalizeError> {
    match b {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => Ok(Class::Keep),
        // sub-delims, ':', '@' and the separator.
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' | b':'
        | b'@' | b'/' => Ok(Class::Keep),
        b'%' => Ok(Class::Escape),
        b'\\' => Err(NormalizeError::Backslash),
        0..=0x1f | 0x7f => Err(NormalizeError::ControlByte(b)),
        _ => Ok(Class::Encode),
    }
}

/// A checked escape at the start of `s` (which begins with `%`).
enum Escape {
    /// Decodes to this unreserved character.
    Decode(u8),
    /// Stays an escape of this byte; `canonical` when its hex is uppercase.
    Keep { byte: u8, canonical: bool },
}

fn escape(s: &[u8]) -> Result<Escape, NormalizeError> {
    let (Some(&h), Some(&l)) = (s.get(1), s.get(2)) else {
        return Err(NormalizeError::MalformedEscape);
    };
    let (Some(hv), Some(lv)) = (hex(h), hex(l)) else {
        return Err(NormalizeError::MalformedEscape);
    };
    let byte = hv << 4 | lv;
    match byte {
        b'/' => Err(NormalizeError::EncodedSlash),
        b'\\' => Err(NormalizeError::EncodedBackslash),
        0..=0x1f | 0x7f => Err(NormalizeError::EncodedControl(byte)),
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
            Ok(Escape::Decode(byte))
        }
        _ => Ok(Escape::Keep {
            byte,
            canonical: !h.is_ascii_lowercase() && !l.is_ascii_lowercase(),
        }),
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xf)]));
}

/// Normalizes a request path (without query). See the module doc.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, NormalizeError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(NormalizeError::NotAbsolute);
    }
    if is_canonical(b)? {
        Ok(Cow::Borrowed(path))
    } else {
        rebuild(path).map(Cow::Owned)
    }
}

/// Checks every byte (so errors are found here) and tells whether `b` is
/// already canonical.
fn is_canonical(b: &[u8]) -> Result<bool, NormalizeError> {
    let mut canonical = true;
    let mut seg_start = 1;
    let mut i = 1;
    while i < b.len() {
        match class(b[i])? {
            Class::Keep => {
                if b[i] == b'/' {
                    if matches!(&b[seg_start..i], b"" | b"." | b"..") {
                        canonical = false;
                    }
                    seg_start = i + 1;
                } else if b[i] == b';' && matches!(&b[seg_start..i], b"" | b"." | b"..") {
                    return Err(NormalizeError::DotSegmentParams);
                }
                i += 1;
            }
            Class::Encode => {
                canonical = false;
                i += 1;
            }
            Class::Escape => {
                match escape(&b[i..])? {
                    Escape::Decode(_)
                    | Escape::Keep {
                        canonical: false, ..
                    } => canonical = false,
                    Escape::Keep { .. } => {}
                }
                i += 3;
            }
        }
    }
    // The last segment may be empty (a trailing slash) but not a dot segment.
    if matches!(&b[seg_start.min(b.len())..], b"." | b"..") {
        canonical = false;
    }
    Ok(canonical)
}

/// Builds the canonical form of an absolute path.
fn rebuild(path: &str) -> Result<String, NormalizeError> {
    // `out` is empty or `/seg1/seg2...`; a trailing slash is added at the end.
    let mut out = String::with_capacity(path.len() + 8);
    let mut trailing = false;
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        let mark = out.len();
        out.push('/');
        decode_segment(seg, &mut out)?;
        if let Some((head, _)) = out[mark + 1..].split_once(';')
            && matches!(head, "" | "." | "..")
        {
            return Err(NormalizeError::DotSegmentParams);
        }
        match &out[mark + 1..] {
            "" | "." => {
                out.truncate(mark);
                trailing = last;
            }
            ".." => {
                out.truncate(mark);
                let parent = out.rfind('/').ok_or(NormalizeError::AboveRoot)?;
                out.truncate(parent);
                trailing = last;
            }
            _ => trailing = false,
        }
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

/// Appends the canonical form of one segment (no `/` in it) to `out`.
fn decode_segment(seg: &str, out: &mut String) -> Result<(), NormalizeError> {
    let b = seg.as_bytes();
    // `seg[run..i]` is a run of kept (ASCII) bytes not yet copied; `run` is
    // only used to slice when the run is non-empty, so it never splits a
    // multi-byte character being encoded byte by byte.
    let mut run = 0;
    let mut i = 0;
    let flush = |out: &mut String, run: usize, i: usize| {
        if run < i {
            out.push_str(&seg[run..i]);
        }
    };
    while i < b.len() {
        match class(b[i])? {
            Class::Keep => i += 1,
            Class::Encode => {
                flush(out, run, i);
                push_escape(out, b[i]);
                i += 1;
                run = i;
            }
            Class::Escape => {
                flush(out, run, i);
                match escape(&b[i..])? {
                    Escape::Decode(c) => out.push(char::from(c)),
                    Escape::Keep { byte, .. } => push_escape(out, byte),
                }
                i += 3;
                run = i;
            }
        }
    }
    flush(out, run, b.len());
    Ok(())
}
