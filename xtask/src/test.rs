//! `cargo xtask test`: the whole suite, as CI runs it. Privileged tests are required here: one that
//! cannot run fails instead of skipping (`MESH_REQUIRE_PRIVILEGED`).
use crate::util::{build_agent, cargo, clean_leftovers, exec};

pub fn run(lint: bool) -> anyhow::Result<()> {
    clean_leftovers();
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
    let result = exec(
        cargo()
            .args(["test", "--workspace"])
            .env("MESH_REQUIRE_PRIVILEGED", "1")
            .env("MESH_AGENT_BIN", &agent),
    );
    clean_leftovers();
    result
}
