//! Per-key concurrency: at most N requests of one key in flight. A permit is
//! taken in phase 4 and given back when the request's policy state is
//! dropped, which is when the response head leaves phase 7 (or earlier, on
//! any error), so a response body still streaming no longer counts. The
//! count is per gateway process.

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// In-flight counts by key; entries exist only while non-zero.
#[derive(Debug, Default)]
pub struct InFlight {
    max: u32,
    counts: DashMap<u64, u32, crate::prehashed::PreHashed>,
}

/// One request in flight; dropping it gives the slot back.
#[derive(Debug)]
pub struct Permit {
    owner: Arc<InFlight>,
    key: u64,
}

impl InFlight {
    pub fn new(max: u32) -> InFlight {
        InFlight {
            max,
            counts: DashMap::default(),
        }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// A slot for `key`, or `None` when `max` are in flight.
    pub fn acquire(self: &Arc<Self>, key: u64) -> Option<Permit> {
        let mut n = self.counts.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        drop(n);
        Some(Permit {
            owner: self.clone(),
            key,
        })
    }

    /// Requests of `key` in flight now.
    pub fn current(&self, key: u64) -> u32 {
        self.counts.get(&key).map_or(0, |n| *n)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Entry::Occupied(mut e) = self.owner.counts.entry(self.key) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_key_and_released_on_drop() {
        let f = Arc::new(InFlight::new(2));
        let a = f.acquire(1).unwrap();
        let b = f.acquire(1).unwrap();
        assert!(f.acquire(1).is_none());
        assert!(f.acquire(2).is_some());
        drop(a);
        assert_eq!(f.current(1), 1);
        let _c = f.acquire(1).unwrap();
        drop(b);
        assert_eq!(f.current(1), 1);
        assert_eq!(f.current(2), 0);
        assert!(f.counts.len() <= 1);
    }
}
