//! Agent configuration: a YAML file, overridden by command-line flags, each of which can also come
//! from a `MESH_*` environment variable. Everything is parsed and validated here, before any socket
//! is bound or program loaded; an error names the field and the reason.
use std::{fmt, path::PathBuf, time::Duration};

use mesh_policy::{
    CaptureRule, FailMode, InterfaceName, NodeSettings, PortRange, PortSpec, Prefix,
};
use serde::Deserialize;

pub const ENV_CONFIG: &str = "MESH_CONFIG";
pub const ENV_INTERFACES: &str = "MESH_INTERFACES";
pub const ENV_CAPTURE: &str = "MESH_CAPTURE";
pub const ENV_FAIL_MODE: &str = "MESH_FAIL_MODE";
pub const ENV_LISTEN_PORT: &str = "MESH_LISTEN_PORT";
pub const ENV_IDLE_TIMEOUT: &str = "MESH_IDLE_TIMEOUT";
pub const ENV_CONNECT_TIMEOUT: &str = "MESH_CONNECT_TIMEOUT";
pub const ENV_DRAIN_TIMEOUT: &str = "MESH_DRAIN_TIMEOUT";
pub const ENV_BPFFS_DIR: &str = "MESH_BPFFS_DIR";
pub const ENV_MARK: &str = "MESH_MARK";
pub const ENV_ROUTE_TABLE: &str = "MESH_ROUTE_TABLE";
pub const ENV_SPLICE: &str = "MESH_SPLICE";
pub const ENV_WORKERS: &str = "MESH_WORKERS";
pub const ENV_POLICY: &str = "MESH_POLICY";
pub const ENV_ADMIN_ADDRESS: &str = "MESH_ADMIN_ADDRESS";
pub const ENV_ACCESS_LOG: &str = "MESH_ACCESS_LOG";
pub const ENV_EBPF_LOG: &str = "MESH_EBPF_LOG";
pub const ENV_KUBE_PROXY_NOTRACK: &str = "MESH_KUBE_PROXY_NOTRACK";
pub const ENV_KUBERNETES: &str = "MESH_KUBERNETES";
pub const ENV_NODE_NAME: &str = "MESH_NODE_NAME";
pub const ENV_NODE_IP: &str = "MESH_NODE_IP";
pub const ENV_KUBE_BACKOFF_MAX: &str = "MESH_KUBE_BACKOFF_MAX";
pub const ENV_POD_NAME: &str = "MESH_POD_NAME";
pub const ENV_LEASE_NAMESPACE: &str = "MESH_LEASE_NAMESPACE";
pub const ENV_LEASE_NAME: &str = "MESH_LEASE_NAME";
pub const ENV_LEASE_DURATION: &str = "MESH_LEASE_DURATION";
pub const ENV_HANDOVER_SOCKET: &str = "MESH_HANDOVER_SOCKET";

pub const DEFAULT_LISTEN_PORT: u16 = 15001;
/// Folder of the derived handover sockets (a hostPath in the DaemonSet, so that the old and the
/// new pod of a rolling update meet there).
pub const DEFAULT_HANDOVER_DIR: &str = "/run/skiff";
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Two data-plane threads, as ztunnel: a node agent shares the node's cores with its pods.
pub const DEFAULT_WORKERS: usize = 2;
pub const MAX_WORKERS: usize = 64;
/// client-go's reflector ceiling: kind to an API server that is coming back, with every node's
/// agent reconnecting at once.
pub const DEFAULT_KUBE_BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/mesh";
/// Mark bit set on captured packets; the policy-routing rule matches `mark/mark`.
pub const DEFAULT_MARK: u32 = 0x1;
pub const DEFAULT_ROUTE_TABLE: u32 = 100;
/// Loopback only unless configured otherwise (like ztunnel's 15020/15021).
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15020";
/// Where the status writers' Lease lives: the agent's own namespace.
pub const DEFAULT_LEASE_NAMESPACE: &str = "skiff-system";
pub const DEFAULT_LEASE_NAME: &str = "skiff-mesh-status";
/// As client-go's leader election: a dead leader is replaced within about this long.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

/// Parses `10s`, `500ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as \"500ms\", \"10s\" or \"2m\""))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} has no unit (use ms, s, m or h)")),
    }
}

/// The configuration file, as written by a person.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct File {
    /// Host-side veth names whose traffic (the pods' egress) is captured.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Destinations to capture: prefix plus ports.
    #[serde(default)]
    pub capture: Vec<FileCaptureRule>,
    /// `open` (default) or `closed`.
    pub fail_mode: Option<String>,
    /// Port of the agent's transparent listeners.
    pub listen_port: Option<u16>,
    /// A proxied connection idle in both directions this long is closed.
    pub idle_timeout: Option<String>,
    /// Upstream connect timeout.
    pub connect_timeout: Option<String>,
    /// How long open connections may finish after SIGTERM before the agent exits.
    pub drain_timeout: Option<String>,
    /// bpffs folder where links and counters are pinned.
    pub bpffs_dir: Option<PathBuf>,
    /// Packet mark for captured packets (one or more bits).
    pub mark: Option<u32>,
    /// Routing table that delivers marked packets locally.
    pub route_table: Option<u32>,
    /// Forward with splice(2) through a kernel pipe instead of userspace buffers.
    pub splice: Option<bool>,
    /// Data-plane threads, each accepting and serving its own connections (default 2).
    pub workers: Option<usize>,
    /// Policy file or folder (Services, EndpointSlices, Gateway API routes, MeshPolicy).
    pub policy: Option<PathBuf>,
    /// Admin server address (`/metrics`, `/healthz`, `/readyz`, `/config_dump`, `/status`).
    pub admin_address: Option<String>,
    /// One JSON line per connection and per HTTP request (default true).
    pub access_log: Option<bool>,
    /// The eBPF programs' own debug logs (rare events: no listener for a targeted SYN, a failed
    /// socket assignment) as `tracing` events of target `mesh_ebpf` (default false: the
    /// statements are then removed by the verifier and cost nothing).
    pub ebpf_log: Option<bool>,
    /// Exempt captured (marked) packets from conntrack so kube-proxy's DNAT of Service VIPs
    /// does not rewrite them before they reach the agent (default true).
    pub kube_proxy_notrack: Option<bool>,
    /// Unix socket on which a running agent hands its sockets to its successor (default
    /// derived from `bpffs_dir` and `listen_port` under /run/skiff).
    pub handover_socket: Option<PathBuf>,
    /// Mutual TLS between nodes: workload identities and the tunnel (off when absent).
    pub mesh: Option<FileMesh>,
}

/// `mesh:` in the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileMesh {
    /// The SPIFFE trust domain (`cluster.local`).
    pub trust_domain: Option<String>,
    /// PEM file of the CA certificate (optionally followed by its issuers up to the root).
    pub ca_cert: Option<PathBuf>,
    /// PEM PKCS#8 file of the CA's private key.
    pub ca_key: Option<PathBuf>,
    /// This node's IP, as pods' `status.hostIP` gives it: the tunnel listens there, and
    /// workloads whose node IP differs are reached through their node's tunnel.
    pub node_ip: Option<String>,
    /// The tunnel's port (default 15008).
    pub tunnel_port: Option<u16>,
    /// Lifetime of workload certificates (default 24h), renewed at half-life.
    pub certificate_lifetime: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCaptureRule {
    /// `10.96.0.0/16`, `fd00::/64` or a single address.
    pub prefix: String,
    /// Numbers, `"8000-8100"` ranges or `"*"` (every port), as in a MeshPolicy.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

/// Flag and environment overrides; `None` leaves the file's value.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Configuration file (YAML).
    #[arg(long, env = ENV_CONFIG)]
    pub config: Option<PathBuf>,
    /// Host-side veth to capture on; repeat or comma-separate. Adds to the file's list.
    #[arg(long = "interface", env = ENV_INTERFACES, value_delimiter = ',')]
    pub interfaces: Vec<String>,
    /// Destination to capture, `PREFIX=PORTS` with PORTS like `80,443,8000-8100` or `*`; repeat or
    /// separate with `;`. Adds to the file's list.
    #[arg(long = "capture", env = ENV_CAPTURE, value_delimiter = ';')]
    pub capture: Vec<String>,
    /// `open` or `closed`.
    #[arg(long, env = ENV_FAIL_MODE)]
    pub fail_mode: Option<String>,
    #[arg(long, env = ENV_LISTEN_PORT)]
    pub listen_port: Option<u16>,
    #[arg(long, env = ENV_IDLE_TIMEOUT)]
    pub idle_timeout: Option<String>,
    #[arg(long, env = ENV_CONNECT_TIMEOUT)]
    pub connect_timeout: Option<String>,
    #[arg(long, env = ENV_DRAIN_TIMEOUT)]
    pub drain_timeout: Option<String>,
    #[arg(long, env = ENV_BPFFS_DIR)]
    pub bpffs_dir: Option<PathBuf>,
    #[arg(long, env = ENV_MARK)]
    pub mark: Option<u32>,
    #[arg(long, env = ENV_ROUTE_TABLE)]
    pub route_table: Option<u32>,
    #[arg(long, env = ENV_SPLICE)]
    pub splice: Option<bool>,
    /// Data-plane threads (1 to 64); each accepts and serves its own connections.
    #[arg(long, env = ENV_WORKERS)]
    pub workers: Option<usize>,
    /// Policy file or folder of YAML documents, reloaded on change and on SIGHUP.
    #[arg(long, env = ENV_POLICY)]
    pub policy: Option<PathBuf>,
    /// Admin server address; `0.0.0.0:PORT` only when it must be reachable from outside the node.
    #[arg(long, env = ENV_ADMIN_ADDRESS)]
    pub admin_address: Option<String>,
    /// Access log lines per connection and per HTTP request.
    #[arg(long, env = ENV_ACCESS_LOG)]
    pub access_log: Option<bool>,
    /// eBPF program debug logs, bridged into the agent's log (`RUST_LOG=mesh_ebpf=debug`).
    #[arg(long, env = ENV_EBPF_LOG)]
    pub ebpf_log: Option<bool>,
    /// Install the `inet skiff_capture` nftables table that exempts captured packets from
    /// conntrack, so kube-proxy's PREROUTING DNAT leaves them to the agent. Off only when nothing
    /// on the node DNATs Service addresses (no kube-proxy) and `nft` is unavailable.
    #[arg(long, env = ENV_KUBE_PROXY_NOTRACK)]
    pub kube_proxy_notrack: Option<bool>,
    /// Unix socket of the zero-loss handover: an agent started with the same configuration
    /// while one runs takes over through it. Default `/run/skiff/handover-<hash>.sock`, the hash
    /// of `bpffs_dir` and `listen_port` (so agents with other pins never meet).
    #[arg(long, env = ENV_HANDOVER_SOCKET)]
    pub handover_socket: Option<PathBuf>,
    /// Take the policy and the pods to capture from the Kubernetes API (kubeconfig from
    /// `KUBECONFIG`, else in-cluster) instead of a policy file.
    #[arg(long, env = ENV_KUBERNETES)]
    pub kubernetes: bool,
    /// This node's name (the downward API's `spec.nodeName`); required with `--kubernetes`.
    #[arg(long, env = ENV_NODE_NAME)]
    pub node_name: Option<String>,
    /// This node's IP (the downward API's `status.hostIP`): `mesh.node_ip`, where the mTLS
    /// tunnel listens.
    #[arg(long, env = ENV_NODE_IP)]
    pub node_ip: Option<String>,
    /// Longest wait between attempts to re-establish a failed watch (`30s`): the delay doubles
    /// from 800 ms, with jitter, up to this. Lower it on small clusters to resync sooner after an
    /// API server outage.
    #[arg(long, env = ENV_KUBE_BACKOFF_MAX)]
    pub kube_backoff_max: Option<String>,
    /// This agent's pod name (downward API `metadata.name`): its identity in the status Lease;
    /// the node name when unset.
    #[arg(long, env = ENV_POD_NAME)]
    pub pod_name: Option<String>,
    /// Namespace of the Lease that elects the one agent writing route and MeshPolicy status.
    #[arg(long, env = ENV_LEASE_NAMESPACE)]
    pub lease_namespace: Option<String>,
    /// Name of that Lease.
    #[arg(long, env = ENV_LEASE_NAME)]
    pub lease_name: Option<String>,
    /// How long a leader that stopped renewing keeps the Lease (`15s`); renewed every fifth of it.
    #[arg(long, env = ENV_LEASE_DURATION)]
    pub lease_duration: Option<String>,
}

/// The validated configuration the agent runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub interfaces: Vec<InterfaceName>,
    pub capture: Vec<CaptureRule>,
    /// Set by the file or a flag; otherwise the policy's MeshPolicy decides (default open).
    pub fail_mode: Option<FailMode>,
    pub listen_port: u16,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub bpffs_dir: PathBuf,
    pub mark: u32,
    pub route_table: u32,
    pub splice: bool,
    /// Data-plane threads: each runs its own event loop, accepts from the shared listeners and
    /// keeps what it accepted, so a request never waits on another thread.
    pub workers: usize,
    pub policy: Option<PathBuf>,
    pub admin_address: std::net::SocketAddr,
    pub access_log: bool,
    /// Load the programs with their debug logs on and forward them to `tracing`.
    pub ebpf_log: bool,
    /// Captured packets (those carrying `mark`) skip conntrack in the node's PREROUTING, so a
    /// kube-proxy DNAT rule for their Service VIP never applies to them; see `routing::Notrack`.
    pub kube_proxy_notrack: bool,
    /// Where this agent offers its sockets to a successor, and looks for a predecessor.
    pub handover_socket: PathBuf,
    /// Kubernetes mode: the node whose pods are enrolled.
    pub kubernetes: Option<Kubernetes>,
    /// Mutual TLS between nodes; `None`: plaintext, as before.
    pub mesh: Option<Mesh>,
}

/// Validated `mesh:` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mesh {
    pub trust_domain: String,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub node_ip: std::net::IpAddr,
    pub tunnel_port: u16,
    pub certificate_lifetime: Duration,
}

/// The port of the node-to-node tunnel, as in Istio ambient (HBONE).
pub const DEFAULT_TUNNEL_PORT: u16 = 15008;

/// Kubernetes mode settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kubernetes {
    /// Only pods scheduled here (`spec.nodeName`) are captured.
    pub node_name: String,
    /// Ceiling of the watch reconnection backoff.
    pub backoff_max: Duration,
    /// The status Lease: exactly one agent of the cluster writes status.
    pub lease: Lease,
}

/// The `coordination.k8s.io/v1` Lease that elects the status writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub namespace: String,
    pub name: String,
    /// `holderIdentity`: the pod name, else the node name.
    pub identity: String,
    /// `leaseDurationSeconds` (whole seconds, at least 1).
    pub duration: Duration,
}

/// Every problem found, each naming its field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl Config {
    /// The configuration in force, for `/config_dump`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "interfaces": self.interfaces,
            "capture": self.capture,
            "fail_mode": self.fail_mode.map(|m| m.to_string()),
            "listen_port": self.listen_port,
            "idle_timeout_ms": self.idle_timeout.as_millis() as u64,
            "connect_timeout_ms": self.connect_timeout.as_millis() as u64,
            "drain_timeout_ms": self.drain_timeout.as_millis() as u64,
            "bpffs_dir": self.bpffs_dir,
            "mark": self.mark,
            "route_table": self.route_table,
            "splice": self.splice,
            "workers": self.workers,
            "policy": self.policy,
            "admin_address": self.admin_address.to_string(),
            "access_log": self.access_log,
            "ebpf_log": self.ebpf_log,
            "kube_proxy_notrack": self.kube_proxy_notrack,
            "handover_socket": self.handover_socket,
            "mesh": self.mesh.as_ref().map(|m| serde_json::json!({
                "trust_domain": m.trust_domain,
                "ca_cert": m.ca_cert,
                "node_ip": m.node_ip.to_string(),
                "tunnel_port": m.tunnel_port,
                "certificate_lifetime_s": m.certificate_lifetime.as_secs(),
            })),
            "kubernetes": self.kubernetes.as_ref().map(|k| serde_json::json!({
                "node_name": k.node_name,
                "lease": {
                    "namespace": k.lease.namespace,
                    "name": k.lease.name,
                    "identity": k.lease.identity,
                    "duration_s": k.lease.duration.as_secs(),
                },
            })),
        })
    }

    /// The node's part of the kernel plan: interfaces, extra capture rules, fail mode, and the
    /// node IP that picks this node's STRICT pods.
    pub fn node_settings(&self) -> NodeSettings {
        NodeSettings {
            interfaces: self.interfaces.clone(),
            capture: self.capture.clone(),
            fail_mode: self.fail_mode,
            mesh_node_ip: self.mesh.as_ref().map(|m| m.node_ip),
        }
    }

    /// Reads the file named by `ov.config` (if any), applies the overrides and validates.
    pub fn load(ov: &Overrides) -> Result<Self, Error> {
        let file = match &ov.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::parse_file(&text).map_err(|message| Error::Syntax {
                    path: path.clone(),
                    message,
                })?
            }
            None => File::default(),
        };
        Self::build(file, ov)
    }

    pub fn parse_file(text: &str) -> Result<File, String> {
        if text.trim().is_empty() {
            return Ok(File::default());
        }
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// Merges and validates; collects every error rather than stopping at the first.
    pub fn build(file: File, ov: &Overrides) -> Result<Self, Error> {
        let mut errs = Vec::new();
        let mut err = |field: String, reason: String| errs.push(FieldError { field, reason });

        let mut names = file.interfaces;
        names.extend(ov.interfaces.iter().filter(|s| !s.is_empty()).cloned());
        names.dedup();
        let mut interfaces = Vec::new();
        for (i, name) in names.iter().enumerate() {
            match name.parse::<InterfaceName>() {
                Ok(n) => interfaces.push(n),
                Err(e) => err(format!("interfaces[{i}]"), e),
            }
        }

        let mut capture = Vec::new();
        for (i, r) in file.capture.iter().enumerate() {
            let prefix = match r.prefix.parse::<Prefix>() {
                Ok(p) => Some(p),
                Err(e) => {
                    err(format!("capture[{i}].prefix"), e);
                    None
                }
            };
            let mut ports = Vec::new();
            if r.ports.is_empty() {
                err(
                    format!("capture[{i}].ports"),
                    "must list at least one port, range, or \"*\"".into(),
                );
            }
            for (j, p) in r.ports.iter().enumerate() {
                match PortRange::from_spec(p) {
                    Ok(r) => ports.push(r),
                    Err(e) => err(format!("capture[{i}].ports[{j}]"), e),
                }
            }
            if let Some(prefix) = prefix {
                capture.push(CaptureRule { prefix, ports });
            }
        }
        for (i, s) in ov.capture.iter().enumerate() {
            let field = format!("--capture[{i}]");
            let Some((p, ports)) = s.split_once('=') else {
                err(
                    field,
                    format!("{s:?} is not PREFIX=PORTS (for example 10.96.0.0/16=80,443)"),
                );
                continue;
            };
            let prefix = p.parse::<Prefix>().map_err(|e| err(field.clone(), e)).ok();
            let ports: Vec<_> = ports
                .split(',')
                .filter_map(|r| {
                    r.parse::<PortRange>()
                        .map_err(|e| err(field.clone(), e))
                        .ok()
                })
                .collect();
            if let Some(prefix) = prefix {
                capture.push(CaptureRule { prefix, ports });
            }
        }
        let fail_mode = match ov.fail_mode.as_ref().or(file.fail_mode.as_ref()) {
            None => None,
            Some(s) => s.parse().map_err(|e| err("fail_mode".into(), e)).ok(),
        };
        let mut duration = |name: &str, v: Option<&String>, default: Duration| match v {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) if d.is_zero() => {
                    err(name.into(), "must be greater than zero".into());
                    default
                }
                Ok(d) => d,
                Err(e) => {
                    err(name.into(), e);
                    default
                }
            },
        };
        let idle_timeout = duration(
            "idle_timeout",
            ov.idle_timeout.as_ref().or(file.idle_timeout.as_ref()),
            DEFAULT_IDLE_TIMEOUT,
        );
        let connect_timeout = duration(
            "connect_timeout",
            ov.connect_timeout
                .as_ref()
                .or(file.connect_timeout.as_ref()),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let drain_timeout = duration(
            "drain_timeout",
            ov.drain_timeout.as_ref().or(file.drain_timeout.as_ref()),
            DEFAULT_DRAIN_TIMEOUT,
        );
        let kube_backoff_max = duration(
            "kube_backoff_max",
            ov.kube_backoff_max.as_ref(),
            DEFAULT_KUBE_BACKOFF_MAX,
        );
        let listen_port = ov
            .listen_port
            .or(file.listen_port)
            .unwrap_or(DEFAULT_LISTEN_PORT);
        if listen_port == 0 {
            err(
                "listen_port".into(),
                "must be a port from 1 to 65535".into(),
            );
        }
        let mark = ov.mark.or(file.mark).unwrap_or(DEFAULT_MARK);
        if mark == 0 {
            err("mark".into(), "must have at least one bit set".into());
        }
        let route_table = ov
            .route_table
            .or(file.route_table)
            .unwrap_or(DEFAULT_ROUTE_TABLE);
        if matches!(route_table, 0 | 253..=255) {
            err(
                "route_table".into(),
                format!("{route_table} is reserved (0, 253 default, 254 main, 255 local)"),
            );
        }
        let bpffs_dir = ov
            .bpffs_dir
            .clone()
            .or(file.bpffs_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR));
        if !bpffs_dir.is_absolute() {
            err(
                "bpffs_dir".into(),
                format!("{} is not an absolute path", bpffs_dir.display()),
            );
        }
        let splice = ov.splice.or(file.splice).unwrap_or(true);
        let workers = ov.workers.or(file.workers).unwrap_or(DEFAULT_WORKERS);
        if !(1..=MAX_WORKERS).contains(&workers) {
            err(
                "workers".into(),
                format!("{workers} is not between 1 and {MAX_WORKERS}"),
            );
        }
        let policy = ov.policy.clone().or(file.policy);
        let admin_text = ov
            .admin_address
            .clone()
            .or(file.admin_address)
            .unwrap_or_else(|| DEFAULT_ADMIN_ADDRESS.to_string());
        let admin_address = admin_text.parse().unwrap_or_else(|_| {
            err(
                "admin_address".into(),
                format!("{admin_text:?} is not IP:PORT (for example 127.0.0.1:15020)"),
            );
            std::net::SocketAddr::from(([127, 0, 0, 1], 15020))
        });
        let kubernetes = if ov.kubernetes {
            if policy.is_some() {
                err(
                    "policy".into(),
                    "--policy and --kubernetes exclude each other: in Kubernetes mode the policy comes from the API server".into(),
                );
            }
            let lease_duration = match ov.lease_duration.as_deref().map(parse_duration) {
                None => DEFAULT_LEASE_DURATION,
                Some(Ok(d)) if d >= Duration::from_secs(1) && d.subsec_nanos() == 0 => d,
                Some(Ok(d)) => {
                    err(
                        "lease_duration".into(),
                        format!(
                            "{d:?} must be a whole number of seconds, at least 1s (leaseDurationSeconds)"
                        ),
                    );
                    DEFAULT_LEASE_DURATION
                }
                Some(Err(e)) => {
                    err("lease_duration".into(), e);
                    DEFAULT_LEASE_DURATION
                }
            };
            let name_field = |field: &str, value: Option<&String>, default: &str| {
                let v = value.map_or(default, |v| v.trim()).to_string();
                let ok = !v.is_empty()
                    && v.len() <= 253
                    && v.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                    });
                (ok, field.to_string(), v)
            };
            let mut lease_names = Vec::new();
            for (ok, field, v) in [
                name_field(
                    "lease_namespace",
                    ov.lease_namespace.as_ref(),
                    DEFAULT_LEASE_NAMESPACE,
                ),
                name_field("lease_name", ov.lease_name.as_ref(), DEFAULT_LEASE_NAME),
            ] {
                if !ok {
                    err(
                        field,
                        format!(
                            "{v:?} is not a Kubernetes object name (lower-case letters, digits, '-', '.')"
                        ),
                    );
                }
                lease_names.push(v);
            }
            let [lease_namespace, lease_name] = <[String; 2]>::try_from(lease_names)
                .unwrap_or_else(|_| [DEFAULT_LEASE_NAMESPACE.into(), DEFAULT_LEASE_NAME.into()]);
            match ov.node_name.as_deref().map(str::trim) {
                Some(n) if !n.is_empty() => Some(Kubernetes {
                    node_name: n.to_string(),
                    backoff_max: kube_backoff_max,
                    lease: Lease {
                        namespace: lease_namespace,
                        name: lease_name,
                        identity: ov
                            .pod_name
                            .as_deref()
                            .map(str::trim)
                            .filter(|p| !p.is_empty())
                            .unwrap_or(n)
                            .to_string(),
                        duration: lease_duration,
                    },
                }),
                _ => {
                    err(
                        ENV_NODE_NAME.into(),
                        format!(
                            "required with --kubernetes ({ENV_KUBERNETES}): set {ENV_NODE_NAME} (or --node-name) to this node's name, e.g. from the downward API's spec.nodeName"
                        ),
                    );
                    None
                }
            }
        } else {
            None
        };
        if let Some(p) = &policy
            && !p.exists()
        {
            err("policy".into(), format!("{} does not exist", p.display()));
        }

        let handover_socket = ov
            .handover_socket
            .clone()
            .or(file.handover_socket)
            .unwrap_or_else(|| derived_handover_socket(&bpffs_dir, listen_port));
        // sun_path holds 108 bytes with the terminating NUL.
        if handover_socket.as_os_str().len() > 107 {
            err(
                "handover_socket".into(),
                format!(
                    "{} is longer than a Unix socket path may be (107 bytes)",
                    handover_socket.display()
                ),
            );
        }
        let mesh = match file.mesh.map(|mut m| {
            m.node_ip = ov.node_ip.clone().or(m.node_ip);
            mesh_settings(m)
        }) {
            Some(Ok(m)) => Some(m),
            Some(Err(problems)) => {
                for p in problems {
                    err(p.field, p.reason);
                }
                None
            }
            None => None,
        };
        if !errs.is_empty() {
            return Err(Error::Invalid(errs));
        }
        Ok(Config {
            interfaces,
            capture,
            fail_mode,
            listen_port,
            idle_timeout,
            connect_timeout,
            drain_timeout,
            bpffs_dir,
            mark,
            route_table,
            splice,
            workers,
            policy,
            admin_address,
            access_log: ov.access_log.or(file.access_log).unwrap_or(true),
            ebpf_log: ov.ebpf_log.or(file.ebpf_log).unwrap_or(false),
            kube_proxy_notrack: ov
                .kube_proxy_notrack
                .or(file.kube_proxy_notrack)
                .unwrap_or(true),
            handover_socket,
            kubernetes,
            mesh,
        })
    }
}

/// Validates `mesh:`; every problem names its field.
fn mesh_settings(m: FileMesh) -> Result<Mesh, Vec<FieldError>> {
    let mut errs = Vec::new();
    let mut err = |field: &str, reason: String| {
        errs.push(FieldError {
            field: format!("mesh.{field}"),
            reason,
        })
    };
    let required = "required when mesh is set".to_string();
    if m.trust_domain.is_none() {
        err("trust_domain", required.clone());
    }
    if let Some(td) = &m.trust_domain
        && let Err(e) = mesh_identity::TrustDomain::new(td)
    {
        err("trust_domain", e.to_string());
    }
    if m.ca_cert.is_none() {
        err("ca_cert", required.clone());
    }
    if m.ca_key.is_none() {
        err("ca_key", required.clone());
    }
    let node_ip = match m
        .node_ip
        .as_deref()
        .map(|s| (s, s.parse::<std::net::IpAddr>()))
    {
        Some((_, Ok(ip))) => Some(ip),
        Some((s, Err(e))) => {
            err("node_ip", format!("{s:?} is not an IP address: {e}"));
            None
        }
        None => {
            err("node_ip", required.clone());
            None
        }
    };
    let lifetime = match m.certificate_lifetime.as_deref().map(parse_duration) {
        None => Some(Duration::from_secs(24 * 3600)),
        Some(Ok(d)) if d >= Duration::from_secs(60) => Some(d),
        Some(Ok(d)) => {
            err("certificate_lifetime", format!("{d:?} is less than 1m"));
            None
        }
        Some(Err(e)) => {
            err("certificate_lifetime", e);
            None
        }
    };
    if m.tunnel_port == Some(0) {
        err("tunnel_port", "must not be 0".into());
    }
    match (m.trust_domain, m.ca_cert, m.ca_key, node_ip, lifetime) {
        (Some(trust_domain), Some(ca_cert), Some(ca_key), Some(node_ip), Some(lifetime))
            if errs.is_empty() =>
        {
            Ok(Mesh {
                trust_domain,
                ca_cert,
                ca_key,
                node_ip,
                tunnel_port: m.tunnel_port.unwrap_or(DEFAULT_TUNNEL_PORT),
                certificate_lifetime: lifetime,
            })
        }
        _ => Err(errs),
    }
}

/// `/run/skiff/handover-<hash>.sock` with a stable hash (FNV-1a, not `DefaultHasher`, whose
/// output may change between Rust releases: an upgraded binary must find the old one) of the
/// two settings that make two agents the same data plane.
pub fn derived_handover_socket(bpffs_dir: &std::path::Path, listen_port: u16) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = bpffs_dir.as_os_str().as_encoded_bytes();
    for b in bytes.iter().chain(&listen_port.to_be_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    PathBuf::from(DEFAULT_HANDOVER_DIR).join(format!("handover-{:012x}.sock", h >> 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(yaml: &str) -> Result<Config, Error> {
        let file = Config::parse_file(yaml).map_err(|message| Error::Syntax {
            path: "t.yaml".into(),
            message,
        })?;
        Config::build(file, &Overrides::default())
    }

    fn fields(r: Result<Config, Error>) -> Vec<String> {
        match r {
            Err(Error::Invalid(v)) => v.into_iter().map(|e| e.field).collect(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn full_file_parses() {
        let c = build(
            "interfaces: [veth1, veth2]\nfail_mode: closed\nlisten_port: 15010\n\
             capture:\n- prefix: 10.96.0.0/16\n  ports: [80, \"8000-8100\"]\n\
             - prefix: fd00:96::/64\n  ports: [\"*\"]\nidle_timeout: 90s\ndrain_timeout: 500ms\n",
        )
        .expect("valid");
        assert_eq!(names(&c), ["veth1", "veth2"]);
        assert_eq!(c.fail_mode, Some(FailMode::Closed));
        assert_eq!(c.listen_port, 15010);
        assert_eq!(ports(&c.capture[0]), ["80", "8000-8100"]);
        assert_eq!(c.capture[1].prefix.to_string(), "fd00:96::/64");
        assert_eq!(c.capture[1].ports, [PortRange::ALL]);
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.drain_timeout, Duration::from_millis(500));
        assert!(c.kube_proxy_notrack, "on by default");
        assert!(
            !build("kube_proxy_notrack: false\n")
                .expect("valid")
                .kube_proxy_notrack
        );
        assert_eq!(c.to_json()["kube_proxy_notrack"], true);
    }

    #[test]
    fn every_bad_field_is_named() {
        let f = fields(build(
            "interfaces: [\"this-name-is-far-too-long\"]\nfail_mode: sideways\n\
             capture:\n- prefix: 10.0.0.0/33\n  ports: [0, \"90-80\", 70000]\n- prefix: x\n  ports: []\n\
             idle_timeout: soon\nroute_table: 254\nmark: 0\n",
        ));
        assert_eq!(
            f,
            [
                "interfaces[0]",
                "capture[0].prefix",
                "capture[0].ports[0]",
                "capture[0].ports[1]",
                "capture[0].ports[2]",
                "capture[1].prefix",
                "capture[1].ports",
                "fail_mode",
                "idle_timeout",
                "mark",
                "route_table",
            ]
        );
    }

    #[test]
    fn workers_default_to_two_and_must_be_between_1_and_64() {
        assert_eq!(build("").expect("valid").workers, 2);
        assert_eq!(build("workers: 1\n").expect("valid").workers, 1);
        assert_eq!(fields(build("workers: 0\n")), ["workers"]);
        assert_eq!(fields(build("workers: 65\n")), ["workers"]);
    }

    #[test]
    fn unknown_field_is_a_syntax_error_naming_it() {
        match build("interfacez: [a]\n") {
            Err(Error::Syntax { message, .. }) => {
                assert!(message.contains("interfacez"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    fn names(c: &Config) -> Vec<&str> {
        c.interfaces.iter().map(|i| i.as_str()).collect()
    }

    fn ports(r: &CaptureRule) -> Vec<String> {
        r.ports.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn capture_prefixes_and_ports_parse_as_in_a_mesh_policy() {
        let c = build("capture:\n- prefix: 10.96.3.7/16\n  ports: [\"*\"]\n").expect("valid");
        assert_eq!(c.capture[0].prefix.to_string(), "10.96.0.0/16");
        // The same PortRange as MeshPolicy.spec.capture: "*" is 1-65535 in both.
        assert_eq!(ports(&c.capture[0]), ["1-65535"]);
    }

    #[test]
    fn flags_add_to_the_file() {
        let ov = Overrides {
            interfaces: vec!["h2".into()],
            capture: vec!["10.1.0.0/24=80,9000-9100".into()],
            fail_mode: Some("closed".into()),
            ..Default::default()
        };
        let c = Config::build(
            Config::parse_file("interfaces: [h1]\nfail_mode: open\n").expect("yaml"),
            &ov,
        )
        .expect("valid");
        assert_eq!(names(&c), ["h1", "h2"]);
        assert_eq!(c.fail_mode, Some(FailMode::Closed));
        assert_eq!(ports(&c.capture[0]), ["80", "9000-9100"]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("").is_err());
    }
}
