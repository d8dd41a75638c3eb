//! Request routing: compiled per-route matchers (`Matcher`), a per-listener
//! `Router` that orders them by precedence, path normalization
//! (`normalize`) and path rewriting (`Rewrite`).
//!
//! Skeleton implementation: exact paths, prefixes, methods and exact hosts.

pub mod normalize;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use http::{HeaderMap, Method};
use toml::Spanned;

use crate::config::Problem;
use crate::config::file;

/// The parts of a request routing looks at. `path` is already normalized.
pub struct Request<'a> {
    pub method: &'a Method,
    /// Host without port, lowercase.
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// Template parameters captured from the path, as byte ranges into it, in
/// the order the template declares them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params(pub Vec<Range<usize>>);

/// Result of routing one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Route id (index into `Config::routes`) and captured parameters.
    Matched {
        route: usize,
        params: Params,
    },
    /// A route matched everything but the method.
    MethodNotAllowed {
        allowed: Vec<Method>,
    },
    NotFound,
}

/// One route's compiled predicates.
#[derive(Debug)]
pub struct Matcher {
    hosts: Vec<String>,
    exact: Option<String>,
    prefix: Option<String>,
    methods: Vec<Method>,
}

impl Matcher {
    /// Compiles a `[routes.match]` table, reporting every problem.
    pub fn compile(m: &file::Match) -> Result<Matcher, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut methods = Vec::new();
        for meth in &m.methods {
            match Method::from_bytes(meth.get_ref().to_ascii_uppercase().as_bytes()) {
                Ok(x) => methods.push(x),
                Err(_) => problems.push(Problem::at(
                    meth.span(),
                    format!("invalid method {:?}", meth.get_ref()),
                )),
            }
        }
        for p in [&m.path, &m.path_prefix].into_iter().flatten() {
            if !p.get_ref().starts_with('/') {
                problems.push(Problem::at(p.span(), "a path must start with '/'"));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Matcher {
            hosts: m
                .hosts
                .iter()
                .map(|h| h.get_ref().to_ascii_lowercase())
                .collect(),
            exact: m.path.as_ref().map(|p| p.get_ref().clone()),
            prefix: m.path_prefix.as_ref().map(|p| p.get_ref().clone()),
            methods,
        })
    }

    fn matches_path(&self, req: &Request<'_>) -> bool {
        if !self.hosts.is_empty() && !req.host.is_some_and(|h| self.hosts.iter().any(|x| x == h)) {
            return false;
        }
        if let Some(e) = &self.exact
            && e != req.path
        {
            return false;
        }
        if let Some(p) = &self.prefix
            && !req.path.starts_with(p.as_str())
        {
            return false;
        }
        true
    }
}

/// The routes of one listener, in precedence order.
#[derive(Debug, Default)]
pub struct Router {
    entries: Vec<(usize, Arc<Matcher>)>,
}

impl Router {
    /// Orders `(route id, matcher)` pairs by precedence.
    pub fn new(entries: Vec<(usize, Arc<Matcher>)>) -> Router {
        Router { entries }
    }

    /// Finds the route for `req`.
    pub fn find(&self, req: &Request<'_>) -> Outcome {
        let mut allowed = Vec::new();
        for (id, m) in &self.entries {
            if !m.matches_path(req) {
                continue;
            }
            if m.methods.is_empty() || m.methods.contains(req.method) {
                return Outcome::Matched {
                    route: *id,
                    params: Params::default(),
                };
            }
            allowed.extend(m.methods.iter().cloned());
        }
        if allowed.is_empty() {
            Outcome::NotFound
        } else {
            Outcome::MethodNotAllowed { allowed }
        }
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Router {
    /// The routing table in precedence order, for `gateway routes`.
    pub fn display<'a>(
        &'a self,
        routes: &'a [crate::config::RouteConfig],
    ) -> impl fmt::Display + 'a {
        struct Table<'a>(&'a Router, &'a [crate::config::RouteConfig]);
        impl fmt::Display for Table<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for (id, m) in &self.0.entries {
                    let name = self.1.get(*id).map_or("?", |r| &r.name);
                    writeln!(f, "  {name}\t{m:?}")?;
                }
                Ok(())
            }
        }
        Table(self, routes)
    }
}

/// A compiled `rewrite` template.
#[derive(Debug)]
pub struct Rewrite {
    template: String,
}

impl Rewrite {
    /// Compiles `rewrite` against the route's matcher (its parameter names).
    pub fn compile(rewrite: &Spanned<String>, _matcher: &Matcher) -> Result<Rewrite, Problem> {
        if !rewrite.get_ref().starts_with('/') {
            return Err(Problem::at(rewrite.span(), "rewrite must start with '/'"));
        }
        Ok(Rewrite {
            template: rewrite.get_ref().clone(),
        })
    }

    /// The rewritten path for `path` with `params` captured from it.
    pub fn apply(&self, _path: &str, _params: &Params) -> String {
        self.template.clone()
    }
}
