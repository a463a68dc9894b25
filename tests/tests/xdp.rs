//! Authorization driven by the policy, through the agent: on the pod's veth it runs at TC
//! ingress before capture (`/status` says so), a denied flow is dropped before the stack sees it
//! (the client times out) and the rule's counter moves in `/metrics`, while an allowed flow on
//! the same interface is still captured and proxied; IPv6 rules; reloads.
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Netns, Topology,
    policy::write_atomically,
    privileged,
    servers::{greeter, greeting, sa},
};

fn policy(extra_rule: &str) -> String {
    format!(
        "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: authz, namespace: mesh-system}}\n\
         spec:\n  authorization:\n    rules:\n\
         \x20   - {{name: no-db, action: Deny, to: [10.201.2.0/24, \"fd00:201:2::/64\"], ports: [5432], protocol: TCP}}\n{extra_rule}"
    )
}

/// GET `path` from the agent's admin server in the node namespace.
fn admin(ns: &Netns, path: &str) -> String {
    ns.http_get(mesh_tests::ADMIN, path)
}

fn xdp_packets(metrics: &str, rule: &str, action: &str) -> u64 {
    let prefix = format!("mesh_xdp_packets_total{{rule=\"{rule}\",action=\"{action}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn times_out(ns: &Netns, to: SocketAddr) -> bool {
    let start = Instant::now();
    let r = ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)));
    matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::TimedOut)
        && start.elapsed() >= Duration::from_millis(1900)
}

#[test]
fn denied_flows_are_dropped_by_xdp_and_counted_while_allowed_ones_are_proxied() {
    if !privileged("denied_flows_are_dropped_by_xdp_and_counted_while_allowed_ones_are_proxied") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    for (ip, port, name) in [
        (IpAddr::V4(server.ip4), 5432, "db"),
        (IpAddr::V4(server.ip4), 8080, "web"),
        (IpAddr::V6(server.ip6), 5432, "db6"),
        (IpAddr::V4(server.ip4), 6000, "other"),
    ] {
        greeter(&server.ns, sa(ip, port), name);
    }
    let dir = std::env::temp_dir().join(format!("{}-files", t.id));
    std::fs::create_dir_all(&dir).expect("dir");
    let pfile = dir.join("policy.yaml");
    write_atomically(&pfile, &policy(""));
    let agent = t.start_agent(&[
        "--interface",
        &client.host_if,
        "--capture",
        "10.201.2.0/24=8080",
        "--policy",
        pfile.to_str().expect("utf8"),
    ]);
    let raw = admin(&t.node, "/status");
    let body = raw.split_once("\r\n\r\n").map_or(raw.as_str(), |(_, b)| b);
    let status: serde_json::Value = serde_json::from_str(body).expect("status JSON");
    let ifaces = &status["authorization"]["interfaces"];
    let h1 = ifaces
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "h1"))
        .unwrap_or_else(|| panic!("h1 in the authorization interfaces: {status}"));
    assert_eq!(
        h1["hook"], "tc ingress",
        "a veth gets TC authorization: {h1}"
    );
    assert!(
        h1["mode"] == "tcx" || h1["mode"] == "clsact",
        "TC attach mode: {h1}"
    );
    assert!(
        status["authorization"]["placement"]
            .as_str()
            .is_some_and(|p| p.contains("TSO/GSO")),
        "/status says why: {status}"
    );
    assert!(
        agent.log().contains("authorization attached at TC ingress"),
        "attach logged:\n{}",
        agent.log()
    );

    // Denied: dropped before capture, so the SYN never gets an answer.
    assert!(
        times_out(&client.ns, sa(server.ip4, 5432)),
        "IPv4 5432 must time out"
    );
    assert!(
        times_out(&client.ns, sa(server.ip6, 5432)),
        "IPv6 5432 must time out"
    );
    // Allowed on the same interface: captured and proxied (the server sees the node).
    assert_eq!(
        greeting(&client.ns, sa(server.ip4, 8080)).expect("8080"),
        format!("peer={} server=web", server.gw4)
    );
    // Not targeted, not denied: direct.
    assert_eq!(
        greeting(&client.ns, sa(server.ip4, 6000)).expect("6000"),
        format!("peer={} server=other", client.ip4)
    );

    let m = admin(&t.node, "/metrics");
    let denied = xdp_packets(&m, "no-db", "deny");
    assert!(
        denied >= 2,
        "SYNs (and retries) of both families counted: {denied}\n{m}"
    );

    // Reload: deny 6000 as well; the old rule stays in force throughout.
    write_atomically(
        &pfile,
        &policy("    - {name: no-6000, action: Deny, to: [10.201.2.0/24], ports: [6000]}\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.log().matches("policy reloaded").count() < 1 {
        assert!(Instant::now() < deadline, "reload:\n{}", agent.log());
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        times_out(&client.ns, sa(server.ip4, 6000)),
        "6000 denied after the reload"
    );
    assert!(
        times_out(&client.ns, sa(server.ip4, 5432)),
        "5432 still denied"
    );
    assert!(
        greeting(&client.ns, sa(server.ip4, 8080)).is_ok(),
        "8080 still allowed"
    );
    let m = admin(&t.node, "/metrics");
    assert!(xdp_packets(&m, "no-6000", "deny") >= 1, "{m}");
    assert!(
        xdp_packets(&m, "no-db", "deny") > denied,
        "counters kept across the reload"
    );
}
