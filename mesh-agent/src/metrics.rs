//! Prometheus metrics: one `prometheus_client` registry with the `mesh` prefix. Each subsystem's
//! metrics are typed label sets with bounded cardinality (Service names from the policy, protocol
//! names, result words; never raw paths or client ports). Kernel counters and process figures are
//! read at scrape time by collectors.
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::ebpf::Programs;

/// Labels of TCP connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `namespace/name` of the destination Service, or `none` for a non-Service destination.
    pub service: String,
    /// `tcp`, `tls`, `http1`, `h2c`.
    pub protocol: String,
}

/// Labels of HTTP request counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// `HTTPRoute namespace/name` (or GRPCRoute), or `none`.
    pub route: String,
    /// Standard methods as they are, anything else `OTHER`.
    pub method: String,
    /// `2xx`, `4xx`, ...; `none` when the client got no status.
    pub status_class: String,
}

/// Labels of HTTP request durations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRouteLabels {
    pub route: String,
    pub method: String,
}

fn request_histogram() -> Histogram {
    // 250 µs .. ~8 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

/// Per-route HTTP metrics, fed by mesh-http's observer hook.
#[derive(Debug)]
pub struct HttpMetrics {
    /// Tells this registry's label sets apart in the per-thread cache.
    id: u64,
    pub requests: Family<HttpLabels, Counter>,
    pub duration: Family<HttpRouteLabels, Histogram, fn() -> Histogram>,
}

/// One label set's metrics, as a worker thread last looked them up.
struct CachedHttp {
    /// The [`HttpMetrics`] they belong to (tests run several agents' metrics in one process).
    owner: u64,
    route: Box<str>,
    method: &'static str,
    class: u16,
    requests: Counter,
    duration: Histogram,
}

/// Label sets a thread keeps resolved; past this the lookup goes to the families each time.
const HTTP_CACHE_ENTRIES: usize = 64;

thread_local! {
    /// The families hash and compare `String` labels under a lock on every lookup; a request
    /// usually has the label set of the one before it, so each thread keeps the metrics it
    /// resolved (the families never drop a label set, so a kept one stays the exported one).
    static HTTP_CACHE: std::cell::RefCell<Vec<CachedHttp>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl mesh_http::Observer for HttpMetrics {
    fn request(&self, r: &mesh_http::RequestRecord<'_>) {
        let route = r.route.unwrap_or("none");
        let method = match r.method.as_str() {
            "GET" => "GET",
            "HEAD" => "HEAD",
            "POST" => "POST",
            "PUT" => "PUT",
            "DELETE" => "DELETE",
            "CONNECT" => "CONNECT",
            "OPTIONS" => "OPTIONS",
            "TRACE" => "TRACE",
            "PATCH" => "PATCH",
            _ => "OTHER",
        };
        let class = match r.status {
            100..=599 => r.status / 100,
            _ => 0,
        };
        let owner = self.id;
        let seconds = r.duration.as_secs_f64();
        let cached = HTTP_CACHE.with(|cache| {
            let cache = cache.borrow();
            cache
                .iter()
                .find(|c| {
                    c.owner == owner && c.class == class && c.method == method && &*c.route == route
                })
                .map(|c| {
                    c.duration.observe(seconds);
                    c.requests.inc();
                })
                .is_some()
        });
        if cached {
            return;
        }
        let duration = self
            .duration
            .get_or_create(&HttpRouteLabels {
                route: route.to_string(),
                method: method.to_string(),
            })
            .clone();
        let requests = self
            .requests
            .get_or_create(&HttpLabels {
                route: route.to_string(),
                method: method.to_string(),
                status_class: if class == 0 {
                    "none".to_string()
                } else {
                    format!("{class}xx")
                },
            })
            .clone();
        duration.observe(seconds);
        requests.inc();
        HTTP_CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.len() < HTTP_CACHE_ENTRIES {
                cache.push(CachedHttp {
                    owner,
                    route: route.into(),
                    method,
                    class,
                    requests,
                    duration,
                });
            }
        });
    }
}

/// Labels of accept failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptErrorLabels {
    /// `emfile` (the agent's fd limit), `enfile` (the system's), `other`.
    pub reason: &'static str,
}

/// Labels of the per-worker gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// The worker's number, as in its thread's name (`mesh-worker-N`).
    pub worker: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

fn connect_histogram() -> Histogram {
    // 100 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Connection-level metrics of the proxy.
#[derive(Debug)]
pub struct TcpMetrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub active: Family<TcpLabels, Gauge>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
    pub upstream_connect_errors: Family<TcpLabels, Counter>,
    pub upstream_connect: Family<TcpLabels, Histogram, fn() -> Histogram>,
    /// Captured connections the agent could not accept (out of fds): each one was refused.
    pub accept_errors: Family<AcceptErrorLabels, Counter>,
    /// Connections each worker thread serves now (captured connections of every kind).
    pub worker_connections: Family<WorkerLabels, Gauge>,
}

/// Policy reloads by result (`applied`, `rejected`).
#[derive(Debug, Default)]
pub struct PolicyMetrics {
    pub reloads: Family<ResultLabels, Counter>,
}

/// Everything the agent exports.
pub struct Metrics {
    pub registry: Registry,
    pub tcp: Arc<TcpMetrics>,
    pub policy: Arc<PolicyMetrics>,
    pub http: Arc<HttpMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh");
        let tcp = Arc::new(TcpMetrics {
            opened: Family::default(),
            closed: Family::default(),
            active: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            upstream_connect_errors: Family::default(),
            upstream_connect: Family::new_with_constructor(connect_histogram as fn() -> Histogram),
            accept_errors: Family::default(),
            worker_connections: Family::default(),
        });
        let policy = Arc::new(PolicyMetrics::default());
        static NEXT_HTTP_METRICS: std::sync::atomic::AtomicU64 =
            std::sync::atomic::AtomicU64::new(0);
        let http = Arc::new(HttpMetrics {
            id: NEXT_HTTP_METRICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            requests: Family::default(),
            duration: Family::new_with_constructor(request_histogram as fn() -> Histogram),
        });
        let r = &mut registry;
        r.register(
            "tcp_connections_opened",
            "Proxied TCP connections opened",
            tcp.opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "Proxied TCP connections closed",
            tcp.closed.clone(),
        );
        r.register(
            "tcp_connections_active",
            "Proxied TCP connections open now",
            tcp.active.clone(),
        );
        r.register_with_unit(
            "tcp_sent",
            "Bytes sent from clients to upstreams",
            Unit::Bytes,
            tcp.sent_bytes.clone(),
        );
        r.register_with_unit(
            "tcp_received",
            "Bytes sent from upstreams to clients",
            Unit::Bytes,
            tcp.received_bytes.clone(),
        );
        r.register(
            "upstream_connect_errors",
            "Upstream connections that could not be established (after retries)",
            tcp.upstream_connect_errors.clone(),
        );
        r.register_with_unit(
            "upstream_connect_duration",
            "Time to establish an upstream TCP connection",
            Unit::Seconds,
            tcp.upstream_connect.clone(),
        );
        r.register(
            "accept_errors",
            "Captured connections refused because accept failed, or because no socket was left for \
             the upstream side right after it, by reason (emfile: the agent's open-file limit, \
             enfile: the system's)",
            tcp.accept_errors.clone(),
        );
        r.register(
            "worker_connections",
            "Captured connections each worker thread serves now; a new connection goes to the \
             worker serving the fewest",
            tcp.worker_connections.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy reloads by result (applied, rejected)",
            policy.reloads.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests (HTTP/1 requests, HTTP/2 streams) by route, method and status class",
            http.requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "HTTP request duration, from the request head to the end of the response body",
            Unit::Seconds,
            http.duration.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry,
            tcp,
            policy,
            http,
        }
    }

    /// Adds the kernel counters of the capture program, read at each scrape once `capture` is
    /// set (the admin server answers before the programs are loaded).
    pub fn register_kernel(&mut self, capture: Arc<OnceLock<Arc<Mutex<Programs>>>>) {
        self.registry
            .register_collector(Box::new(KernelCollector { capture }));
    }

    /// Adds the HTTP proxy's counters, read at each scrape.
    pub fn register_http(&mut self, proxy: mesh_http::Proxy) {
        self.registry
            .register_collector(Box::new(HttpCollector { proxy }));
    }

    /// Adds the mTLS tunnel's counters and certificate expiries, read at each scrape.
    pub fn register_mesh(&mut self, mesh: Arc<OnceLock<Arc<crate::mesh::Mesh>>>) {
        self.registry
            .register_collector(Box::new(MeshCollector { mesh }));
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The registry in the classic Prometheus text format (0.0.4), for scrapers and tools that
    /// do not ask for OpenMetrics (`promtool check metrics`, curl).
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Capture program counters from the per-CPU map, summed at scrape time.
struct KernelCollector {
    capture: Arc<OnceLock<Arc<Mutex<Programs>>>>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(capture) = self.capture.get() else {
            return Ok(());
        };
        let values = capture.lock().unwrap_or_else(|e| e.into_inner()).counters();
        let Ok(values) = values else { return Ok(()) };
        let authz = capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .authz_counts();
        if !authz.is_empty() {
            let mut p = encoder.encode_descriptor(
                "xdp_packets",
                // The name is kept from when authorization ran only at XDP.
                "Packets decided by an authorization rule (TC on veths, XDP on other devices)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for c in &authz {
                let labels = [("rule", c.rule.as_str()), ("action", c.action)];
                ConstCounter::new(c.packets).encode(p.encode_family(&labels)?)?;
            }
            let mut b = encoder.encode_descriptor(
                "xdp",
                "Bytes decided by an authorization rule (TC on veths, XDP on other devices)",
                Some(&Unit::Bytes),
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for c in &authz {
                let labels = [("rule", c.rule.as_str()), ("action", c.action)];
                ConstCounter::new(c.bytes).encode(b.encode_family(&labels)?)?;
            }
        }
        let refused = capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .strict_refused();
        if !refused.is_empty() {
            let mut r = encoder.encode_descriptor(
                "mtls_strict_refused",
                "Plaintext connection openings to STRICT pods dropped, by the pod's host-side interface",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (iface, n) in &refused {
                ConstCounter::new(*n).encode(r.encode_family(&[("interface", iface.as_str())])?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "capture_packets",
            "Packets seen by the TC capture program, by what happened to them",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (name, v) in mesh_common::counters::NAMES.iter().zip(values) {
            let labels = [("result", *name)];
            let fam = m.encode_family(&labels)?;
            ConstCounter::new(v).encode(fam)?;
        }
        Ok(())
    }
}

/// The HTTP proxy's counters (node-wide; per-route labels are not exported yet).
#[derive(Debug)]
struct HttpCollector {
    proxy: mesh_http::Proxy,
}

impl Collector for HttpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.proxy.stats().snapshot();
        for (name, help, v) in [
            (
                "http_retries",
                "Upstream attempts repeated after a connect failure, reset or 503",
                s.retries,
            ),
            (
                "http_retries_over_budget",
                "Retries refused because the retry budget was spent",
                s.retries_over_budget,
            ),
            (
                "http_timeouts",
                "Requests answered 504 at a route timeout",
                s.timeouts,
            ),
            (
                "http_upstream_errors",
                "Upstream connect failures, resets and protocol errors",
                s.upstream_errors,
            ),
            (
                "http_no_healthy_endpoint",
                "Requests answered 503 for want of a healthy endpoint",
                s.no_healthy_endpoint,
            ),
            (
                "http_ejections",
                "Endpoints ejected by passive outlier detection",
                s.ejections,
            ),
            ("http_mirrors", "Requests mirrored", s.mirrors),
            (
                "http_upstream_denied",
                "Requests answered 403 because the destination's agent refused the tunnel stream",
                s.denied_upstream,
            ),
            (
                "http_tunneled_denied",
                "Requests from other nodes refused 403 here by an HTTP deny rule (source identity)",
                s.denied_tunneled,
            ),
        ] {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        // Every reason, zero included: the set is closed, and a dashboard sees the series
        // before the first refusal.
        let mut rejected = encoder.encode_descriptor(
            "http_rejected_requests",
            "HTTP/1 requests refused with 400 for malformed framing (RFC 9112), by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (why, n) in s.rejections() {
            let labels = [("reason", why.label())];
            ConstCounter::new(n).encode(rejected.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The log writer's count of lines it dropped (its queue full), once logging is set up.
static LOG_DROPS: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Makes `mesh_log_lines_dropped_total` read `counter` (the first call wins).
pub fn count_dropped_log_lines(counter: tracing_appender::non_blocking::ErrorCounter) {
    let _ = LOG_DROPS.set(counter);
}

/// Resident memory, CPU time and open file descriptors of the agent, from /proc/self, and the
/// log lines dropped.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = process_figures();
        let rss = ConstGauge::new(p.rss_bytes as i64);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory",
            "Resident set size",
            Some(&Unit::Bytes),
            rss.metric_type(),
        )?)?;
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "User and system CPU time",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let fds = ConstGauge::new(p.open_fds as i64);
        fds.encode(encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors",
            None,
            fds.metric_type(),
        )?)?;
        let dropped = ConstCounter::new(LOG_DROPS.get().map_or(0, |c| c.dropped_lines() as u64));
        dropped.encode(encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines (access logs included) dropped because the log writer's queue was full",
            None,
            dropped.metric_type(),
        )?)?;
        Ok(())
    }
}

/// What `process_figures` reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessFigures {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
}

pub fn process_figures() -> ProcessFigures {
    let mut f = ProcessFigures::default();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        f.rss_bytes = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024);
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of stat(5): indexes 11 and 12 after the ')'.
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .map_or(100.0, |v| v as f64);
        f.cpu_seconds = (ticks(11) + ticks(12)) / hz;
    }
    f.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_declared_once() {
        let mut m = Metrics::new();
        let proxy = mesh_http::Proxy::new(
            mesh_http::Config::default(),
            Arc::new(mesh_policy::PolicyStore::default()),
        );
        m.register_http(proxy);
        let labels = HttpLabels {
            route: "none".into(),
            method: "GET".into(),
            status_class: "2xx".into(),
        };
        m.http.requests.get_or_create(&labels).inc();
        let text = m.encode();
        assert!(
            text.contains("mesh_http_rejected_requests_total{reason=\"duplicate_host\"} 0"),
            "{text}"
        );
        for text in [m.encode(), m.encode_prometheus()] {
            let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
            let n = types.len();
            types.sort_unstable();
            types.dedup();
            assert_eq!(types.len(), n, "a family is declared twice:\n{text}");
        }
    }

    #[test]
    fn families_encode_with_the_prefix_and_units() {
        let m = Metrics::new();
        let l = TcpLabels {
            service: "shop/ledger".into(),
            protocol: "tcp".into(),
        };
        m.tcp.opened.get_or_create(&l).inc();
        m.tcp.sent_bytes.get_or_create(&l).inc_by(42);
        m.tcp.upstream_connect.get_or_create(&l).observe(0.002);
        m.policy
            .reloads
            .get_or_create(&ResultLabels {
                result: "applied".into(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(
                "mesh_tcp_connections_opened_total{service=\"shop/ledger\",protocol=\"tcp\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("mesh_tcp_sent_bytes_total{service=\"shop/ledger\",protocol=\"tcp\"} 42"),
            "{text}"
        );
        assert!(
            text.contains("mesh_upstream_connect_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("mesh_policy_reloads_total{result=\"applied\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mesh_process_resident_memory_bytes"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "OpenMetrics terminator");
    }

    #[test]
    fn process_figures_are_read() {
        let p = process_figures();
        assert!(p.rss_bytes > 0 && p.open_fds > 0, "{p:?}");
    }
}

/// The tunnel's counters, both sides, and the certificates' remaining lifetimes.
#[derive(Debug)]
struct MeshCollector {
    mesh: Arc<OnceLock<Arc<crate::mesh::Mesh>>>,
}

impl Collector for MeshCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use mesh_tunnel::HandshakeFailure;
        use prometheus_client::metrics::MetricType;
        use std::sync::atomic::Ordering;
        let Some(mesh) = self.mesh.get() else {
            return Ok(());
        };
        let sides = [
            ("client", mesh.client_stats().snapshot()),
            ("server", mesh.server_stats().snapshot()),
        ];
        let mut h = encoder.encode_descriptor(
            "tunnel_handshakes",
            "mTLS tunnel handshakes by side (client: this node dialled) and result",
            None,
            MetricType::Counter,
        )?;
        for (side, s) in &sides {
            let labels = [("side", *side), ("result", "ok")];
            ConstCounter::new(s.handshakes_ok).encode(h.encode_family(&labels)?)?;
            for kind in HandshakeFailure::ALL {
                let labels = [("side", *side), ("result", kind.as_str())];
                ConstCounter::new(s.handshakes_failed(kind)).encode(h.encode_family(&labels)?)?;
            }
        }
        for (name, help, kind, value) in [
            (
                "tunnel_connections_open",
                "mTLS tunnel connections (TLS + HTTP/2) open now",
                MetricType::Gauge,
                (|s: &mesh_tunnel::StatsSnapshot| s.connections_open) as fn(&_) -> u64,
            ),
            (
                "tunnel_connections",
                "mTLS tunnel connections opened",
                MetricType::Counter,
                |s| s.connections_opened,
            ),
            (
                "tunnel_streams_open",
                "Tunneled connections (HTTP/2 CONNECT streams) open now",
                MetricType::Gauge,
                |s| s.streams_open,
            ),
            (
                "tunnel_streams",
                "Tunneled connections (HTTP/2 CONNECT streams) established",
                MetricType::Counter,
                |s| s.streams_opened,
            ),
            (
                "tunnel_streams_refused",
                "CONNECT streams the receiving agent refused (denied, not a workload of its node, unreachable)",
                MetricType::Counter,
                |s| s.streams_refused,
            ),
            (
                "tunnel_keepalive_failures",
                "mTLS tunnel connections closed because the peer left a keepalive PING unanswered",
                MetricType::Counter,
                |s| s.keepalive_failures,
            ),
        ] {
            let mut f = encoder.encode_descriptor(name, help, None, kind)?;
            for (side, s) in &sides {
                let labels = [("side", *side)];
                match kind {
                    MetricType::Gauge => {
                        ConstGauge::new(value(s) as i64).encode(f.encode_family(&labels)?)?
                    }
                    _ => ConstCounter::new(value(s)).encode(f.encode_family(&labels)?)?,
                }
            }
        }
        let c = &mesh.inbound;
        let mut d = encoder.encode_descriptor(
            "tunnel_inbound",
            "Tunneled connections this node's agent decided, by result (allowed, denied by \
             authorization, not_here: no enrolled workload of this node, unreachable: the pod \
             refused)",
            None,
            MetricType::Counter,
        )?;
        for (result, v) in [
            ("allowed", &c.allowed),
            ("denied", &c.denied),
            ("not_here", &c.not_here),
            ("unreachable", &c.unreachable),
        ] {
            let labels = [("result", result)];
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(d.encode_family(&labels)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "certificate_expiry",
            "Time left until the current certificate of each workload identity this node holds expires",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (id, left) in mesh.expiries() {
            let id = id.to_string();
            let labels = [("identity", id.as_str())];
            ConstGauge::new(left).encode(e.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
