//! L4 authorization, driven directly: the test process loads the eBPF object mesh-agent's
//! build script produced, and calls the agent's own writer and attacher
//! (`mesh_agent::ebpf::authz`) with plans compiled by `mesh_policy::AuthzPlan`, inside the node
//! namespace. On the topology's veths the agent attaches `authorize_tc` at TC ingress; the XDP
//! program `authorize`, the same decision for other devices, is attached by force in
//! `xdp_program_decides_like_the_tc_one`.
//!
//! Semantics kept here: any matching deny drops; else any matching allow passes; else the
//! interface's default (allow when none is configured). Rules match on source prefix,
//! destination prefix, protocol and destination port range.
use std::{
    collections::HashMap,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Netns, Topology, privileged,
    servers::{greeter, greeting, sa},
};

use mesh_agent::ebpf::{
    self,
    attach::{Attached, Mode},
    authz,
};
use mesh_policy::{AuthzAction as Action, AuthzPlan, AuthzProtocol, AuthzRule, PortRange, Prefix};

/// Transport a test rule matches.
#[derive(Clone, Copy, Debug)]
enum Protocol {
    Tcp,
    Udp,
    Any,
}

/// A rule as the tests write it: with the counter id it must get, so that assertions can read
/// its counters.
#[derive(Clone, Debug)]
struct Rule {
    id: u32,
    name: String,
    interfaces: Option<Vec<String>>,
    src: Option<(IpAddr, u8)>,
    dst: Option<(IpAddr, u8)>,
    ports: Option<(u16, u16)>,
    protocol: Protocol,
    action: Action,
}

#[derive(Clone, Debug)]
struct RuleSet {
    rules: Vec<Rule>,
    defaults: HashMap<String, Action>,
}

impl RuleSet {
    /// The plan mesh-policy compiles from these rules, and each rule's counter id.
    fn plan(&self) -> (AuthzPlan, Vec<u32>) {
        let prefix = |p: Option<(IpAddr, u8)>| p.map(|(a, l)| Prefix::new(a, l).expect("prefix"));
        let rules = self
            .rules
            .iter()
            .map(|r| AuthzRule {
                key: r.name.clone(),
                rule: r.name.clone(),
                action: r.action,
                interfaces: r.interfaces.as_ref().map(|l| {
                    l.iter()
                        .map(|i| i.parse().expect("interface name"))
                        .collect()
                }),
                src: prefix(r.src),
                dst: prefix(r.dst),
                ports: r.ports.map(|(a, b)| PortRange::new(a, b).expect("ports")),
                protocol: match r.protocol {
                    Protocol::Tcp => Some(AuthzProtocol::Tcp),
                    Protocol::Udp => Some(AuthzProtocol::Udp),
                    Protocol::Any => None,
                },
            })
            .collect();
        let defaults = self
            .defaults
            .iter()
            .map(|(i, a)| (i.parse().expect("interface name"), *a))
            .collect();
        let plan = AuthzPlan::compile(rules, defaults).expect("the rules fit");
        (plan, self.rules.iter().map(|r| r.id).collect())
    }
}

/// How long a client waits before calling a flow dropped.
const DROP_TIMEOUT: Duration = Duration::from_millis(700);

/// The eBPF object built by mesh-agent's build script: `MESH_EBPF_OBJECT`, or the newest
/// `build/mesh-agent-*/out/mesh-ebpf` next to this test binary (same target dir).
fn object() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_EBPF_OBJECT") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // <target>/<profile>/deps/authz-<hash>
    let profile = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(profile.join("build"))
        .expect("target build dir")
        .flatten()
    {
        if !e.file_name().to_string_lossy().starts_with("mesh-agent-") {
            continue;
        }
        let p = e.path().join("out/mesh-ebpf");
        if let Ok(m) = p.metadata().and_then(|m| m.modified())
            && best.as_ref().is_none_or(|(t, _)| m > *t)
        {
            best = Some((m, p));
        }
    }
    best.map(|(_, p)| p).unwrap_or_else(|| {
        panic!(
            "no mesh-ebpf object under {}: run `cargo build -p mesh-agent` with the same target dir first",
            profile.display()
        )
    })
}

/// A loaded object whose authorization program is driven from the node namespace.
struct Authz {
    node: Netns,
    bpf: Option<aya::Ebpf>,
    attached: Vec<Attached>,
    /// Counter ids already used, so that only new ones are zeroed (as the agent does).
    seen: std::collections::BTreeSet<u32>,
}

impl Authz {
    fn load(t: &Topology) -> Authz {
        let bpf = aya::Ebpf::load_file(object()).expect("load the eBPF object");
        Authz {
            node: t.node.clone(),
            bpf: Some(bpf),
            attached: Vec::new(),
            seen: Default::default(),
        }
    }

    /// Runs `f` with the object on a thread inside the node namespace.
    fn in_node<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut aya::Ebpf) -> T + Send + 'static,
    ) -> T {
        let mut bpf = self.bpf.take().expect("object");
        let (bpf, out) = self.node.run(move || {
            let out = f(&mut bpf);
            (bpf, out)
        });
        self.bpf = Some(bpf);
        out
    }

    fn apply(&mut self, rules: &RuleSet) -> Result<(), ebpf::Error> {
        let (plan, ids) = rules.plan();
        let fresh: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|i| self.seen.insert(*i))
            .collect();
        self.in_node(move |bpf| authz::write(bpf, &plan, &ids, &fresh))
    }

    fn attach(&mut self, t: &Topology, ifaces: &[&str]) {
        let ifaces: Vec<mesh_policy::InterfaceName> = ifaces
            .iter()
            .map(|s| s.parse().expect("interface name"))
            .collect();
        let dir = t.bpffs_dir.clone();
        let tcx = ebpf::kernel::Kernel::probe().tcx;
        let a = self
            .in_node(move |bpf| authz::attach(bpf, &ifaces, &dir, tcx))
            .expect("attach");
        self.attached.extend(a);
    }

    /// Detaches every attached program, from the node namespace: a clsact filter is removed
    /// by a netlink request that names the interface by index in the caller's namespace.
    fn detach(&mut self) {
        let attached = std::mem::take(&mut self.attached);
        self.node
            .run(move || ebpf::attach::detach_all(attached))
            .expect("detach");
    }

    fn stats(&self) -> authz::Stats {
        authz::stats(self.bpf.as_ref().expect("object")).expect("stats")
    }

    fn rule_packets(&self, id: u32) -> u64 {
        self.stats().rules.get(&id).map_or(0, |c| c.packets)
    }
}

/// Name and type of the program behind the link pinned at `pin` (bpftool 7.1 does not list
/// TCX links in `bpftool net`).
fn pinned_program(pin: &std::path::Path) -> (String, String) {
    let json = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("bpftool");
        serde_json::from_slice(&out.stdout).expect("bpftool JSON")
    };
    let link = json(&["link", "show", "pinned", &pin.to_string_lossy()]);
    let id = link["prog_id"].as_u64().expect("prog_id").to_string();
    let prog = json(&["prog", "show", "id", &id]);
    let field = |k: &str| prog[k].as_str().unwrap_or("").to_string();
    (field("name"), field("type"))
}

/// Whether `ip link` shows an XDP program on `iface`.
fn xdp_attached(ns: &Netns, iface: &str) -> bool {
    let out = ns.sh(&["ip", "-d", "link", "show", iface]);
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

fn ifindex(ns: &Netns, iface: &str) -> u32 {
    let iface = iface.to_string();
    ns.run(move || nix::net::if_::if_nametoindex(iface.as_str()).expect("ifindex"))
}

fn prefix(s: &str) -> (IpAddr, u8) {
    let (a, l) = s.split_once('/').expect("prefix");
    (a.parse().expect("addr"), l.parse().expect("len"))
}

fn rule(id: u32, iface: &str, dst: Option<&str>, ports: Option<(u16, u16)>) -> Rule {
    Rule {
        id,
        name: format!("rule-{id}"),
        interfaces: Some(vec![iface.to_string()]),
        src: None,
        dst: dst.map(prefix),
        ports,
        protocol: Protocol::Tcp,
        action: Action::Deny,
    }
}

fn connects(ns: &Netns, addr: SocketAddr) -> bool {
    match ns.run(move || TcpStream::connect_timeout(&addr, DROP_TIMEOUT)) {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::TimedOut => false,
        Err(e) => panic!("connecting to {addr}: unexpected {e} (dropped flows time out)"),
    }
}

/// A UDP socket in `ns` bound to `addr`, with a short read timeout.
fn udp_receiver(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let s = ns.run(move || UdpSocket::bind(addr).expect("bind udp"));
    s.set_read_timeout(Some(DROP_TIMEOUT)).expect("timeout");
    s
}

fn udp_send(ns: &Netns, to: SocketAddr, payload: Vec<u8>) {
    ns.run(move || {
        let any: SocketAddr = if to.is_ipv4() {
            sa(Ipv4Addr::UNSPECIFIED, 0)
        } else {
            "[::]:0".parse().expect("addr")
        };
        let s = UdpSocket::bind(any).expect("bind sender");
        s.send_to(&payload, to).expect("send");
    });
}

fn received(s: &UdpSocket) -> Option<usize> {
    let mut buf = vec![0u8; 65536];
    match s.recv_from(&mut buf) {
        Ok((n, _)) => Some(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv: {e}"),
    }
}

#[test]
fn denied_flow_is_dropped_and_counted_allowed_flow_passes() {
    if !privileged("denied_flow_is_dropped_and_counted_allowed_flow_passes") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 9000), "s9000");
    greeter(&server.ns, sa(server.ip4, 8080), "s8080");
    assert!(
        connects(&client.ns, sa(server.ip4, 9000)),
        "reachable before"
    );

    let mut x = Authz::load(&t);
    x.apply(&RuleSet {
        rules: vec![rule(
            10,
            &client.host_if,
            Some(&format!("{}/32", server.ip4)),
            Some((9000, 9000)),
        )],
        defaults: HashMap::new(),
    })
    .expect("apply");
    x.attach(&t, &[&client.host_if]);
    let a = &x.attached[0];
    let prog: &aya::programs::SchedClassifier = x
        .bpf
        .as_ref()
        .and_then(|b| b.program(authz::TC_PROGRAM))
        .expect("program")
        .try_into()
        .expect("TC classifier");
    let verified = prog
        .info()
        .expect("info")
        .verified_instruction_count()
        .expect("kernel reports verified instructions");
    eprintln!(
        "attached to {}: mode {}, {verified} instructions verified",
        a.iface,
        a.mode.as_str()
    );
    // Headroom under the verifier's 1M budget: a change that makes the paths multiply shows here.
    assert!(verified < 100_000, "verifier work: {verified}");
    assert_eq!(
        a.mode.hook(),
        "tc ingress",
        "a veth gets TC authorization, not XDP (which costs it TSO/GSO)"
    );
    // A TCX link (6.6+) is pinned; a clsact filter (older kernels) has no link to pin.
    let pin = a.pin.clone();
    match a.mode {
        Mode::Tcx => assert_eq!(
            pinned_program(pin.as_deref().expect("a TCX link is pinned")),
            (authz::TC_PROGRAM.to_string(), "sched_cls".to_string()),
            "the pinned link runs the TC program"
        ),
        Mode::Clsact => {
            assert!(pin.is_none(), "a clsact filter is not pinned");
            let out = t
                .node
                .sh(&["tc", "filter", "show", "dev", &client.host_if, "ingress"]);
            let filters = String::from_utf8_lossy(&out.stdout);
            assert!(
                filters.contains(authz::TC_PROGRAM),
                "the clsact filter runs the TC program: {filters}"
            );
        }
        other => panic!("a veth gets TCX or clsact, not {other:?}"),
    }
    assert!(
        !xdp_attached(&t.node, &client.host_if),
        "no XDP program on the veth"
    );

    assert!(
        !connects(&client.ns, sa(server.ip4, 9000)),
        "9000 is denied: the SYN must be dropped"
    );
    let deny = x.stats().rules[&10];
    assert!(
        deny.packets >= 1,
        "the deny rule counted the SYN(s): {deny:?}"
    );
    assert!(deny.bytes >= deny.packets * 54, "bytes counted: {deny:?}");

    let g = greeting(&client.ns, sa(server.ip4, 8080)).expect("8080 allowed");
    assert_eq!(g, format!("peer={} server=s8080", client.ip4));
    let after = x.stats();
    assert_eq!(
        after.rules[&10].packets, deny.packets,
        "8080 did not hit the deny rule"
    );
    let idx = ifindex(&t.node, &client.host_if);
    let iface = after.interfaces[&idx].counters;
    assert!(
        iface.default_allow.packets >= 4,
        "the 8080 flow passed by the interface default: {iface:?}"
    );
    assert_eq!(iface.default_deny.packets, 0);

    x.detach();
    assert!(pin.is_none_or(|p| !p.exists()), "detached: the pin is gone");
    assert!(
        connects(&client.ns, sa(server.ip4, 9000)),
        "reachable again after detach"
    );
}

/// The XDP program, which the agent attaches to devices other than veths, decides as the TC one
/// does: attached here by force (driver mode) to the veth, it drops the denied flow, counts it,
/// and lets the other one through.
#[test]
fn xdp_program_decides_like_the_tc_one() {
    if !privileged("xdp_program_decides_like_the_tc_one") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 9000), "s9000");
    greeter(&server.ns, sa(server.ip4, 8080), "s8080");
    let mut x = Authz::load(&t);
    x.apply(&RuleSet {
        rules: vec![rule(
            10,
            &client.host_if,
            Some(&format!("{}/32", server.ip4)),
            Some((9000, 9000)),
        )],
        defaults: HashMap::new(),
    })
    .expect("apply");
    let iface: mesh_policy::InterfaceName = client.host_if.parse().expect("interface name");
    let pin = t.bpffs_dir.join(format!("authz-{iface}"));
    let a = x
        .in_node(move |bpf| {
            std::fs::create_dir_all(pin.parent().expect("pin dir")).expect("pin dir");
            ebpf::attach::xdp(authz::program(bpf)?, &iface, &pin)
        })
        .expect("attach XDP");
    assert_eq!(a.mode, Mode::Driver, "veth supports native XDP");
    x.attached.push(a);
    assert!(
        !connects(&client.ns, sa(server.ip4, 9000)),
        "9000 is denied: the SYN must be dropped"
    );
    assert!(x.rule_packets(10) >= 1, "the deny rule counted the SYN(s)");
    let g = greeting(&client.ns, sa(server.ip4, 8080)).expect("8080 allowed");
    assert_eq!(g, format!("peer={} server=s8080", client.ip4));
    x.detach();
    assert!(connects(&client.ns, sa(server.ip4, 9000)), "detached");
}

#[test]
fn default_deny_interface_with_one_allow_rule() {
    if !privileged("default_deny_interface_with_one_allow_rule") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 8080), "s8080");
    greeter(&server.ns, sa(server.ip4, 9000), "s9000");
    let mut allow = rule(
        1,
        &client.host_if,
        Some("10.201.2.0/24"),
        Some((8000, 8099)),
    );
    allow.action = Action::Allow;
    let mut x = Authz::load(&t);
    x.apply(&RuleSet {
        rules: vec![allow],
        defaults: HashMap::from([(client.host_if.clone(), Action::Deny)]),
    })
    .expect("apply");
    x.attach(&t, &[&client.host_if]);

    // ARP is not IP: it passes, so the first connection can resolve the gateway.
    let g = greeting(&client.ns, sa(server.ip4, 8080)).expect("8080 allowed");
    assert_eq!(g, format!("peer={} server=s8080", client.ip4));
    assert!(
        !connects(&client.ns, sa(server.ip4, 9000)),
        "9000 denied by default"
    );
    let s = x.stats();
    assert!(s.rules[&1].packets >= 4, "allow rule counted: {s:?}");
    let idx = ifindex(&t.node, &client.host_if);
    assert!(
        s.interfaces[&idx].counters.default_deny.packets >= 1,
        "default deny counted: {s:?}"
    );
}

#[test]
fn source_prefix_rule() {
    if !privileged("source_prefix_rule") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 8080), "s8080");
    let second = Ipv4Addr::new(10, 201, 1, 3);
    client
        .ns
        .sh(&["ip", "addr", "add", &format!("{second}/24"), "dev", "eth0"]);
    let mut r = rule(3, &client.host_if, None, None);
    r.src = Some((IpAddr::V4(second), 32));
    r.protocol = Protocol::Any;
    let mut x = Authz::load(&t);
    x.apply(&RuleSet {
        rules: vec![r],
        defaults: HashMap::new(),
    })
    .expect("apply");
    x.attach(&t, &[&client.host_if]);

    let from = |src: Ipv4Addr| {
        let to = sa(server.ip4, 8080);
        client.ns.run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.bind(&sa(src, 0).into()).expect("bind");
            match s.connect_timeout(&to.into(), DROP_TIMEOUT) {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::TimedOut => false,
                Err(e) => panic!("connect from {src}: {e}"),
            }
        })
    };
    assert!(from(client.ip4), "the pod's main address is not matched");
    assert!(!from(second), "the denied source is dropped");
    assert!(x.rule_packets(3) >= 1);
}

#[test]
fn udp_rule() {
    if !privileged("udp_rule") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let denied = udp_receiver(&server.ns, sa(server.ip4, 5353));
    let allowed = udp_receiver(&server.ns, sa(server.ip4, 5354));
    let mut r = rule(
        4,
        &client.host_if,
        Some("10.201.2.2/32"),
        Some((5353, 5353)),
    );
    r.protocol = Protocol::Udp;
    // A TCP rule on the same port must not catch UDP.
    let tcp = rule(
        5,
        &client.host_if,
        Some("10.201.2.2/32"),
        Some((5354, 5354)),
    );
    let mut x = Authz::load(&t);
    x.apply(&RuleSet {
        rules: vec![r, tcp],
        defaults: HashMap::new(),
    })
    .expect("apply");
    x.attach(&t, &[&client.host_if]);

    udp_send(&client.ns, sa(server.ip4, 5354), b"hello".to_vec());
    assert_eq!(received(&allowed), Some(5), "5354/udp passes");
    udp_send(&client.ns, sa(server.ip4, 5353), b"hello".to_vec());
    assert_eq!(received(&denied), None, "5353/udp is dropped");
    let s = x.stats();
    assert_eq!(s.rules[&4].packets, 1, "{s:?}");
    assert_eq!(s.rules[&5].packets, 0, "{s:?}");
}

#[test]
fn fragmented_udp_follows_its_first_fragment() {
    if !privileged("fragmented_udp_follows_its_first_fragment") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let ok = udp_receiver(&server.ns, sa(server.ip4, 6000));
    let denied = udp_receiver(&server.ns, sa(server.ip4, 6001));
    let mut allow = rule(1, &client.host_if, None, Some((6000, 6000)));
    allow.protocol = Protocol::Udp;
    allow.action = Action::Allow;
    let mut x = Authz::load(&t);
    x.apply(&RuleSet {
        rules: vec![allow],
        defaults: HashMap::from([(client.host_if.clone(), Action::Deny)]),
    })
    .expect("apply");
    x.attach(&t, &[&client.host_if]);

    // 4000 bytes over a 1500-byte MTU: three fragments, ports only in the first.
    udp_send(&client.ns, sa(server.ip4, 6000), vec![7; 4000]);
    assert_eq!(received(&ok), Some(4000), "allowed datagram reassembled");
    udp_send(&client.ns, sa(server.ip4, 6001), vec![7; 4000]);
    assert_eq!(
        received(&denied),
        None,
        "denied first fragment: nothing reassembled"
    );
    let s = x.stats();
    let idx = ifindex(&t.node, &client.host_if);
    let c = s.interfaces[&idx].counters;
    assert_eq!(
        s.rules[&1].packets, 1,
        "the allow rule judged the first fragment"
    );
    assert_eq!(
        c.fragments_passed.packets, 4,
        "later fragments passed: {c:?}"
    );
    // At least: IPv6 noise from the pod (MLD reports) is default-denied too.
    assert!(
        c.default_deny.packets >= 1,
        "the denied first fragment: {c:?}"
    );
}

#[test]
fn ipv6_rules_and_neighbour_discovery() {
    if !privileged("ipv6_rules_and_neighbour_discovery") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip6, 8080), "v6-8080");
    greeter(&server.ns, sa(server.ip6, 9000), "v6-9000");
    greeter(&server.ns, sa(server.ip6, 9001), "v6-9001");
    // Default deny: without the neighbour-discovery exemption nothing IPv6 would work at all.
    let mut allow = rule(1, &client.host_if, Some("fd00:201::/32"), None);
    allow.action = Action::Allow;
    let deny = rule(
        2,
        &client.host_if,
        Some("fd00:201:2::/48"),
        Some((9000, 9000)),
    );
    let mut x = Authz::load(&t);
    x.apply(&RuleSet {
        rules: vec![allow, deny],
        defaults: HashMap::from([(client.host_if.clone(), Action::Deny)]),
    })
    .expect("apply");
    x.attach(&t, &[&client.host_if]);

    let g = greeting(&client.ns, sa(server.ip6, 8080)).expect("8080 over IPv6");
    assert_eq!(g, format!("peer={} server=v6-8080", client.ip6));
    assert!(
        !connects(&client.ns, sa(server.ip6, 9000)),
        "[..]:9000 denied"
    );
    assert!(
        connects(&client.ns, sa(server.ip6, 9001)),
        "[..]:9001 allowed"
    );
    // IPv4 to the server: default deny (the rules are IPv6 only).
    greeter(&server.ns, sa(server.ip4, 8080), "v4");
    assert!(
        !connects(&client.ns, sa(server.ip4, 8080)),
        "IPv4 default deny"
    );
    let s = x.stats();
    assert!(s.rules[&1].packets >= 4, "{s:?}");
    assert!(s.rules[&2].packets >= 1, "{s:?}");
}

#[test]
fn all_interfaces_rules_and_unknown_interfaces() {
    if !privileged("all_interfaces_rules_and_unknown_interfaces") {
        return;
    }
    let t = Topology::new(&["client", "server", "other"]);
    let (client, server, other) = (t.pod("client"), t.pod("server"), t.pod("other"));
    greeter(&server.ns, sa(server.ip4, 9000), "s9000");
    let mut x = Authz::load(&t);
    let mut bad = rule(1, "nope0", None, None);
    bad.interfaces = Some(vec!["nope0".into(), client.host_if.clone()]);
    let err = x
        .apply(&RuleSet {
            rules: vec![bad],
            defaults: HashMap::new(),
        })
        .expect_err("unknown interface");
    assert_eq!(
        err.to_string(),
        "unknown interfaces in authorization rules: nope0"
    );

    let mut all = rule(7, "", Some("10.201.2.0/24"), Some((9000, 9000)));
    all.interfaces = None;
    x.apply(&RuleSet {
        rules: vec![all],
        defaults: HashMap::new(),
    })
    .expect("apply");
    // Attached after apply: the program starts with its rules.
    x.attach(&t, &[&client.host_if, &other.host_if]);
    assert!(!connects(&client.ns, sa(server.ip4, 9000)));
    assert!(!connects(&other.ns, sa(server.ip4, 9000)));
    assert!(x.rule_packets(7) >= 2);

    // Across the two lists: a deny for all interfaces beats the interface's own allow, and an
    // allow for all interfaces beats the interface's default deny.
    let mut own_allow = rule(8, &client.host_if, None, Some((9000, 9000)));
    own_allow.action = Action::Allow;
    let mut all_deny = rule(9, "", Some("10.201.2.2/32"), Some((9000, 9000)));
    all_deny.interfaces = None;
    x.apply(&RuleSet {
        rules: vec![own_allow.clone(), all_deny],
        defaults: HashMap::new(),
    })
    .expect("apply");
    assert!(!connects(&client.ns, sa(server.ip4, 9000)), "deny wins");
    assert!(x.rule_packets(9) >= 1 && x.rule_packets(8) == 0);
    let mut all_allow = rule(10, "", None, Some((9000, 9000)));
    all_allow.interfaces = None;
    all_allow.action = Action::Allow;
    x.apply(&RuleSet {
        rules: vec![all_allow],
        defaults: HashMap::from([(other.host_if.clone(), Action::Deny)]),
    })
    .expect("apply");
    assert!(
        connects(&other.ns, sa(server.ip4, 9000)),
        "allow beats the default"
    );
    greeter(&server.ns, sa(server.ip4, 9001), "s9001");
    assert!(!connects(&other.ns, sa(server.ip4, 9001)), "default deny");
    assert!(
        connects(&client.ns, sa(server.ip4, 9001)),
        "client has no default"
    );
}

/// Extension headers are walked to the transport header: they do not hide a denied port.
#[test]
fn ipv6_extension_headers_are_walked() {
    if !privileged("ipv6_extension_headers_are_walked") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let denied = udp_receiver(&server.ns, sa(server.ip6, 5353));
    let allowed = udp_receiver(&server.ns, sa(server.ip6, 5354));
    // Right after the topology is built, link-local addresses are still in duplicate address
    // detection and the node's neighbour solicitations go unanswered: a lone datagram would be
    // lost on the way. Resolve the neighbours first.
    greeter(&server.ns, sa(server.ip6, 8080), "warm-up");
    greeting(&client.ns, sa(server.ip6, 8080)).expect("TCP retransmits until resolved");
    let mut r = rule(
        1,
        &client.host_if,
        Some("fd00:201:2::2/128"),
        Some((5353, 5353)),
    );
    r.protocol = Protocol::Udp;
    let mut x = Authz::load(&t);
    x.apply(&RuleSet {
        rules: vec![r],
        defaults: HashMap::new(),
    })
    .expect("apply");
    x.attach(&t, &[&client.host_if]);

    let send = |port: u16| {
        let to = sa(server.ip6, port);
        client.ns.run(move || {
            let s = UdpSocket::bind("[::]:0").expect("bind");
            // Hop-by-hop and destination options headers, each 8 bytes of PadN.
            let opts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
            for opt in [libc::IPV6_HOPOPTS, libc::IPV6_DSTOPTS] {
                // SAFETY: valid socket fd, pointer and length of a local buffer.
                let r = unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&s),
                        libc::IPPROTO_IPV6,
                        opt,
                        opts.as_ptr().cast(),
                        opts.len() as libc::socklen_t,
                    )
                };
                assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
            }
            s.send_to(b"hello", to).expect("send");
        })
    };
    send(5354);
    assert_eq!(
        received(&allowed),
        Some(5),
        "5354 with extension headers passes"
    );
    send(5353);
    assert_eq!(
        received(&denied),
        None,
        "5353 behind extension headers is still denied"
    );
    assert_eq!(x.rule_packets(1), 1);
}

#[test]
fn a_second_loader_replaces_the_pinned_link_in_place() {
    if !privileged("a_second_loader_replaces_the_pinned_link_in_place") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 9000), "s9000");
    let deny = RuleSet {
        rules: vec![rule(1, &client.host_if, None, Some((9000, 9000)))],
        defaults: HashMap::new(),
    };
    let mut first = Authz::load(&t);
    first.apply(&deny).expect("apply");
    first.attach(&t, &[&client.host_if]);
    assert!(!first.attached[0].replaced);
    // The first "agent" goes away without detaching: its pinned link keeps enforcing.
    let first_mode = first.attached[0].mode;
    let attached = std::mem::take(&mut first.attached);
    first
        .node
        .run(move || attached.into_iter().for_each(ebpf::attach::release));
    drop(first);
    assert!(
        !connects(&client.ns, sa(server.ip4, 9000)),
        "pinned program still runs"
    );

    // The second one allows 9000: after the in-place update its rules apply.
    let mut second = Authz::load(&t);
    second
        .apply(&RuleSet {
            rules: vec![],
            defaults: HashMap::new(),
        })
        .expect("apply");
    second.attach(&t, &[&client.host_if]);
    let a = &second.attached[0];
    assert!(a.replaced, "the pinned link was updated, not recreated");
    assert_eq!(a.mode, first_mode, "mode read back from the kernel");
    assert!(connects(&client.ns, sa(server.ip4, 9000)));
    second.detach();
    assert!(
        !t.bpffs_dir
            .join(format!("authz-{}", client.host_if))
            .exists()
    );
}

/// While a client sends a steady UDP stream, the rule set flips between A (deny, rule 1) and B
/// (allow, rule 2) many times. Every packet must be decided by A or B: rule 1 + rule 2 counts
/// equal the packets sent, and the server received exactly rule 2's.
#[test]
fn reload_is_atomic_under_traffic() {
    if !privileged("reload_is_atomic_under_traffic") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let rx = udp_receiver(&server.ns, sa(server.ip4, 7000));
    let got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (got, stop) = (got.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if rx.recv_from(&mut buf).is_ok() {
                    got.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let set = |id: u32, action: Action| {
        let mut r = rule(
            id,
            &client.host_if,
            Some("10.201.2.2/32"),
            Some((7000, 7000)),
        );
        r.protocol = Protocol::Udp;
        r.action = action;
        RuleSet {
            rules: vec![r],
            defaults: HashMap::new(),
        }
    };
    let (a, b) = (set(1, Action::Deny), set(2, Action::Allow));
    let mut x = Authz::load(&t);
    x.apply(&a).expect("apply A");
    x.attach(&t, &[&client.host_if]);

    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let sending = sending.clone();
        let to = sa(server.ip4, 7000);
        client.ns.spawn(move || {
            let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            let mut sent = 0u64;
            while sending.load(Ordering::Relaxed) {
                if s.send_to(&sent.to_be_bytes(), to).is_ok() {
                    sent += 1;
                }
                // ~20k packets/s: well under what the veth and the receiver absorb.
                thread::sleep(Duration::from_micros(50));
            }
            sent
        })
    };
    let start = Instant::now();
    let mut flips = 0;
    while start.elapsed() < Duration::from_secs(3) {
        x.apply(if flips % 2 == 0 { &b } else { &a })
            .expect("apply");
        flips += 1;
    }
    sending.store(false, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    receiver.join().expect("receiver");

    let s = x.stats();
    let (denied, allowed) = (s.rules[&1].packets, s.rules[&2].packets);
    let got = got.load(Ordering::Relaxed);
    eprintln!("flips={flips} sent={sent} denied(A)={denied} allowed(B)={allowed} received={got}");
    assert!(flips >= 20, "the rule set flipped many times: {flips}");
    assert!(denied > 0 && allowed > 0, "both rule sets handled packets");
    assert_eq!(
        denied + allowed,
        sent,
        "every packet was decided by A or by B"
    );
    assert_eq!(got, allowed, "exactly B's packets arrived");
}

/// Drop rate of a UDP flood from a pod: the deny rule where the agent puts it on a veth (TC
/// ingress), then the XDP program forced into generic mode, against nftables drop rules (netdev ingress on the same veth, then inet prerouting), same
/// topology, same run. One sender thread; every phase drops everything sent, so the rate is the
/// whole per-packet cost (send syscall, pod stack, veth, drop) on one CPU.
/// `cargo test -p mesh-tests --test authz -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_xdp_vs_nftables_drop() {
    if !privileged("bench_xdp_vs_nftables_drop") {
        return;
    }
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let to = sa(server.ip4, 9999);
    let flood = |ns: &Netns| {
        ns.run(move || {
            let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            s.connect(to).expect("connect");
            let payload = [0u8; 18]; // 60-byte frames
            let (mut sent, mut failed) = (0u64, 0u64);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(secs) {
                for _ in 0..256 {
                    match s.send(&payload) {
                        Ok(_) => sent += 1,
                        Err(_) => failed += 1,
                    }
                }
            }
            (sent, failed, start.elapsed().as_secs_f64())
        })
    };
    let mut r = rule(
        1,
        &client.host_if,
        Some("10.201.2.2/32"),
        Some((9999, 9999)),
    );
    r.protocol = Protocol::Udp;
    let rules = RuleSet {
        rules: vec![r],
        defaults: HashMap::new(),
    };
    let nft_counter = |table: &str| {
        let out = t.node.sh(&["nft", "-j", "list", "table", table, "bench"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft json");
        v["nftables"]
            .as_array()
            .expect("nftables")
            .iter()
            .filter_map(|o| o["rule"]["expr"].as_array())
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64())
            .expect("nft counter")
    };
    let mut results = Vec::new();
    let mut report = |what: String, (sent, failed, secs): (u64, u64, f64), dropped: u64| {
        let line = format!(
            "{what:<28} sent {sent:>9} ({failed} send errors) in {secs:.1}s, dropped {dropped:>9} = {:>8.0} pkt/s",
            dropped as f64 / secs
        );
        println!("{line}");
        results.push(line);
    };

    // As attach() picks it: TC ingress on a veth.
    let mut x = Authz::load(&t);
    x.apply(&rules).expect("apply");
    x.attach(&t, &[&client.host_if]);
    let mode = x.attached[0].mode;
    let f = flood(&client.ns);
    report(
        format!("{} ({})", mode.hook(), mode.as_str()),
        f,
        x.rule_packets(1),
    );
    x.detach();
    drop(x);

    // XDP forced into generic mode (aya directly; the link dies with the object).
    let mut g = Authz::load(&t);
    g.apply(&rules).expect("apply");
    let iface = client.host_if.clone();
    g.in_node(move |bpf| {
        let p: &mut aya::programs::Xdp = bpf
            .program_mut(authz::PROGRAM)
            .expect("program")
            .try_into()
            .expect("xdp");
        p.load().expect("load");
        p.attach(&iface, aya::programs::XdpMode::Skb)
            .expect("attach generic");
    });
    let f = flood(&client.ns);
    report("XDP (generic, forced)".into(), f, g.rule_packets(1));
    drop(g);

    let h = &client.host_if;
    t.node.sh(&["nft", "add", "table", "netdev", "bench"]);
    t.node.sh(&[
        "nft",
        &format!(
            "add chain netdev bench in {{ type filter hook ingress device {h} priority 0 ; }}"
        ),
    ]);
    t.node.sh(&[
        "nft",
        "add rule netdev bench in ip daddr 10.201.2.2 udp dport 9999 counter drop",
    ]);
    let f = flood(&client.ns);
    report("nftables netdev ingress".into(), f, nft_counter("netdev"));
    t.node.sh(&["nft", "delete", "table", "netdev", "bench"]);

    t.node.sh(&["nft", "add", "table", "inet", "bench"]);
    t.node.sh(&[
        "nft",
        "add chain inet bench pre { type filter hook prerouting priority -300 ; }",
    ]);
    t.node.sh(&[
        "nft",
        "add rule inet bench pre ip daddr 10.201.2.2 udp dport 9999 counter drop",
    ]);
    let f = flood(&client.ns);
    report("nftables inet prerouting".into(), f, nft_counter("inet"));
    assert_eq!(results.len(), 4);
}
