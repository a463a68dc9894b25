//! `cargo xtask bench --only ebpf`, and the eBPF rows of the data-path run: the per-packet cost
//! of the agent's programs with `BPF_PROG_TEST_RUN`, and untargeted throughput with them
//! attached.
//!
//! Per packet: `bpftool prog run ... repeat 1000000` (the kernel times the program over the
//! repetitions), from the node namespace, where the programs run: their socket lookups see the
//! node's sockets and its sk_lookup program, as real packets do. Each round also runs a no-op TC
//! program (`r0 = TC_ACT_OK; exit`, loaded here) on the same packet: that is the test-run floor,
//! what a program costs with no work in it (35-45 ns on the bench machine, whose kernel has
//! retpolines and return thunks). Rows give the programs' cost net of that floor (same round)
//! and the raw figure. Packets: a SYN to a captured port and an ACK of a real flow the agent
//! proxies (`capture`: its `bpf_sk_assign` fails in a test run, which is not at TC ingress, so
//! the path is the real one up to that call), an ACK to a port nobody captures (`capture`, and
//! `authorize_tc` letting it through by the interface default), a SYN the authorization rule
//! denies (`authorize_tc`).
use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::Topology;

use super::{
    load,
    table::{Better, Row, Target, Unit},
};

const REPEAT: &str = "1000000";
/// The client pod's address (pod 1 of the topology) and a source port.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
const SPORT: u16 = 40_000;
/// Captured by the agent's `--capture`; not captured; denied by the bench's authorization rule.
pub const CAPTURED_PORT: u16 = 7000;
pub const UNTARGETED_PORT: u16 = 5202;
pub const DENIED_PORT: u16 = 5432;
/// The control pod's iperf3 port (not captured either).
const CONTROL_PORT: u16 = 5203;
/// Program names in the object.
const CAPTURE: &str = "capture";
const AUTHORIZE_TC: &str = "authorize_tc";

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// The eBPF rows on a running topology: `agent` captures the server's [`CAPTURED_PORT`] on the
/// client pod's veth and reads its policy from `policy`; the `control` pod's veth has no
/// program. Untargeted iperf3 from the client (to [`UNTARGETED_PORT`]) and from the control pod
/// (to [`CONTROL_PORT`]) at the same time, so that whatever else the shared machine does hits
/// both alike (one after the other, 5 s runs differed by up to 50 % from load alone), with the
/// capture program attached; then the policy becomes `with_deny` (an authorization rule for
/// [`DENIED_PORT`], which attaches `authorize_tc`), the per-packet costs are measured, and the
/// iperf3 pairs run again. Each iperf3 run lasts `secs`, `rounds` pairs of each.
pub fn rows(
    t: &Topology,
    policy: &Path,
    with_deny: &str,
    rounds: usize,
    secs: f64,
    scratch: &Path,
) -> Vec<Row> {
    let server = t.pod("server").ip4;
    let server_ns = t.pod("server").ns.clone();
    let (client, control) = (t.pod("client").ns.clone(), t.pod("control").ns.clone());
    let ratios = |row: &mut Row| {
        for _ in 0..rounds {
            let (c, s) = (control.clone(), server_ns.clone());
            let other = thread::spawn(move || {
                load::iperf3(&c, &s, (server, CONTROL_PORT).into(), CONTROL_PORT, 1, secs)
            });
            let with = load::iperf3(
                &client,
                &server_ns,
                (server, UNTARGETED_PORT).into(),
                UNTARGETED_PORT,
                1,
                secs,
            );
            let without = other
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the control iperf3 thread panicked")));
            row.push(
                Target::Agent,
                with.and_then(|w| without.map(|n| 100.0 * w.gbits / n.gbits)),
            );
        }
    };
    let mut tc = Row::new(
        "untargeted iperf3, capture attached / a veth without programs",
        Unit::Percent,
        Better::Higher,
    );
    ratios(&mut tc);
    let mut both = Row::new(
        "untargeted iperf3, capture + authorization (TC) attached / a veth without programs",
        Unit::Percent,
        Better::Higher,
    );
    let mut rows = match deny_rule(t, policy, with_deny) {
        Ok(()) => {
            let rows = packet_rows(t, server, scratch);
            ratios(&mut both);
            rows
        }
        Err(e) => {
            let why = format!("{e:#}");
            both.push(Target::Agent, Err(anyhow::anyhow!("{why}")));
            let mut r = Row::new("eBPF per packet", Unit::Nanos, Better::Lower);
            r.push(Target::Agent, Err(e));
            vec![r]
        }
    };
    rows.push(tc);
    rows.push(both);
    rows
}

/// `--only ebpf`: a client, a server and a control pod, the agent capturing the server's
/// [`CAPTURED_PORT`] from the client (and nothing else), then [`rows`].
pub fn run(agent_bin: &Path, rounds: usize, secs: f64) -> anyhow::Result<Vec<Row>> {
    let t = Topology::new(&["client", "server", "control"]);
    let dir = std::env::temp_dir().join(format!("{}-bench", t.id));
    std::fs::create_dir_all(&dir)?;
    let server = t.pod("server").ip4;
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, super::data_path::policy_text(server, false))?;
    let capture = format!("{server}/32={CAPTURED_PORT}");
    let _agent = t.start_agent_bin_env(
        agent_bin,
        &[
            "--interface",
            &t.pod("client").host_if,
            "--capture",
            &capture,
            "--policy",
            &policy.to_string_lossy(),
        ],
        &[("MESH_ACCESS_LOG", "false")],
    );
    let with_deny = super::data_path::policy_text(server, true);
    let rows = rows(&t, &policy, &with_deny, rounds, secs, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

/// Writes `text` to the policy file and waits for the authorization link.
fn deny_rule(t: &Topology, policy: &Path, text: &str) -> anyhow::Result<()> {
    mesh_tests::policy::write_atomically(policy, text);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if programs(&t.bpffs_dir).is_ok_and(|p| p.iter().any(|p| p.name == AUTHORIZE_TC)) {
            // Its rules are written with the same reload; a moment for the map update.
            thread::sleep(Duration::from_millis(500));
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
    bail!("no authorization link pinned 15 s after adding an authorization rule")
}

/// A packet kind's name, its costs net of the floor and raw (one per round).
type Samples = (String, Vec<f64>, Vec<f64>);

/// Three rounds of: the no-op floor, then every packet kind. One row for the floor, then per
/// kind a row net of the floor and a raw one.
fn packet_rows(t: &Topology, server: Ipv4Addr, scratch: &Path) -> Vec<Row> {
    let mut floor = Row::new(
        "eBPF per packet: no-op TC program (test-run floor, subtracted below)",
        Unit::Nanos,
        Better::Lower,
    );
    let mut run = || -> anyhow::Result<Vec<Samples>> {
        let progs = programs(&t.bpffs_dir)?;
        let id = |name: &str| {
            progs
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.id)
                .with_context(|| format!("no program {name} among the pinned links {progs:?}"))
        };
        let (capture, authorize) = (id(CAPTURE)?, id(AUTHORIZE_TC)?);
        let noop = Noop::tc()?;
        // A flow the agent proxies: its socket is what `bpf_skc_lookup_tcp` finds for the ACK.
        let (_listener, stream) = proxied_flow(t, server)?;
        let flow = stream.local_addr()?.port();
        let kinds = [
            (
                "targeted SYN",
                capture,
                tcp_packet(CLIENT, server, SPORT, CAPTURED_PORT, SYN),
            ),
            (
                "established packet",
                capture,
                tcp_packet(CLIENT, server, flow, CAPTURED_PORT, ACK),
            ),
            (
                "untargeted packet",
                capture,
                tcp_packet(CLIENT, server, SPORT, UNTARGETED_PORT, ACK),
            ),
            (
                "denied SYN",
                authorize,
                tcp_packet(CLIENT, server, SPORT, DENIED_PORT, SYN),
            ),
            (
                "allowed packet",
                authorize,
                tcp_packet(CLIENT, server, SPORT, UNTARGETED_PORT, ACK),
            ),
        ];
        let mut out: Vec<Samples> = kinds
            .iter()
            .map(|(name, id, _)| {
                let prog = if *id == capture {
                    CAPTURE
                } else {
                    AUTHORIZE_TC
                };
                (format!("{name} ({prog})"), Vec::new(), Vec::new())
            })
            .collect();
        for _ in 0..3 {
            let base = test_run(t, noop.id, &kinds[2].2, scratch)?;
            floor.push(Target::Agent, Ok(base));
            for ((_, id, packet), (_, net, raw)) in kinds.iter().zip(out.iter_mut()) {
                let v = test_run(t, *id, packet, scratch)?;
                raw.push(v);
                net.push((v - base).max(0.0));
            }
        }
        Ok(out)
    };
    match run() {
        Ok(kinds) => {
            let mut net_rows = Vec::new();
            let mut raw_rows = Vec::new();
            for (name, net, raw) in kinds {
                let mut n = Row::new(
                    format!("eBPF per packet, net of the floor: {name}"),
                    Unit::Nanos,
                    Better::Lower,
                );
                let mut r = Row::new(
                    format!("eBPF per packet, raw: {name}"),
                    Unit::Nanos,
                    Better::Lower,
                );
                for v in net {
                    n.push(Target::Agent, Ok(v));
                }
                for v in raw {
                    r.push(Target::Agent, Ok(v));
                }
                net_rows.push(n);
                raw_rows.push(r);
            }
            let mut rows = vec![floor];
            rows.extend(net_rows);
            rows.extend(raw_rows);
            rows
        }
        Err(e) => {
            let mut r = Row::new("eBPF per packet", Unit::Nanos, Better::Lower);
            r.push(Target::Agent, Err(e));
            vec![r]
        }
    }
}

/// A listener on the server's [`CAPTURED_PORT`] and a connection to it from the client through
/// the agent (the kernel completes the agent's upstream connection into the backlog).
fn proxied_flow(t: &Topology, server: Ipv4Addr) -> anyhow::Result<(TcpListener, TcpStream)> {
    let addr = SocketAddr::from((server, CAPTURED_PORT));
    let listener = t
        .pod("server")
        .ns
        .run(move || TcpListener::bind(addr))
        .with_context(|| format!("listening on {addr} in the server pod"))?;
    let stream = t
        .pod("client")
        .ns
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .with_context(|| format!("connecting to {addr} through the agent"))?;
    // The agent accepts, then connects upstream: a moment before its socket is there.
    thread::sleep(Duration::from_millis(200));
    Ok((listener, stream))
}

/// A program of a link pinned by the agent.
#[derive(Debug)]
struct Program {
    id: u64,
    name: String,
}

/// The program of every link pinned under `dir`.
fn programs(dir: &Path) -> anyhow::Result<Vec<Program>> {
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
            out.push(Program {
                id,
                name: prog["name"].as_str().unwrap_or("").to_string(),
            });
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

/// Average ns per run of program `id` on `packet`, over [`REPEAT`] runs, from the node
/// namespace.
fn test_run(t: &Topology, id: u64, packet: &[u8], dir: &Path) -> anyhow::Result<f64> {
    let file = dir.join("packet");
    std::fs::write(&file, packet)?;
    let out = t
        .node
        .cmd("bpftool")
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

/// A loaded no-op program (`r0 = verdict; exit`), unloaded on drop (its fd closes). Loaded with
/// the bpf(2) syscall: no object file or compiler needed for two instructions.
struct Noop {
    _fd: OwnedFd,
    id: u64,
}

impl Noop {
    /// A TC classifier returning `TC_ACT_OK`.
    fn tc() -> anyhow::Result<Noop> {
        const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
        Noop::load(BPF_PROG_TYPE_SCHED_CLS, 0)
    }

    fn load(prog_type: u32, verdict: i32) -> anyhow::Result<Noop> {
        use nix::libc;
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
        // `mov r0, verdict` (BPF_ALU64 | BPF_MOV | BPF_K) and `exit` (BPF_JMP | BPF_EXIT).
        let insns: [u64; 2] = [0xb7 | (u64::from(verdict as u32) << 32), 0x95];
        let license = c"GPL";
        /// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the rest stays zero.
        #[repr(C)]
        #[derive(Default)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            _rest: [u64; 16],
        }
        let mut attr = ProgLoad {
            prog_type,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        attr.prog_name[..10].copy_from_slice(b"bench_noop");
        // SAFETY: bpf(2) reads `attr` (valid for its size) and the instruction and license
        // buffers it points to, which outlive the call; it returns a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &mut attr as *mut ProgLoad,
                std::mem::size_of::<ProgLoad>(),
            )
        };
        if fd < 0 {
            bail!(
                "loading the no-op program: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        /// `struct bpf_prog_info` up to `id`, with room for the rest the kernel may fill.
        #[repr(C)]
        struct Info {
            prog_type: u32,
            id: u32,
            _rest: [u64; 32],
        }
        let mut info = Info {
            prog_type: 0,
            id: 0,
            _rest: [0; 32],
        };
        #[repr(C)]
        struct InfoByFd {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut req = InfoByFd {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<Info>() as u32,
            info: &mut info as *mut Info as u64,
        };
        // SAFETY: the kernel writes at most `info_len` bytes into `info`, which outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &mut req as *mut InfoByFd,
                std::mem::size_of::<InfoByFd>(),
            )
        };
        if r != 0 {
            bail!(
                "reading the no-op program's id: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Noop {
            _fd: fd,
            id: u64::from(info.id),
        })
    }
}

/// An Ethernet + IPv4 + TCP frame from `src`:`sport` to `dst`:`port` with `flags`, with valid
/// checksums.
pub fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, port: u16, flags: u8) -> Vec<u8> {
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
    p.extend_from_slice(&sport.to_be_bytes());
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
        let p = tcp_packet(CLIENT, Ipv4Addr::new(10, 201, 2, 2), SPORT, 7000, SYN);
        assert_eq!(p.len(), 54);
        // A header with its checksum in place sums to zero.
        assert_eq!(checksum(&p[14..34], 0), 0);
        assert_eq!(&p[36..38], &7000u16.to_be_bytes());
        assert_eq!(p[47], SYN);
    }
}
