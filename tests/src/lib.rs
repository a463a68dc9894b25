//! Test harness for privileged integration tests.
//!
//! A [`Topology`] is a node network namespace (where the agent runs, with no route out) and one
//! namespace per pod behind a veth pair, named `mesh-test-<pid>-<n>[-pod]`. Everything is deleted
//! when the value drops, also when a test panics. Nothing is attached to the root namespace.
//! Sockets are opened inside a namespace with [`Netns::run`], so tests use real TCP from std.
#![forbid(unsafe_code)]

pub mod kube;
pub mod mtls;
pub mod policy;
pub mod servers;
pub mod tls;

use std::{
    fs::File,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use nix::sched::CloneFlags;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Whether privileged tests can run. Without root, prints `skipping: <why>` and returns false,
/// unless `CI` or `MESH_REQUIRE_PRIVILEGED` is set: then it panics, so CI never passes by skipping.
pub fn privileged(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not running as root (needs CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    } else if !Path::new("/run/netns").exists() && Command::new("ip").arg("-V").output().is_err() {
        Some("iproute2 (`ip`) is not installed")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            if std::env::var_os("CI").is_some()
                || std::env::var_os("MESH_REQUIRE_PRIVILEGED").is_some()
            {
                panic!("{test}: privileged test cannot run: {why}");
            }
            eprintln!("skipping: {test}: {why}");
            false
        }
    }
}

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace.
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens stay in it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Spawns `f` on a thread inside this namespace and returns its handle (for servers).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// A command run inside this namespace (`ip netns exec`).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command inside the namespace and panics if it fails.
    pub fn sh(&self, args: &[&str]) -> Output {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh(&all)
    }
}

/// A pod: a namespace behind a veth whose host end is in the node namespace.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The node's address on this pod's link (what a server in the pod sees as the agent's).
    pub gw4: Ipv4Addr,
    pub gw6: Ipv6Addr,
    /// Host-side veth name, in the node namespace.
    pub host_if: String,
}

/// Node namespace plus pods; deleted on drop.
pub struct Topology {
    pub id: String,
    pub node: Netns,
    pub pods: Vec<Pod>,
    /// bpffs folder the agents of this topology pin into.
    pub bpffs_dir: PathBuf,
}

impl Topology {
    /// Builds the node namespace and one pod per name. Pod `i` (from 1) gets 10.201.i.2/24 and
    /// fd00:201:i::2/64, default routes via the node, whose side has .1 and ::1.
    pub fn new(pods: &[&str]) -> Self {
        Self::with_net(pods, 201)
    }

    /// [`Topology::new`] with pods in 10.`net`.i.0/24 and fd00:`net`:i::/64, so that the pods
    /// of two nodes joined by an underlay have distinct addresses.
    pub fn with_net(pods: &[&str], net: u8) -> Self {
        let id = format!(
            "mesh-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let node = Netns { name: id.clone() };
        let mut topo = Topology {
            bpffs_dir: PathBuf::from("/sys/fs/bpf").join(&id),
            id: id.clone(),
            node: node.clone(),
            pods: Vec::new(),
        };
        sh(&["ip", "netns", "add", &node.name]);
        sh(&["ip", "-n", &node.name, "link", "set", "lo", "up"]);
        node.sh(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        for (i, name) in pods.iter().enumerate() {
            let i = i + 1;
            let ns = Netns {
                name: format!("{id}-{name}"),
            };
            let host_if = format!("h{i}");
            sh(&["ip", "netns", "add", &ns.name]);
            // Registered before configuring, so a failure below still cleans it up.
            let pod = Pod {
                name: name.to_string(),
                ns: ns.clone(),
                ip4: Ipv4Addr::new(10, net, i as u8, 2),
                ip6: format!("fd00:{net}:{i}::2").parse().expect("v6"),
                gw4: Ipv4Addr::new(10, net, i as u8, 1),
                gw6: format!("fd00:{net}:{i}::1").parse().expect("v6"),
                host_if: host_if.clone(),
            };
            topo.pods.push(pod.clone());
            let n = &node.name;
            sh(&[
                "ip", "-n", n, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                "netns", &ns.name,
            ]);
            sh(&["ip", "-n", n, "link", "set", &host_if, "up"]);
            sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
            sh(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"]);
            sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/24", pod.gw4),
                "dev",
                &host_if,
            ]);
            sh(&[
                "ip",
                "-n",
                n,
                "-6",
                "addr",
                "add",
                &format!("{}/64", pod.gw6),
                "dev",
                &host_if,
                "nodad",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{}/24", pod.ip4),
                "dev",
                "eth0",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "-6",
                "addr",
                "add",
                &format!("{}/64", pod.ip6),
                "dev",
                "eth0",
                "nodad",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "route",
                "add",
                "default",
                "via",
                &pod.gw4.to_string(),
            ]);
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &pod.gw6.to_string(),
            ]);
        }
        topo
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Makes the node DNAT its own connections to `vip:port` to `backend:bport`, as kube-proxy
    /// does for host-network clients: this is how a Service IP reaches a pod without the mesh.
    pub fn kube_proxy_dnat(&self, vip: Ipv4Addr, port: u16, backend: Ipv4Addr, bport: u16) {
        let rules = format!(
            "table ip kubeproxy {{\n chain out {{\n  type nat hook output priority -100;\n  ip daddr {vip} tcp dport {port} dnat to {backend}:{bport}\n }}\n}}\n"
        );
        let mut c = self.node.cmd("nft");
        c.args(["-f", "-"]).stdin(Stdio::piped());
        let mut child = c.spawn().expect("nft");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), rules.as_bytes())
            .expect("write rules");
        assert!(child.wait().expect("nft").success(), "nft rules failed");
        // A node has a default route; this one has no route out, so give the node's own
        // connections a route for the VIP (the DNAT above then re-routes them to the pod).
        self.node
            .sh(&["ip", "route", "replace", &format!("{vip}/32"), "dev", "lo"]);
    }

    /// Installs kube-proxy's rules for one Service port, as kube-proxy in `mode` does: `vip:port`
    /// DNATed to `backend:bport` in `nat` PREROUTING (the pods' connections) and OUTPUT (the
    /// node's own, hence the agent's upstream ones). Callable once per Service port; IPv4 or IPv6
    /// (both addresses of one family).
    pub fn kube_proxy_service(
        &self,
        mode: KubeProxyMode,
        vip: impl Into<IpAddr>,
        port: u16,
        backend: impl Into<IpAddr>,
        bport: u16,
    ) {
        let (vip, backend) = (vip.into(), backend.into());
        let to = std::net::SocketAddr::new(backend, bport).to_string();
        let (family, bits) = if vip.is_ipv4() {
            ("ip", 32)
        } else {
            ("ip6", 128)
        };
        match mode {
            KubeProxyMode::Nftables => {
                // `add` is idempotent for the table and chains, so Services can be added one by one.
                let rules = format!(
                    "add table {family} kube-proxy\n\
                     add chain {family} kube-proxy nat-prerouting {{ type nat hook prerouting priority dstnat; }}\n\
                     add chain {family} kube-proxy nat-output {{ type nat hook output priority -100; }}\n\
                     add rule {family} kube-proxy nat-prerouting {family} daddr {vip} tcp dport {port} dnat to {to}\n\
                     add rule {family} kube-proxy nat-output {family} daddr {vip} tcp dport {port} dnat to {to}\n"
                );
                self.node.nft(&rules);
            }
            KubeProxyMode::IptablesLegacy | KubeProxyMode::IptablesNft => {
                let bin = mode.command(vip.is_ipv6());
                let (dst, port) = (format!("{vip}/{bits}"), port.to_string());
                for chain in ["PREROUTING", "OUTPUT"] {
                    self.node.sh(&[
                        bin,
                        "-w",
                        "-t",
                        "nat",
                        "-A",
                        chain,
                        "-d",
                        &dst,
                        "-p",
                        "tcp",
                        "--dport",
                        &port,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &to,
                    ]);
                }
            }
        }
        // As in kube_proxy_dnat: the node has no default route, give its own connections one.
        self.node.sh(&[
            "ip",
            "route",
            "replace",
            &format!("{vip}/{bits}"),
            "dev",
            "lo",
        ]);
    }

    /// Starts `mesh-agent run` in the node namespace with these extra arguments and waits until
    /// it reports ready.
    pub fn start_agent(&self, args: &[&str]) -> Agent {
        Agent::start(self, &agent_bin(), args, &[])
    }

    /// [`start_agent`](Self::start_agent) with another `RUST_LOG` filter.
    pub fn start_agent_logging(&self, args: &[&str], rust_log: &str) -> Agent {
        Agent::start(self, &agent_bin(), args, &[("RUST_LOG", rust_log)])
    }

    /// [`start_agent`](Self::start_agent) with extra environment variables (`KUBECONFIG`).
    pub fn start_agent_env(&self, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start(self, &agent_bin(), args, env)
    }

    /// [`start_agent`](Self::start_agent) with a given binary (the benchmark's release build).
    pub fn start_agent_bin(&self, bin: &Path, args: &[&str]) -> Agent {
        Agent::start(self, bin, args, &[])
    }

    /// Starts `mesh-agent run` like [`start_agent`](Self::start_agent) but returns at once,
    /// without waiting for it to be ready ([`Agent::wait_ready`]).
    pub fn spawn_agent(&self, args: &[&str]) -> Agent {
        Agent::spawn(self, &agent_bin(), args, &[])
    }

    /// [`spawn_agent`](Self::spawn_agent) with another agent binary.
    pub fn spawn_agent_bin(&self, bin: &Path, args: &[&str]) -> Agent {
        Agent::spawn(self, bin, args, &[])
    }

    /// [`start_agent_bin`](Self::start_agent_bin) with extra environment variables.
    pub fn start_agent_bin_env(&self, bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start(self, bin, args, env)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self
            .pods
            .iter()
            .map(|p| &p.ns)
            .chain(std::iter::once(&self.node))
        {
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &ns.name])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
        }
        for ns in self
            .pods
            .iter()
            .map(|p| &p.ns)
            .chain(std::iter::once(&self.node))
        {
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).status();
        }
        let _ = std::fs::remove_dir_all(&self.bpffs_dir);
        // Agent logs and scratch folders (`<id>-...` in the temp dir) are kept when a test
        // fails, for the report, and removed otherwise.
        if !std::thread::panicking()
            && let Ok(dir) = std::fs::read_dir(std::env::temp_dir())
        {
            let prefix = format!("{}-", self.id);
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Netns {
    /// Loads an nftables script (`nft -f -`) in this namespace and panics if it fails.
    pub fn nft(&self, script: &str) {
        let mut child = self
            .cmd("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), script.as_bytes())
            .expect("write rules");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft -f - failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The ways kube-proxy programs a Service's DNAT on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeProxyMode {
    /// `--proxy-mode nftables`: its own `ip kube-proxy` table.
    Nftables,
    /// `--proxy-mode iptables` with the legacy x_tables backend.
    IptablesLegacy,
    /// `--proxy-mode iptables` through `iptables-nft` (nf_tables underneath).
    IptablesNft,
}

impl KubeProxyMode {
    fn command(self, ipv6: bool) -> &'static str {
        match (self, ipv6) {
            (KubeProxyMode::Nftables, _) => "nft",
            (KubeProxyMode::IptablesLegacy, false) => "iptables-legacy",
            (KubeProxyMode::IptablesLegacy, true) => "ip6tables-legacy",
            (KubeProxyMode::IptablesNft, false) => "iptables-nft",
            (KubeProxyMode::IptablesNft, true) => "ip6tables-nft",
        }
    }
}

impl Netns {
    /// Starts the test echo backend (`tests/support/echo.py`) in this namespace and waits until
    /// it listens. Extra arguments: `--tls CERT KEY`, `--log FILE`, `--status CODE`.
    pub fn echo(&self, name: &str, port: u16, extra: &[&str]) {
        let script = support("echo.py");
        let mut args = vec![
            script.to_string_lossy().to_string(),
            name.to_string(),
            port.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.serve("/usr/bin/python3", &args);
    }

    /// `GET path` over HTTP/1.0 to `addr` from inside this namespace; the raw response (head
    /// and body). For the agent's admin server: `ns.http_get(ADMIN, "/metrics")`.
    pub fn http_get(&self, addr: std::net::SocketAddr, path: &str) -> String {
        let path = path.to_string();
        self.run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            std::io::Write::write_all(
                &mut s,
                format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes(),
            )
            .expect("request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("response");
            out
        })
    }

    /// Starts a server that prints `ready` on stdout once it listens, waits for that line, and
    /// leaves it running until the namespace is torn down (a thread reaps it then).
    pub fn serve(&self, program: &str, args: &[String]) {
        let mut child = self
            .cmd(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        let mut out = child.stdout.take().expect("stdout");
        let mut b = [0u8; 6];
        out.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("{program} {args:?} did not start: {e}"));
        assert_eq!(&b, b"ready\n");
        std::thread::spawn(move || {
            let _ = child.wait();
            drop(out);
        });
    }
}

/// A file in `tests/support`.
pub fn support(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("support")
        .join(name)
}

/// The agent's admin server address in the node namespace (the default `admin_address`).
pub const ADMIN: std::net::SocketAddr =
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15020));

/// The agent binary: `MESH_AGENT_BIN`, or the workspace's `target/debug/mesh-agent`.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mesh-agent");
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build -p mesh-agent`) or run `cargo xtask test`",
        p.display()
    );
    p
}

/// A running agent; killed on drop if still running.
pub struct Agent {
    child: Option<Child>,
    pub log_path: PathBuf,
    pub bpffs_dir: PathBuf,
    /// The node namespace the agent runs in.
    netns: PathBuf,
}

impl Agent {
    fn start(topo: &Topology, bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut agent = Agent::spawn(topo, bin, args, env);
        agent.wait_ready();
        agent
    }

    /// Starts the agent without waiting for it to be ready: for measuring how soon it serves.
    fn spawn(topo: &Topology, bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let log_path = std::env::temp_dir().join(format!(
            "{}-agent-{}.log",
            topo.id,
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let log = File::create(&log_path).expect("agent log");
        let bpffs = topo.bpffs_dir.to_string_lossy().to_string();
        // nsenter enters only the network namespace: the agent keeps the host's mount namespace,
        // so its pinned links live in the real bpffs and survive the agent, as on a node.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", topo.node.path().display()))
            .arg(bin)
            .arg("run")
            .args(["--bpffs-dir", &bpffs])
            .args(args)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        Agent {
            child: Some(child),
            log_path,
            bpffs_dir: topo.bpffs_dir.clone(),
            netns: topo.node.path(),
        }
    }

    /// Waits until the agent logs `agent ready`; panics with its log if it exits or takes
    /// longer than `MESH_AGENT_READY_SECS` (20 s by default).
    pub fn wait_ready(&mut self) {
        // An emulated CPU (`cargo xtask kernels` runs the suite under qemu TCG) needs longer.
        let ready_secs = std::env::var("MESH_AGENT_READY_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        let deadline = Instant::now() + Duration::from_secs(ready_secs);
        loop {
            if self.log().contains("agent ready") {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("agent exited ({status}) before ready:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after {ready_secs} s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("agent running")
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The agent's JSON log lines.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// Kernel counters, read from the pinned map with `mesh-agent counters`.
    pub fn counters(&self) -> serde_json::Value {
        read_counters(&self.bpffs_dir)
    }

    /// Waits for the agent to exit by itself (after a handover); killed if it has not within
    /// `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        sh(&["kill", "-TERM", &child.id().to_string()]);
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "agent did not exit within {within:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the agent dies without cleaning up, as in a crash or OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_socket_state();
        }
        self.kill();
        // A failing test unwinds through here: the agent's log is what explains it.
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of the agent's log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Agent {
    /// For a failing test, while the agent still runs: the node's TCP drop counters, its
    /// sockets in SYN-RECV and the agent's listeners, and the program's counters. A connection
    /// that timed out leaves its trace here (a full accept queue, a SYN the program passed on)
    /// and nowhere in the agent's log.
    fn print_socket_state(&self) {
        let net = format!("--net={}", self.netns.display());
        let run = |args: &[&str]| {
            Command::new("nsenter")
                .arg(&net)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("{args:?}: {e}\n"))
        };
        eprintln!("--- node namespace: TCP drop counters (nstat) ---");
        eprint!(
            "{}",
            run(&[
                "nstat",
                "-az",
                "TcpExtListenDrops",
                "TcpExtListenOverflows",
                "TcpExtTCPReqQFullDrop",
                "TcpExtTCPBacklogDrop",
                "TcpExtTCPTimeWaitOverflow",
                "TcpExtTW*",
                "TcpExtPAWS*",
                "TcpAttemptFails",
                "TcpOutRsts",
                "IpInNoRoutes",
            ])
        );
        eprintln!("--- node namespace: listeners and SYN-RECV sockets (ss) ---");
        eprint!("{}", run(&["ss", "-tanl"]));
        eprint!("{}", run(&["ss", "-tan", "state", "syn-recv"]));
        eprintln!("--- program counters ---");
        let out = Command::new(agent_bin())
            .args(["counters", "--bpffs-dir"])
            .arg(&self.bpffs_dir)
            .output();
        if let Ok(o) = out {
            eprintln!("{}", String::from_utf8_lossy(&o.stdout));
        }
    }
}

/// Counters pinned in `dir`.
pub fn read_counters(dir: &Path) -> serde_json::Value {
    let out = sh(&[
        agent_bin().to_str().expect("utf8"),
        "counters",
        "--bpffs-dir",
        dir.to_str().expect("utf8"),
    ]);
    serde_json::from_slice(&out.stdout).expect("counters JSON")
}

/// Counter `name` from a counters object.
pub fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {v}"))
}
