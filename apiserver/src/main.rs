//! `mesh-apiserver`: runs the test API server on a plain-HTTP address, prints the bound address
//! as the first line of stdout and optionally writes a kubeconfig pointing at itself.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mesh_apiserver::server::Server;
use mesh_apiserver::store::Store;
use mesh_apiserver::watch::{ExpiredAs, WatchSettings};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Expired {
    Event,
    Http,
}

/// An in-memory Kubernetes API server for tests.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free one. The bound address is printed first.
    #[arg(long, env = "MESH_APISERVER_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,
    /// Write a kubeconfig for this server here (context `mesh-apiserver`, namespace default).
    #[arg(long, env = "MESH_APISERVER_KUBECONFIG_OUT")]
    kubeconfig: Option<PathBuf>,
    /// Load objects from this file at start if it exists, and save them after every write.
    #[arg(long, env = "MESH_APISERVER_STATE")]
    state: Option<PathBuf>,
    /// How many events are kept for watches to resume from; older versions get 410 Gone.
    #[arg(long, env = "MESH_APISERVER_COMPACTION_WINDOW", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    compaction_window: u64,
    /// Seconds after which the server ends a watch that set no timeoutSeconds.
    #[arg(long, env = "MESH_APISERVER_WATCH_TIMEOUT", default_value_t = 1800)]
    watch_timeout: u64,
    /// Seconds between BOOKMARK events on watches that allow them.
    #[arg(long, env = "MESH_APISERVER_BOOKMARK_INTERVAL", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    bookmark_interval: u64,
    /// How a watch from an expired resourceVersion is answered: an ERROR event in a 200 stream
    /// (as the real server does) or an HTTP 410.
    #[arg(
        long,
        env = "MESH_APISERVER_EXPIRED_WATCH",
        value_enum,
        default_value = "event"
    )]
    expired_watch: Expired,
}

fn kubeconfig(addr: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: mesh-apiserver
  cluster:
    server: http://{addr}
users:
- name: mesh-apiserver
  user: {{}}
contexts:
- name: mesh-apiserver
  context:
    cluster: mesh-apiserver
    user: mesh-apiserver
    namespace: default
current-context: mesh-apiserver
"
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    let args = Args::parse();
    let store = Store::new(
        usize::try_from(args.compaction_window).unwrap_or(usize::MAX),
        args.state.clone(),
    )
    .context("loading state")?;
    let settings = WatchSettings {
        default_timeout: Duration::from_secs(args.watch_timeout),
        bookmark_interval: Duration::from_secs(args.bookmark_interval),
        expired_as: match args.expired_watch {
            Expired::Event => ExpiredAs::Event,
            Expired::Http => ExpiredAs::Http,
        },
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    if let Some(path) = &args.kubeconfig {
        std::fs::write(path, kubeconfig(&addr.to_string()))
            .with_context(|| format!("writing kubeconfig {}", path.display()))?;
    }
    println!("{addr}");
    let server = Server::new(store, settings);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // The state file is written before each write is answered, so stopping needs no flush.
    tokio::select! {
        r = server.serve(listener) => r.context("serving")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
