//! The processes the bench starts (backend, HAProxy, nginx) from the config templates in
//! `bench/peers/`, and what it reads about them in `/proc`: RSS, CPU time, open fds.
use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::Netns;

use crate::util::root;

/// How to start a server: its config template in `bench/peers/`, the values of its `@NAME@`
/// placeholders (`@DIR@`, the scratch folder, is always set), and the command, where `@CONF@`
/// stands for the rendered file.
pub struct Spec<'a> {
    pub name: &'static str,
    pub template: &'a str,
    pub vars: Vec<(&'a str, String)>,
    pub program: &'a str,
    pub args: &'a [&'a str],
}

/// A server process started in a namespace; killed on drop (and with the namespaces anyway).
pub struct Server {
    pub name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Renders the template of `spec` into `dir`, starts it in `ns`, and waits until `ready`
    /// says it serves; fails with its log if it exits or never does.
    pub fn start(
        spec: Spec<'_>,
        ns: &Netns,
        dir: &Path,
        ready: impl Fn() -> bool,
    ) -> anyhow::Result<Server> {
        let Spec {
            name,
            template,
            vars,
            program,
            args,
        } = spec;
        let src = root().join("bench/peers").join(template);
        let mut text =
            std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
        for (k, v) in vars.iter().chain([&("DIR", dir.display().to_string())]) {
            text = text.replace(&format!("@{k}@"), v);
        }
        if let Some(name) = unfilled(&text) {
            bail!("{template}: no value for @{name}@");
        }
        let conf = dir.join(template);
        std::fs::write(&conf, text)?;
        let log = dir.join(format!("{name}.log"));
        let conf_s = conf.display().to_string();
        let child = ns
            .cmd(program)
            .args(args.iter().map(|a| a.replace("@CONF@", &conf_s)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let mut server = Server { name, child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("{name} exited ({status}):\n{}", server.log_text());
            }
            if ready() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("{name} not serving after 10 s:\n{}", server.log_text());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it still runs (a peer that died fails its cells rather than the run).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.log_text());
        }
        Ok(())
    }

    /// The process and its children (nginx's workers): `ip netns exec` execs the program, so
    /// the child's pid is the program's.
    pub fn pids(&self) -> Vec<u32> {
        with_children(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The name of a `@NAME@` placeholder left in `text`.
fn unfilled(text: &str) -> Option<&str> {
    let parts: Vec<&str> = text.split('@').collect();
    let inner = parts.get(1..parts.len().saturating_sub(1))?;
    inner
        .iter()
        .find(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .copied()
}

/// `pid` and its direct children.
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if stat_fields(p).is_some_and(|f| f.get(1).and_then(|s| s.parse().ok()) == Some(pid)) {
                pids.push(p);
            }
        }
    }
    pids
}

/// The fields of `/proc/PID/stat` after the command name (so index 0 is the state, 1 the
/// parent pid, 11 utime and 12 stime).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// Summed VmRSS of `pids`, KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    status_kib(pids, "VmRSS:")
}

/// Summed `field` of `pids`' `/proc/PID/status` (`VmRSS:`, `RssAnon:`, `RssFile:`), KiB.
pub fn status_kib(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}

/// User plus system CPU time of `pids` (all their threads), seconds.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|&p| {
            let f = stat_fields(p)?;
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / clock_ticks()
}

/// CPU time the whole machine spent busy since boot (user, nice, system, irq and softirq of
/// every CPU, from `/proc/stat`; not idle, iowait or steal), seconds.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal ...
            [0, 1, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum()
        })
        .unwrap_or(0);
    ticks as f64 / clock_ticks()
}

/// `CLK_TCK`: 100 on every Linux this runs on, asked anyway.
fn clock_ticks() -> f64 {
    crate::util::output("getconf", &["CLK_TCK"])
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Open fds of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
