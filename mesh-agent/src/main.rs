//! `mesh-agent`: the per-node data plane agent.
//!
//! `run` captures targeted connections of the pods behind the configured veths and forwards them;
//! `check` validates a configuration without touching the kernel; `counters` prints the kernel
//! counters of a running (or killed) agent.
mod admin;
mod app;
mod config;
mod ebpf;
mod metrics;
mod policy;
mod proxy;
mod routing;
mod watch;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "eBPF service-mesh data plane agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture and proxy the pods' targeted connections until SIGTERM or SIGINT.
    Run(config::Overrides),
    /// Validate the configuration and the policy (`--policy`) without touching the kernel; print
    /// every error with its object, field and reason; exit non-zero if there is one.
    Check(config::Overrides),
    /// Print the capture program's kernel counters as JSON.
    Counters {
        #[arg(long, env = config::ENV_BPFFS_DIR, default_value = config::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json") {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Check(ov) => check(&ov),
        Command::Run(ov) => {
            let cfg = match config::Config::load(&ov) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let initial = match &cfg.policy {
                None => mesh_policy::Compiled::empty(),
                Some(path) => match policy::load(path) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("policy {}:", path.display());
                        for l in policy::error_lines(&e) {
                            eprintln!("  {l}");
                        }
                        return ExitCode::from(2);
                    }
                },
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(app::run(cfg, initial)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("mesh-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Counters { bpffs_dir } => match ebpf::pinned_counters(&bpffs_dir) {
            Ok(values) => {
                let obj: serde_json::Map<String, serde_json::Value> = mesh_common::counters::NAMES
                    .iter()
                    .zip(values)
                    .map(|(k, v)| (k.to_string(), v.into()))
                    .collect();
                println!("{}", serde_json::Value::Object(obj));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("reading counters from {}: {e}", bpffs_dir.display());
                ExitCode::FAILURE
            }
        },
    }
}

/// `mesh-agent check`: configuration, then policy; every error on its own line.
fn check(ov: &config::Overrides) -> ExitCode {
    let cfg = match config::Config::load(ov) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "configuration is valid: {} interface(s), {} capture rule(s), fail mode {}",
        cfg.interfaces.len(),
        cfg.capture.len(),
        cfg.fail_mode
            .map_or("from policy".to_string(), |m| format!("{m:?}"))
    );
    let Some(path) = &cfg.policy else {
        return ExitCode::SUCCESS;
    };
    match policy::load(path) {
        Ok(p) => {
            let s = p.summary();
            println!(
                "policy {} is valid: {} service(s), {} HTTPRoute(s), {} GRPCRoute(s), {} TLSRoute(s), {} TCPRoute(s), {} MeshPolicy(s), {} capture rule(s)",
                path.display(),
                s.services,
                s.http_routes,
                s.grpc_routes,
                s.tls_routes,
                s.tcp_routes,
                s.mesh_policies,
                s.capture_rules
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let lines = policy::error_lines(&e);
            eprintln!(
                "policy {} is invalid ({} error(s)):",
                path.display(),
                lines.len()
            );
            for l in lines {
                eprintln!("  {l}");
            }
            ExitCode::from(2)
        }
    }
}
