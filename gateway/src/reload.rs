//! The live configuration: the current `Generation` (compiled config plus the
//! upstream pools built for it) behind `arc-swap`, replaced atomically on
//! reload. A request holds the generation it started with until it ends.
//! Reloads come from SIGHUP, from the file watcher and from the admin API;
//! an invalid file is rejected with a logged error and the old generation
//! keeps serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};

use crate::config::{Config, ConfigError, Problem};
use crate::server::Workers;
use crate::upstream::Pool;
use crate::xdp::Enforcer;

/// One loaded configuration and what was built from it.
#[derive(Debug)]
pub struct Generation {
    pub config: Config,
    /// Pools, aligned with `config.upstreams`.
    pub upstreams: Vec<Arc<Pool>>,
}

impl Generation {
    /// Builds pools for `config`, reusing those of `previous` whose settings
    /// did not change, so their keep-alive connections survive the reload.
    pub fn new(mut config: Config, previous: Option<&Generation>) -> Generation {
        if let Some(p) = previous {
            keep_route_state(&mut config, &p.config);
        }
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .and_then(|p| p.upstreams.iter().find(|pool| pool.config == *u))
                    .cloned()
                    .unwrap_or_else(|| {
                        let old = previous.and_then(|p| {
                            p.upstreams.iter().find(|pool| pool.config.name == u.name)
                        });
                        Pool::replacing(u, old.map(|p| &**p))
                    })
            })
            .collect();
        crate::auth::activate(&config.auth);
        Generation { config, upstreams }
    }
}

/// A route's breaker and concurrency limiter carry over a reload that
/// keeps their settings (as pools do): an open breaker stays open, and the
/// slots of requests still in flight stay counted, instead of a fresh
/// limiter letting `max` more in beside them.
fn keep_route_state(config: &mut Config, previous: &Config) {
    for route in &mut config.routes {
        let Some(old) = previous.routes.iter().find(|r| r.name == route.name) else {
            continue;
        };
        let (new, old) = (&mut route.upstream_policy, &old.upstream_policy);
        if let (Some(n), Some(o)) = (&new.breaker, &old.breaker)
            && n.same_settings(o)
        {
            new.breaker = Some(o.clone());
        }
        if let (Some(n), Some(o)) = (&new.concurrency, &old.concurrency)
            && n.same_settings(o)
        {
            new.concurrency = Some(o.clone());
        }
    }
}

/// The configuration in force.
pub struct Live {
    path: PathBuf,
    current: ArcSwap<Generation>,
    /// Serializes reloads.
    reloading: Mutex<()>,
    /// Receives the `[xdp]` section of each accepted reload.
    enforcer: Arc<Enforcer>,
    /// Binds and starts added listeners, stops removed ones.
    workers: Option<Arc<Workers>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Live {
    pub fn new(
        path: &Path,
        config: Config,
        enforcer: Arc<Enforcer>,
        workers: Option<Arc<Workers>>,
    ) -> Live {
        Live {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(Generation::new(config, None)),
            reloading: Mutex::new(()),
            enforcer,
            workers,
        }
    }

    /// The allow/deny enforcer (kernel or userspace).
    pub fn enforcer(&self) -> &Arc<Enforcer> {
        &self.enforcer
    }

    /// The generation in force now.
    pub fn load(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the file again and swaps it in if valid (including that every
    /// added listener address can be bound). Blocking (file I/O, certificate
    /// loading, binding): call from a blocking context.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let _g = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let result = Config::load(&self.path).and_then(|config| {
            let old = self.current.load();
            let changes = match &self.workers {
                Some(w) => w.bind_changes(Some(&old.config), &config).map_err(|m| {
                    ConfigError::new(&self.path, String::new(), vec![Problem::whole(m)])
                })?,
                None => Default::default(),
            };
            for key in start_only_changes(&old.config, &config) {
                tracing::warn!(
                    "config reload: {key} changed, but it is read at start only; \
                     the running value stays until a restart"
                );
            }
            self.enforcer.update(&config.xdp);
            let next = Generation::new(config, Some(&old));
            self.current.store(Arc::new(next));
            if let Some(w) = &self.workers {
                w.apply(changes);
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                metrics::counter!("gateway_config_reloads_total", "result" => "ok").increment(1);
                tracing::info!(path = %self.path.display(), "config reloaded");
                Ok(())
            }
            Err(e) => {
                metrics::counter!("gateway_config_reloads_total", "result" => "failed")
                    .increment(1);
                tracing::error!("config reload rejected, keeping the previous config:\n{e}");
                Err(e)
            }
        }
    }
}

/// The settings that only a restart applies, where `new` differs from `old`.
fn start_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.workers != new.workers {
        changed.push("[server] workers");
    }
    if old.shutdown_timeout != new.shutdown_timeout {
        changed.push("[server] shutdown_timeout");
    }
    if old.watch_config != new.watch_config {
        changed.push("[server] watch_config");
    }
    if old.admin != new.admin {
        changed.push("[admin] listen");
    }
    if old.access_log != new.access_log {
        changed.push("[access_log]");
    }
    changed
}

/// Reloads on SIGHUP until the task is dropped.
pub async fn on_sighup(live: Arc<Live>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload through the admin API instead");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received, reloading");
        let l = live.clone();
        let _ = tokio::task::spawn_blocking(move || l.reload()).await;
    }
}

/// Watches the config file (through its directory, so that editors that
/// replace the file are seen) and reloads when it changes, debounced.
pub async fn on_file_change(live: Arc<Live>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _watcher = match watch_file(live.path(), move || {
        let _ = tx.send(());
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("{e}; reload with SIGHUP or the admin API");
            return;
        }
    };
    while rx.recv().await.is_some() {
        // Let a burst of events (write, rename, chmod) settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while rx.try_recv().is_ok() {}
        tracing::info!("config file changed, reloading");
        let l = live.clone();
        let _ = tokio::task::spawn_blocking(move || l.reload()).await;
    }
}

/// Calls `changed` (on the watcher's thread) whenever `path` changes. The
/// file is watched through its directory, so that editors and config
/// managers that replace it are seen. Watching stops when the returned
/// watcher is dropped.
pub fn watch_file(
    path: &Path,
    changed: impl Fn() + Send + 'static,
) -> Result<notify::RecommendedWatcher, String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !ev.kind.is_access()
            && ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
        {
            changed();
        }
    })
    .map_err(|e| format!("cannot watch {} ({e})", path.display()))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch {} ({e})", dir.display()))?;
    Ok(watcher)
}
