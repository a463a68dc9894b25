//! `mesh-agent`: the per-node data plane agent.
//!
//! `run` captures targeted connections of the pods behind the configured veths and forwards them;
//! `check` validates a configuration without touching the kernel; `counters` prints the kernel
//! counters of a running (or killed) agent.
use std::{path::PathBuf, process::ExitCode};

use mesh_agent::{app, config, ebpf, policy, proxy};

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
    /// Show a running agent's state for a person: readiness, attached interfaces and modes,
    /// map fill levels (from its admin server's `/status`).
    Status {
        #[arg(long, env = config::ENV_ADMIN_ADDRESS, default_value = config::DEFAULT_ADMIN_ADDRESS)]
        admin_address: std::net::SocketAddr,
    },
    /// Print the capture program's kernel counters as JSON.
    Counters {
        #[arg(long, env = config::ENV_BPFFS_DIR, default_value = config::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

/// Lines the background log writer holds before it drops new ones. Its queue is allocated and
/// written whole at start (tracing-appender's default of 128,000 lines made it 4 MB of the
/// agent's idle memory); 8,192 lines are a burst of over 100 ms at 60,000 access-log lines a
/// second. Dropped lines are counted in `mesh_log_lines_dropped_total`.
const LOG_QUEUE_LINES: usize = 8192;

/// Logs go to stderr through a background writer, so a slow reader of the log never blocks the
/// data path (lines are dropped, not waited for, if it falls far behind). The returned guard
/// flushes on exit.
fn init_tracing(access_log: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !access_log {
        for target in [proxy::ACCESS, "mesh_http::access"] {
            if let Ok(d) = format!("{target}=off").parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .finish(std::io::stderr());
    mesh_agent::metrics::count_dropped_log_lines(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json") {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder.init();
    }
    guard
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The file may switch access logs off too; a config error is reported below.
    let access_log = match &cli.command {
        Command::Run(ov) => config::Config::load(ov).map_or(true, |c| c.access_log),
        _ => true,
    };
    let _log_guard = init_tracing(access_log);
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
            // Before anything is bound or loaded: a kernel without a needed feature is named in
            // one line, not found out later from a verifier log.
            if let Err(line) = ebpf::kernel::Kernel::probe().require() {
                eprintln!("mesh-agent: {line}");
                return ExitCode::from(3);
            }
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
            // The control plane's runtime (policy, Kubernetes, admin, handover): the data plane
            // runs on its own worker threads (`workers`).
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("mesh-control")
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
        Command::Status { admin_address } => match status(admin_address) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("asking the agent at {admin_address}: {e}");
                ExitCode::FAILURE
            }
        },
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
            .map_or("from policy".to_string(), |m| m.to_string())
    );
    let Some(path) = &cfg.policy else {
        return ExitCode::SUCCESS;
    };
    match policy::load(path) {
        Ok(p) => {
            if let Err(e) = p.kernel_plan(&cfg.node_settings()) {
                eprintln!("policy {} is invalid: {e}", path.display());
                return ExitCode::from(2);
            }
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

/// Fetches `/status` and renders it as a few readable lines.
fn status(admin: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(2))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(s, "GET /status HTTP/1.0\r\nHost: {admin}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body)?;
    let mut out = String::new();
    out += &format!("ready: {}\n", v["ready"]);
    let files = &v["open_files"];
    out += &format!(
        "open files: {} (soft limit {}, hard limit {})\n",
        files["open"], files["soft_limit"], files["hard_limit"]
    );
    let cap = &v["capture"];
    out += &format!(
        "capture: program {} at {} ({})\n",
        cap["program"].as_str().unwrap_or("-"),
        cap["hook"].as_str().unwrap_or("-"),
        cap["mode"].as_str().unwrap_or("-")
    );
    for i in cap["interfaces"].as_array().into_iter().flatten() {
        out += &format!(
            "  interface {}  pinned at {}\n",
            i["name"].as_str().unwrap_or("?"),
            i["pin"].as_str().unwrap_or("?")
        );
    }
    let authz = &v["authorization"];
    if let Some(ifaces) = authz["interfaces"].as_array().filter(|a| !a.is_empty()) {
        out += &format!(
            "authorization: {} rules; {}\n",
            authz["rules"],
            authz["placement"].as_str().unwrap_or("-")
        );
        for i in ifaces {
            out += &format!(
                "  interface {}  {} ({})\n",
                i["name"].as_str().unwrap_or("?"),
                i["hook"].as_str().unwrap_or("?"),
                i["mode"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(maps) = v["maps"].as_object() {
        out += "maps:\n";
        for (name, m) in maps {
            out += &format!("  {name:<18} {} / {}\n", m["entries"], m["max"]);
        }
    }
    Ok(out)
}
