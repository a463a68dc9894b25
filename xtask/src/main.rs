//! `cargo xtask <command>`: setup, demo, test, kernels, bench, fuzz, soak. Every command but `setup` first runs the
//! setup steps that are missing, so a fresh machine needs nothing else.
mod bench;
mod crds;
mod demo;
mod fuzz;
mod k8s_agent;
mod kernels;
mod kube;
mod layout;
mod manifests;
mod mtls_agent;
mod setup;
mod soak;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent): nightly rust-src, bpf-linker built
    /// against rustc's LLVM, and the Debian packages the tests use.
    Setup,
    /// Build a topology in network namespaces, run the agent, make requests, show what happened;
    /// then the same with the agent in Kubernetes mode against the test API server.
    Demo {
        /// Only the Kubernetes part.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Lints, unit tests, privileged integration tests (as root), the conformance suite, and the
    /// privileged tests on Debian's 6.1 kernel in a VM.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the run on Debian's 6.1 kernel in a VM (`cargo xtask kernels --kernel 6.1`).
        #[arg(long)]
        no_kernels: bool,
    },
    /// The privileged integration tests on Debian's 6.1 and 6.12 kernels (qemu VMs) and on the
    /// host: a kernel x test table.
    Kernels(kernels::Options),
    /// End-to-end figures: the agent against direct, HAProxy and nginx (throughput, latency,
    /// memory, CPU per request, eBPF per-packet cost), written to `bench/results/`;
    /// Kubernetes mode at scale (10,000 Services: time to ready, memory, route edit latency).
    Bench {
        /// Run only this section.
        #[arg(long, value_enum)]
        only: Option<bench::Section>,
        /// Only the Kubernetes section's smoke run, as `cargo xtask test` runs it: debug builds
        /// at a twentieth of the scale (checks that the benchmark works; not figures to quote).
        #[arg(long, conflicts_with = "only")]
        smoke: bool,
        /// Every data-path scenario once, briefly (about a second each), with the release
        /// agent (or `MESH_AGENT_BIN` when set): fails if any scenario fails (a peer did not start, the agent returned
        /// errors). Checks that the benchmark works; not figures to quote.
        #[arg(long, conflicts_with_all = ["only", "smoke"])]
        quick: bool,
    },
    /// Run every cargo-fuzz target (ClientHello, protocol detection, HTTP/1 scanner and
    /// server path, policy loading, authorization compiler) for the given time split evenly;
    /// prints executions per target and fails on a crash or hang.
    Fuzz {
        /// Total minutes for all targets together.
        #[arg(long, default_value_t = 6)]
        minutes: u64,
    },
    /// The agent for N minutes under HTTP and L4 load, policy reloads and restarts, in network
    /// namespaces of its own; samples its RSS and open fds every second into a CSV and a PNG
    /// chart, and fails if they are not back at their idle baseline once the load stops.
    Soak {
        /// Minutes of load (after a warm-up of a sixth of that, 10-60 s).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// Trace which functions of the release agent run during the quick benchmark and write
    /// them to `mesh-agent/hot-text.order`, the order the linker places them first in.
    Layout,
    /// Write the CRDs generated from the Rust types to `manifests/crds/`.
    Crds {
        /// Write nothing; fail with a diff if a committed CRD differs.
        #[arg(long)]
        check: bool,
    },
    /// Check `manifests/`: kustomize renders, every object validates against the Kubernetes
    /// schemas, the example MeshPolicies against the CRD and `mesh-agent check`.
    Manifests,
    /// The agent command of the conformance run in Kubernetes mode (run by `run.py` in the node
    /// namespace): `mesh-apiserver`, the CRDs, the case's policy applied with kubectl, a Pod
    /// object for the client, then `mesh-agent run --kubernetes`.
    K8sAgent(k8s_agent::Options),
    /// The agent command of the conformance run through the mTLS tunnel (run by `run.py` in
    /// the node namespace): two agents as two nodes, the backends' Pods on the second, every
    /// request carried through its tunnel port.
    MtlsAgent(mtls_agent::Options),
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let done = match cli.command {
        Command::K8sAgent(opts) => return k8s_agent::run(&opts),
        Command::MtlsAgent(opts) => return mtls_agent::run(&opts),
        Command::Setup => setup::run(),
        Command::Demo { kubernetes } => {
            setup::run()?;
            demo::run(kubernetes)
        }
        Command::Test {
            no_lint,
            no_kernels,
        } => {
            setup::run()?;
            test::run(!no_lint, !no_kernels)
        }
        Command::Kernels(opts) => {
            setup::run()?;
            kernels::run(&opts)
        }
        Command::Bench { only, smoke, quick } => {
            setup::run()?;
            if quick {
                // An agent the caller built (as the tests take it), else the release build.
                let agent = match std::env::var_os("MESH_AGENT_BIN") {
                    Some(bin) => std::path::PathBuf::from(bin),
                    None => util::build_release()?.0,
                };
                bench::quick(&agent)
            } else if smoke {
                let agent = util::build_agent(false)?;
                bench::kubernetes::smoke(&agent, &util::build_apiserver()?)
            } else {
                bench::run(only)
            }
        }
        Command::Fuzz { minutes } => {
            setup::run()?;
            fuzz::run(std::time::Duration::from_secs(minutes * 60))
        }
        Command::Soak { minutes } => {
            setup::run()?;
            soak::run(minutes, &util::build_agent(false)?)
        }
        Command::Layout => {
            setup::run()?;
            layout::run()
        }
        Command::Crds { check } => crds::run(check),
        Command::Manifests => {
            setup::run()?;
            manifests::run(&util::build_agent(false)?)
        }
    };
    done.map(|()| std::process::ExitCode::SUCCESS)
}
