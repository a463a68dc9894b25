//! Coexistence with kube-proxy: with its Service DNAT rules in the node (nftables, iptables-legacy
//! and iptables-nft), a captured pod's connection to a Service VIP still reaches the agent with
//! the VIP as original destination, is routed by HTTPRoute, TLSRoute and TCPRoute, and the agent's
//! own upstream connection to a VIP is still DNATed to an endpoint by kube-proxy's OUTPUT rule.
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, TcpStream},
    path::PathBuf,
    thread,
    time::Duration,
};

use mesh_tests::{
    Agent, KubeProxyMode, Topology,
    policy::{service, write_atomically},
    privileged,
    servers::{TIMEOUT, greeter, sa},
    tls::Ca,
};
use serde_json::Value;

const HTTP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const TLS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 43);
const TCP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);
/// A Service the policy does not know: captured by prefix, forwarded to the VIP itself.
const PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn scratch(t: &Topology) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{}-files", t.id));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn v4(ip: Ipv4Addr) -> IpAddr {
    IpAddr::V4(ip)
}

/// The agent's table as `nft list` prints it, or `None` when it does not exist.
fn notrack_table(t: &Topology) -> Option<String> {
    let out = t
        .node
        .cmd("nft")
        .args(["list", "table", "inet", "skiff_capture"])
        .output()
        .expect("nft");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn closed_connections(agent: &Agent) -> Vec<(String, String)> {
    agent
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "connection closed")
        .map(|l| {
            (
                l["span"]["dst"].as_str().unwrap_or("").to_string(),
                l["span"]["route"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Connects from `pod` to `addr`, reads the greeter's line, sends `msg` and reads it back.
fn greet_and_echo(
    t: &Topology,
    pod: &str,
    addr: std::net::SocketAddr,
    msg: &str,
) -> (String, String) {
    let mut s = t
        .pod(pod)
        .ns
        .run(move || TcpStream::connect_timeout(&addr, TIMEOUT))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut greeting = String::new();
    r.read_line(&mut greeting).expect("greeting");
    s.write_all(format!("{msg}\n").as_bytes()).expect("send");
    let mut echoed = String::new();
    r.read_line(&mut echoed).expect("echo");
    let _ = s.shutdown(Shutdown::Write);
    (greeting.trim().to_string(), echoed.trim().to_string())
}

/// Pods, backends, kube-proxy rules for four Services (each DNATed by kube-proxy to a pod the
/// mesh's route does not choose, so the test tells who routed), the policy, and the agent.
fn services_through_kube_proxy(mode: KubeProxyMode, test: &str) {
    if !privileged(test) {
        return;
    }
    let t = Topology::new(&[
        "client",
        "web",
        "canary",
        "tls-a",
        "tls-default",
        "tcp",
        "decoy",
        "plain",
    ]);
    let dir = scratch(&t);
    let pod_ip = |p: &str| t.pod(p).ip4;

    for b in ["web", "canary"] {
        t.pod(b).ns.echo(b, 8080, &[]);
    }
    let ca = Ca::new(&dir.join("ca"));
    let (a_cert, a_key) = ca.leaf("tls-a", &["a.example.com"]);
    let (d_cert, d_key) = ca.leaf("tls-default", &["*.example.com"]);
    for (pod, cert, key) in [("tls-a", &a_cert, &a_key), ("tls-default", &d_cert, &d_key)] {
        t.pod(pod).ns.echo(
            pod,
            8443,
            &[
                "--tls",
                cert.to_str().expect("utf8"),
                key.to_str().expect("utf8"),
            ],
        );
    }
    greeter(&t.pod("tcp").ns, sa(pod_ip("tcp"), 9000), "tcp");
    greeter(&t.pod("decoy").ns, sa(pod_ip("decoy"), 9000), "decoy");
    greeter(&t.pod("plain").ns, sa(pod_ip("plain"), 8080), "plain");

    // kube-proxy's view: each VIP goes to one endpoint.
    t.kube_proxy_service(mode, HTTP_VIP, 80, pod_ip("web"), 8080);
    t.kube_proxy_service(mode, TLS_VIP, 443, pod_ip("tls-default"), 8443);
    t.kube_proxy_service(mode, TCP_VIP, 9000, pod_ip("decoy"), 9000);
    t.kube_proxy_service(mode, PLAIN_VIP, 80, pod_ip("plain"), 8080);

    let policy = [
        service("web", v4(HTTP_VIP), 80, 8080, &[v4(pod_ip("web"))]),
        service("canary", "10.96.1.80".parse().expect("ip"), 80, 8080, &[v4(pod_ip("canary"))]),
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-canary, namespace: mesh-test}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  \
         - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-routed-by, value: skiff}]}}]\n    \
         backendRefs: [{name: canary, port: 80}]\n"
            .to_string(),
        service("tls-front", v4(TLS_VIP), 443, 8443, &[v4(pod_ip("tls-default"))]),
        service("tls-a", "10.96.1.43".parse().expect("ip"), 443, 8443, &[v4(pod_ip("tls-a"))]),
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: to-a, namespace: mesh-test}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: tls-front, port: 443}]\n  hostnames: [a.example.com]\n  \
         rules:\n  - backendRefs: [{name: tls-a, port: 443}]\n"
            .to_string(),
        service("tcp-front", v4(TCP_VIP), 9000, 9000, &[v4(pod_ip("decoy"))]),
        service("tcp-b", "10.96.1.90".parse().expect("ip"), 9000, 9000, &[v4(pod_ip("tcp"))]),
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: to-tcp, namespace: mesh-test}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: tcp-front, port: 9000}]\n  \
         rules:\n  - backendRefs: [{name: tcp-b, port: 9000}]\n"
            .to_string(),
    ]
    .concat();
    let pfile = dir.join("policy.yaml");
    write_atomically(&pfile, &policy);
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        pfile.to_str().expect("utf8"),
        "--capture",
        &format!("{PLAIN_VIP}/32=80"),
    ]);
    let table = notrack_table(&t).expect("the agent installed its notrack table");
    assert!(
        table.contains("priority raw") && table.contains("notrack"),
        "{table}"
    );
    let curl = |args: &[&str]| {
        t.pod("client")
            .ns
            .cmd("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output()
            .expect("curl")
    };

    // HTTP: the HTTPRoute's backend (not kube-proxy's) answers, with the injected header.
    let out = curl(&[&format!("http://{HTTP_VIP}/hello")]);
    assert!(
        out.status.success(),
        "HTTP via {HTTP_VIP}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    let body: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(body["backend"], "canary", "{body}");
    assert_eq!(body["headers"]["x-routed-by"], "skiff", "{body}");
    assert_eq!(body["path"], "/hello");

    // TLS: routed by SNI to tls-a; curl verified tls-a's own certificate for a.example.com.
    let out = curl(&[
        "--cacert",
        ca.cert.to_str().expect("utf8"),
        "--resolve",
        &format!("a.example.com:443:{TLS_VIP}"),
        "https://a.example.com/tls",
    ]);
    assert!(
        out.status.success(),
        "TLS via {TLS_VIP}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    let body: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(body["backend"], "tls-a", "{body}");

    // TCP: the TCPRoute's backend greets, and bytes go both ways.
    let (greeting, echoed) =
        greet_and_echo(&t, "client", sa(TCP_VIP, 9000), "bytes via kube-proxy");
    assert!(greeting.ends_with("server=tcp"), "{greeting}");
    assert_eq!(echoed, "bytes via kube-proxy");

    // No route: the agent connects to the VIP itself and kube-proxy's OUTPUT DNAT picks the pod.
    let (greeting, echoed) = greet_and_echo(&t, "client", sa(PLAIN_VIP, 80), "plain");
    // The backend's peer is a node address (the agent's upstream), not the client pod.
    assert!(
        t.pods
            .iter()
            .any(|p| greeting == format!("peer={} server=plain", p.gw4)),
        "the agent's upstream: {greeting}"
    );
    assert_eq!(echoed, "plain");

    thread::sleep(Duration::from_millis(300));
    let conns = closed_connections(&agent);
    for (dst, route) in [
        (format!("{HTTP_VIP}:80"), None),
        (format!("{TLS_VIP}:443"), Some("TLSRoute mesh-test/to-a")),
        (format!("{TCP_VIP}:9000"), Some("TCPRoute mesh-test/to-tcp")),
        (format!("{PLAIN_VIP}:80"), None),
    ] {
        assert!(
            conns
                .iter()
                .any(|(d, r)| *d == dst && route.is_none_or(|route| r == route)),
            "the agent saw {dst} (route {route:?}) as original destination: {conns:?}\n{}",
            agent.log()
        );
    }
    let routed_http = agent.log_lines().into_iter().any(|l| {
        l["message"] == "request"
            && l["dst"] == format!("{HTTP_VIP}:80")
            && l["route"].as_str() == Some("HTTPRoute mesh-test/to-canary")
    });
    assert!(
        routed_http,
        "HTTP request line with the route:\n{}",
        agent.log()
    );
}

#[test]
fn nftables_kube_proxy_services_reach_routed_backends() {
    services_through_kube_proxy(
        KubeProxyMode::Nftables,
        "nftables_kube_proxy_services_reach_routed_backends",
    );
}

#[test]
fn iptables_legacy_kube_proxy_services_reach_routed_backends() {
    services_through_kube_proxy(
        KubeProxyMode::IptablesLegacy,
        "iptables_legacy_kube_proxy_services_reach_routed_backends",
    );
}

#[test]
fn iptables_nft_kube_proxy_services_reach_routed_backends() {
    services_through_kube_proxy(
        KubeProxyMode::IptablesNft,
        "iptables_nft_kube_proxy_services_reach_routed_backends",
    );
}

/// Why the table exists: switched off, kube-proxy's PREROUTING DNAT breaks the captured
/// connection (the handshake never completes and the agent accepts nothing).
#[test]
fn without_notrack_prerouting_dnat_breaks_captured_connections() {
    if !privileged("without_notrack_prerouting_dnat_breaks_captured_connections") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let server = t.pod("server");
    greeter(&server.ns, sa(server.ip4, 8080), "server");
    t.kube_proxy_service(KubeProxyMode::Nftables, PLAIN_VIP, 80, server.ip4, 8080);
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--capture",
        &format!("{PLAIN_VIP}/32=80"),
        "--kube-proxy-notrack",
        "false",
    ]);
    assert!(notrack_table(&t).is_none(), "switched off: no table");
    let out = t
        .pod("client")
        .ns
        .cmd("curl")
        .args(["-sS", "--max-time", "3", &format!("http://{PLAIN_VIP}/")])
        .output()
        .expect("curl");
    assert!(!out.status.success(), "expected the bug without notrack");
    assert!(
        closed_connections(&agent).is_empty(),
        "the agent accepted nothing:\n{}",
        agent.log()
    );
}

#[test]
fn the_notrack_table_is_replaced_after_a_crash_and_removed_on_stop() {
    if !privileged("the_notrack_table_is_replaced_after_a_crash_and_removed_on_stop") {
        return;
    }
    let t = Topology::new(&["client"]);
    let args = [
        "--interface",
        &t.pod("client").host_if,
        "--capture",
        "10.96.0.0/16=80",
    ];
    let mut first = t.start_agent(&args);
    assert!(notrack_table(&t).is_some(), "installed at start");
    first.kill();
    assert!(notrack_table(&t).is_some(), "a SIGKILLed agent leaves it");

    let mut second = t.start_agent(&args);
    let table = notrack_table(&t).expect("installed");
    assert_eq!(
        table.matches("notrack").count(),
        1,
        "replaced, not duplicated:\n{table}"
    );
    let status = second.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", second.log());
    assert!(
        notrack_table(&t).is_none(),
        "removed on stop:\n{}",
        second.log()
    );
}

/// The notrack table is `inet`: an IPv6 Service VIP behind kube-proxy's ip6 rules works too, in
/// each mode, with the agent's upstream DNATed by the OUTPUT rule.
#[test]
fn ipv6_service_vip_through_each_kube_proxy_mode() {
    if !privileged("ipv6_service_vip_through_each_kube_proxy_mode") {
        return;
    }
    let vip: std::net::Ipv6Addr = "fd00:96::10".parse().expect("ip");
    for mode in [
        KubeProxyMode::Nftables,
        KubeProxyMode::IptablesLegacy,
        KubeProxyMode::IptablesNft,
    ] {
        let t = Topology::new(&["client", "server"]);
        let server = t.pod("server");
        greeter(&server.ns, sa(server.ip6, 8080), "server");
        t.kube_proxy_service(mode, vip, 80, server.ip6, 8080);
        let agent = t.start_agent(&[
            "--interface",
            &t.pod("client").host_if,
            "--capture",
            "fd00:96::/64=80",
        ]);
        let (greeting, echoed) = greet_and_echo(&t, "client", sa(vip, 80), "over IPv6");
        assert!(
            greeting.ends_with("server=server")
                && !greeting.contains(&t.pod("client").ip6.to_string()),
            "{mode:?}: the agent connected to the backend: {greeting}"
        );
        assert_eq!(echoed, "over IPv6", "{mode:?}");
        thread::sleep(Duration::from_millis(200));
        let conns = closed_connections(&agent);
        assert!(
            conns.iter().any(|(d, _)| *d == format!("[{vip}]:80")),
            "{mode:?}: the agent saw the VIP as original destination: {conns:?}"
        );
    }
}
