//! Wiring: validated config -> policy routing -> eBPF capture -> listeners -> accept loops, then
//! the shutdown sequence (stop accepting, drain, detach, remove routing).
use std::sync::{Arc, atomic::Ordering};

use anyhow::Context as _;
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{info, warn};

use crate::{
    config::Config,
    ebpf::Capture,
    proxy::{self, Listeners, Stats},
    routing::PolicyRouting,
};

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    raise_fd_limit();
    let mut sigterm =
        tokio::signal::unix::signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint =
        tokio::signal::unix::signal(SignalKind::interrupt()).context("SIGINT handler")?;

    // Listeners first: once the program is attached, SYNs need somewhere to go.
    let listeners = Listeners::bind(cfg.listen_port)?;
    let mut routing = PolicyRouting::install(cfg.mark, cfg.route_table)?;
    let mut capture = Capture::load(&cfg)?;
    capture.set_listeners(&listeners.v4, listeners.v6.as_ref())?;
    info!(
        interfaces = ?cfg.interfaces,
        rules = cfg.capture.len(),
        fail_mode = ?cfg.fail_mode,
        port = cfg.listen_port,
        "agent ready"
    );

    let settings = Arc::new(proxy::Settings {
        connect_timeout: cfg.connect_timeout,
        idle_timeout: cfg.idle_timeout,
        splice: cfg.splice,
        listen_port: cfg.listen_port,
    });
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut loops = Vec::new();
    for l in std::iter::once(listeners.v4).chain(listeners.v6) {
        loops.push(tokio::spawn(proxy::serve(
            l,
            settings.clone(),
            stats.clone(),
            stop_rx.clone(),
        )));
    }

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: draining"),
        _ = sigint.recv() => info!("SIGINT: draining"),
    }
    // Stop accepting: listeners close and leave the SockMap; new SYNs follow the fail mode.
    capture.clear_listeners();
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let left = stats.drain(cfg.drain_timeout).await;
    if left > 0 {
        warn!(open = left, grace = ?cfg.drain_timeout, "drain period over; closing the rest");
    }
    let counters = capture.counters().ok();
    capture.detach();
    routing.remove();
    info!(
        accepted = stats.accepted.load(Ordering::Relaxed),
        upstream_failures = stats.upstream_failures.load(Ordering::Relaxed),
        kernel = ?counters,
        "agent stopped"
    );
    Ok(())
}

/// Each proxied connection holds two sockets and, with splice, four pipe fds.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!(error = %e, "could not raise the open-file limit");
    }
}
