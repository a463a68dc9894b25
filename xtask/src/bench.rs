//! `cargo xtask bench`: end-to-end figures. The data path ([`data_path`]): the agent against
//! direct, HAProxy and nginx on one topology, in one run (HTTP/1.1, h2c, gRPC, L4, latency at a
//! fixed rate, new connections, memory, CPU per request, idle connections, eBPF per-packet
//! cost), printed as a table and written to `bench/results/`. Then Kubernetes mode at scale
//! ([`kubernetes`]).
mod cluster;
pub mod data_path;
mod ebpf;
pub mod kubernetes;
mod load;
mod mtls;
mod procs;
mod report;
mod table;

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::util::{build_release, root};

/// The parts of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// The agent against direct, HAProxy and nginx: throughput, latency, memory, CPU.
    DataPath,
    /// Kubernetes mode with 10,000 Services: time to ready, memory, route edit latency.
    Kubernetes,
    /// Only the eBPF rows of the data path (per-packet cost, untargeted throughput), on a
    /// topology of their own; printed and written to `bench/results/ebpf.md`.
    Ebpf,
    /// The mTLS tunnel between two nodes against plaintext through the agents and direct;
    /// printed and written to `bench/results/mtls.md`.
    Mtls,
}

/// Runs `only` the given section, or every section.
pub fn run(only: Option<Section>) -> anyhow::Result<()> {
    if !mesh_tests::privileged("bench") {
        bail!("the benchmark needs root (BPF, network namespaces)");
    }
    if only.is_none_or(|s| s == Section::DataPath) {
        // An agent the caller built (a release build to compare with), else this tree's.
        let agent = match std::env::var_os("MESH_AGENT_BIN") {
            Some(bin) => std::path::PathBuf::from(bin),
            None => build_release()?.0,
        };
        let plan = data_path::Plan::FULL;
        let results = data_path::run(plan, &agent)?;
        print(&results);
        let layout = layout_line(&agent);
        println!("{layout}");
        let dir = root().join("bench/results");
        report::write(
            &dir,
            &results,
            &format!(
                "{} rounds of {} s per scenario; {layout}",
                plan.rounds, plan.secs
            ),
        )?;
        println!(
            "\nwritten: {}/latest.md, latency.png, rss.png",
            dir.display()
        );
    }
    if only == Some(Section::Ebpf) {
        let agent = match std::env::var_os("MESH_AGENT_BIN") {
            Some(bin) => std::path::PathBuf::from(bin),
            None => build_release()?.0,
        };
        // Five rounds, not the data path's three: the untargeted ratio is a difference of a
        // few percent between two noisy iperf3 runs.
        let plan = data_path::Plan::FULL;
        let rows = ebpf::run(&agent, 5, plan.secs)?;
        let table = table::markdown(&rows);
        println!("\n{table}");
        let file = root().join("bench/results/ebpf.md");
        std::fs::write(
            &file,
            format!(
                "# eBPF rows (`cargo xtask bench --only ebpf`)\n\n{table}\n{}\n",
                report::machine()
            ),
        )?;
        println!("\nwritten: {}", file.display());
    }
    if only.is_none_or(|s| s == Section::Mtls) {
        let agent = match std::env::var_os("MESH_AGENT_BIN") {
            Some(bin) => std::path::PathBuf::from(bin),
            None => build_release()?.0,
        };
        let plan = data_path::Plan::FULL;
        let table = mtls::run(&agent, plan.rounds, plan.secs)?;
        println!("\n{table}");
        let file = root().join("bench/results/mtls.md");
        std::fs::write(
            &file,
            format!(
                "# mTLS tunnel rows (`cargo xtask bench --only mtls`)\n\n{table}\n{}\n",
                report::machine()
            ),
        )?;
        println!("\nwritten: {}", file.display());
    }
    if only.is_none_or(|s| s == Section::Kubernetes) {
        println!();
        kubernetes::run()?;
    }
    Ok(())
}

/// `--quick`: every data-path scenario once, briefly, with `agent`, then the mTLS rows; fails
/// if any did not complete (the data path's after all have run), so CI keeps the benchmark
/// working. Figures are printed but mean little.
pub fn quick(agent: &Path) -> anyhow::Result<()> {
    if !mesh_tests::privileged("bench --quick") {
        bail!("the benchmark needs root (BPF, network namespaces)");
    }
    let results = data_path::run(data_path::Plan::QUICK, agent)?;
    print(&results);
    let failed: Vec<String> = results
        .rows
        .iter()
        .flat_map(|r| {
            r.failures()
                .map(move |(t, why)| format!("{} / {}: {}", r.name, t.name(), why))
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} benchmark scenario(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    // The mTLS rows, once and briefly: every path and measurement must complete.
    let plan = data_path::Plan::QUICK;
    let table = mtls::run(agent, plan.rounds, plan.secs)
        .context("the mTLS rows (cargo xtask bench --only mtls)")?;
    println!("\nmTLS tunnel, quick:\n{table}");
    Ok(())
}

/// How much of `mesh-agent/hot-text.order` the measured (release) agent matches: names go stale
/// with new toolchains and dependency versions, and the idle RSS grows back as they do.
fn layout_line(agent: &Path) -> String {
    match crate::layout::coverage(agent) {
        Ok((found, listed)) => format!(
            "hot text: {found} of the {listed} functions in {} are in this agent{}",
            crate::layout::ORDER_FILE,
            if found * 10 < listed * 9 {
                " (below 90 %: run `cargo xtask layout`)"
            } else {
                ""
            }
        ),
        Err(e) => format!("hot text: {e:#}"),
    }
}

fn print(results: &data_path::Results) {
    println!("\n{}", table::markdown(&results.rows));
    if let Some(added) = report::added_latency(results) {
        println!("{added}");
    }
}
