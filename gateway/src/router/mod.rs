//! Request routing: compiled per-route matchers (`Matcher`), a per-listener
//! `Router` that orders them by precedence, path normalization
//! (`normalize`) and path rewriting (`Rewrite`). `docs/routing.md` is the
//! user-facing description.
//!
//! Precedence: the most specific route wins, ties go to the route declared
//! first. Specificity compares, in order:
//! 1. host: an exact host, then `*.suffix` wildcards (longer suffix first),
//!    then routes without `hosts`;
//! 2. path: exact, then templates (more literal segments first, then those
//!    without `{rest...}`, then more segments), then prefixes (longer first),
//!    then routes without a path predicate;
//! 3. the number of predicates: a method list counts one, each header and
//!    query predicate one; more first.
//!
//! The router indexes routes by exact host (a hash map), by wildcard suffix
//! (a hash map probed with each suffix of the request host, longest first)
//! and, within each host group, by exact path (a hash map); only templates,
//! prefixes and path-less routes of the request's host groups are scanned.
//! Nothing is compiled or allocated per request except the allowed-method
//! list of a 405.

mod matcher;
pub mod normalize;
mod path;
mod rewrite;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use http::{HeaderMap, Method};

pub use matcher::Matcher;
pub use rewrite::Rewrite;

use matcher::{HostPattern, method_order};
use path::PathKey;

/// Most parameters a path template may declare.
pub const MAX_PARAMS: usize = 8;

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
/// the order the template declares them. Stored inline: routing does not
/// allocate.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params {
    len: u8,
    ranges: [(u32, u32); MAX_PARAMS],
}

impl Params {
    /// The byte range of parameter `i` in the path.
    pub fn get(&self, i: usize) -> Option<Range<usize>> {
        let (start, end) = *self.ranges[..usize::from(self.len)].get(i)?;
        Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records the next parameter. Templates are limited to `MAX_PARAMS`
    /// and paths to `u32::MAX` bytes when compiled, so nothing is dropped.
    fn push(&mut self, r: Range<usize>) {
        if let (Some(slot), Ok(start), Ok(end)) = (
            self.ranges.get_mut(usize::from(self.len)),
            u32::try_from(r.start),
            u32::try_from(r.end),
        ) {
            *slot = (start, end);
            self.len += 1;
        }
    }
}

/// Result of routing one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Route id (index into `Config::routes`) and captured parameters.
    Matched {
        route: usize,
        params: Params,
    },
    /// Routes matched everything but the method; `allowed` is the union of
    /// their methods, deduplicated, in a fixed order (GET, HEAD, POST, ...).
    MethodNotAllowed {
        allowed: Vec<Method>,
    },
    NotFound,
}

/// Host specificity; smaller sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum HostKey {
    Exact,
    /// Longer suffixes first.
    Wildcard(Reverse<usize>),
    Any,
}

/// Precedence within one host group; smaller sorts first.
type RouteKey = (PathKey, Reverse<usize>, usize);

/// Routes of one host group.
#[derive(Debug, Default)]
struct Table {
    /// Routes with an exact path, by path, each list in precedence order.
    exact: HashMap<Box<str>, Vec<usize>>,
    /// The other routes, in precedence order.
    others: Vec<usize>,
}

impl Table {
    fn insert(&mut self, i: usize, m: &Matcher) {
        match &m.path {
            path::PathMatch::Exact(p) => self.exact.entry(p.clone()).or_default().push(i),
            _ => self.others.push(i),
        }
    }
}

/// The routes of one listener, in precedence order.
#[derive(Debug, Default)]
pub struct Router {
    /// `(route id, matcher)` in precedence order; tables index into it.
    routes: Box<[(usize, Arc<Matcher>)]>,
    exact_hosts: HashMap<Box<str>, Table>,
    /// Keyed by suffix including the dot (`.example.com`).
    wildcard_hosts: HashMap<Box<str>, Table>,
    any_host: Table,
}

impl Router {
    /// Orders `(route id, matcher)` pairs by precedence and builds the index.
    pub fn new(entries: Vec<(usize, Arc<Matcher>)>) -> Router {
        let route_key = |(id, m): &(usize, Arc<Matcher>)| -> RouteKey {
            (m.path_key(), Reverse(m.predicate_count()), *id)
        };
        // A route with several hosts is listed at its most specific one.
        let host_key = |m: &Matcher| {
            m.hosts
                .iter()
                .map(|h| match h {
                    HostPattern::Exact(_) => HostKey::Exact,
                    HostPattern::Wildcard(s) => HostKey::Wildcard(Reverse(s.len())),
                })
                .min()
                .unwrap_or(HostKey::Any)
        };
        let mut routes = entries;
        routes.sort_by_cached_key(|e| (host_key(&e.1), route_key(e)));

        let mut router = Router {
            routes: Box::default(),
            exact_hosts: HashMap::new(),
            wildcard_hosts: HashMap::new(),
            any_host: Table::default(),
        };
        for (i, (_, m)) in routes.iter().enumerate() {
            if m.hosts.is_empty() {
                router.any_host.insert(i, m);
            }
            for h in &m.hosts {
                let t = match h {
                    HostPattern::Exact(e) => router.exact_hosts.entry(e.clone()),
                    HostPattern::Wildcard(s) => router.wildcard_hosts.entry(s.clone()),
                };
                t.or_default().insert(i, m);
            }
        }
        // Within a host group, order by path, predicates and id only.
        let keys: Vec<RouteKey> = routes.iter().map(route_key).collect();
        let tables = router
            .exact_hosts
            .values_mut()
            .chain(router.wildcard_hosts.values_mut())
            .chain([&mut router.any_host]);
        for t in tables {
            for list in t.exact.values_mut().chain([&mut t.others]) {
                list.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
                list.dedup();
            }
        }
        router.routes = routes.into();
        router
    }

    /// Finds the route for `req`: the most specific route whose predicates
    /// all hold; else 405 if some route failed only on the method; else 404.
    pub fn find(&self, req: &Request<'_>) -> Outcome {
        let mut allowed = Vec::new();
        if let Some(host) = req.host {
            let host = host.strip_suffix('.').unwrap_or(host);
            if let Some(t) = self.exact_hosts.get(host)
                && let Some(o) = self.search(t, req, &mut allowed)
            {
                return o;
            }
            if !self.wildcard_hosts.is_empty() {
                // Dots left to right: the longest suffix first; the label
                // before it must not be empty.
                for (i, _) in host.match_indices('.').filter(|(i, _)| *i > 0) {
                    if let Some(t) = self.wildcard_hosts.get(&host[i..])
                        && let Some(o) = self.search(t, req, &mut allowed)
                    {
                        return o;
                    }
                }
            }
        }
        if let Some(o) = self.search(&self.any_host, req, &mut allowed) {
            return o;
        }
        if allowed.is_empty() {
            Outcome::NotFound
        } else {
            allowed.sort_by(|a, b| method_order(a).cmp(&method_order(b)));
            allowed.dedup();
            Outcome::MethodNotAllowed { allowed }
        }
    }

    /// The best full match in one host group; collects the methods of routes
    /// that match but for the method.
    fn search(&self, t: &Table, req: &Request<'_>, allowed: &mut Vec<Method>) -> Option<Outcome> {
        let exact = if t.exact.is_empty() {
            None
        } else {
            t.exact.get(req.path)
        };
        for &i in exact.into_iter().flatten() {
            let (id, m) = &self.routes[i];
            if m.matches_predicates(req) {
                if m.allows(req.method) {
                    return Some(Outcome::Matched {
                        route: *id,
                        params: Params::default(),
                    });
                }
                allowed.extend(m.methods.iter().cloned());
            }
        }
        for &i in &t.others {
            let (id, m) = &self.routes[i];
            let Some(params) = m.path.matches(req.path) else {
                continue;
            };
            if m.matches_predicates(req) {
                if m.allows(req.method) {
                    return Some(Outcome::Matched { route: *id, params });
                }
                allowed.extend(m.methods.iter().cloned());
            }
        }
        None
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Route ids in precedence order (a route with several hosts at its most
    /// specific host).
    pub fn route_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.routes.iter().map(|(id, _)| *id)
    }

    /// The routing table in precedence order, for `gateway routes`;
    /// `upstreams` names the routes' upstreams.
    pub fn display<'a>(
        &'a self,
        routes: &'a [crate::config::RouteConfig],
        upstreams: &'a [crate::config::UpstreamConfig],
    ) -> impl fmt::Display + 'a {
        RouteTable {
            router: self,
            routes,
            upstreams,
        }
    }
}

/// `Router::display`.
struct RouteTable<'a> {
    router: &'a Router,
    routes: &'a [crate::config::RouteConfig],
    upstreams: &'a [crate::config::UpstreamConfig],
}

impl RouteTable<'_> {
    /// Where a route sends what it matches.
    fn target(&self, route: Option<&crate::config::RouteConfig>) -> String {
        use crate::config::RouteAction;
        match route.map(|r| &r.action) {
            Some(RouteAction::Upstream(i)) => match self.upstreams.get(*i) {
                Some(u) => format!("upstream {}", u.name),
                None => "upstream ?".into(),
            },
            Some(RouteAction::Respond { status, .. }) => format!("respond {}", status.as_u16()),
            Some(RouteAction::Redirect(r)) => format!("redirect {}", r.status.as_u16()),
            None => "?".into(),
        }
    }
}

impl fmt::Display for RouteTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.router.is_empty() {
            return writeln!(f, "  (no routes)");
        }
        let or = |s: String, empty: &str| if s.is_empty() { empty.to_string() } else { s };
        let mut rows = vec![[
            "#".to_string(),
            "ROUTE".into(),
            "HOSTS".into(),
            "METHODS".into(),
            "PATH".into(),
            "TARGET".into(),
            "PREDICATES".into(),
        ]];
        for (n, (id, m)) in self.router.routes.iter().enumerate() {
            let route = self.routes.get(*id);
            let name = route.map_or("?", |r| &r.name);
            let hosts: Vec<String> = m.hosts.iter().map(ToString::to_string).collect();
            let methods: Vec<&str> = m.methods.iter().map(Method::as_str).collect();
            rows.push([
                (n + 1).to_string(),
                name.to_string(),
                or(hosts.join(","), "*"),
                or(methods.join(","), "*"),
                m.path.to_string(),
                self.target(route),
                or(m.describe_predicates(), "-"),
            ]);
        }
        let mut widths = [0; 7];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in &rows {
            let [n, rest @ .., last] = row;
            write!(f, "  {n:>w$}", w = widths[0])?;
            for (cell, w) in rest.iter().zip(&widths[1..]) {
                write!(f, "  {cell:<w$}")?;
            }
            writeln!(f, "  {last}")?;
        }
        Ok(())
    }
}
