//! Process orchestration for `gateway run`: loads the config, binds every
//! listener once per worker, starts one single-threaded runtime per worker
//! thread (no work stealing, no cross-thread wakeups on the data path), runs
//! the admin listener, reload triggers and signal handling on the main
//! thread, and drains in-flight requests on SIGTERM/SIGINT.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::config::Config;
use crate::listener::{self, Accept};
use crate::observe::access_log::AccessLog;
use crate::proxy::Shared;
use crate::reload::{self, Live};
use crate::xdp::Enforcer;

/// Options from the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub no_xdp: bool,
}

/// Runs the gateway until SIGTERM or SIGINT.
pub fn run(path: &Path, opts: Options) -> anyhow::Result<()> {
    // The recorder first: compiling the config registers metric handles
    // (route breakers' gauges, route limits' counters) that would be
    // no-ops if made before it.
    let metrics = crate::observe::metrics::install();
    let config = Config::load(path).map_err(|e| anyhow!("invalid configuration:\n{e}"))?;
    let access_log = match &config.access_log {
        Some(t) => {
            Some(AccessLog::start(t).with_context(|| format!("cannot open access log {t:?}"))?)
        }
        None => None,
    };
    let shutdown_timeout = config.shutdown_timeout;

    // Bind everything before serving anything, so a bad address fails the start.
    crate::upstream::conn::set_workers(config.workers);
    let (workers, receivers) = Workers::new(config.workers);
    let initial = workers
        .bind_changes(None, &config)
        .map_err(|e| anyhow!(e))?;
    let admin_socket = match config.admin {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .with_context(|| format!("cannot listen on {a} (admin)"))?,
        ),
        None => None,
    };
    let enforcer = Arc::new(Enforcer::start(&config.xdp, opts.no_xdp));
    let workers = Arc::new(workers);
    let live = Arc::new(Live::new(
        path,
        config,
        enforcer.clone(),
        Some(workers.clone()),
    ));
    let shared = Arc::new(Shared {
        live: live.clone(),
        access_log,
    });
    workers.apply(initial);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut threads = Vec::new();
    for (i, rx) in receivers.into_iter().enumerate() {
        let shared = shared.clone();
        let enforcer = enforcer.clone();
        let shutdown = shutdown_rx.clone();
        let t = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || {
                crate::upstream::conn::enter_worker(i);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("worker {i}: cannot start runtime: {e}");
                        return;
                    }
                };
                rt.block_on(worker(i, rx, shared, enforcer, shutdown, shutdown_timeout));
            })?;
        threads.push(t);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let state = Arc::new(admin::State {
            live: live.clone(),
            metrics,
            phase: AtomicU8::new(admin::STARTING),
        });
        // The admin listener outlives the drain (see `admin::serve`).
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        if let Some(s) = admin_socket {
            s.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(s)?;
            tracing::info!(addr = %l.local_addr()?, "admin listening");
            tokio::spawn(admin::serve(l, state.clone(), admin_stop_rx));
        }
        tokio::spawn(reload::on_sighup(live.clone()));
        if live.load().config.watch_config {
            tokio::spawn(reload::on_file_change(live.clone()));
        }
        state.phase.store(admin::READY, Ordering::Release);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        state.phase.store(admin::DRAINING, Ordering::Release);
        let _ = shutdown_tx.send(true);
        // Workers drain on their own threads; the admin listener keeps
        // answering (`/readyz` 503) until they are done.
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        let _ = admin_stop_tx.send(true);
        anyhow::Ok(())
    })?;
    enforcer.stop();
    tracing::info!("stopped");
    Ok(())
}

/// A command for one worker's set of accept loops.
enum Cmd {
    /// Start accepting on `socket` for listener `name` (replacing any loop
    /// of that name, which then stops and drains).
    Start {
        name: Arc<str>,
        socket: std::net::TcpListener,
        active: Arc<AtomicUsize>,
    },
    /// Stop accepting for listener `name`; its connections drain.
    Stop { name: Arc<str> },
}

/// The worker threads' accept loops, as seen from the reload path.
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Cmd>>,
    /// Open connections per listener name, across workers.
    active: Mutex<HashMap<Arc<str>, Arc<AtomicUsize>>>,
}

/// Listener changes bound and ready to apply.
#[derive(Default)]
pub struct ListenerChanges {
    start: Vec<(Arc<str>, Vec<std::net::TcpListener>)>,
    stop: Vec<Arc<str>>,
}

impl Workers {
    fn new(n: usize) -> (Workers, Vec<mpsc::UnboundedReceiver<Cmd>>) {
        let (senders, receivers) = (0..n.max(1)).map(|_| mpsc::unbounded_channel()).unzip();
        (
            Workers {
                senders,
                active: Mutex::new(HashMap::new()),
            },
            receivers,
        )
    }

    /// Binds one socket per worker for every listener of `new` that `old`
    /// does not have with the same name and address. Nothing changes until
    /// `apply`; an address that cannot be bound fails the whole change.
    pub fn bind_changes(
        &self,
        old: Option<&Config>,
        new: &Config,
    ) -> Result<ListenerChanges, String> {
        let mut changes = ListenerChanges::default();
        for l in &new.listeners {
            let unchanged = old.is_some_and(|o| {
                o.listeners
                    .iter()
                    .any(|x| x.name == l.name && x.addr == l.addr)
            });
            if unchanged {
                continue;
            }
            let mut sockets = Vec::with_capacity(self.senders.len());
            for _ in &self.senders {
                let s = listener::bind(l.addr).map_err(|e| {
                    format!("cannot listen on {} (listener {:?}): {e}", l.addr, l.name)
                })?;
                sockets.push(s);
            }
            changes.start.push((l.name.clone(), sockets));
        }
        if let Some(o) = old {
            for l in &o.listeners {
                if !new.listeners.iter().any(|x| x.name == l.name) {
                    changes.stop.push(l.name.clone());
                }
            }
        }
        Ok(changes)
    }

    /// Starts and stops accept loops as bound by `bind_changes`.
    pub fn apply(&self, changes: ListenerChanges) {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        for name in changes.stop {
            tracing::info!(listener = %name, "listener removed; draining its connections");
            active.remove(&name);
            for tx in &self.senders {
                let _ = tx.send(Cmd::Stop { name: name.clone() });
            }
        }
        for (name, sockets) in changes.start {
            let counter = active.entry(name.clone()).or_default().clone();
            if let Some(addr) = sockets.first().and_then(|s| s.local_addr().ok()) {
                tracing::info!(listener = %name, %addr, "listening");
            }
            for (tx, socket) in self.senders.iter().zip(sockets) {
                let _ = tx.send(Cmd::Start {
                    name: name.clone(),
                    socket,
                    active: counter.clone(),
                });
            }
        }
    }
}

/// One worker: runs the accept loops it is told to, until shutdown, then
/// drains its connections for up to `drain`.
async fn worker(
    i: usize,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    shared: Arc<Shared>,
    enforcer: Arc<Enforcer>,
    mut shutdown: watch::Receiver<bool>,
    drain: std::time::Duration,
) {
    let tracker = TaskTracker::new();
    let mut loops: HashMap<Arc<str>, watch::Sender<bool>> = HashMap::new();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::Start { name, socket, active }) => {
                    let (stop_tx, stop_rx) = watch::channel(false);
                    if let Some(old) = loops.insert(name.clone(), stop_tx) {
                        let _ = old.send(true);
                    }
                    tracker.spawn(listener::accept_loop(Accept {
                        name,
                        socket,
                        shared: shared.clone(),
                        enforcer: enforcer.clone(),
                        active,
                        shutdown: stop_rx,
                        tracker: tracker.clone(),
                    }));
                }
                Some(Cmd::Stop { name }) => {
                    if let Some(tx) = loops.remove(&name) {
                        let _ = tx.send(true);
                    }
                }
                None => break,
            },
            _ = shutdown.changed() => break,
        }
    }
    for tx in loops.values() {
        let _ = tx.send(true);
    }
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            "worker {i}: {} connections still open after {drain:?}; closing them",
            tracker.len()
        );
    }
}
