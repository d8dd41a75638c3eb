//! File discovery: a TOML or JSON file (by extension: `.json` is JSON,
//! anything else TOML) listing targets per pool, so that an external
//! registry (a Consul template, a Kubernetes sidecar script) can drive the
//! gateway:
//!
//! ```toml
//! api = ["10.0.0.1:8080", { address = "10.0.0.2:8080", weight = 2 }]
//! ```
//!
//! The file is watched (through its directory, so a write-then-rename is
//! seen) and also polled every `interval` as a fallback. Write it
//! atomically (write a temporary file, then rename it over).

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use http::uri::Authority;
use notify::{RecursiveMode, Watcher};

use super::Pool;
use super::config::{MAX_WEIGHT, TargetSpec, check_authority};
use super::discovery::{alive, apply};

/// Reads the targets listed under `key` in the file at `path`.
pub fn read(path: &Path, key: &str) -> Result<Vec<(Authority, u32)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text, path.extension().is_some_and(|e| e == "json"), key)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn parse(text: &str, json: bool, key: &str) -> Result<Vec<(Authority, u32)>, String> {
    let specs: Vec<TargetSpec> = if json {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let entry = v.get(key).ok_or_else(|| format!("no entry {key:?}"))?;
        serde_json::from_value(entry.clone()).map_err(|e| format!("entry {key:?}: {e}"))?
    } else {
        let v: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let entry = v.get(key).ok_or_else(|| format!("no entry {key:?}"))?;
        entry
            .clone()
            .try_into()
            .map_err(|e| format!("entry {key:?}: {e}"))?
    };
    specs
        .iter()
        .map(|s| {
            check_authority(s.address())?;
            let w = s.weight();
            if w == 0 || w > MAX_WEIGHT {
                return Err(format!(
                    "weight of {} must be between 1 and {MAX_WEIGHT}",
                    s.address()
                ));
            }
            let a: Authority = s.address().parse().map_err(|e| format!("{e}"))?;
            Ok((a, w))
        })
        .collect()
}

/// Re-reads the file when it changes (or every `interval`) until the pool
/// is dropped.
pub async fn watch(pool: Weak<Pool>, path: PathBuf, key: String, interval: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|n| n.to_os_string());
    // Kept alive for as long as this task runs.
    let _watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !ev.kind.is_access()
            && ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name)
        {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w))
    .map_err(|e| {
        tracing::warn!(
            "cannot watch {} ({e}); polling every {interval:?}",
            dir.display()
        );
    })
    .ok();
    let mut last = std::fs::read_to_string(&path).ok();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = rx.recv() => {
                // Let a burst of events (write, rename) settle.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
            }
        }
        let Some(pool) = alive(&pool) else {
            return;
        };
        let now = std::fs::read_to_string(&path).ok();
        if now == last {
            continue;
        }
        apply(&pool, read(&path, &key));
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_and_json() {
        let t = parse(
            "api = [\"127.0.0.1:1\", { address = \"127.0.0.1:2\", weight = 3 }]\nother = 5",
            false,
            "api",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].1, 3);
        let j = parse(r#"{"api": ["127.0.0.1:1"]}"#, true, "api").unwrap();
        assert_eq!(j[0].0.as_str(), "127.0.0.1:1");
        assert!(parse("api = [\"no-port\"]", false, "api").is_err());
        assert!(parse("x = []", false, "api").is_err());
    }
}
