//! Configuration problems, each tied to a place in the file, printed as
//! `FILE:LINE:COL: message`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Byte range in the file the problem is about; `None` for whole-file
    /// problems (unreadable file).
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl Problem {
    /// A problem located at `span`.
    pub fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Self {
            span: Some(span),
            message: message.into(),
        }
    }

    /// A problem about the file as a whole.
    pub fn whole(message: impl Into<String>) -> Self {
        Self {
            span: None,
            message: message.into(),
        }
    }
}

/// Every problem found while loading one config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    /// The file's text, kept to turn byte offsets into lines and columns.
    source_text: String,
    pub problems: Vec<Problem>,
}

impl ConfigError {
    pub fn new(path: &Path, source_text: String, problems: Vec<Problem>) -> Self {
        Self {
            path: path.to_path_buf(),
            source_text,
            problems,
        }
    }

    /// Each problem as a `FILE:LINE:COL: message` line, in file order.
    pub fn lines(&self) -> Vec<String> {
        let mut ps: Vec<&Problem> = self.problems.iter().collect();
        ps.sort_by_key(|p| p.span.as_ref().map_or(0, |s| s.start));
        ps.into_iter()
            .map(|p| match &p.span {
                Some(span) => {
                    let (line, col) = line_col(&self.source_text, span.start);
                    format!("{}:{line}:{col}: {}", self.path.display(), p.message)
                }
                None => format!("{}: {}", self.path.display(), p.message),
            })
            .collect()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("\n"))
    }
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
pub fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 8), (2, 3));
        assert_eq!(line_col(t, 999), (3, 1));
    }
}
