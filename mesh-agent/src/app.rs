//! Wiring: validated config and policy -> listeners -> policy routing -> eBPF capture -> accept
//! loops and the policy watcher; then the shutdown sequence (stop accepting, drain, detach,
//! remove routing).
use std::sync::{
    Arc, Mutex, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use mesh_policy::{Compiled, PolicyStore};
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{info, warn};

use crate::{
    admin,
    config::Config,
    ebpf::Programs,
    metrics::Metrics,
    policy::{self, ReloadStats},
    proxy::{self, Listeners, Stats, balance::Balancer},
    routing::{Notrack, PolicyRouting},
};

/// Different endpoints tried for one connection before it is given up.
const CONNECT_ATTEMPTS: usize = 3;

pub async fn run(cfg: Config, initial: Compiled) -> anyhow::Result<()> {
    raise_fd_limit();
    crate::proxy::headroom::set_from_limit();
    let mut sigterm =
        tokio::signal::unix::signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint =
        tokio::signal::unix::signal(SignalKind::interrupt()).context("SIGINT handler")?;

    // Kubernetes mode: the client is configured before anything is bound or loaded, so a
    // missing kubeconfig is a startup error.
    let kube = match &cfg.kubernetes {
        Some(k) => Some((crate::k8s::client().await?, k.clone())),
        None => None,
    };
    // A running agent with this configuration hands over its sockets (handover.rs); without
    // one this is a fresh start.
    let takeover = crate::handover::connect(&cfg.handover_socket)
        .context("taking over from the running agent")?;
    if let Some(t) = &takeover {
        info!(from_version = %t.version, socket = %cfg.handover_socket.display(), "taking over from the running agent");
    }
    let plan = policy::plan(&cfg, &initial)?;
    let summary = initial.summary();
    let store = Arc::new(PolicyStore::new(initial));
    let mut metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));

    // The admin server answers from the start: /healthz at once, /readyz only once everything
    // below is in place.
    let capture_cell: Arc<OnceLock<Arc<Mutex<Programs>>>> = Arc::new(OnceLock::new());
    metrics.register_kernel(capture_cell.clone());
    let mesh_cell: Arc<OnceLock<Arc<crate::mesh::Mesh>>> = Arc::new(OnceLock::new());
    if cfg.mesh.is_some() {
        metrics.register_mesh(mesh_cell.clone());
    }
    // Like Istio's default retry policy: 503s and connect failures of idempotent requests are
    // retried (twice at most, within the retry budget).
    let http = mesh_http::Proxy::with_resilience(
        mesh_http::Config {
            connect_timeout: cfg.connect_timeout,
            ..Default::default()
        },
        store.clone(),
        mesh_http::Resilience {
            retry_on_status: vec![503],
            ..Default::default()
        },
    )
    .with_observer(metrics.http.clone())
    // Requests to an enrolled pod of another node go through the mTLS tunnel, once it runs.
    .with_dialer(Arc::new(crate::tunnel::Dialer {
        mesh: mesh_cell.clone(),
        policy: store.clone(),
    }));
    metrics.register_http(http.clone());
    let kube_metrics = kube
        .as_ref()
        .map(|_| crate::k8s::Metrics::register(&mut metrics.registry));
    let kube_status = kube
        .as_ref()
        .map(|(_, k)| crate::k8s::Status::new(&k.node_name));
    let kube_status_handle = kube_status.clone();
    let handover_metrics = crate::handover::Metrics::register(&mut metrics.registry);
    let metrics = Arc::new(metrics);
    let status: admin::StatusFn = {
        let cell = capture_cell.clone();
        let kube_status = kube_status.clone();
        Arc::new(move || {
            let mut s = match cell.get() {
                Some(c) => c.lock().unwrap_or_else(|e| e.into_inner()).status(),
                None => serde_json::json!({"capture": null}),
            };
            if let Some(k) = &kube_status {
                s["kubernetes"] = k.json();
            }
            s
        })
    };
    let admin_state = Arc::new(admin::State {
        metrics: metrics.clone(),
        ready: ready.clone(),
        policy: store.clone(),
        config: cfg.to_json(),
        status,
    });
    let (channel, listeners, admin_listener, tunnel_fd) = match takeover {
        Some(t) => (
            Some(t.channel),
            Listeners::from_fds(t.v4, t.v6, cfg.listen_port)?,
            match t.admin {
                Some(fd) => std::net::TcpListener::from(fd),
                None => admin::bind(cfg.admin_address)?,
            },
            t.tunnel,
        ),
        // Listeners first: once the program is attached, SYNs need somewhere to go.
        None => (
            None,
            Listeners::bind(cfg.listen_port)?,
            admin::bind(cfg.admin_address)?,
            None,
        ),
    };
    let tunnel_listener = match &cfg.mesh {
        Some(m) => Some(crate::mesh::tunnel_listener(m, tunnel_fd)?),
        None => None,
    };
    // Copies of the sockets for the next agent, should one take over from this one.
    let offered =
        crate::handover::Offered::new(&listeners, &admin_listener, tunnel_listener.as_ref())?;
    let (admin_addr, admin_task) = admin::spawn_on(admin_listener, admin_state, cfg.admin_address)?;
    let mut routing = if channel.is_some() {
        PolicyRouting::adopt(cfg.mark, cfg.route_table)?
    } else {
        PolicyRouting::install(cfg.mark, cfg.route_table)?
    };
    // Before the program attaches: no captured SYN may meet kube-proxy's DNAT (routing.rs).
    let mut notrack = cfg
        .kube_proxy_notrack
        .then(|| {
            if channel.is_some() {
                Notrack::adopt(cfg.mark)
            } else {
                Notrack::install(cfg.mark)
            }
        })
        .transpose()?;
    let mut capture = Programs::load(&cfg.bpffs_dir, cfg.mark, cfg.ebpf_log)?;
    // Until the predecessor hears this agent is ready, a failure here leaves the links to it.
    capture.release_on_drop(channel.is_some());
    if let Some(logger) = capture.take_logger() {
        tokio::spawn(crate::ebpf::forward_logs(logger));
    }
    // The listeners go in before the program attaches (or replaces a predecessor's through the
    // pinned link): no captured SYN meets an empty SockMap.
    capture.set_listeners(&listeners.v4, listeners.v6.as_ref())?;
    // Taking over in Kubernetes mode, the policy and the pods to capture come from the API
    // server: the predecessor's programs keep running on its complete maps until the first
    // synced apply replaces them through the pins, instead of this agent's empty ones now.
    let synced_first = channel.is_some() && cfg.kubernetes.is_some();
    if !synced_first {
        capture.apply(&plan)?;
    }
    let capture = Arc::new(Mutex::new(capture));
    let _ = capture_cell.set(capture.clone());

    let reloads = Arc::new(ReloadStats {
        metrics: metrics.policy.clone(),
        ..Default::default()
    });
    let watcher = cfg.policy.clone().map(|path| {
        let (cfg, store, capture, reloads) =
            (cfg.clone(), store.clone(), capture.clone(), reloads.clone());
        tokio::spawn(crate::watch::watch(path.clone(), move |trigger| {
            policy::reload(&path, trigger, &cfg, &store, &capture, &reloads);
        }))
    });

    let workers = Arc::new(
        crate::workers::Workers::start(cfg.workers, |i| {
            let worker = crate::metrics::WorkerLabels { worker: i as u32 };
            metrics
                .tcp
                .worker_connections
                .get_or_create(&worker)
                .clone()
        })
        .map_err(|e| anyhow::anyhow!("starting {} worker threads: {e}", cfg.workers))?,
    );
    // mTLS between nodes: identities of this node's workloads and the tunnel server.
    let mesh = match (&cfg.mesh, tunnel_listener) {
        (Some(m), Some(listener)) => {
            let mesh = crate::mesh::Mesh::start(
                m,
                listener,
                &workers,
                store.clone(),
                cfg.connect_timeout,
                http.clone(),
                cfg.idle_timeout,
            )
            .await?;
            let _ = mesh_cell.set(mesh.clone());
            Some(mesh)
        }
        _ => None,
    };

    let (start_moving, handoff, moved) = proxy::Handoff::new();
    let settings = Arc::new(proxy::Settings {
        connect_timeout: cfg.connect_timeout,
        idle_timeout: cfg.idle_timeout,
        splice: cfg.splice,
        listen_port: cfg.listen_port,
        connect_attempts: CONNECT_ATTEMPTS,
        policy: store.clone(),
        // One endpoint registry for TCP connections and HTTP requests.
        balancer: Arc::new(Balancer::new(http.balancer())),
        metrics: metrics.tcp.clone(),
        http: http.clone(),
        handoff,
        mesh: mesh.clone(),
    });
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut loops = Vec::new();
    for l in std::iter::once(listeners.v4).chain(listeners.v6) {
        // Every worker accepts from its own duplicate of the listening socket; the socket
        // closes (and leaves the SockMap's hold) once the last accept loop ends.
        let l = l.into_std()?;
        let dups = (1..workers.len())
            .map(|_| l.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut sockets = std::iter::once(l).chain(dups);
        loops.extend(workers.spawn_each(|i| {
            let socket = sockets.next();
            let placement = (workers.clone(), i);
            let (settings, stats, stop_rx) = (settings.clone(), stats.clone(), stop_rx.clone());
            // The listeners are shared with a running predecessor: this agent accepts only once
            // it can route what it accepts (Kubernetes mode: once synced).
            let gate = synced_first.then(|| ready.clone());
            async move {
                let Some(socket) = socket else { return };
                let l = match tokio::net::TcpListener::from_std(socket) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "registering the listener with a worker");
                        return;
                    }
                };
                if let Some(ready) = gate {
                    while !ready.load(Ordering::Acquire) {
                        if *stop_rx.borrow() {
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
                proxy::serve(l, settings, stats, stop_rx, placement).await;
            }
        }));
    }

    // Kubernetes mode is ready once every watched kind has synced and its policy is applied.
    let kubernetes = match (kube, kube_metrics, kube_status) {
        (Some((client, k)), Some(metrics), Some(status)) => {
            let targets = crate::k8s::Targets {
                cfg: cfg.clone(),
                store: store.clone(),
                programs: capture.clone(),
                reloads: reloads.clone(),
                ready: ready.clone(),
                metrics,
                status,
            };
            Some(tokio::spawn(crate::k8s::run(
                client,
                k.node_name,
                k.backoff_max,
                targets,
            )))
        }
        _ => {
            // Programs attached, listeners in the SockMap, policy loaded, accepting.
            ready.store(true, Ordering::Release);
            None
        }
    };
    info!(
        interfaces = ?plan.interfaces,
        capture_rules = plan.capture.len(),
        fail_mode = %plan.fail_mode,
        port = cfg.listen_port,
        policy = ?summary,
        admin = %admin_addr,
        "agent ready"
    );
    // What start-up allocated and freed (BTF, policy parsing) goes back to the kernel now, and
    // what a load spike leaves in the arenas every `TRIM_EVERY`.
    crate::memory::trim();
    tokio::spawn(async {
        loop {
            tokio::time::sleep(crate::memory::TRIM_EVERY).await;
            crate::memory::trim();
        }
    });

    // From here on nothing fails before the predecessor hears ready: what was adopted is ours.
    capture
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .release_on_drop(false);
    routing.own();
    if let Some(n) = notrack.as_mut() {
        n.own();
    }
    let reclaim = {
        let capture = capture.clone();
        Box::new(move || {
            let mut c = capture.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = c.reclaim() {
                warn!(error = %e, "attaching the programs again after a failed takeover");
            }
        })
    };
    let mut successor = crate::handover::serve(
        &cfg.handover_socket,
        channel,
        offered,
        crate::handover::Hooks {
            settings: settings.clone(),
            stats: stats.clone(),
            metrics: handover_metrics,
            ready: ready.clone(),
            reclaim,
            workers: workers.clone(),
            taken_over: {
                let status = kube_status_handle.clone();
                Box::new(move || {
                    if let Some(s) = &status {
                        s.retry_lease();
                    }
                })
            },
        },
    );
    let handed_over = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: draining"); None }
        _ = sigint.recv() => { info!("SIGINT: draining"); None }
        Some(ch) = successor.recv() => Some(ch),
    };
    ready.store(false, Ordering::Release);
    if let Some(channel) = handed_over {
        admin_task.abort();
        for w in watcher.into_iter().chain(kubernetes) {
            w.abort();
            let _ = w.await;
        }
        if let Some(s) = &kube_status_handle {
            s.release().await;
        }
        // Programs, routes and the notrack table are the successor's now; the listeners stay in
        // its SockMap.
        capture.lock().unwrap_or_else(|e| e.into_inner()).release();
        routing.forget();
        if let Some(n) = notrack.as_mut() {
            n.forget();
        }
        let _ = stop_tx.send(true);
        for l in loops {
            let _ = l.await;
        }
        // The successor accepts on the tunnel socket too; this agent's tunnel connections finish
        // their streams while the proxied connections move.
        let tunnel = async {
            if let Some(m) = &mesh {
                m.stop_serving(cfg.drain_timeout).await;
            }
        };
        tokio::join!(
            crate::handover::hand_over(channel, start_moving, moved, &stats, cfg.drain_timeout),
            tunnel
        );
        info!(
            accepted = stats.accepted.load(Ordering::Relaxed),
            "agent stopped: handed over"
        );
        return Ok(());
    }
    for w in watcher.into_iter().chain(kubernetes) {
        w.abort();
        // Wait until the task (and its handle on the capture) is gone.
        let _ = w.await;
    }
    // Status writing has stopped with that task: hand the status Lease to another agent now
    // rather than after it expires (a rolling update then changes writers at once).
    if let Some(s) = &kube_status_handle {
        s.release().await;
    }
    // Stop accepting: listeners close and leave the SockMap; new SYNs follow the fail mode.
    capture
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear_listeners();
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let tunnel = async {
        if let Some(m) = &mesh {
            m.stop_serving(cfg.drain_timeout).await;
        }
    };
    let (left, ()) = tokio::join!(stats.drain(cfg.drain_timeout), tunnel);
    if left > 0 {
        warn!(open = left, grace = ?cfg.drain_timeout, "drain period over; closing the rest");
    }
    let mut capture = capture.lock().unwrap_or_else(|e| e.into_inner());
    let counters = capture.counters().ok();
    capture.detach();
    routing.remove();
    // No successor will come through it: a clean stop leaves no socket file behind (a killed
    // agent's file is recognised as stale and replaced by the next one).
    let _ = std::fs::remove_file(&cfg.handover_socket);
    if let Some(n) = notrack.as_mut() {
        n.remove();
    }
    info!(
        accepted = stats.accepted.load(Ordering::Relaxed),
        upstream_failures = stats.upstream_failures.load(Ordering::Relaxed),
        policy_reloads = reloads.applied.load(Ordering::Relaxed),
        policy_rejections = reloads.rejected.load(Ordering::Relaxed),
        kernel = ?counters,
        "agent stopped"
    );
    Ok(())
}

/// Each proxied L4 connection holds two fds (more while bytes move), so the soft open-file
/// limit (often 1,024) would cap the agent long before the memory does: it is raised to the hard
/// limit, which the agent cannot raise itself (no CAP_SYS_RESOURCE in a pod).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(
                from = soft,
                soft = hard,
                hard,
                "open-file soft limit raised to the hard limit"
            ),
            Err(e) => warn!(error = %e, soft, hard, "could not raise the open-file soft limit"),
        },
        Ok((soft, hard)) => info!(soft, hard, "open-file soft limit already at the hard limit"),
        Err(e) => warn!(error = %e, "could not read the open-file limit"),
    }
}
