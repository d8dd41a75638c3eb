//! Consumers: named clients with credentials, groups, scopes and their own
//! limits (`[consumers.rate_limit]`, compiled here), from the
//! config file and from an optional consumers file. The set in force sits
//! behind `arc-swap`; the consumers file is watched and swapped in on change
//! (after validation: a broken file is logged and the previous set stays).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use toml::Spanned;

use super::basic::{self, PasswordHash};
use super::config;
use crate::config::Problem;
use crate::config::error::line_col;
use crate::policy::ratelimit::RateLimit;
use crate::policy::ratelimit::redis::Redis;

/// One consumer.
#[derive(Debug)]
pub struct Consumer {
    pub name: Arc<str>,
    /// `name` as a header value, made once.
    pub name_header: http::HeaderValue,
    pub groups: Box<[Box<str>]>,
    pub scopes: Box<[Box<str>]>,
    /// `[consumers.rate_limit]`, checked in step 4d after the route's.
    pub rate_limit: Option<RateLimit>,
}

/// Every consumer, indexed by each kind of credential.
#[derive(Debug, Default)]
pub struct Consumers {
    by_name: HashMap<Arc<str>, Arc<Consumer>>,
    /// SHA-256 of each API key.
    by_api_key: HashMap<[u8; 32], Arc<Consumer>, crate::prehashed::PreHashed>,
    /// Basic user name → consumer and password hash.
    by_user: HashMap<Box<str>, (Arc<Consumer>, PasswordHash)>,
    /// Client certificate names (`cert_names`) → consumer.
    by_cert_name: HashMap<Box<str>, Arc<Consumer>>,
    /// Successful Basic verifications (see `basic`), valid for this set only.
    pub(super) verified: basic::VerifiedCache,
}

impl Consumers {
    pub fn by_name(&self, name: &str) -> Option<&Arc<Consumer>> {
        self.by_name.get(name)
    }

    /// The consumer whose API key hashes to `digest`. Only digests are ever
    /// compared, never keys: the map's lookup could at most leak, through
    /// timing, how a guess's digest starts, which does not help to find a
    /// key; the final comparison is constant-time all the same.
    pub fn by_api_key(&self, digest: &[u8; 32]) -> Option<&Arc<Consumer>> {
        use subtle::ConstantTimeEq;
        self.by_api_key
            .get_key_value(digest)
            .filter(|(k, _)| bool::from(k.ct_eq(digest)))
            .map(|(_, c)| c)
    }

    /// The consumer of the first of `names` (a certificate's, most
    /// specific first) that one claims.
    pub fn by_cert_names(&self, names: &[Box<str>]) -> Option<&Arc<Consumer>> {
        names.iter().find_map(|n| self.by_cert_name.get(n))
    }

    pub fn by_user(&self, user: &str) -> Option<&(Arc<Consumer>, PasswordHash)> {
        self.by_user.get(user)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The consumers in force: the config file's plus the consumers file's.
pub struct ConsumerStore {
    current: ArcSwap<Consumers>,
    /// The config file's own consumers, kept to merge with each new version
    /// of the consumers file.
    inline: Vec<Built>,
    file: Option<PathBuf>,
    /// `[redis]`, for consumers' limits with `backend = "redis"`.
    redis: Option<Arc<Redis>>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

impl std::fmt::Debug for ConsumerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerStore")
            .field("consumers", &self.current.load().len())
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// One consumer as compiled, before indexing.
#[derive(Debug, Clone)]
struct Built {
    consumer: Arc<Consumer>,
    api_keys: Vec<[u8; 32]>,
    basic: Option<(Box<str>, PasswordHash)>,
    cert_names: Vec<Box<str>>,
}

impl ConsumerStore {
    /// Compiles the config file's consumers and reads the consumers file.
    /// Problems in the consumers file are reported at `file`'s span with the
    /// consumers file's own `FILE:LINE:COL`.
    pub fn compile(
        inline: &[config::Consumer],
        file: Option<(&Spanned<String>, PathBuf)>,
        redis: Option<&Arc<Redis>>,
    ) -> Result<ConsumerStore, Vec<Problem>> {
        let mut problems = Vec::new();
        // Duplicates among the config file's own consumers, with their spans
        // (`index` finds the rest).
        let mut names = std::collections::HashSet::new();
        for c in inline {
            if !names.insert(c.name.get_ref()) {
                problems.push(Problem::at(
                    c.name.span(),
                    format!("duplicate consumer name {:?}", c.name.get_ref()),
                ));
            }
        }
        let inline: Vec<Built> = inline
            .iter()
            .filter_map(|c| build(c, redis, &mut problems))
            .collect();
        let mut from_file = Vec::new();
        if let Some((span, path)) = &file {
            match load_file(path, redis) {
                Ok(b) => from_file = b,
                Err(msgs) => {
                    for m in msgs {
                        problems.push(Problem::at(span.span(), m));
                    }
                }
            }
        }
        let set = match index(&inline, &from_file) {
            Ok(s) => Some(s),
            Err(_) if !problems.is_empty() => None,
            Err(msgs) => {
                let span = file.as_ref().map_or(0..0, |(s, _)| s.span());
                problems.extend(msgs.into_iter().map(|m| Problem::at(span.clone(), m)));
                None
            }
        };
        match set {
            Some(set) if problems.is_empty() => Ok(ConsumerStore {
                current: ArcSwap::from_pointee(set),
                inline,
                file: file.map(|(_, p)| p),
                redis: redis.cloned(),
                watcher: Mutex::new(None),
            }),
            _ => Err(problems),
        }
    }

    /// No consumers.
    pub fn empty() -> ConsumerStore {
        ConsumerStore {
            current: ArcSwap::from_pointee(Consumers::default()),
            inline: Vec::new(),
            file: None,
            redis: None,
            watcher: Mutex::new(None),
        }
    }

    /// The consumers in force now, for a short look.
    pub fn load(&self) -> arc_swap::Guard<Arc<Consumers>> {
        self.current.load()
    }

    /// The consumers in force now, to keep across an await.
    pub fn load_full(&self) -> Arc<Consumers> {
        self.current.load_full()
    }

    /// Reads the consumers file again and swaps it in if valid.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.file else {
            return Ok(self.current.load().len());
        };
        let set = load_file(path, self.redis.as_ref())
            .and_then(|b| index(&self.inline, &b))
            .map_err(|m| m.join("\n"))?;
        let n = set.len();
        self.current.store(Arc::new(set));
        Ok(n)
    }

    /// Starts watching the consumers file (through its directory, so that
    /// editors that replace the file are seen). The watcher lives as long as
    /// the store, i.e. as long as the configuration generation.
    pub fn watch(self: &Arc<Self>) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let watcher = match crate::reload::watch_file(&path, move || {
            let _ = tx.send(());
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("consumers file: {e}; it will not be reloaded until the config is");
                return;
            }
        };
        // The reloading thread holds only a weak reference: it ends when the
        // store (and with it the watcher and the channel) is dropped.
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("consumers-watch".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Let a burst of events (write, rename, chmod) settle.
                    std::thread::sleep(Duration::from_millis(200));
                    while rx.try_recv().is_ok() {}
                    let Some(store) = weak.upgrade() else { return };
                    match store.reload() {
                        Ok(n) => {
                            metrics::counter!("gateway_consumers_reloads_total", "result" => "ok")
                                .increment(1);
                            tracing::info!(consumers = n, "consumers file reloaded");
                        }
                        Err(e) => {
                            metrics::counter!("gateway_consumers_reloads_total", "result" => "failed")
                                .increment(1);
                            tracing::error!(
                                "consumers file rejected, keeping the previous consumers:\n{e}"
                            );
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the consumers file watcher: {e}");
            return;
        }
        if let Ok(mut w) = self.watcher.lock() {
            *w = Some(watcher);
        }
    }
}

/// Reads and compiles the consumers file; problems as `FILE:LINE:COL: msg`.
fn load_file(path: &Path, redis: Option<&Arc<Redis>>) -> Result<Vec<Built>, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![format!(
            "cannot read consumers file {}: {e}",
            path.display()
        )]
    })?;
    let at = |span: Option<std::ops::Range<usize>>, msg: &str| match span {
        Some(s) => {
            let (l, c) = line_col(&text, s.start);
            format!("{}:{l}:{c}: {msg}", path.display())
        }
        None => format!("{}: {msg}", path.display()),
    };
    let parsed: config::ConsumersFile =
        crate::config::file::parse_sections(&text).map_err(|ps| {
            ps.into_iter()
                .map(|p| at(p.span, &p.message))
                .collect::<Vec<_>>()
        })?;
    let mut problems = Vec::new();
    let built = parsed
        .consumers
        .iter()
        .filter_map(|c| build(c, redis, &mut problems))
        .collect();
    if problems.is_empty() {
        Ok(built)
    } else {
        Err(problems
            .into_iter()
            .map(|p| at(p.span, &p.message))
            .collect())
    }
}

/// Compiles one consumer, checking its credentials.
fn build(
    c: &config::Consumer,
    redis: Option<&Arc<Redis>>,
    problems: &mut Vec<Problem>,
) -> Option<Built> {
    let before = problems.len();
    let name = c.name.get_ref();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        problems.push(Problem::at(
            c.name.span(),
            format!("consumer name {name:?} must be non-empty printable ASCII"),
        ));
    }
    let mut api_keys = Vec::new();
    for k in &c.api_keys {
        match parse_sha256(k.get_ref()) {
            Some(d) => api_keys.push(d),
            None => problems.push(Problem::at(
                k.span(),
                "an API key is stored as \"sha256:\" and the 64 hex digits of its SHA-256 \
                 (e.g. `printf %s KEY | sha256sum`)",
            )),
        }
    }
    let basic = match &c.password_hash {
        Some(h) => match PasswordHash::parse(h.get_ref()) {
            Ok(hash) => {
                let user = c.username.as_ref().unwrap_or(&c.name).get_ref();
                if user.contains(':') {
                    problems.push(Problem::at(
                        c.name.span(),
                        format!("Basic user name {user:?} must not contain ':'"),
                    ));
                }
                Some((Box::from(user.as_str()), hash))
            }
            Err(msg) => {
                problems.push(Problem::at(h.span(), msg));
                None
            }
        },
        None => {
            if let Some(u) = &c.username {
                problems.push(Problem::at(u.span(), "`username` needs a `password_hash`"));
            }
            None
        }
    };
    for n in &c.cert_names {
        if n.get_ref().is_empty() {
            problems.push(Problem::at(
                n.span(),
                "a certificate name must not be empty",
            ));
        }
    }
    let rate_limit = c.rate_limit.as_ref().and_then(|s| {
        if let Some(k) = &s.get_ref().key {
            problems.push(Problem::at(
                k.span(),
                "a consumer's rate_limit is always keyed by the consumer; remove `key`",
            ));
            return None;
        }
        RateLimit::compile("consumer", s.get_ref(), redis, s.span(), problems)
    });
    let name_header = http::HeaderValue::from_str(name).ok();
    if problems.len() != before {
        return None;
    }
    Some(Built {
        consumer: Arc::new(Consumer {
            name: name.as_str().into(),
            name_header: name_header?,
            groups: c.groups.iter().map(|g| g.as_str().into()).collect(),
            scopes: c.scopes.iter().map(|s| s.as_str().into()).collect(),
            rate_limit,
        }),
        api_keys,
        basic,
        cert_names: c
            .cert_names
            .iter()
            .map(|n| n.get_ref().as_str().into())
            .collect(),
    })
}

/// Indexes consumers, rejecting duplicate names, keys and user names.
fn index(inline: &[Built], from_file: &[Built]) -> Result<Consumers, Vec<String>> {
    let mut set = Consumers {
        verified: basic::VerifiedCache::new(),
        ..Default::default()
    };
    let mut problems = Vec::new();
    for b in inline.iter().chain(from_file) {
        let name = &b.consumer.name;
        if set
            .by_name
            .insert(name.clone(), b.consumer.clone())
            .is_some()
        {
            problems.push(format!("duplicate consumer name {name:?}"));
        }
        for k in &b.api_keys {
            if set.by_api_key.insert(*k, b.consumer.clone()).is_some() {
                problems.push(format!("consumer {name:?} shares an API key with another"));
            }
        }
        for n in &b.cert_names {
            if set
                .by_cert_name
                .insert(n.clone(), b.consumer.clone())
                .is_some()
            {
                problems.push(format!(
                    "consumer {name:?}: certificate name {n:?} is taken"
                ));
            }
        }
        if let Some((user, hash)) = &b.basic
            && set
                .by_user
                .insert(user.clone(), (b.consumer.clone(), hash.clone()))
                .is_some()
        {
            problems.push(format!(
                "consumer {name:?}: Basic user name {user:?} is taken"
            ));
        }
    }
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(problems)
    }
}

/// `sha256:<64 hex digits>` → digest.
fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sha256_keys() {
        let d =
            parse_sha256("sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
                .unwrap();
        assert_eq!(d[0], 0x2c);
        assert_eq!(d[31], 0xae);
        assert!(parse_sha256("sha256:2c26").is_none());
        assert!(
            parse_sha256("2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
                .is_none()
        );
        assert!(
            parse_sha256("sha256:zz26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
                .is_none()
        );
    }
}
