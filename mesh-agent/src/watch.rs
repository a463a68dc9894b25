//! Noticing that the policy files changed: a cheap poll of their names, sizes and modification
//! times (no inotify dependency, works on ConfigMap symlink swaps), plus SIGHUP for "reload now".
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tokio::signal::unix::{SignalKind, signal};

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_millis(250);

/// What identifies the content of the policy path without reading it.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Names, sizes and mtimes of the YAML files at `path` (a file, or a folder's `*.yaml|*.yml`).
pub fn fingerprint(path: &Path) -> Fingerprint {
    let mut files = Vec::new();
    if path.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                let p = e.path();
                if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                    files.push(p);
                }
            }
        }
    } else {
        files.push(path.to_path_buf());
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            // metadata() follows symlinks, so a ConfigMap's `..data` swap shows up.
            let m = std::fs::metadata(&p).ok();
            let len = m.as_ref().map_or(0, |m| m.len());
            let mtime = m.and_then(|m| m.modified().ok());
            (p, len, mtime)
        })
        .collect()
}

/// Why a reload is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    FileChange,
    Sighup,
    /// An object watched in the Kubernetes API changed.
    Kubernetes,
}

/// Calls `reload` whenever the files at `path` change (once they have been stable for one poll,
/// so a file being written is not read half-way) or SIGHUP arrives. Runs until the task is dropped.
pub async fn watch(path: PathBuf, mut reload: impl FnMut(Trigger)) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; reload on file change only");
            None
        }
    };
    let mut applied = fingerprint(&path);
    let mut pending: Option<Fingerprint> = None;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = fingerprint(&path);
                if now == applied {
                    pending = None;
                    continue;
                }
                if pending.as_ref() == Some(&now) {
                    applied = now;
                    pending = None;
                    reload(Trigger::FileChange);
                } else {
                    pending = Some(now);
                }
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                applied = fingerprint(&path);
                pending = None;
                reload(Trigger::Sighup);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_sees_edits_new_files_and_ignores_others() {
        let dir = std::env::temp_dir().join(format!("mesh-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("a.yaml"), "a: 1\n").expect("write");
        std::fs::write(dir.join("notes.txt"), "x").expect("write");
        let f1 = fingerprint(&dir);
        assert_eq!(f1.len(), 1);
        std::fs::write(dir.join("a.yaml"), "a: 22\n").expect("write");
        let f2 = fingerprint(&dir);
        assert_ne!(f1, f2);
        std::fs::write(dir.join("b.yml"), "b: 1\n").expect("write");
        assert_eq!(fingerprint(&dir).len(), 2);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
