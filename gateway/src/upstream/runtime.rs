//! The background runtime: one thread with a current-thread tokio runtime
//! that runs every pool's health checks, discovery and metric export. It
//! is started on first use, so pools can be built anywhere (at start-up
//! before any runtime exists, or on a reload's blocking thread), and it is
//! kept off the worker threads so a slow DNS server or a hanging health
//! check never delays the data path.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::Handle;

static HANDLE: OnceLock<Option<Handle>> = OnceLock::new();

fn handle() -> Option<&'static Handle> {
    HANDLE
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("upstream-bg".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => {
                            let _ = tx.send(Some(rt.handle().clone()));
                            rt.block_on(std::future::pending::<()>());
                        }
                        Err(e) => {
                            tracing::error!("cannot start the upstream background runtime: {e}");
                            let _ = tx.send(None);
                        }
                    }
                });
            match spawned {
                Ok(_) => rx.recv().ok().flatten(),
                Err(e) => {
                    tracing::error!("cannot start the upstream background thread: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// Runs `task` on the background runtime.
pub fn spawn<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match handle() {
        Some(h) => {
            h.spawn(task);
        }
        None => {
            tracing::error!("no upstream background runtime: health checks and discovery are off")
        }
    }
}
