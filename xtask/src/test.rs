//! `cargo xtask test`: the whole suite, as CI runs it. Privileged tests are required here: one that
//! cannot run fails instead of skipping (`MESH_REQUIRE_PRIVILEGED`). Then the Gateway API
//! conformance requests in `../shared/conformance` drive the agent from the outside.
use std::process::Command;

use anyhow::bail;

use crate::util::{build_agent, build_apiserver, cargo, clean_leftovers, exec, root};

pub fn run(lint: bool) -> anyhow::Result<()> {
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
    conformance(&agent)
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
