//! The policy in force: loading and validating it, what the kernel must capture because of it,
//! and reloading it (a valid policy replaces the old one atomically; an invalid one is reported
//! and ignored, and the last good policy stays).
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use mesh_policy::{Compiled, KernelPlan, LoadError, NodeSettings, PlanError, PolicyStore};
use tracing::{error, info};

use crate::{
    config::Config,
    ebpf::Programs,
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

/// The kernel plan of `policy` on this node: the policy's capture, fail mode and authorization
/// with the configuration's interfaces, capture rules and fail mode.
pub fn plan(cfg: &Config, policy: &Compiled) -> Result<KernelPlan, PlanError> {
    policy.kernel_plan(&cfg.node_settings())
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
    programs: &Mutex<Programs>,
    stats: &ReloadStats,
) {
    match load(path) {
        Ok(new) => {
            let _ = apply(new, &cfg.node_settings(), trigger, store, programs, stats);
        }
        Err(e) => {
            let lines = error_lines(&e);
            stats.count(false);
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

/// Why a compiled policy could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("kernel maps could not follow: {0}")]
    Kernel(#[from] crate::ebpf::Error),
}

/// The one step both modes share (file and Kubernetes): the kernel plan of `new` on a node
/// with `node`'s settings, written to the kernel, then the route table swapped. On error the
/// last good policy stays in force and the error is logged and counted.
pub fn apply(
    new: Compiled,
    node: &NodeSettings,
    trigger: Trigger,
    store: &PolicyStore,
    programs: &Mutex<Programs>,
    stats: &ReloadStats,
) -> Result<KernelPlan, ApplyError> {
    let summary = new.summary();
    let result = new
        .kernel_plan(node)
        .map_err(ApplyError::from)
        .and_then(|plan| {
            let mut programs = programs.lock().unwrap_or_else(|e| e.into_inner());
            // Kernel first: a new destination is captured before routes for it are looked up;
            // a destination that leaves the policy is released after the swap's in-flight users
            // finish with it (they keep their Arc).
            programs.apply(&plan)?;
            Ok(plan)
        });
    match &result {
        Ok(plan) => {
            let old = store.replace(new);
            // Freeing a large route table (10,000 Services) takes tens of milliseconds; the
            // new one is in force already, so that need not delay what follows the reload.
            std::thread::spawn(move || drop(old));
            stats.count(true);
            info!(?trigger, ?summary, interfaces = ?plan.interfaces, capture_rules = plan.capture.len(), fail_mode = %plan.fail_mode, "policy reloaded");
        }
        Err(ApplyError::Plan(e)) => {
            stats.count(false);
            error!(
                ?trigger,
                errors = e.0.len(),
                "policy rejected; the last good policy stays in force"
            );
            for l in &e.0 {
                error!(%l, "policy error");
            }
        }
        Err(e) => {
            stats.count(false);
            error!(?trigger, error = %e, "policy reload: keeping the last good policy");
        }
    }
    result
}

/// Shared handle used by the proxy.
pub type Store = Arc<PolicyStore>;
