//! What the agent says about the kernel it runs on. On a kernel that has every feature the
//! programs need it starts and `/status` shows what it found (TCX or a clsact filter); on one that
//! lacks a feature (`cargo xtask kernels --kernel 5.10`: no `bpf_xdp_load_bytes` before Linux
//! 5.18) it refuses to start with one line naming the feature and the release that has it.
use std::process::Command;

use mesh_tests::{ADMIN, Topology, agent_bin, privileged};

/// `(major, minor)` of the running kernel.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (parts.next().expect("major"), parts.next().expect("minor"))
}

#[test]
fn the_agent_states_its_kernel_requirements() {
    if !privileged("the_agent_states_its_kernel_requirements") {
        return;
    }
    let t = Topology::new(&["client"]);
    let client = t.pod("client");
    let version = kernel_version();
    if version < (5, 18) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", t.node.path().display()))
            .arg(agent_bin())
            .args(["run", "--interface", &client.host_if])
            .args(["--bpffs-dir", &t.bpffs_dir.to_string_lossy()])
            .output()
            .expect("run the agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "refused: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(
            lines[0].contains("lacks bpf_xdp_load_bytes in XDP (Linux 5.18 or newer has it)"),
            "names the feature and the release: {stderr}"
        );
        eprintln!("kernel {version:?}: {}", lines[0]);
        return;
    }
    let _agent = t.start_agent(&["--interface", &client.host_if]);
    let raw = t.node.http_get(ADMIN, "/status");
    let status = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(status).expect("status JSON");
    let tcx = version >= (6, 6);
    assert_eq!(v["kernel"]["tcx"], tcx, "{status}");
    let mode = if tcx { "tcx" } else { "clsact" };
    assert_eq!(v["capture"]["mode"], mode, "{status}");
    assert_eq!(v["capture"]["interfaces"][0]["mode"], mode, "{status}");
    eprintln!("kernel {version:?}: capture attached as {mode}");
}
