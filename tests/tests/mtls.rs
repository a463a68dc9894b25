//! Mutual TLS between two nodes: two node namespaces joined by an underlay veth, each with its
//! agent and pods, routes between their pod ranges over the underlay. A pod of node A talks to
//! a pod of node B through the agents' tunnel (HTTP/2 CONNECT in TLS 1.3 to node B's port
//! 15008): the underlay carries TLS only, both sides prove SPIFFE identities from the mesh's
//! CA, and node B's agent authorizes by the client's identity. HTTP goes through node A's
//! HTTP proxy (routes, filters, injected headers) before the tunnel, and node B's agent applies
//! the HTTP deny rules that name source identities.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use mesh_tests::{
    ADMIN, Agent, Topology,
    kube::{ApiServer, metric, start_agent, until},
    mtls::{TRUST_DOMAIN, TwoNodes, ca, pod},
    policy::service,
    privileged, sh,
};
const PORT: u16 = 7000;

/// Two nodes: A with pods `client` (ServiceAccount client-a) and `intruder` (client-b), B with
/// `server` (ServiceAccount server), all in namespace `demo`, which is in the mesh. Node A's
/// pod `outsider` is not in the mesh: no Pod object, its veth not captured, so it talks
/// plaintext straight over the underlay.
struct Lab {
    a: Topology,
    b: Topology,
    _agents: (Agent, Agent),
    dir: PathBuf,
    node_b: Ipv4Addr,
}

/// The first lab's MeshPolicy: capture the pod on node B, refuse client-b by principal at L4.
fn l4_policy(server: Ipv4Addr) -> String {
    format!(
        "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: mesh, namespace: demo}}\n\
         spec:\n  capture: [{{cidr: 10.212.0.0/16, ports: [{PORT}]}}]\n  authorization:\n    rules:\n\
         \x20   - name: not-client-b\n      action: Deny\n      to: [{server}/32]\n      ports: [{PORT}]\n\
         \x20     principals: [\"spiffe://{TRUST_DOMAIN}/ns/demo/sa/client-b\"]\n"
    )
}

impl Lab {
    fn new() -> Lab {
        Lab::build(None)
    }

    /// The lab with workload certificates of `lifetime` (renewed at half of it).
    fn build(lifetime: Option<&str>) -> Lab {
        Lab::with_policy(|server| l4_policy(server.ip4), lifetime)
    }

    /// The lab with `policy(server pod)` as its documents besides the namespace and the pods,
    /// and workload certificates of `lifetime` (default 24h).
    fn with_policy(policy: impl FnOnce(&mesh_tests::Pod) -> String, lifetime: Option<&str>) -> Lab {
        let nodes = TwoNodes::new(&["client", "intruder", "outsider"], 211, &["server"], 212);
        let (a, b, node_a, node_b) = (&nodes.a, &nodes.b, nodes.node_a, nodes.node_b);
        let (client, intruder, server) = (a.pod("client"), a.pod("intruder"), b.pod("server"));
        server.ns.echo("server", PORT, &[]);
        let extra = policy(server);
        let policy = [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {skiff.dev/mesh: enabled}}\n"
                .to_string(),
            pod("client", "demo", "client-a", client.ip4, node_a),
            pod("intruder", "demo", "client-b", intruder.ip4, node_a),
            pod("server", "demo", "server", server.ip4, node_b),
            extra,
        ]
        .join("---\n");
        let policy_path = nodes.dir.join("policy.yaml");
        std::fs::write(&policy_path, policy).expect("policy");
        let lifetime = lifetime.map_or(String::new(), |l| format!("  certificate_lifetime: {l}\n"));
        let config = |name: &str, node_ip: Ipv4Addr, ifaces: &[&str]| {
            nodes.config(name, Some(node_ip), ifaces, Some(&policy_path), &lifetime)
        };
        let config_a = config("a", node_a, &[&client.host_if, &intruder.host_if]);
        let config_b = config("b", node_b, &[&server.host_if]);
        let agent_a = a.start_agent(&["--config", config_a.to_str().expect("utf8")]);
        let agent_b = b.start_agent(&["--config", config_b.to_str().expect("utf8")]);
        let TwoNodes { a, b, dir, .. } = nodes;
        Lab {
            a,
            b,
            _agents: (agent_a, agent_b),
            dir,
            node_b,
        }
    }

    /// Replaces `from` with `to` in the policy file; the agents reload it.
    fn edit_policy(&self, from: &str, to: &str) {
        let path = self.dir.join("policy.yaml");
        let text = std::fs::read_to_string(&path).expect("policy");
        assert!(text.contains(from), "{from:?} not in the policy");
        std::fs::write(&path, text.replace(from, to)).expect("policy");
    }

    /// An HTTP request from `pod` of node A to the server, carrying `marker`; the response.
    fn request(&self, pod: &str, marker: &str) -> std::io::Result<String> {
        let dst = SocketAddr::V4(SocketAddrV4::new(self.b.pod("server").ip4, PORT));
        self.get(pod, dst, &format!("/{marker}"), marker)
    }

    /// `GET path` from `pod` of node A to `dst` with header `X-Marker: marker`; the response.
    fn get(&self, pod: &str, dst: SocketAddr, path: &str, marker: &str) -> std::io::Result<String> {
        let (path, marker) = (path.to_string(), marker.to_string());
        self.a.pod(pod).ns.run(move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: web\r\nX-Marker: {marker}\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
    }
}

/// `tcpdump` on node A's underlay, writing `file` until stopped.
fn capture(t: &Topology, file: &Path) -> Child {
    let mut child = t
        .node
        .cmd("tcpdump")
        .args([
            "-i",
            "underlay",
            "--immediate-mode",
            "-Z",
            "root",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    // It says "listening on underlay" once the capture runs.
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).expect("tcpdump output");
    assert!(line.contains("listening on"), "tcpdump: {line}");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    child
}

/// The packets of a capture file, one line each (`tcpdump -nn -r`), with tcpdump's messages.
fn packets(t: &Topology, file: &Path) -> String {
    let out = t
        .node
        .cmd("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .output()
        .expect("tcpdump -r");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stop(mut c: Child) {
    // Packets still on their way into the capture.
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status();
    let _ = c.wait();
}

/// The certificate node B's agent presents for `server_name`, as openssl prints its SAN, using
/// a client certificate that `ca` signed for `principal`.
fn server_certificate(
    lab: &Lab,
    ca: (&Path, &Path),
    principal: &str,
    server_name: &str,
) -> (bool, String) {
    let d = lab.dir.join(format!(
        "probe-{}",
        principal.rsplit('/').next().unwrap_or("x")
    ));
    std::fs::create_dir_all(&d).expect("dir");
    let key = d.join("probe.key");
    let csr = d.join("probe.csr");
    let crt = d.join("probe.crt");
    let ext = d.join("ext.cnf");
    std::fs::write(
        &ext,
        format!("subjectAltName=URI:{principal}\nextendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n"),
    )
    .expect("ext");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &Path| p.to_str().expect("utf8").to_string();
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p(&key),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &p(&key),
        "-subj",
        "/O=probe",
        "-out",
        &p(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(ca.0),
        "-CAkey",
        &p(ca.1),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&crt),
    ]);
    let out = lab
        .a
        .node
        .cmd("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("{}:15008", lab.node_b),
            "-servername",
            server_name,
        ])
        .args([
            "-cert",
            &p(&crt),
            "-key",
            &p(&key),
            "-alpn",
            "h2",
            "-tls1_3",
            "-showcerts",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            // Stay connected long enough to see the server's verdict on our certificate.
            std::thread::sleep(Duration::from_millis(700));
            drop(c.stdin.take());
            c.wait_with_output()
        })
        .expect("s_client");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let pem_start = text.find("-----BEGIN CERTIFICATE-----");
    let san = pem_start.map(|i| {
        let pem = &text[i..];
        let end = pem.find("-----END CERTIFICATE-----").expect("pem end") + 25;
        let mut x = Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("x509");
        x.stdin
            .take()
            .expect("stdin")
            .write_all(&pem.as_bytes()[..end])
            .expect("pem");
        String::from_utf8_lossy(&x.wait_with_output().expect("x509").stdout).to_string()
    });
    (out.status.success(), san.unwrap_or_default())
}

#[test]
fn pods_on_two_nodes_talk_through_the_mtls_tunnel() {
    if !privileged("pods_on_two_nodes_talk_through_the_mtls_tunnel") {
        return;
    }
    let lab = Lab::new();
    let pcap = lab.dir.join("underlay.pcap");
    let tcpdump = capture(&lab.a, &pcap);

    // Allowed: client-a reaches the server, through the tunnel.
    let marker = "PLAINTEXT-MARKER-5d1c";
    let response = lab.request("client", marker).expect("client-a's request");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(marker),
        "the server saw the request: {response}"
    );
    // The server sees node B's agent as the peer (it delivered the connection).
    assert!(
        !response.contains(&format!("\"peer\": \"{}\"", lab.a.pod("client").ip4)),
        "{response}"
    );

    // Refused by node B's agent: client-b is denied by principal.
    let denied = lab.request("intruder", "INTRUDER-MARKER-77");
    assert!(
        !denied.as_ref().is_ok_and(|r| r.contains("200 OK")),
        "client-b must be refused: {denied:?}"
    );
    stop(tcpdump);

    // The underlay carried TLS to port 15008 and never the plaintext.
    let bytes = std::fs::read(&pcap).expect("pcap");
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(marker.as_bytes()),
        "the payload crossed the underlay in plaintext"
    );
    assert!(
        !contains(b"INTRUDER-MARKER"),
        "the refused payload crossed the underlay in plaintext"
    );
    let summary = packets(&lab.a, &pcap);
    assert!(
        summary.contains(&format!("{}.15008", lab.node_b)),
        "no tunnel packets: {summary}"
    );
    assert!(
        !summary.contains(&format!(".{PORT}:")),
        "plaintext to the pod port on the underlay: {summary}"
    );

    // Node B counted one allowed and at least one denied tunneled connection.
    let allowed = metric(&lab.b, "mesh_tunnel_inbound_total{result=\"allowed\"}");
    let denied = metric(&lab.b, "mesh_tunnel_inbound_total{result=\"denied\"}");
    assert!(
        allowed >= 1.0 && denied >= 1.0,
        "allowed {allowed}, denied {denied}"
    );
    assert!(
        metric(
            &lab.a,
            "mesh_tunnel_handshakes_total{side=\"client\",result=\"ok\"}"
        ) >= 1.0
    );
    // Each node holds certificates for its own workloads only, with time left on them.
    let expiry = |t: &Topology, sa: &str| {
        metric(
            t,
            &format!(
                "mesh_certificate_expiry_seconds{{identity=\"spiffe://{TRUST_DOMAIN}/ns/demo/sa/{sa}\"}}"
            ),
        )
    };
    assert!(expiry(&lab.a, "client-a") > 3600.0);
    assert!(expiry(&lab.a, "client-b") > 3600.0);
    assert_eq!(
        expiry(&lab.a, "server"),
        0.0,
        "node A holds no certificate of node B's pod"
    );
    assert!(expiry(&lab.b, "server") > 3600.0);
    // Node B's access log names both principals.
    let log = lab._agents.1.log();
    assert!(
        log.lines()
            .any(|l| l.contains("tunneled connection accepted")
                && l.contains(&format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/client-a"))
                && l.contains(&format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/server"))),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("tunneled connection denied") && l.contains("not-client-b")),
        "{log}"
    );
    let _ = ADMIN;
}

#[test]
fn the_tunnel_proves_spiffe_ids_and_refuses_another_ca() {
    if !privileged("the_tunnel_proves_spiffe_ids_and_refuses_another_ca") {
        return;
    }
    let lab = Lab::new();
    let ca_dir = lab.dir.join("ca");
    let (ca_cert, ca_key) = (ca_dir.join("ca.crt"), ca_dir.join("ca.key"));
    // A client with a certificate from the mesh's CA sees the server workload's SPIFFE ID.
    let (_, san) = server_certificate(
        &lab,
        (&ca_cert, &ca_key),
        &format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/probe"),
        &format!("server.demo.{TRUST_DOMAIN}"),
    );
    assert!(
        san.contains(&format!("URI:spiffe://{TRUST_DOMAIN}/ns/demo/sa/server")),
        "server certificate SAN: {san}"
    );
    let ok_before = metric(
        &lab.b,
        "mesh_tunnel_handshakes_total{side=\"server\",result=\"ok\"}",
    );
    assert!(ok_before >= 1.0, "the mesh CA's client was accepted");

    // A client whose certificate another CA signed is refused by the server.
    let (other_cert, other_key) = ca(&lab.dir, "other-ca");
    let _ = server_certificate(
        &lab,
        (&other_cert, &other_key),
        &format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/client-a"),
        &format!("server.demo.{TRUST_DOMAIN}"),
    );
    let bad = metric(
        &lab.b,
        "mesh_tunnel_handshakes_total{side=\"server\",result=\"bad_certificate\"}",
    );
    assert!(bad >= 1.0, "the other CA's certificate was not refused");
    // And the mesh still works.
    let r = lab.request("client", "after-probes").expect("request");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let _ = sh;
}

/// A pod of `node` (IP `host`) with ServiceAccount `sa`, Running, as a kubelet reports it.
fn k8s_pod(api: &ApiServer, name: &str, sa: &str, node: &str, ip: Ipv4Addr, host: Ipv4Addr) {
    api.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo}}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: app}}]\n"
    ));
    api.kubectl(
        &[
            "patch",
            "pod",
            name,
            "-n",
            "demo",
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(
                "{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"{ip}\",\"podIPs\":[{{\"ip\":\"{ip}\"}}],\
                 \"hostIP\":\"{host}\",\"conditions\":[{{\"type\":\"Ready\",\"status\":\"True\"}}]}}}}"
            ),
        ],
        "",
    );
}

/// Kubernetes mode: the workloads (identity, node) come from the API server's Pods, the node IP
/// from `--node-ip` (the DaemonSet's downward API `status.hostIP`), the CA from files (a mounted
/// Secret in a cluster).
#[test]
fn kubernetes_mode_tunnels_with_identities_from_the_pods() {
    if !privileged("kubernetes_mode_tunnels_with_identities_from_the_pods") {
        return;
    }
    let nodes = TwoNodes::new(&["client"], 211, &["server"], 212);
    // One file for both nodes, as one ConfigMap: the node IP comes from `--node-ip`.
    let config = nodes.config("agent", None, &[], None, "");
    let TwoNodes {
        a,
        b,
        node_a,
        node_b,
        ..
    } = nodes;
    let (client, server) = (a.pod("client"), b.pod("server"));
    server.ns.echo("server", PORT, &[]);
    let api = ApiServer::start_at(&a, &format!("{node_a}:0"));
    api.install_crds();
    api.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, labels: {{skiff.dev/mesh: enabled}}}}\n---\n\
         apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: mesh, namespace: demo}}\n\
         spec:\n  capture: [{{cidr: 10.212.0.0/16, ports: [{PORT}]}}]\n"
    ));
    k8s_pod(&api, "client", "client-a", "node-a", client.ip4, node_a);
    k8s_pod(&api, "server", "server", "node-b", server.ip4, node_b);
    let config = config.to_str().expect("utf8");
    let _agent_a = start_agent(
        &a,
        &api,
        "node-a",
        &["--config", config, "--node-ip", &node_a.to_string()],
    );
    let agent_b = start_agent(
        &b,
        &api,
        "node-b",
        &["--config", config, "--node-ip", &node_b.to_string()],
    );
    // Both agents have seen the pods and hold their own workloads' certificates.
    let expiry = |t: &Topology, sa: &str| {
        metric(
            t,
            &format!(
                "mesh_certificate_expiry_seconds{{identity=\"spiffe://{TRUST_DOMAIN}/ns/demo/sa/{sa}\"}}"
            ),
        )
    };
    until(Duration::from_secs(20), "certificates for the pods", || {
        expiry(&a, "client-a") > 0.0 && expiry(&b, "server") > 0.0
    });
    assert_eq!(expiry(&a, "server"), 0.0);
    let dst = SocketAddr::V4(SocketAddrV4::new(server.ip4, PORT));
    let response = client.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /k8s HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    });
    let response = response.expect("request");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(metric(&b, "mesh_tunnel_inbound_total{result=\"allowed\"}") >= 1.0);
    let log = agent_b.log();
    assert!(
        log.lines()
            .any(|l| l.contains("tunneled connection accepted")
                && l.contains(&format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/client-a"))),
        "{log}"
    );
}

/// One HTTP/1.1 response (head and a Content-Length body) off a kept-alive connection.
fn read_response(s: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(head + &String::from_utf8_lossy(&body))
}

/// Certificates of one minute are renewed after 30 s on both nodes while one client connection
/// keeps sending requests through the tunnel: none fails, the tunnel connection opened before
/// the renewal carries on, and a new connection afterwards works.
#[test]
fn a_certificate_rotation_drops_no_open_connection() {
    if !privileged("a_certificate_rotation_drops_no_open_connection") {
        return;
    }
    let lab = Lab::build(Some("1m"));
    let dst = SocketAddr::V4(SocketAddrV4::new(lab.b.pod("server").ip4, PORT));
    let answered = lab.a.pod("client").ns.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut answered = 0;
        // 40 s: across the renewal at 30 s.
        for i in 0..20 {
            write!(s, "GET /rotation-{i} HTTP/1.1\r\nHost: server\r\n\r\n")?;
            let r = read_response(&mut s)?;
            if r.starts_with("HTTP/1.1 200") && r.contains(&format!("/rotation-{i}")) {
                answered += 1;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok::<_, std::io::Error>(answered)
    });
    assert_eq!(answered.expect("the connection across the rotation"), 20);
    let renewed = |agent: &Agent, sa: &str| {
        agent.log().lines().any(|l| {
            l.contains("identity certificate renewed")
                && l.contains(&format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/{sa}"))
        })
    };
    assert!(
        renewed(&lab._agents.0, "client-a"),
        "client-a's certificate was renewed"
    );
    assert!(
        renewed(&lab._agents.1, "server"),
        "server's certificate was renewed"
    );
    assert_eq!(
        metric(&lab.a, "mesh_tunnel_connections_total{side=\"client\"}"),
        1.0,
        "the tunnel connection opened before the renewal carried every request"
    );
    let r = lab
        .request("client", "after-rotation")
        .expect("new connection");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

const WEB_VIP: &str = "10.96.7.10";
const GRPC_VIP: &str = "10.96.7.11";
const GRPC_PORT: u16 = 50051;

/// The HTTP lab's documents: Services `web` (port 80) and `grpc` for the pod on node B, an
/// HTTPRoute on `web` that only takes `/api` and adds a header, fixed headers from the
/// MeshPolicy, and an HTTP deny rule for client-b on `/api/admin`, which node A cannot decide
/// (it names a source identity) and node B must.
fn l7_policy(server: &mesh_tests::Pod) -> String {
    server.ns.serve(
        "/usr/bin/python3",
        &[
            mesh_tests::support("grpc_server.py")
                .to_string_lossy()
                .to_string(),
            "g".to_string(),
            GRPC_PORT.to_string(),
        ],
    );
    let ip = |s: &str| s.parse().expect("ip");
    let endpoint = [std::net::IpAddr::V4(server.ip4)];
    format!(
        "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: mesh, namespace: demo}}\n\
         spec:\n  capture:\n  - {{cidr: 10.212.0.0/16, ports: [{PORT}, {GRPC_PORT}]}}\n\
         \x20 - {{cidr: 10.96.7.0/24, ports: [80, {GRPC_PORT}]}}\n\
         \x20 headers: {{set: {{x-mesh-policy: tunneled}}}}\n\
         \x20 authorization:\n    http:\n\
         \x20   - name: no-admin-for-b\n      paths: [/api/admin]\n\
         \x20     principals: [\"spiffe://{TRUST_DOMAIN}/ns/demo/sa/client-b\"]\n{}{}\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web-api, namespace: mesh-test}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n\
         \x20 - matches: [{{path: {{type: PathPrefix, value: /api}}}}]\n\
         \x20   filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {{set: [{{name: x-route, value: web-api}}]}}\n\
         \x20   backendRefs: [{{name: web, port: 80}}]\n",
        service("web", ip(WEB_VIP), 80, PORT, &endpoint),
        service("grpc", ip(GRPC_VIP), GRPC_PORT, GRPC_PORT, &endpoint),
    )
}

/// The JSON body of an echo response.
fn echoed(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

#[test]
fn http_routes_grpc_and_identity_deny_rules_work_through_the_tunnel() {
    if !privileged("http_routes_grpc_and_identity_deny_rules_work_through_the_tunnel") {
        return;
    }
    let lab = Lab::with_policy(l7_policy, None);
    let pcap = lab.dir.join("underlay-l7.pcap");
    let tcpdump = capture(&lab.a, &pcap);
    let web: SocketAddr = format!("{WEB_VIP}:80").parse().expect("addr");

    // Routed on node A (the HTTPRoute's filter, the policy's fixed header, a request id), then
    // carried to node B's pod through the tunnel.
    let marker = "L7-PLAINTEXT-MARKER-9e2f";
    let response = lab
        .get("client", web, "/api/hello", marker)
        .expect("client-a's request");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = echoed(&response);
    assert_eq!(seen["path"], "/api/hello", "{seen}");
    assert_eq!(seen["headers"]["x-marker"], marker, "{seen}");
    assert_eq!(seen["headers"]["x-route"], "web-api", "{seen}");
    assert_eq!(seen["headers"]["x-mesh-policy"], "tunneled", "{seen}");
    assert!(
        seen["headers"]["x-request-id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{seen}"
    );
    // The pod's peer is node B's agent: the request came out of the tunnel there.
    assert_ne!(seen["peer"], lab.a.pod("client").ip4.to_string(), "{seen}");
    // Routing is node A's: a path no rule takes is answered there.
    let unrouted = lab
        .get("client", web, "/elsewhere", "unrouted")
        .expect("request");
    assert!(unrouted.starts_with("HTTP/1.1 404"), "{unrouted}");

    // The deny rule names client-b: node B refuses it /api/admin and nothing else; client-a
    // gets through. Node A could not have decided it (it has no source condition of its own).
    let admin_a = lab
        .get("client", web, "/api/admin", "admin-a")
        .expect("request");
    assert!(admin_a.starts_with("HTTP/1.1 200"), "{admin_a}");
    let admin_b = lab
        .get("intruder", web, "/api/admin", "ADMIN-B-MARKER")
        .expect("request");
    assert!(admin_b.starts_with("HTTP/1.1 403"), "{admin_b}");
    assert!(admin_b.contains("denied by policy"), "{admin_b}");
    let hello_b = lab
        .get("intruder", web, "/api/hello", "hello-b")
        .expect("request");
    assert!(hello_b.starts_with("HTTP/1.1 200"), "{hello_b}");

    // gRPC (HTTP/2 to the Service) through the tunnel, unary and server-streaming.
    let grpc = |method: &str, payload: &str| -> serde_json::Value {
        let out = lab
            .a
            .pod("client")
            .ns
            .cmd("/usr/bin/python3")
            .arg(mesh_tests::support("grpc_client.py"))
            .args([&format!("{GRPC_VIP}:{GRPC_PORT}"), method, payload])
            .output()
            .expect("grpc client");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                lab._agents.0.log()
            )
        })
    };
    let echo = grpc("Echo", "GRPC-MARKER-41");
    assert_eq!(echo["code"], "OK", "{echo}");
    let reply = echo["replies"][0].as_str().expect("reply");
    assert!(
        reply.starts_with("g:GRPC-MARKER-41:rid=") && reply.len() > "g:GRPC-MARKER-41:rid=".len(),
        "unary reply with an injected request id: {reply}"
    );
    assert_eq!(echo["trailers"]["x-served-by"], "g", "{echo}");
    let count = grpc("Count", "3");
    assert_eq!(count["code"], "OK", "{count}");
    assert_eq!(
        count["replies"],
        serde_json::json!(["g:0", "g:1", "g:2"]),
        "{count}"
    );
    stop(tcpdump);

    // The underlay carried none of it in plaintext, and nothing to the pods' ports.
    let bytes = std::fs::read(&pcap).expect("pcap");
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for needle in [marker, "ADMIN-B-MARKER", "GRPC-MARKER-41", "web-api"] {
        assert!(
            !contains(needle.as_bytes()),
            "{needle} crossed the underlay in plaintext"
        );
    }
    let summary = packets(&lab.a, &pcap);
    assert!(
        summary.contains(&format!("{}.15008", lab.node_b)),
        "no tunnel packets: {summary}"
    );
    for port in [PORT, GRPC_PORT] {
        assert!(
            !summary.contains(&format!(".{port}:")),
            "plaintext to port {port} on the underlay: {summary}"
        );
    }

    // Node B counted and logged the refusal with the rule and the principal.
    assert!(
        metric(&lab.b, "mesh_http_tunneled_denied_total") >= 1.0,
        "node B counted the denial"
    );
    let log = lab._agents.1.log();
    assert!(
        log.lines().any(|l| l.contains("tunneled request denied")
            && l.contains("no-admin-for-b")
            && l.contains(&format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/client-b"))),
        "{log}"
    );
}

/// Capture the pods of node B, and `mode` for namespace `demo`.
fn mtls_policy(mode: &str) -> String {
    format!(
        "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: mesh, namespace: demo}}\n\
         spec:\n  capture: [{{cidr: 10.212.0.0/16, ports: [{PORT}]}}]\n  mtls:\n    namespaces: {{demo: {mode}}}\n"
    )
}

#[test]
fn strict_refuses_plaintext_from_outside_the_mesh_and_permissive_accepts_it() {
    if !privileged("strict_refuses_plaintext_from_outside_the_mesh_and_permissive_accepts_it") {
        return;
    }
    let mut lab = Lab::with_policy(|_| mtls_policy("STRICT"), None);
    let server = lab.b.pod("server").clone();
    let strict_interfaces = |lab: &Lab| {
        mesh_tests::kube::status(&lab.b)["mtls_strict"]["interfaces"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let refused = |lab: &Lab| {
        metric(
            &lab.b,
            &format!(
                "mesh_mtls_strict_refused_total{{interface=\"{}\"}}",
                server.host_if
            ),
        )
    };
    until(Duration::from_secs(10), "STRICT attached on node B", || {
        strict_interfaces(&lab) == 1
    });

    // In the mesh: through the tunnel, delivered by node B's agent.
    let r = lab
        .request("client", "in-mesh")
        .expect("client-a's request");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Outside the mesh: plaintext over the underlay, refused at the pod's veth.
    let outside = lab.request("outsider", "from-outside");
    assert!(
        outside.is_err(),
        "STRICT must refuse plaintext from outside the mesh: {outside:?}"
    );
    assert!(
        refused(&lab) >= 1.0,
        "the refusal is counted on {}",
        server.host_if
    );
    // The node itself (a kubelet probe) still reaches the pod: its SYN carries a local socket.
    let probe = lab.b.node.http_get(
        SocketAddr::V4(SocketAddrV4::new(server.ip4, PORT)),
        "/healthz",
    );
    assert!(probe.starts_with("HTTP/1.1 200"), "{probe}");

    // PERMISSIVE: both.
    lab.edit_policy("demo: STRICT", "demo: PERMISSIVE");
    until(Duration::from_secs(10), "STRICT detached", || {
        strict_interfaces(&lab) == 0
    });
    let r = lab
        .request("outsider", "permissive")
        .expect("plaintext accepted");
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("permissive"),
        "{r}"
    );
    let r = lab.request("client", "still-in-mesh").expect("tunnel");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // STRICT again, then a clean stop of node B's agent takes the program away with it.
    let before = refused(&lab);
    lab.edit_policy("demo: PERMISSIVE", "demo: STRICT");
    until(Duration::from_secs(10), "STRICT attached again", || {
        strict_interfaces(&lab) == 1
    });
    assert!(lab.request("outsider", "strict-again").is_err());
    assert!(refused(&lab) > before);
    lab._agents.1.terminate(Duration::from_secs(10));
    let r = lab
        .request("outsider", "agent-gone")
        .expect("nothing left behind after a clean stop");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// GETs from `pod` of node A to the server, each on a new connection, every 20 ms until `stop`;
/// (answered, failures with their errors).
fn request_loop(
    lab: &Lab,
    pod: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    let dst = SocketAddr::V4(SocketAddrV4::new(lab.b.pod("server").ip4, PORT));
    lab.a.pod(pod).ns.spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            i += 1;
            let one = || -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                write!(
                    s,
                    "GET /loop-{i} HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"
                )?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            };
            match one() {
                Ok(r) if r.starts_with("HTTP/1.1 200") => ok += 1,
                Ok(r) => failed.push(format!("request {i}: {}", r.lines().next().unwrap_or(""))),
                Err(e) => failed.push(format!("request {i}: {e}")),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok, failed)
    })
}

#[test]
fn an_upgrade_with_mtls_on_hands_over_the_tunnel_listener_and_loses_no_request() {
    if !privileged("an_upgrade_with_mtls_on_hands_over_the_tunnel_listener_and_loses_no_request") {
        return;
    }
    let mut lab = Lab::with_policy(|_| mtls_policy("STRICT"), None);
    // A long-lived connection through the tunnel, opened before the upgrade.
    let dst = SocketAddr::V4(SocketAddrV4::new(lab.b.pod("server").ip4, PORT));
    let (to_client, requests) = std::sync::mpsc::channel::<u32>();
    let (answers, from_client) = std::sync::mpsc::channel::<std::io::Result<bool>>();
    let long_lived = lab.a.pod("client").ns.spawn(move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        for i in requests {
            let answered = write!(s, "GET /long-{i} HTTP/1.1\r\nHost: server\r\n\r\n")
                .and_then(|()| read_response(&mut s))
                .map(|r| r.starts_with("HTTP/1.1 200") && r.contains(&format!("/long-{i}")));
            answers.send(answered).expect("answer");
        }
    });
    let ask = |i: u32| {
        to_client.send(i).expect("ask");
        from_client
            .recv_timeout(Duration::from_secs(10))
            .expect("an answer")
    };
    assert!(ask(1).expect("first request"));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = request_loop(&lab, "client", stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let config_b = lab.dir.join("b.yaml");
    let successor = lab
        .b
        .start_agent(&["--config", config_b.to_str().expect("utf8")]);
    let mut old = std::mem::replace(&mut lab._agents.1, successor);
    std::thread::sleep(Duration::from_millis(500));
    // The old agent's tunnel connection still carries the long-lived connection's stream.
    assert!(ask(2).expect("a request after the upgrade, on the old connection"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failed) = looping.join().expect("request loop");
    assert!(failed.is_empty(), "lost during the upgrade: {failed:?}");
    assert!(answered >= 10, "{answered} requests");

    // Once the long-lived connection ends, the old agent has nothing left and exits.
    drop(to_client);
    long_lived.join().expect("long-lived connection");
    let status = old.wait_exit(Duration::from_secs(20));
    let old_log = old.log();
    assert!(status.success(), "old agent exit {status}:\n{old_log}");
    assert!(
        old_log.contains("tunnel server finished: no connection left"),
        "{old_log}"
    );
    let new_log = lab._agents.1.log();
    assert!(
        new_log.contains("mTLS tunnel listener taken over from the running agent"),
        "{new_log}"
    );
    // New connections now reach the successor's tunnel server (its counters start at zero),
    // and STRICT holds across the upgrade: the program was replaced in place.
    let r = lab.request("client", "after-upgrade").expect("after");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(metric(&lab.b, "mesh_tunnel_inbound_total{result=\"allowed\"}") >= 1.0);
    assert!(
        new_log
            .lines()
            .any(|l| l.contains("STRICT mTLS attached at TC egress")
                && l.contains("\"replaced\":true")),
        "{new_log}"
    );
    assert!(lab.request("outsider", "after-upgrade").is_err());
}
