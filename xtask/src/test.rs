//! `cargo xtask test`: the whole suite, as CI runs it. Privileged tests are required here: one that
//! cannot run fails instead of skipping (`MESH_REQUIRE_PRIVILEGED`). Then the Gateway API
//! conformance requests in `../shared/conformance` drive the agent from the outside, in file mode,
//! in Kubernetes mode (`xtask k8s-agent` as the runner's agent command) and through the mTLS
//! tunnel between two agents (`xtask mtls-agent`), then a one-minute
//! soak (`cargo xtask soak`: RSS and fds back to their baseline after load). Last, the
//! privileged tests again on Debian bookworm's 6.1 kernel in a VM (`cargo xtask kernels --kernel
//! 6.1`), the oldest kernel the agent is meant to run on.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::{
    build_agent, build_apiserver, cargo, clean_leftovers, entries_under, exec, root,
};

/// CI's soak: short, but long enough for restarts and reloads to happen under load.
const SOAK_MINUTES: f64 = 1.0;

pub fn run(lint: bool, kernels: bool) -> anyhow::Result<()> {
    let mut steps = Steps::default();
    let result = run_steps(lint, kernels, &mut steps);
    // Where CI's time goes, also when a step failed.
    steps.print();
    result
}

fn run_steps(lint: bool, kernels: bool, steps: &mut Steps) -> anyhow::Result<()> {
    clean_leftovers();
    steps.time("CRD check", || crate::crds::run(true))?;
    if lint {
        steps.time("fmt", || {
            exec(cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
        steps.time("clippy", || {
            exec(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
    }
    let agent = steps.time("build agent", || build_agent(false))?;
    let apiserver = steps.time("build API server", build_apiserver)?;
    steps.time("manifests", || crate::manifests::run(&agent))?;
    let result = steps.time("cargo test --workspace", || {
        exec(
            cargo()
                .args(["test", "--workspace"])
                .env("MESH_REQUIRE_PRIVILEGED", "1")
                .env("MESH_AGENT_BIN", &agent)
                .env("MESH_APISERVER_BIN", &apiserver),
        )
    });
    clean_leftovers();
    result?;
    conformance(&agent, &apiserver, steps)?;
    steps.time("data-path bench, quick", || {
        // The debug agent CI already built: the quick run checks that every scenario
        // completes, which needs no release build (one costs minutes on a CI machine).
        crate::bench::quick(&agent)
            .context("the data-path benchmark's quick run (cargo xtask bench --quick)")
    })?;
    steps.time("Kubernetes scale smoke", || {
        crate::bench::kubernetes::smoke(&agent, &apiserver).context(
            "the Kubernetes scale benchmark's smoke run (cargo xtask bench --only kubernetes)",
        )
    })?;
    steps.time("soak", || {
        crate::soak::run(SOAK_MINUTES, &agent)
            .context("the soak (cargo xtask soak --minutes 1): RSS and fds after load")
    })?;
    steps.time("fuzzing", || {
        crate::fuzz::run_each(crate::fuzz::CI_SECONDS_PER_TARGET)
            .context("fuzzing (cargo xtask fuzz)")
    })?;
    if kernels {
        steps.time("Debian 6.1 VM", || {
            crate::kernels::run(&crate::kernels::Options::ci()).context(
                "the privileged tests on Debian's 6.1 kernel (cargo xtask kernels --kernel 6.1)",
            )
        })?;
        steps.time("Debian 5.10 refusal", || {
            crate::kernels::run(&crate::kernels::Options::ci_refusal()).context(
                "the agent's refusal of Debian's 5.10 kernel (cargo xtask kernels --kernel 5.10 --suites kernel)",
            )
        })?;
    }
    Ok(())
}

/// Wall time of each step of the run.
#[derive(Default)]
struct Steps {
    done: Vec<(&'static str, Duration, bool)>,
    start: Option<Instant>,
}

impl Steps {
    fn time<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        self.start.get_or_insert(start);
        let r = f();
        self.done.push((name, start.elapsed(), r.is_ok()));
        r
    }

    fn print(&self) {
        println!("\n== cargo xtask test: time per step");
        for (name, took, ok) in &self.done {
            let mark = if *ok { "" } else { "  (failed)" };
            println!("  {name:<26} {:>7}{mark}", secs(*took));
        }
        if let Some(start) = self.start {
            println!("  {:<26} {:>7}", "total", secs(start.elapsed()));
        }
    }
}

/// Runs every conformance request with the shared runner as it is (`run.py` exits non-zero
/// unless all pass): with the agent in file mode; in Kubernetes mode, where this binary's
/// `k8s-agent` subcommand turns the runner's policy file and client interface into API objects
/// (see `k8s_agent.rs`); and through the mTLS tunnel, where `mtls-agent` runs a second agent
/// as the backends' node (see `mtls_agent.rs`). The runs go at once, each in a mount namespace of its own (see
/// [`isolated`]): most of a run is waiting (agent start-up, one curl after another), and one
/// after the other they took a third of CI's time.
fn conformance(agent: &Path, apiserver: &Path, steps: &mut Steps) -> anyhow::Result<()> {
    let file = format!(
        "{} run --policy {{policy}} --interface {{iface}}",
        agent.display()
    );
    // This binary, already built: `cargo xtask` would pay cargo's start-up on every case.
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let kubernetes = format!(
        "{} k8s-agent --agent {} --apiserver {} --policy {{policy}} --interface {{iface}} --dir {{dir}}",
        xtask.display(),
        agent.display(),
        apiserver.display()
    );
    let tunnel = format!(
        "{} mtls-agent --agent {} --policy {{policy}} --interface {{iface}} --dir {{dir}}",
        xtask.display(),
        agent.display()
    );
    // What each run must still see once `/tmp` and `/run` are private (see [`isolated`]).
    let keep = [
        root(),
        conformance_dir(),
        agent.into(),
        apiserver.into(),
        xtask.clone(),
    ];
    let keep = &keep;
    let runs = [
        ("file mode", file),
        ("Kubernetes mode", kubernetes),
        ("mTLS tunnel", tunnel),
    ];
    for (mode, cmd) in &runs {
        println!("== conformance, {mode}: run.py --agent-cmd '{cmd}'");
    }
    let outcomes = steps.time("conformance (three modes)", || {
        Ok(std::thread::scope(|s| {
            let handles: Vec<_> = runs
                .iter()
                .map(|(mode, cmd)| {
                    s.spawn(move || {
                        let start = Instant::now();
                        (*mode, run_conformance(cmd, keep), start.elapsed())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("conformance thread panicked"))
                .collect::<Vec<_>>()
        }))
    })?;
    let mut failed = Vec::new();
    for (mode, result, took) in outcomes {
        match result {
            Ok(out) => {
                println!("== conformance, {mode} ({}):\n{out}", secs(took));
            }
            Err(e) => {
                println!("== conformance, {mode} FAILED ({}): {e:#}", secs(took));
                failed.push(mode);
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "the conformance requests failed in {}",
            failed.join(" and ")
        );
    }
    Ok(())
}

/// The shared conformance suite: `MESH_CONFORMANCE_DIR`, or `shared/conformance` beside the
/// repository.
fn conformance_dir() -> PathBuf {
    std::env::var_os("MESH_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/conformance"))
}

/// Runs `run.py` with the agent command; returns its output, or an error holding it.
fn run_conformance(agent_cmd: &str, keep: &[PathBuf]) -> anyhow::Result<String> {
    let suite = conformance_dir();
    let runner = suite.join("run.py");
    if !runner.exists() {
        bail!(
            "{} is missing: the conformance suite must run (it is looked for in shared/ beside \
             the repository, or where MESH_CONFORMANCE_DIR says)",
            runner.display()
        );
    }
    let mut cmd = isolated(keep)?;
    cmd.arg("python3")
        .arg(&runner)
        .arg("--cases")
        .arg(suite.join("cases"))
        .arg("--agent-cmd")
        .arg(agent_cmd)
        .current_dir(root());
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("run.py failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// A command prefix that runs what follows in a private mount namespace with its own `/tmp`,
/// `/run` (so `/run/netns`, where `ip netns` names namespaces) and bpffs. `run.py` names its
/// namespaces `ml-node`, `ml-client`, ... and keeps its state in `/tmp`; the agents pin under
/// `/sys/fs/bpf`: in private copies of these, two runs cannot meet. Network namespaces are
/// still created by the runner, as before; only their names are private.
///
/// Each path of `keep` that lies under `/tmp` or `/run` (a checkout cloned to `/tmp`, say)
/// stays visible: the top-level entry holding it is bound back into the fresh tmpfs from the
/// directory the tmpfs hides, which the shell holds open before mounting over it (through
/// `/proc/self/fd`, which `mount` must not canonicalize: that would name the new, empty `/tmp`).
fn isolated(keep: &[PathBuf]) -> anyhow::Result<Command> {
    let mut script = String::from("set -e\n");
    for (fd, dir) in [(3, "/tmp"), (4, "/run")] {
        script.push_str(&format!("exec {fd}<{dir}\nmount -t tmpfs tmpfs {dir}\n"));
        for name in entries_under(dir, keep)? {
            let (from, to) = (
                format!("/proc/self/fd/{fd}/{name}"),
                format!("{dir}/{name}"),
            );
            script.push_str(&format!(
                "if [ -d '{from}' ]; then mkdir '{to}'; else touch '{to}'; fi\n\
                 mount --no-canonicalize --rbind '{from}' '{to}'\n"
            ));
        }
        script.push_str(&format!("exec {fd}<&-\n"));
    }
    script.push_str("mount -t bpf bpf /sys/fs/bpf\nexec \"$@\"\n");
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    Ok(c)
}

fn secs(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}
