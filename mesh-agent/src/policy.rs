//! The policy in force: loading and validating it, what the kernel must capture because of it,
//! and reloading it (a valid policy replaces the old one atomically; an invalid one is reported
//! and ignored, and the last good policy stays).
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use mesh_policy::{Compiled, LoadError, PolicyStore};
use tracing::{error, info};

use crate::{
    config::{CaptureRule, Config, FailMode, Prefix},
    ebpf::Capture,
    metrics::{PolicyMetrics, ResultLabels},
    watch::Trigger,
};

/// Loads and compiles the policy at `path`.
pub fn load(path: &Path) -> Result<Compiled, LoadError> {
    Compiled::load(path)
}

/// One line per problem, as `mesh-agent check` prints them.
pub fn error_lines(e: &LoadError) -> Vec<String> {
    match e {
        LoadError::Invalid(errs) => errs.iter().map(|e| e.to_string()).collect(),
        other => vec![other.to_string()],
    }
}

/// The capture rules of the config plus those the policy implies.
pub fn capture_rules(cfg: &Config, policy: &Compiled) -> Vec<CaptureRule> {
    let mut rules = cfg.capture.clone();
    for r in policy.capture() {
        let prefix: Result<Prefix, _> = format!("{}/{}", r.network, r.prefix_len).parse();
        if let Ok(prefix) = prefix {
            rules.push(CaptureRule {
                prefix,
                ports: r.ports.clone(),
            });
        }
    }
    rules
}

/// The configured fail mode, or the policy's when the configuration leaves it open.
pub fn fail_mode(cfg: &Config, policy: &Compiled) -> FailMode {
    cfg.fail_mode.unwrap_or(match policy.settings().fail_mode {
        mesh_policy::FailMode::Open => FailMode::Open,
        mesh_policy::FailMode::Closed => FailMode::Closed,
    })
}

/// Counts of reloads, for logs and metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub applied: std::sync::atomic::AtomicU64,
    pub rejected: std::sync::atomic::AtomicU64,
    pub metrics: Arc<PolicyMetrics>,
}

impl ReloadStats {
    fn count(&self, applied: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let (n, word) = if applied {
            (&self.applied, "applied")
        } else {
            (&self.rejected, "rejected")
        };
        n.fetch_add(1, Relaxed);
        self.metrics
            .reloads
            .get_or_create(&ResultLabels {
                result: word.into(),
            })
            .inc();
    }
}

/// Reloads from `path`: on success swaps the store and brings the kernel maps in line.
pub fn reload(
    path: &Path,
    trigger: Trigger,
    cfg: &Config,
    store: &PolicyStore,
    capture: &Mutex<Capture>,
    stats: &ReloadStats,
) {
    match load(path) {
        Ok(new) => {
            let rules = capture_rules(cfg, &new);
            let mode = fail_mode(cfg, &new);
            let summary = new.summary();
            let mut cap = capture.lock().unwrap_or_else(|e| e.into_inner());
            // Kernel first: a new destination is captured before routes for it are looked up;
            // a destination that leaves the policy is released after the swap's in-flight users
            // finish with it (they keep their Arc).
            if let Err(e) = cap
                .sync_rules(&rules)
                .and_then(|()| cap.set_settings(mode, cfg.mark))
                .and_then(|()| cap.apply_authz(&new.settings().authorization))
            {
                stats.count(false);
                error!(?trigger, error = %e, "policy reload: kernel maps could not follow; keeping the last good policy");
                return;
            }
            drop(cap);
            store.replace(new);
            stats.count(true);
            info!(?trigger, ?summary, capture_rules = rules.len(), fail_mode = ?mode, "policy reloaded");
        }
        Err(e) => {
            stats.count(false);
            let lines = error_lines(&e);
            error!(
                ?trigger,
                errors = lines.len(),
                "policy rejected; the last good policy stays in force"
            );
            for l in lines {
                error!(%l, "policy error");
            }
        }
    }
}

/// Shared handle used by the proxy.
pub type Store = Arc<PolicyStore>;
