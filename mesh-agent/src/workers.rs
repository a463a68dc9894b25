//! The data plane's threads. Each worker runs its own single-threaded event loop and accepts
//! from the same listeners (each holds a duplicate of the listening socket); a connection, its
//! upstream connections and every task it spawns stay on the thread that accepted it.
//!
//! Why not one work-stealing runtime: with the proxy, the load generator and the backends
//! sharing a node's cores, a request's tasks woke each other across threads (futex wake-ups,
//! parked threads unparked to steal) for most of its cost. Here a request never waits on another
//! thread. The control plane (policy, Kubernetes, admin, handover) keeps its own runtime.
use std::{io, thread};

use tokio::{runtime::Handle, sync::watch, task::JoinHandle};

/// The worker threads; dropping this stops them (their remaining tasks are dropped).
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    exit: watch::Sender<bool>,
    next: std::sync::atomic::AtomicUsize,
}

impl Workers {
    /// Starts `n` worker threads, each with its own current-thread runtime.
    pub fn start(n: usize) -> io::Result<Self> {
        let (exit, _) = watch::channel(false);
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let mut stop = exit.subscribe();
            thread::Builder::new()
                .name(format!("mesh-worker-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let _ = stop.wait_for(|v| *v).await;
                    });
                })?;
        }
        Ok(Self {
            handles,
            exit,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether no worker runs (never, once started with n >= 1).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Spawns `make(i)` on every worker `i`.
    pub fn spawn_each<F>(&self, mut make: impl FnMut(usize) -> F) -> Vec<JoinHandle<F::Output>>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles
            .iter()
            .enumerate()
            .map(|(i, h)| h.spawn(make(i)))
            .collect()
    }

    /// The worker for the next connection that arrives other than by accept (moved in by a
    /// handover), in turn.
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.exit.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_thread() {
        let w = Workers::start(3).expect("start");
        let names: Vec<String> = w
            .spawn_each(|_| async { thread::current().name().unwrap_or("").to_string() })
            .into_iter()
            .map(|h| join(h).expect("join"))
            .collect();
        assert_eq!(names, ["mesh-worker-0", "mesh-worker-1", "mesh-worker-2"]);
    }

    fn join<T>(h: JoinHandle<T>) -> Result<T, tokio::task::JoinError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt")
            .block_on(h)
    }
}
