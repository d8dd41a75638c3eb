//! State that outlives one configuration: limiter buckets, quota counters,
//! auto-ban counts and Redis connections are kept across reloads as long as
//! the setting that made them is unchanged, so editing an unrelated route
//! does not hand every client a fresh burst. Also the janitor thread that
//! keeps keyed state bounded (expired buckets, past quota periods).

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

type Entries = HashMap<String, Weak<dyn Any + Send + Sync>>;

static REGISTRY: OnceLock<Mutex<Entries>> = OnceLock::new();

/// The state registered under `key` by a live configuration, or a new one
/// made by `make`. `key` must describe every setting the state depends on.
pub fn get_or_make<T: Send + Sync + 'static>(key: String, make: impl FnOnce() -> T) -> Arc<T> {
    let reg = REGISTRY.get_or_init(Default::default);
    let mut map = reg.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = map.get(&key).and_then(Weak::upgrade)
        && let Ok(t) = existing.downcast::<T>()
    {
        return t;
    }
    map.retain(|_, w| w.strong_count() > 0);
    let t = Arc::new(make());
    let any: Arc<dyn Any + Send + Sync> = t.clone();
    map.insert(key, Arc::downgrade(&any));
    t
}

/// Keyed state the janitor trims.
pub trait Sweep: Send + Sync {
    /// Drops entries that no longer matter (full buckets, past periods).
    fn sweep(&self);
}

static SWEPT: OnceLock<Mutex<Vec<Weak<dyn Sweep>>>> = OnceLock::new();

/// How often the janitor runs.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Registers `s` with the janitor, starting the janitor thread on first use
/// (not at config load, so that `gateway check` starts no thread).
pub fn sweep_later(s: Weak<dyn Sweep>) {
    let list = SWEPT.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("policy-janitor".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(SWEEP_EVERY);
                    let live: Vec<Arc<dyn Sweep>> = match SWEPT.get() {
                        Some(l) => {
                            let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
                            l.retain(|w| w.strong_count() > 0);
                            l.iter().filter_map(Weak::upgrade).collect()
                        }
                        None => Vec::new(),
                    };
                    for s in live {
                        s.sweep();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(
                "cannot start the policy janitor thread: {e}; keyed limiter state will grow"
            );
        }
        Mutex::new(Vec::new())
    });
    list.lock().unwrap_or_else(|p| p.into_inner()).push(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_state_while_alive() {
        let a = get_or_make("test:a".into(), || 1u32);
        let b = get_or_make("test:a".into(), || 2u32);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let c = get_or_make("test:a".into(), || 3u32);
        assert_eq!(*c, 3);
    }
}
