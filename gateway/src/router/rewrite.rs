//! `rewrite`: the upstream path, built from literal text and the route's
//! template parameters.

use toml::Spanned;

use super::normalize::normalize;
use super::{Matcher, Params};
use crate::config::Problem;

/// A compiled `rewrite` template such as `/v2/users/{id}`.
#[derive(Debug)]
pub struct Rewrite {
    parts: Box<[Part]>,
    /// Length of the literal parts, to size the output.
    literal_len: usize,
}

#[derive(Debug)]
enum Part {
    Literal(Box<str>),
    /// Index into the route's `Params`.
    Param(usize),
}

impl Rewrite {
    /// Compiles `rewrite` against the route's matcher: every `{name}` must be
    /// a parameter of the route's path template.
    pub fn compile(rewrite: &Spanned<String>, matcher: &Matcher) -> Result<Rewrite, Problem> {
        let src = rewrite.get_ref();
        let bad = |msg: String| Problem::at(rewrite.span(), msg);
        if !src.starts_with('/') {
            return Err(bad("rewrite must start with '/'".into()));
        }
        let names = matcher.param_names();
        let mut parts = Vec::new();
        // The rewrite with each parameter replaced by a plain segment, to
        // check that its literal parts are a normalized path.
        let mut shape = String::with_capacity(src.len());
        let mut rest = src.as_str();
        while !rest.is_empty() {
            let open = rest.find('{');
            let close = rest.find('}');
            match (open, close) {
                (None, None) => {
                    parts.push(Part::Literal(rest.into()));
                    shape.push_str(rest);
                    break;
                }
                (Some(o), Some(c)) if o < c => {
                    if o > 0 {
                        parts.push(Part::Literal(rest[..o].into()));
                        shape.push_str(&rest[..o]);
                    }
                    let name = &rest[o + 1..c];
                    if name.contains('{') {
                        return Err(bad(format!("invalid rewrite {src:?}: unbalanced braces")));
                    }
                    if let Some(base) = name.strip_suffix("...")
                        && names.iter().any(|n| **n == *base)
                    {
                        return Err(bad(format!(
                            "rewrite {src:?}: write {{{base}}}, without '...', to insert the rest of the path"
                        )));
                    }
                    let Some(i) = names.iter().position(|n| **n == *name) else {
                        let known = if names.is_empty() {
                            "the route's path has no template parameters".to_string()
                        } else {
                            let list: Vec<String> =
                                names.iter().map(|n| format!("{{{n}}}")).collect();
                            format!("the route's path defines {}", list.join(", "))
                        };
                        return Err(bad(format!(
                            "rewrite {src:?} uses {{{name}}}, which the route's path does not define; {known}"
                        )));
                    };
                    parts.push(Part::Param(i));
                    shape.push('p');
                    rest = &rest[c + 1..];
                }
                _ => return Err(bad(format!("invalid rewrite {src:?}: unbalanced braces"))),
            }
        }
        match normalize(&shape) {
            Ok(n) if n == shape => {}
            _ => {
                return Err(bad(format!(
                    "rewrite {src:?} is not a normalized path (no '//', '.' or '..' segments, \
                     escapes only where needed, uppercase hex)"
                )));
            }
        }
        let literal_len = parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.len(),
                Part::Param(_) => 0,
            })
            .sum();
        Ok(Rewrite {
            parts: parts.into(),
            literal_len,
        })
    }

    /// The rewritten path for `path` with `params` captured from it.
    pub fn apply(&self, path: &str, params: &Params) -> String {
        let value = |i: usize| params.get(i).and_then(|r| path.get(r)).unwrap_or("");
        let len = self.literal_len
            + self
                .parts
                .iter()
                .map(|p| match p {
                    Part::Param(i) => value(*i).len(),
                    Part::Literal(_) => 0,
                })
                .sum::<usize>();
        let mut out = String::with_capacity(len);
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Param(i) => out.push_str(value(*i)),
            }
        }
        // An empty `{rest...}` between two slashes would leave `//`, which
        // some upstreams read as the start of an authority: merged.
        if out.contains("//") {
            let mut prev = false;
            out.retain(|c| {
                let dup = c == '/' && prev;
                prev = c == '/';
                !dup
            });
        }
        out
    }
}
