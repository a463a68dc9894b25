//! Running commands from the workspace root.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace root.
pub fn root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    p.canonicalize().unwrap_or(p)
}

/// Runs a command from the workspace root, streaming its output; fails on non-zero exit.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or None if it could not run or failed.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The entries directly under `dir` (`/tmp`, say) that hold some path of `keep`, by name, each
/// once: what must be bound back when a fresh tmpfs is mounted over `dir` (a checkout cloned
/// to `/tmp`, its build and test executables). Each path counts as written and as resolved, so
/// a symlink under `dir` to elsewhere keeps the link, and one elsewhere into `dir` keeps its
/// target. Names with a quote or a line break are refused: they end up in shell scripts and
/// in a file read line by line.
pub fn entries_under(dir: &str, keep: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut entries: Vec<String> = Vec::new();
    for path in keep {
        let written = std::path::absolute(path)
            .with_context(|| format!("{}: no absolute form", path.display()))?;
        let resolved = path.canonicalize().ok();
        for path in std::iter::once(written).chain(resolved) {
            let Ok(rest) = path.strip_prefix(dir) else {
                continue;
            };
            let Some(first) = rest.components().next() else {
                bail!(
                    "{} is {dir} itself: it cannot stay visible under a private {dir}",
                    path.display()
                );
            };
            let name = first
                .as_os_str()
                .to_str()
                .filter(|n| !n.contains(['\'', '\n', '\r']));
            let Some(name) = name else {
                bail!(
                    "{}: a path with a quote, a line break or not UTF-8 cannot be kept visible",
                    path.display()
                );
            };
            if !entries.iter().any(|e| e == name) {
                entries.push(name.to_owned());
            }
        }
    }
    Ok(entries)
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Where cargo builds: `CARGO_TARGET_DIR` when set (relative to the workspace root), else
/// `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root().join(d),
        None => root().join("target"),
    }
}

/// Builds the agent (debug) and returns the binary's path.
pub fn build_agent(release: bool) -> anyhow::Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "-p", "mesh-agent"]);
    if release {
        c.arg("--release");
    }
    exec(&mut c)?;
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("mesh-agent"))
}

/// Release builds of the agent and the test API server; the binaries' paths. The agent is built
/// on its own, as the Containerfile builds it: built together with the API server, shared
/// dependencies would get the union of both features, and with them other symbol names than
/// those `mesh-agent/hot-text.order` lists (see `cargo xtask layout`). Both feature sets stay
/// cached side by side, so neither build undoes the other.
pub fn build_release() -> anyhow::Result<(PathBuf, PathBuf)> {
    exec(cargo().args(["build", "--release", "-p", "mesh-agent"]))?;
    exec(cargo().args(["build", "--release", "-p", "mesh-apiserver"]))?;
    let dir = target_dir().join("release");
    Ok((dir.join("mesh-agent"), dir.join("mesh-apiserver")))
}

/// Builds the test API server (debug) and returns the binary's path.
pub fn build_apiserver() -> anyhow::Result<PathBuf> {
    exec(cargo().args(["build", "-p", "mesh-apiserver"]))?;
    Ok(target_dir().join("debug").join("mesh-apiserver"))
}

/// Deletes network namespaces and bpffs folders that an interrupted test or demo left behind.
/// Whether a namespace or bpffs folder was left by a test or demo run that has ended. Test
/// topologies are named `mesh-test-<pid of the test process>-<n>`: those of a test process that
/// still runs (another `cargo test` on this machine) are not leftovers and stay.
fn is_leftover(name: &str) -> bool {
    if name.starts_with("mesh-demo-") {
        return true;
    }
    let Some(rest) = name.strip_prefix("mesh-test-") else {
        return false;
    };
    match rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) {
        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
        None => true,
    }
}

pub fn clean_leftovers() {
    if let Some(list) = output("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if is_leftover(name) {
                if let Some(pids) = output("ip", &["netns", "pids", name]) {
                    for pid in pids.split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                }
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if is_leftover(&n) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
