//! `cargo xtask fuzz --minutes N`: every cargo-fuzz target of the workspace (the `fuzz/` crate:
//! mesh-inspect's, mesh-http's and mesh-policy's parsers of untrusted bytes), for N minutes split
//! evenly, each from its committed seeds (`fuzz/seeds/<target>`) plus what earlier runs found
//! (`fuzz/corpus/<target>`, not committed). Prints the executions of each target and every crash, hang or leak libFuzzer
//! reports, with the input it saved (`fuzz/artifacts/<target>/`), and fails if there was one.
//! `cargo xtask test` runs it with [`CI_SECONDS_PER_TARGET`].
//!
//! The fuzz crate is not a workspace member (libFuzzer needs nightly and sanitizer flags); it
//! builds with `cargo +nightly fuzz`, all targets in one build, so their dependencies (hyper, the
//! Kubernetes types) build once.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::{root, target_dir};

/// Each target's time in `cargo xtask test`: enough to replay the seeds and explore a little,
/// short enough that six targets stay within a few minutes of CI.
pub const CI_SECONDS_PER_TARGET: u64 = 20;

/// Every fuzz target, with the crate whose code it drives.
pub const TARGETS: &[(&str, &str)] = &[
    ("mesh-inspect", "detect"),
    ("mesh-inspect", "client_hello"),
    ("mesh-http", "head_scanner"),
    ("mesh-http", "proxy_h1"),
    ("mesh-policy", "policy_load"),
    ("mesh-policy", "authz_plan"),
];

/// The outcome of one target's run.
#[derive(Debug)]
pub struct Outcome {
    pub target: &'static str,
    pub seconds: u64,
    pub executions: Option<u64>,
    /// libFuzzer's account of a failure (crash, timeout, leak, out of memory), with the saved
    /// input; `None` if the run ended by its time limit.
    pub failure: Option<String>,
}

/// Runs every target for `total` split evenly, printing a table; fails on any failure.
pub fn run(total: Duration) -> anyhow::Result<()> {
    let per_target = (total.as_secs() / TARGETS.len() as u64).max(1);
    run_each(per_target)
}

/// Runs every target for `seconds` each.
pub fn run_each(seconds: u64) -> anyhow::Result<()> {
    build()?;
    let mut outcomes = Vec::new();
    for &(_, target) in TARGETS {
        outcomes.push(run_target(target, seconds)?);
    }
    println!(
        "\n{:<14} {:>8} {:>14} result",
        "target", "seconds", "executions"
    );
    for o in &outcomes {
        println!(
            "{:<14} {:>8} {:>14} {}",
            o.target,
            o.seconds,
            o.executions.map_or("?".into(), |n| n.to_string()),
            o.failure.as_deref().unwrap_or("ok")
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.failure.is_some())
        .map(|o| o.target)
        .collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Where every fuzz crate builds.
fn fuzz_target_dir() -> PathBuf {
    target_dir().join("fuzz")
}

/// The fuzz crate's folder.
fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

fn cargo_fuzz() -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"]).current_dir(root());
    c
}

/// The build options, the same for `build` and `run` so that `run` finds the binaries fresh.
fn build_args(c: &mut Command) {
    c.arg("--target-dir")
        .arg(fuzz_target_dir())
        // The policy crates pull in the Kubernetes types: 16 units build them several times
        // faster than one for a little run speed.
        .args(["--codegen-units", "16"]);
}

fn build() -> anyhow::Result<()> {
    let start = Instant::now();
    let mut c = cargo_fuzz();
    c.arg("build");
    build_args(&mut c);
    let status = c.status().context("running cargo +nightly fuzz build")?;
    if !status.success() {
        bail!("building the fuzz targets failed: {status}");
    }
    eprintln!("fuzz: built the targets in {:.0?}", start.elapsed());
    Ok(())
}

fn run_target(target: &'static str, seconds: u64) -> anyhow::Result<Outcome> {
    let dir = fuzz_dir();
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    let artifacts = dir.join("artifacts").join(target);
    for d in [&corpus, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    eprintln!("fuzz: {target} for {seconds} s");
    let mut c = cargo_fuzz();
    c.args(["run", target]);
    build_args(&mut c);
    c.arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // A single input taking this long is a hang.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1");
    let out = c
        .output()
        .with_context(|| format!("running cargo +nightly fuzz run {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let log_file = artifacts.join("last-run.log");
    std::fs::write(&log_file, &log).with_context(|| format!("writing {}", log_file.display()))?;
    let executions = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse().ok());
    let failure = (!out.status.success()).then(|| describe_failure(&log, &log_file));
    Ok(Outcome {
        target,
        seconds,
        executions,
        failure,
    })
}

/// libFuzzer's summary line and the saved input, or where the log is.
fn describe_failure(log: &str, log_file: &Path) -> String {
    let summary = log
        .lines()
        .find(|l| l.starts_with("SUMMARY:") || l.contains("==ERROR:") || l.contains("panicked at"))
        .unwrap_or("failed")
        .trim()
        .to_owned();
    let input = log
        .lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .map(str::trim);
    match input {
        Some(input) => format!("{summary}; input {input}; log {}", log_file.display()),
        None => format!("{summary}; log {}", log_file.display()),
    }
}
