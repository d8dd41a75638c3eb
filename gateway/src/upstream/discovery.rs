//! Service discovery: the target set of a pool follows a DNS name
//! (`dns.rs`) or a watched file (`file.rs`) without a restart. Both feed
//! `Pool::set_targets`, which keeps the state of targets that stay and
//! never drops a request in flight (requests hold their target). A failed
//! resolution or an unreadable, invalid or empty file never empties a pool:
//! the last good set stays, the failure is logged, counted
//! (`gateway_discovery_updates_total{result="failed"}`) and shown in
//! `/admin/upstreams`.

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use http::uri::Authority;

use super::config::Discovery;
use super::{Pool, dns, file, runtime};

/// What discovery last did.
#[derive(Debug, Default)]
pub struct Status {
    pub updates: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub last_success: Option<SystemTime>,
}

impl Status {
    pub fn to_json(&self, d: &Discovery) -> serde_json::Value {
        let source = match d {
            Discovery::Static => serde_json::json!({"kind": "static"}),
            Discovery::Dns { name, srv, .. } => {
                serde_json::json!({"kind": if *srv { "dns_srv" } else { "dns" }, "name": name})
            }
            Discovery::File { path, key, .. } => {
                serde_json::json!({"kind": "file", "path": path.display().to_string(), "key": key})
            }
        };
        serde_json::json!({
            "source": source,
            "updates": self.updates,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_success": self.last_success.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        })
    }
}

/// Starts the pool's discovery: a file is read at once (so the pool starts
/// with its targets); a DNS name is resolved at once on the background
/// runtime, and this waits for that first answer for up to 3 s.
pub fn start(pool: &Arc<Pool>) {
    match pool.config.settings.discovery.clone() {
        Discovery::Static => {}
        Discovery::File {
            path,
            key,
            interval,
        } => {
            apply(pool, file::read(&path, &key));
            runtime::spawn(file::watch(Arc::downgrade(pool), path, key, interval));
        }
        Discovery::Dns {
            name,
            port,
            srv,
            resolver,
            interval,
        } => {
            let (tx, rx) = std::sync::mpsc::channel();
            runtime::spawn(dns::run(
                Arc::downgrade(pool),
                dns::Source {
                    name,
                    port,
                    srv,
                    resolver,
                    interval,
                },
                tx,
            ));
            let _ = rx.recv_timeout(std::time::Duration::from_secs(3));
        }
    }
}

/// Applies one discovery result to the pool.
pub fn apply(pool: &Pool, found: Result<Vec<(Authority, u32)>, String>) {
    let name = pool.name();
    let result = found.and_then(|f| pool.set_targets(f));
    let mut status = pool.discovery_status();
    match result {
        Ok(()) => {
            status.updates += 1;
            status.last_error = None;
            status.last_success = Some(SystemTime::now());
            drop(status);
            metrics::counter!("gateway_discovery_updates_total", "upstream" => name.to_string(), "result" => "ok").increment(1);
        }
        Err(e) => {
            status.failures += 1;
            status.last_error = Some(e.clone());
            drop(status);
            tracing::warn!(
                upstream = name,
                "discovery failed, keeping the last good targets: {e}"
            );
            metrics::counter!("gateway_discovery_updates_total", "upstream" => name.to_string(), "result" => "failed").increment(1);
        }
    }
}

/// Upgrades a task's weak reference, or says the pool is gone.
pub fn alive(pool: &Weak<Pool>) -> Option<Arc<Pool>> {
    pool.upgrade()
}
