//! Process orchestration for `gateway run`: loads the config, binds every
//! listener once per worker, starts one single-threaded runtime per worker
//! thread (no work stealing, no cross-thread wakeups on the data path), runs
//! the admin listener, reload triggers and signal handling on the main
//! thread, and drains in-flight requests on SIGTERM/SIGINT.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context as _, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
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
    let config = Config::load(path).map_err(|e| anyhow!("invalid configuration:\n{e}"))?;
    let metrics = crate::observe::metrics::install();
    let access_log = match &config.access_log {
        Some(t) => {
            Some(AccessLog::start(t).with_context(|| format!("cannot open access log {t:?}"))?)
        }
        None => None,
    };
    let workers = config.workers;
    let shutdown_timeout = config.shutdown_timeout;

    // Bind everything before serving anything, so a bad address fails the start.
    let mut sockets: Vec<Vec<(Arc<str>, std::net::TcpListener)>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut active: HashMap<Arc<str>, Arc<AtomicUsize>> = HashMap::new();
    for l in &config.listeners {
        for w in sockets.iter_mut() {
            let s = listener::bind(l.addr)
                .with_context(|| format!("cannot listen on {} (listener {:?})", l.addr, l.name))?;
            w.push((l.name.clone(), s));
        }
        active.insert(l.name.clone(), Arc::new(AtomicUsize::new(0)));
        tracing::info!(listener = %l.name, addr = %l.addr, tls = l.tls.is_some(), "listening");
    }
    let admin_socket = match config.admin {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .with_context(|| format!("cannot listen on {a} (admin)"))?,
        ),
        None => None,
    };
    let enforcer = Arc::new(Enforcer::start(&config.xdp, opts.no_xdp));
    let live = Arc::new(Live::new(path, config, enforcer.clone()));
    let shared = Arc::new(Shared {
        live: live.clone(),
        access_log,
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut threads = Vec::new();
    for (i, socks) in sockets.into_iter().enumerate() {
        let shared = shared.clone();
        let enforcer = enforcer.clone();
        let shutdown = shutdown_rx.clone();
        let active = active.clone();
        let t = std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("worker {i}: cannot start runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let tracker = TaskTracker::new();
                let mut loops = Vec::new();
                for (name, socket) in socks {
                    let active = active.get(&name).cloned().unwrap_or_default();
                    loops.push(tokio::spawn(listener::accept_loop(Accept {
                        name,
                        socket,
                        shared: shared.clone(),
                        enforcer: enforcer.clone(),
                        active,
                        shutdown: shutdown.clone(),
                        tracker: tracker.clone(),
                    })));
                }
                for l in loops {
                    let _ = l.await;
                }
                tracker.close();
                if tokio::time::timeout(shutdown_timeout, tracker.wait()).await.is_err() {
                    tracing::warn!("worker {i}: {} connections still open after {shutdown_timeout:?}; closing them", tracker.len());
                }
            });
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
            ready: AtomicBool::new(false),
        });
        if let Some(s) = admin_socket {
            s.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(s)?;
            tracing::info!(addr = %l.local_addr()?, "admin listening");
            tokio::spawn(admin::serve(l, state.clone(), shutdown_rx.clone()));
        }
        tokio::spawn(reload::on_sighup(live.clone()));
        if live.load().config.watch_config {
            tokio::spawn(reload::on_file_change(live.clone()));
        }
        state.ready.store(true, Ordering::Release);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        state.ready.store(false, Ordering::Release);
        let _ = shutdown_tx.send(true);
        anyhow::Ok(())
    })?;
    for t in threads {
        let _ = t.join();
    }
    enforcer.stop();
    tracing::info!("stopped");
    Ok(())
}
