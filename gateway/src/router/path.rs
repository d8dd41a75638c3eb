//! Path predicates: exact paths, prefixes and templates.

use std::cmp::Reverse;
use std::fmt;
use std::ops::Range;

use toml::Spanned;

use super::normalize::normalize;
use super::{MAX_PARAMS, Params};
use crate::config::Problem;

/// A route's path predicate.
#[derive(Debug)]
pub(super) enum PathMatch {
    /// No path predicate: every path.
    Any,
    Exact(Box<str>),
    Prefix(Prefix),
    Template(Template),
}

/// `path_prefix`.
#[derive(Debug)]
pub(super) struct Prefix {
    /// As written, e.g. `/api/` or `/api`.
    pub(super) prefix: Box<str>,
}

impl Prefix {
    fn matches(&self, path: &str) -> bool {
        match self.prefix.strip_suffix('/') {
            // Segment boundaries: `/api/` matches `/api`, `/api/`, `/api/x`.
            Some(dir) => path.starts_with(&*self.prefix) || (!dir.is_empty() && path == dir),
            None => path.starts_with(&*self.prefix),
        }
    }
}

/// A path template such as `/users/{id}/files/{rest...}`.
#[derive(Debug)]
pub(super) struct Template {
    pub(super) source: Box<str>,
    segments: Box<[Segment]>,
    /// Parameter names in declaration order (the order of `Params`).
    pub(super) names: Box<[Box<str>]>,
}

#[derive(Debug)]
enum Segment {
    Literal(Box<str>),
    /// `{name}`: one non-empty segment.
    Param,
    /// `{name...}`: the rest of the path, possibly empty; always last.
    Rest,
}

/// Specificity of a path predicate; smaller sorts first (more specific).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum PathKey {
    Exact,
    /// More literal segments, then no `{rest...}`, then more segments.
    Template {
        literals: Reverse<usize>,
        rest: bool,
        segments: Reverse<usize>,
    },
    /// Longer prefixes first.
    Prefix(Reverse<usize>),
    Any,
}

impl PathMatch {
    /// Compiles `path` / `path_prefix`, pushing every problem found.
    pub(super) fn compile(
        path: Option<&Spanned<String>>,
        prefix: Option<&Spanned<String>>,
        problems: &mut Vec<Problem>,
    ) -> Option<PathMatch> {
        match (path, prefix) {
            (None, None) => Some(PathMatch::Any),
            (Some(_), Some(pre)) => {
                problems.push(Problem::at(
                    pre.span(),
                    "give either `path` or `path_prefix`, not both",
                ));
                None
            }
            (None, Some(pre)) => {
                let p = pre.get_ref();
                check_path(p, "path_prefix", pre.span(), problems).then(|| {
                    PathMatch::Prefix(Prefix {
                        prefix: p.as_str().into(),
                    })
                })
            }
            (Some(path), None) => {
                let p = path.get_ref();
                if p.contains(['{', '}']) {
                    Template::compile(path, problems).map(PathMatch::Template)
                } else {
                    check_path(p, "path", path.span(), problems)
                        .then(|| PathMatch::Exact(p.as_str().into()))
                }
            }
        }
    }

    pub(super) fn key(&self) -> PathKey {
        match self {
            PathMatch::Exact(_) => PathKey::Exact,
            PathMatch::Template(t) => PathKey::Template {
                literals: Reverse(
                    t.segments
                        .iter()
                        .filter(|s| matches!(s, Segment::Literal(_)))
                        .count(),
                ),
                rest: matches!(t.segments.last(), Some(Segment::Rest)),
                segments: Reverse(t.segments.len()),
            },
            PathMatch::Prefix(p) => PathKey::Prefix(Reverse(p.prefix.len())),
            PathMatch::Any => PathKey::Any,
        }
    }

    /// Whether `path` matches, with the captured parameters.
    pub(super) fn matches(&self, path: &str) -> Option<Params> {
        match self {
            PathMatch::Any => Some(Params::default()),
            PathMatch::Exact(e) => (**e == *path).then(Params::default),
            PathMatch::Prefix(p) => p.matches(path).then(Params::default),
            PathMatch::Template(t) => t.matches(path),
        }
    }

    /// Parameter names, for rewrites.
    pub(super) fn param_names(&self) -> &[Box<str>] {
        match self {
            PathMatch::Template(t) => &t.names,
            _ => &[],
        }
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::Any => f.write_str("any"),
            PathMatch::Exact(p) => write!(f, "exact {p}"),
            PathMatch::Prefix(p) => write!(f, "prefix {}", p.prefix),
            PathMatch::Template(t) => write!(f, "template {}", t.source),
        }
    }
}

/// Checks that a configured path starts with '/' and is canonical: request
/// paths are normalized before matching, so any other spelling never matches.
fn check_path(p: &str, what: &str, span: Range<usize>, problems: &mut Vec<Problem>) -> bool {
    if !p.starts_with('/') {
        problems.push(Problem::at(span, format!("{what} must start with '/'")));
        return false;
    }
    match normalize(p) {
        Ok(n) if n == p => true,
        Ok(n) => {
            problems.push(Problem::at(
                span,
                format!(
                    "{what} {p:?} is not in normalized form and would never match; write {n:?}"
                ),
            ));
            false
        }
        Err(e) => {
            problems.push(Problem::at(span, format!("invalid {what} {p:?}: {e}")));
            false
        }
    }
}

impl Template {
    fn compile(path: &Spanned<String>, problems: &mut Vec<Problem>) -> Option<Template> {
        let src = path.get_ref();
        let span = path.span();
        let before = problems.len();
        let mut bad = |msg: String| problems.push(Problem::at(span.clone(), msg));
        let Some(body) = src.strip_prefix('/') else {
            bad("path must start with '/'".into());
            return None;
        };
        let mut segments = Vec::new();
        let mut names: Vec<Box<str>> = Vec::new();
        let count = body.split('/').count();
        for (i, seg) in body.split('/').enumerate() {
            let last = i + 1 == count;
            if !seg.contains(['{', '}']) {
                if let Err(msg) = check_literal(seg, last) {
                    bad(msg);
                }
                segments.push(Segment::Literal(seg.into()));
                continue;
            }
            if seg.matches('{').count() != seg.matches('}').count() {
                bad(format!(
                    "invalid template segment {seg:?}: unbalanced braces"
                ));
                continue;
            }
            let whole = seg
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .filter(|s| !s.contains(['{', '}']));
            let Some(inner) = whole else {
                bad(format!(
                    "invalid template segment {seg:?}: a parameter must be a whole segment, as in /users/{{id}}"
                ));
                continue;
            };
            let (name, rest) = match inner.strip_suffix("...") {
                Some(n) => (n, true),
                None => (inner, false),
            };
            if name.is_empty() {
                bad(format!(
                    "invalid template segment {seg:?}: empty parameter name"
                ));
                continue;
            }
            if !valid_name(name) {
                bad(format!(
                    "invalid parameter name {name:?}: use letters, digits and '_', not starting with a digit"
                ));
                continue;
            }
            if names.iter().any(|n| **n == *name) {
                bad(format!("duplicate parameter name {name:?}"));
                continue;
            }
            if rest && !last {
                bad(format!(
                    "{{{name}...}} must be the last segment of the template"
                ));
                continue;
            }
            names.push(name.into());
            segments.push(if rest { Segment::Rest } else { Segment::Param });
        }
        if names.len() > MAX_PARAMS {
            bad(format!(
                "a template may have at most {MAX_PARAMS} parameters, this one has {}",
                names.len()
            ));
        }
        if problems.len() > before {
            return None;
        }
        Some(Template {
            source: src.as_str().into(),
            segments: segments.into(),
            names: names.into(),
        })
    }

    fn matches(&self, path: &str) -> Option<Params> {
        // Params stores u32 offsets.
        if u32::try_from(path.len()).is_err() {
            return None;
        }
        let mut params = Params::default();
        let mut rest = path.strip_prefix('/')?;
        let mut offset = 1;
        let mut segs = self.segments.iter().peekable();
        while let Some(seg) = segs.next() {
            if let Segment::Rest = seg {
                params.push(offset..path.len());
                return Some(params);
            }
            let (part, tail) = match rest.find('/') {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            match seg {
                Segment::Literal(l) if **l == *part => {}
                Segment::Param if !part.is_empty() => params.push(offset..offset + part.len()),
                _ => return None,
            }
            match tail {
                Some(t) => {
                    offset += part.len() + 1;
                    rest = t;
                }
                // Path exhausted: a match only if the template is too.
                None => return segs.peek().is_none().then_some(params),
            }
        }
        // Template exhausted but the path goes on.
        None
    }
}

/// Checks one literal template segment the way `check_path` checks a path.
fn check_literal(seg: &str, last: bool) -> Result<(), String> {
    let never = "is not in normalized form and would never match";
    match seg {
        "" if !last => Err(format!(
            "template has an empty segment (repeated '/'); it {never}"
        )),
        "." | ".." => Err(format!("template segment {seg:?} {never}")),
        _ => match normalize(&format!("/{seg}")) {
            Ok(n) if n[1..] == *seg => Ok(()),
            Ok(n) => Err(format!(
                "template segment {seg:?} {never}; write {:?}",
                &n[1..]
            )),
            Err(e) => Err(format!("invalid template segment {seg:?}: {e}")),
        },
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
