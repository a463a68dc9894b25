//! Per-packet cost of the agent's programs with `BPF_PROG_TEST_RUN` (through `bpftool prog
//! run`, which times the program over many repetitions in the kernel): a SYN the TC program
//! captures, a packet of an established captured flow, a packet it lets through untouched, and a
//! SYN the XDP program drops by policy.
use std::{net::Ipv4Addr, path::Path, process::Command};

use anyhow::{Context as _, bail};
use mesh_tests::Topology;

use super::table::{Better, Row, Target, Unit};

const REPEAT: &str = "1000000";
/// The client pod's address (pod 1 of the topology) and a source port.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
const SPORT: u16 = 40_000;
/// Captured by the agent's `--capture`; not captured; denied by the bench's authorization rule.
pub const CAPTURED_PORT: u16 = 7000;
pub const UNTARGETED_PORT: u16 = 5202;
pub const DENIED_PORT: u16 = 5432;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// One row per packet kind; the cost in the agent's column.
/// `scratch` holds the packet files.
pub fn rows(t: &Topology, server: Ipv4Addr, scratch: &Path) -> Vec<Row> {
    let progs = programs(&t.bpffs_dir);
    let kinds = [
        ("targeted SYN (TC)", "sched_cls", CAPTURED_PORT, SYN),
        ("established packet (TC)", "sched_cls", CAPTURED_PORT, ACK),
        ("untargeted packet (TC)", "sched_cls", UNTARGETED_PORT, ACK),
        ("XDP deny", "xdp", DENIED_PORT, SYN),
    ];
    kinds
        .into_iter()
        .map(|(name, kind, port, flags)| {
            let mut row = Row::new(
                format!("eBPF per packet: {name}"),
                Unit::Nanos,
                Better::Lower,
            );
            let r = progs
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .and_then(|p| {
                    let id = p
                        .iter()
                        .find(|(_, k)| k == kind)
                        .map(|(id, _)| *id)
                        .with_context(|| {
                            format!("no {kind} program among the pinned links {p:?}")
                        })?;
                    let packet = tcp_packet(CLIENT, server, port, flags);
                    test_run(id, &packet, scratch)
                });
            row.push(Target::Agent, r);
            row
        })
        .collect()
}

/// Whether an XDP program's link is pinned under `dir`.
pub fn has_xdp(dir: &Path) -> bool {
    programs(dir).is_ok_and(|p| p.iter().any(|(_, k)| k == "xdp"))
}

/// (program id, type) of every link pinned under `dir`.
fn programs(dir: &Path) -> anyhow::Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let Some(link) = bpftool_json(&["link", "show", "pinned", &p.to_string_lossy()]) else {
                continue;
            };
            let Some(id) = link["prog_id"].as_u64() else {
                continue;
            };
            let prog = bpftool_json(&["prog", "show", "id", &id.to_string()])
                .with_context(|| format!("bpftool prog show id {id}"))?;
            out.push((id, prog["type"].as_str().unwrap_or("").to_string()));
        }
    }
    if out.is_empty() {
        bail!("no pinned links under {}", dir.display());
    }
    Ok(out)
}

fn bpftool_json(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new("bpftool").arg("-j").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Average ns per run of program `id` on `packet`, over [`REPEAT`] runs.
fn test_run(id: u64, packet: &[u8], dir: &Path) -> anyhow::Result<f64> {
    let file = dir.join("packet");
    std::fs::write(&file, packet)?;
    let out = Command::new("bpftool")
        .args(["prog", "run", "id", &id.to_string(), "data_in"])
        .arg(&file)
        .args(["repeat", REPEAT])
        .output()
        .context("bpftool prog run")?;
    let _ = std::fs::remove_file(&file);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("bpftool prog run id {id}: {text}");
    }
    // "Return value: 0, duration (average): 23ns"
    text.split("duration (average):")
        .nth(1)
        .and_then(|s| s.trim().strip_suffix("ns").or_else(|| s.split("ns").next()))
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no duration in bpftool's output: {text}"))
}

/// An Ethernet + IPv4 + TCP frame from `src`:[`SPORT`] to `dst`:`port` with `flags`, with
/// valid checksums.
pub fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, port: u16, flags: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(54);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // destination MAC
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // source MAC
    p.extend_from_slice(&[0x08, 0x00]); // IPv4
    let ip_start = p.len();
    p.extend_from_slice(&[0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p[ip_start..ip_start + 20], 0);
    p[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
    let tcp_start = p.len();
    p.extend_from_slice(&SPORT.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes()); // sequence
    p.extend_from_slice(&(if flags & ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
    p.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let mut pseudo = 0u32;
    for w in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += 6 + 20;
    let sum = checksum(&p[tcp_start..], pseudo);
    p[tcp_start + 16..tcp_start + 18].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The Internet checksum of `data` with `initial` (a pseudo-header sum) added.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for w in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_have_valid_checksums() {
        let p = tcp_packet(CLIENT, Ipv4Addr::new(10, 201, 2, 2), 7000, SYN);
        assert_eq!(p.len(), 54);
        // A header with its checksum in place sums to zero.
        assert_eq!(checksum(&p[14..34], 0), 0);
        assert_eq!(&p[36..38], &7000u16.to_be_bytes());
        assert_eq!(p[47], SYN);
    }
}
