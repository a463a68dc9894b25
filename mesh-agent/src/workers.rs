//! The data plane's threads. Each worker runs its own single-threaded event loop and accepts
//! from the same listeners (each holds a duplicate of the listening socket). A connection goes to
//! the worker serving the fewest (see [`Workers::place`]); it, its upstream connections and every
//! task it spawns then stay on that thread.
//!
//! Why placed and not left where accepted: every worker's event loop watches the same listening
//! socket and the first one woken accepts whatever is queued. Left at that, one worker took
//! nearly every connection (in the benchmark, all 16 of wrk's connections on one thread while
//! the other slept and the proxy was short of a core); why the same one each time was not traced.
//!
//! Why not one work-stealing runtime: with the proxy, the load generator and the backends
//! sharing a node's cores, a request's tasks woke each other across threads (futex wake-ups,
//! parked threads unparked to steal) for most of its cost. Here a request never waits on another
//! thread. The control plane (policy, Kubernetes, admin, handover) keeps its own runtime.
use std::{io, thread};

use prometheus_client::metrics::gauge::Gauge;
use tokio::{runtime::Handle, sync::watch, task::JoinHandle};

/// The worker threads; dropping this stops them (their remaining tasks are dropped).
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    exit: watch::Sender<bool>,
    /// Connections each worker serves now (`mesh_worker_connections`).
    loads: Vec<Gauge>,
}

/// One connection counted against a worker until it is dropped.
#[derive(Debug)]
pub struct Load(Gauge);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Workers {
    /// Starts `n` worker threads, each with its own current-thread runtime; `load(i)` is the
    /// gauge that counts worker `i`'s connections.
    pub fn start(n: usize, mut load: impl FnMut(usize) -> Gauge) -> io::Result<Self> {
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
            loads: (0..n).map(&mut load).collect(),
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

    /// The worker that serves a connection worker `me` accepted: the one serving the fewest
    /// connections, `me` when it serves no more than that (a connection moves to another
    /// thread only to even out the load). `None` for `me` places a connection that was not
    /// accepted here (moved in by a handover).
    pub fn place(&self, me: Option<usize>) -> usize {
        let (fewest, least) = self
            .loads
            .iter()
            .map(Gauge::get)
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .unwrap_or((0, 0));
        match me {
            Some(me) if self.loads.get(me).is_some_and(|l| l.get() <= least) => me,
            _ => fewest,
        }
    }

    /// Counts a connection against worker `i` until the returned guard is dropped.
    pub fn count(&self, i: usize) -> Load {
        let gauge = self.loads[i].clone();
        gauge.inc();
        Load(gauge)
    }

    /// Worker `i`'s runtime.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i]
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
        let w = Workers::start(3, |_| Gauge::default()).expect("start");
        let names: Vec<String> = w
            .spawn_each(|_| async { thread::current().name().unwrap_or("").to_string() })
            .into_iter()
            .map(|h| join(h).expect("join"))
            .collect();
        assert_eq!(names, ["mesh-worker-0", "mesh-worker-1", "mesh-worker-2"]);
    }

    #[test]
    fn a_connection_goes_to_the_worker_serving_the_fewest() {
        let w = Workers::start(3, |_| Gauge::default()).expect("start");
        // Nothing served anywhere: the accepting worker keeps it.
        assert_eq!(w.place(Some(2)), 2);
        let held: Vec<Load> = (0..3).map(|_| w.count(w.place(Some(0)))).collect();
        // Three connections accepted by worker 0 end up one per worker.
        assert_eq!(
            w.loads.iter().map(Gauge::get).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        let fourth = w.count(w.place(Some(1)));
        assert_eq!(
            w.loads[1].get(),
            2,
            "on a tie the accepting worker keeps it"
        );
        drop(held);
        assert_eq!(
            w.loads.iter().map(Gauge::get).collect::<Vec<_>>(),
            [0, 1, 0]
        );
        // A moved-in connection goes to the first of the least loaded.
        assert_eq!(w.place(None), 0);
        assert_eq!(w.place(Some(1)), 0);
        drop(fourth);
    }

    fn join<T>(h: JoinHandle<T>) -> Result<T, tokio::task::JoinError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt")
            .block_on(h)
    }
}
