//! `cargo xtask test`: the whole suite, as CI runs it. Privileged tests are required here: one that
//! cannot run fails instead of skipping (`MESH_REQUIRE_PRIVILEGED`). Then the Gateway API
//! conformance requests in `../shared/conformance` drive the agent from the outside. Last, the
//! privileged tests again on Debian bookworm's 6.1 kernel in a VM (`cargo xtask kernels --kernel
//! 6.1`), the oldest kernel the agent is meant to run on.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::util::{build_agent, build_apiserver, cargo, clean_leftovers, exec, root};

pub fn run(lint: bool, kernels: bool) -> anyhow::Result<()> {
    clean_leftovers();
    crate::crds::run(true)?;
    if lint {
        exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
        exec(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    let agent = build_agent(false)?;
    let apiserver = build_apiserver()?;
    crate::manifests::run(&agent)?;
    let result = exec(
        cargo()
            .args(["test", "--workspace"])
            .env("MESH_REQUIRE_PRIVILEGED", "1")
            .env("MESH_AGENT_BIN", &agent)
            .env("MESH_APISERVER_BIN", &apiserver),
    );
    clean_leftovers();
    result?;
    conformance(&agent)?;
    crate::fuzz::run_each(crate::fuzz::CI_SECONDS_PER_TARGET)
        .context("fuzzing (cargo xtask fuzz)")?;
    if kernels {
        crate::kernels::run(&crate::kernels::Options::ci()).context(
            "the privileged tests on Debian's 6.1 kernel (cargo xtask kernels --kernel 6.1)",
        )?;
        crate::kernels::run(&crate::kernels::Options::ci_refusal()).context(
            "the agent's refusal of Debian's 5.10 kernel (cargo xtask kernels --kernel 5.10 --suites kernel)",
        )?;
    }
    Ok(())
}

/// Runs every conformance request with the shared runner as it is (`run.py` exits non-zero
/// unless all pass).
fn conformance(agent: &std::path::Path) -> anyhow::Result<()> {
    let suite = root().join("../shared/conformance");
    let runner = suite.join("run.py");
    if !runner.exists() {
        bail!(
            "{} is missing: the conformance suite must run",
            runner.display()
        );
    }
    exec(
        Command::new("python3")
            .arg(&runner)
            .arg("--cases")
            .arg(suite.join("cases"))
            .arg("--agent-cmd")
            .arg(format!(
                "{} run --policy {{policy}} --interface {{iface}}",
                agent.display()
            )),
    )
}
