//! `cargo xtask demo`: one node namespace, a client pod and two server pods, the agent started
//! from `manifests/examples/agent.yaml`, a few real connections, and what the agent saw.
use std::{net::Ipv4Addr, thread, time::Duration};

use mesh_tests::{
    Topology,
    servers::{greeter, greeting, sa},
};

use crate::util::{build_agent, clean_leftovers, root};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

pub fn run() -> anyhow::Result<()> {
    if !mesh_tests::privileged("demo") {
        anyhow::bail!("the demo needs root (BPF, network namespaces)");
    }
    clean_leftovers();
    // Built where the harness looks for it (target/debug/mesh-agent).
    build_agent(false)?;

    println!("== topology: node namespace with the agent; pods client (h1), web (h2), api (h3)");
    let t = Topology::new(&["client", "web", "api"]);
    let (client, web, api) = (t.pod("client"), t.pod("web"), t.pod("api"));
    greeter(&web.ns, sa(web.ip4, 8080), "web");
    greeter(&web.ns, sa(web.ip6, 8080), "web");
    greeter(&api.ns, sa(api.ip4, 9090), "api");
    t.kube_proxy_dnat(VIP, 80, web.ip4, 8080);
    for p in &t.pods {
        println!(
            "   {:<7} {} {}  (node side {})",
            p.name, p.ip4, p.ip6, p.host_if
        );
    }

    let config = root().join("manifests/examples/agent.yaml");
    println!("== agent: mesh-agent run --config {}", config.display());
    println!("{}", indent(&std::fs::read_to_string(&config)?));
    let mut agent = t.start_agent(&["--config", config.to_str().unwrap_or_default()]);
    let before = agent.counters();

    let calls = [
        (
            "client -> Service VIP 10.96.0.10:80 (captured; kube-proxy DNATs the agent's upstream)",
            sa(VIP, 80),
        ),
        (
            "client -> web pod 10.201.2.2:8080 (captured port)",
            sa(web.ip4, 8080),
        ),
        (
            "client -> web pod [fd00:201:2::2]:8080 (captured, IPv6)",
            sa(web.ip6, 8080),
        ),
        (
            "client -> api pod 10.201.3.2:9090 (port not targeted: direct)",
            sa(api.ip4, 9090),
        ),
    ];
    for (what, addr) in calls {
        println!("== {what}");
        match greeting(&client.ns, addr) {
            Ok(g) => {
                let peer = g
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("peer=")
                    .to_string();
                let via = if peer == client.ip4.to_string() || peer == client.ip6.to_string() {
                    "the client itself: not proxied"
                } else {
                    "the node: the agent proxied it"
                };
                println!("   backend answered: {g:?}  (its peer is {via})");
            }
            Err(e) => println!("   failed: {e}"),
        }
    }
    thread::sleep(Duration::from_millis(300));
    println!("== what the agent logged per connection (original destination as it saw it)");
    for l in agent.log_lines() {
        if l["message"] == "connection closed" {
            println!(
                "   src={} original_dst={} sent={} received={}",
                l["span"]["src"].as_str().unwrap_or("?"),
                l["span"]["dst"].as_str().unwrap_or("?"),
                l["bytes_sent"],
                l["bytes_received"]
            );
        }
    }
    let after = agent.counters();
    println!("== kernel counters (capture program, summed over CPUs; delta during the demo)");
    for name in mesh_common::counters::NAMES {
        let d = mesh_tests::counter(&after, name) - mesh_tests::counter(&before, name);
        println!("   {name:<15} {d}");
    }
    println!("== SIGTERM: the agent drains, detaches and removes its routing rules");
    let status = agent.terminate(Duration::from_secs(30));
    println!("   agent exited: {status}");
    println!("== tearing down the namespaces");
    drop(t);
    println!("demo done");
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("   | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
