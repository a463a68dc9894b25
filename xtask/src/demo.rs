//! `cargo xtask demo`: one node namespace, a client pod and server pods, the agent started from
//! `manifests/examples/agent.yaml`, a few real connections, and what the agent saw; then the
//! Kubernetes part ([`kubernetes`]): the same agent fed by an API server.
mod kubernetes;

use std::{net::Ipv4Addr, path::Path, thread, time::Duration};

use mesh_tests::{
    Topology,
    policy::write_atomically,
    servers::{greeter, greeting, sa},
    tls::Ca,
};

use crate::util::{build_agent, build_apiserver, clean_leftovers, root};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Both parts, or with `kubernetes_only` the Kubernetes part alone.
pub fn run(kubernetes_only: bool) -> anyhow::Result<()> {
    if !mesh_tests::privileged("demo") {
        anyhow::bail!("the demo needs root (BPF, network namespaces)");
    }
    clean_leftovers();
    // Built where the harness looks for it (target/debug/mesh-agent).
    build_agent(false)?;
    let apiserver = build_apiserver()?;
    remove_namespaces_on_signal()?;
    if !kubernetes_only {
        file_mode()?;
    }
    kubernetes::run(&apiserver)?;
    println!("demo done");
    Ok(())
}

/// On Ctrl-C (or SIGTERM, SIGHUP) the demo ends without unwinding, so the topologies' drop
/// never runs: this thread removes what they made instead (this process's `mesh-test-<pid>-*`
/// network namespaces with every process in them, which includes the agent and the API server,
/// and their bpffs folders and scratch files), then exits.
fn remove_namespaces_on_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered here, before the demo starts anything, so no signal is missed.
    let (mut int, mut term, mut hup) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    thread::spawn(move || {
        let name = rt.block_on(async {
            tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
                _ = hup.recv() => "SIGHUP",
            }
        });
        println!("\n== {name}: removing the demo's namespaces");
        let prefix = format!("mesh-test-{}-", std::process::id());
        remove_own(&prefix);
        std::process::exit(130);
    });
    Ok(())
}

/// Kills the processes in, and deletes, the network namespaces named `prefix*`; removes the
/// bpffs folders and temp files of the same names.
fn remove_own(prefix: &str) {
    let list = crate::util::output("ip", &["netns", "list"]).unwrap_or_default();
    let names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .collect();
    for name in &names {
        let pids = crate::util::output("ip", &["netns", "pids", name]).unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid])
                .status();
        }
    }
    for name in &names {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .status();
    }
    for dir in [Path::new("/sys/fs/bpf").to_path_buf(), std::env::temp_dir()] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_dir_all(e.path());
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The file-mode part: policy from `manifests/examples/policy.yaml`.
fn file_mode() -> anyhow::Result<()> {
    println!("== topology: node namespace with the agent; pods behind veths h1..h11");
    let t = Topology::new(&[
        "client", "web", "api", "tls-a", "tls-b", "tcp-x", "tcp-y", "shop-v1", "shop-v2", "grpc-a",
        "grpc-b",
    ]);
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

    let scratch = std::env::temp_dir().join(format!("{}-demo", t.id));
    std::fs::create_dir_all(&scratch)?;
    let ca = Ca::new(&scratch.join("ca"));
    for (pod, names) in [
        ("tls-a", &["a.example.com"][..]),
        ("tls-b", &["*.b.example.com"][..]),
    ] {
        let (cert, key) = ca.leaf(pod, names);
        t.pod(pod).ns.echo(
            pod,
            8443,
            &["--tls", &cert.to_string_lossy(), &key.to_string_lossy()],
        );
    }
    greeter(
        &t.pod("tcp-x").ns,
        sa(t.pod("tcp-x").ip4, 9000),
        "ledger-v1",
    );
    greeter(
        &t.pod("tcp-y").ns,
        sa(t.pod("tcp-y").ip4, 9000),
        "ledger-v2",
    );
    for pod in ["shop-v1", "shop-v2"] {
        t.pod(pod).ns.echo(pod, 8080, &[]);
    }
    let support = root().join("tests/support");
    for pod in ["grpc-a", "grpc-b"] {
        let server = support.join("grpc_server.py").to_string_lossy().to_string();
        t.pod(pod).ns.serve(
            "/usr/bin/python3",
            &[server, pod.to_string(), "50051".to_string()],
        );
    }

    let config = root().join("manifests/examples/agent.yaml");
    // The policy is copied so the demo can edit it live without touching the repository.
    let policy = scratch.join("policy.yaml");
    let policy_text = std::fs::read_to_string(root().join("manifests/examples/policy.yaml"))?;
    write_atomically(&policy, &policy_text);
    println!(
        "== agent: mesh-agent run --config manifests/examples/agent.yaml --policy manifests/examples/policy.yaml"
    );
    println!("{}", indent(&std::fs::read_to_string(&config)?));
    let mut agent = t.start_agent(&[
        "--config",
        config.to_str().unwrap_or_default(),
        "--policy",
        policy.to_str().unwrap_or_default(),
    ]);
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
    println!(
        "== TLS by SNI behind one VIP (10.96.0.30:443), verified end to end by curl: never terminated"
    );
    for host in ["a.example.com", "www.b.example.com", "other.example.com"] {
        // No route for other.example.com: the Service's own endpoint (tls-a) answers with its own
        // certificate, which does not name other.example.com, so that one call skips verification.
        let verify = if host == "other.example.com" {
            "--insecure"
        } else {
            "--show-error"
        };
        let out = client
            .ns
            .cmd("curl")
            .args([
                "-sS",
                verify,
                "--max-time",
                "5",
                "--cacert",
                &ca.cert.to_string_lossy(),
            ])
            .args([
                "--resolve",
                &format!("{host}:443:10.96.0.30"),
                &format!("https://{host}/"),
            ])
            .output()?;
        let answer = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|v| format!("backend {}", v["backend"]))
            .unwrap_or_else(|_| {
                format!("no answer: {}", String::from_utf8_lossy(&out.stderr).trim())
            });
        let note = if host == "other.example.com" {
            "  (no TLSRoute matches: original destination)"
        } else {
            ""
        };
        println!("   SNI {host:<18} -> {answer}{note}");
    }

    println!(
        "== HTTP: GET http://10.96.0.50/api/v2/items (HTTPRoute rule with a header filter); what the backend received:"
    );
    let out = client
        .ns
        .cmd("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-H",
            "Host: shop.demo",
            "http://10.96.0.50/api/v2/items",
        ])
        .output()?;
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(v) => {
            println!(
                "   backend {} got {} {}",
                v["backend"], v["method"], v["path"]
            );
            for h in [
                "x-request-id",
                "traceparent",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-mesh",
                "x-canary",
            ] {
                println!("   {h:<18} {}", v["headers"][h]);
            }
        }
        Err(_) => println!(
            "   no answer: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
    println!(
        "== HTTP: 1,000 requests to http://10.96.0.50/ on one keep-alive connection (weights 90/10)"
    );
    let out = client
        .ns
        .cmd("curl")
        .args(["-sS", "--max-time", "60", "http://10.96.0.50/[1-1000]"])
        .output()?;
    let mut shop = std::collections::BTreeMap::new();
    for v in serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .flatten()
    {
        *shop
            .entry(v["backend"].as_str().unwrap_or("?").to_string())
            .or_insert(0usize) += 1;
    }
    println!("   {shop:?}");
    println!("== gRPC over h2c to 10.96.0.60:50051, routed by method (GRPCRoute)");
    for (method, payload) in [("Echo", "hello"), ("Count", "3")] {
        let out = client
            .ns
            .cmd("/usr/bin/python3")
            .arg(support.join("grpc_client.py"))
            .args(["10.96.0.60:50051", method, payload])
            .output()?;
        println!(
            "   mesh.Test/{method}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }

    let ledger = sa(Ipv4Addr::new(10, 96, 0, 40), 9000);
    println!("== TCPRoute ledger-canary, weights 90/10: 500 connections to 10.96.0.40:9000");
    println!("   {}", split(&t, ledger, 500));
    println!("== live policy edit: weights 50/50 (the agent notices the file change)");
    write_atomically(
        &policy,
        &policy_text
            .replace("weight: 90}", "weight: 50}")
            .replace("weight: 10}", "weight: 50}"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent.log().matches("policy reloaded").count() < 1 && std::time::Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(50));
    }
    println!("   {}", split(&t, ledger, 500));
    println!(
        "== an invalid edit (a backendRef to a port the Service lacks) is rejected; 50/50 stays"
    );
    write_atomically(
        &policy,
        &policy_text.replace(
            "{name: ledger-v2, port: 9000, weight: 10}",
            "{name: ledger-v2, port: 9001, weight: 10}",
        ),
    );
    while !agent.log().contains("policy rejected") && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    for l in agent
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "policy error")
    {
        println!("   agent: {}", l["l"].as_str().unwrap_or_default());
    }
    println!("   {}", split(&t, ledger, 200));

    thread::sleep(Duration::from_millis(300));
    println!("== what the agent logged per connection (original destination as it saw it)");
    let mut shown = 0;
    for l in agent.log_lines() {
        let span = &l["span"];
        // The first few, and the TLS ones; the 1,200 ledger connections look alike.
        if l["message"] == "connection closed"
            && (shown < 3 || span["sni"].is_string() || l["requests"].is_u64())
        {
            shown += 1;
            let traffic = match l["requests"].as_u64() {
                Some(n) => format!("requests={n}"),
                None => format!("sent={} received={}", l["bytes_sent"], l["bytes_received"]),
            };
            println!(
                "   src={} original_dst={} proto={} sni={} route={} upstream={} {traffic}",
                span["src"].as_str().unwrap_or("?"),
                span["dst"].as_str().unwrap_or("?"),
                span["proto"].as_str().unwrap_or("-"),
                span["sni"].as_str().unwrap_or("-"),
                span["route"].as_str().unwrap_or("-"),
                span["upstream"].as_str().unwrap_or("-"),
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
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// Opens `n` connections to `addr` from the client and counts which server greeted each.
fn split(t: &Topology, addr: std::net::SocketAddr, n: usize) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let who = match greeting(&t.pod("client").ns, addr) {
            Ok(g) => g.rsplit("server=").next().unwrap_or_default().to_string(),
            Err(e) => format!("error: {e}"),
        };
        *counts.entry(who).or_insert(0usize) += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}: {v} ({:.1}%)", 100.0 * *v as f64 / n as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("   | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
