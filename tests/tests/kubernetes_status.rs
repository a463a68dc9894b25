//! Status in Kubernetes mode, end to end against the test API server and the real `kubectl`:
//! which agent holds the status Lease, what the routes' and MeshPolicies' status say (read back
//! with `kubectl get -o json`, as a user would), that one change is one write, and that another
//! agent takes over when the writer dies.
use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Topology,
    kube::{ApiServer, join_underlay, metric, start_agent, status, until},
    policy::service,
    privileged,
};
use serde_json::Value;

/// Short, so that a takeover fits in a test; renewed every fifth of it.
const LEASE: Duration = Duration::from_secs(3);
const LEASE_FLAG: &str = "3s";

fn route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: mesh-test}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: {parent}, port: 80}}]\n  rules:\n{rules}"
    )
}

/// Our `status.parents` entry of a route, if written.
fn our_parent(api: &ApiServer, name: &str) -> Option<Value> {
    let r = api.get("httproute", "mesh-test", name);
    r["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == "skiff.dev/mesh")
        .cloned()
}

/// `(status, reason, message, observedGeneration)` of condition `ty` of our parent entry.
fn condition(api: &ApiServer, name: &str, ty: &str) -> Option<(String, String, String, i64)> {
    let p = our_parent(api, name)?;
    let c = p["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str().unwrap_or_default().to_string(),
        c["observedGeneration"].as_i64().unwrap_or(0),
    ))
}

fn holder(api: &ApiServer) -> Option<String> {
    api.get("lease", "skiff-system", "skiff-mesh-status")["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

fn writes(t: &Topology) -> f64 {
    metric(
        t,
        "mesh_kubernetes_status_writes_total{kind=\"HTTPRoute\",result=\"ok\"}",
    )
}

#[test]
fn one_agent_holds_the_lease_writes_status_once_and_another_takes_over() {
    if !privileged("one_agent_holds_the_lease_writes_status_once_and_another_takes_over") {
        return;
    }
    let t1 = Topology::new(&["client-1"]);
    let t2 = Topology::with_net(&["client-2"], 202);
    let (underlay, _) = join_underlay(&t1, &t2);
    // In node 1, on the underlay: node 2's agent reaches it through the veth.
    let api = ApiServer::start_at(&t1, &format!("{underlay}:0"));
    api.install_crds();
    let ep: IpAddr = t1.pod("client-1").ip4.into();
    api.apply(
        &[
            service("front", "10.96.0.50".parse().expect("ip"), 80, 8080, &[ep]),
            service("svc-a", "10.96.0.51".parse().expect("ip"), 80, 8080, &[ep]),
        ]
        .concat(),
    );
    let lease_flags = ["--lease-duration", LEASE_FLAG];
    let mut agents = [
        (
            start_agent(&t1, &api, "node-1", &lease_flags),
            &t1,
            "node-1",
        ),
        (
            start_agent(&t2, &api, "node-2", &lease_flags),
            &t2,
            "node-2",
        ),
    ];

    // Exactly one holds the Lease, and both agents agree on which.
    let mut leader = String::new();
    until(LEASE * 3, "a Lease holder both agents agree on", || {
        leader = holder(&api).unwrap_or_default();
        let flags: Vec<bool> = agents
            .iter()
            .map(|(_, t, _)| status(t)["kubernetes"]["leader"] == true)
            .collect();
        flags.iter().filter(|f| **f).count() == 1
            && agents
                .iter()
                .zip(&flags)
                .all(|((_, _, node), f)| *f == (*node == leader))
    });
    let li = agents
        .iter()
        .position(|(_, _, n)| *n == leader)
        .expect("leader is an agent");
    let fi = 1 - li;
    assert_eq!(metric(agents[li].1, "mesh_kubernetes_leader"), 1.0);
    assert_eq!(metric(agents[fi].1, "mesh_kubernetes_leader"), 0.0);
    assert_eq!(
        status(agents[fi].1)["kubernetes"]["lease"]["holder"],
        leader.as_str()
    );

    // A route's status is written by the leader, once.
    let rules = "  - backendRefs: [{name: svc-a, port: 80}]\n";
    let applied = Instant::now();
    api.apply(&route("split", "front", rules));
    until(Duration::from_secs(5), "route status written", || {
        condition(&api, "split", "Accepted").is_some_and(|c| c.0 == "True")
    });
    eprintln!("kubectl apply -> route status: {:?}", applied.elapsed());
    assert_eq!(
        condition(&api, "split", "ResolvedRefs").map(|c| (c.0, c.1)),
        Some(("True".into(), "ResolvedRefs".into()))
    );
    let parent = our_parent(&api, "split").expect("entry");
    assert_eq!(
        parent["parentRef"],
        serde_json::json!({"group": "", "kind": "Service", "name": "front", "port": 80})
    );
    let full = api.kubectl(
        &[
            "get",
            "httproute",
            "split",
            "-n",
            "mesh-test",
            "-o",
            "json",
            "--show-managed-fields",
        ],
        "",
    );
    let full: Value = serde_json::from_str(&full).expect("json");
    let managers: Vec<Value> = full["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        managers.iter().any(|m| m["manager"] == "skiff.dev/mesh"
            && m["operation"] == "Apply"
            && m["subresource"] == "status"),
        "status applied by field manager skiff.dev/mesh: {managers:?}"
    );
    // Quiet for a while: the write's own watch event, the reconcile it triggers and the Lease
    // renewals write nothing more.
    thread::sleep(Duration::from_secs(2));
    assert_eq!(writes(agents[li].1), 1.0, "one change, one write");
    assert_eq!(writes(agents[fi].1), 0.0, "the follower writes nothing");

    // The leader dies without releasing: the other agent takes over once the Lease expires.
    let killed = Instant::now();
    agents[li].0.kill();
    let follower = agents[fi].2;
    let took = until(LEASE * 3, "takeover", || {
        holder(&api).as_deref() == Some(follower)
            && status(agents[fi].1)["kubernetes"]["leader"] == true
    });
    eprintln!("leader killed -> other agent holds the Lease: {took:?} (lease {LEASE:?})");
    assert!(
        took <= LEASE + LEASE / 5 + Duration::from_millis(1500),
        "takeover in {took:?}, lease {LEASE:?}"
    );
    let lease = api.get("lease", "skiff-system", "skiff-mesh-status");
    assert!(
        lease["spec"]["leaseTransitions"].as_i64() >= Some(1),
        "{lease}"
    );

    // The new leader writes the status of the next change: the backend now names a Service
    // that does not exist.
    api.apply(&route(
        "split",
        "front",
        "  - backendRefs: [{name: svc-gone, port: 80}]\n",
    ));
    until(
        Duration::from_secs(5),
        "new leader updates the status",
        || {
            condition(&api, "split", "ResolvedRefs")
                .is_some_and(|c| c.0 == "False" && c.1 == "BackendNotFound" && c.3 == 2)
        },
    );
    eprintln!(
        "killed -> next status written by the new leader: {:?}",
        killed.elapsed()
    );
    assert_eq!(writes(agents[fi].1), 1.0);

    // A clean stop hands over at once: the leader releases the Lease on SIGTERM, so the
    // restarted agent takes it at its next try instead of after a whole lease duration.
    let (t_old, node_old) = (agents[li].1, agents[li].2);
    agents[li].0 = start_agent(t_old, &api, node_old, &lease_flags);
    until(LEASE, "restarted agent is a follower", || {
        status(t_old)["kubernetes"]["lease"]["holder"] == follower
    });
    let stopping = Instant::now();
    assert!(agents[fi].0.terminate(Duration::from_secs(20)).success());
    let stopped = stopping.elapsed();
    let took = until(LEASE * 2, "handover after SIGTERM", || {
        holder(&api).as_deref() == Some(node_old)
    });
    eprintln!(
        "leader stopped (SIGTERM, exit in {stopped:?}) -> other agent holds the Lease {took:?} later"
    );
    assert!(
        took < LEASE,
        "a released Lease is taken before it would expire: {took:?}"
    );
}

#[test]
fn a_missing_backend_is_backend_not_found_and_answers_500_while_the_rest_works() {
    if !privileged("a_missing_backend_is_backend_not_found_and_answers_500_while_the_rest_works") {
        return;
    }
    let t = Topology::new(&["client", "a", "b"]);
    for pod in ["a", "b"] {
        t.pod(pod).ns.echo(pod, 8080, &[]);
    }
    let api = ApiServer::start_at(&t, "127.0.0.1:0");
    api.install_crds();
    let ep = |p: &str| IpAddr::V4(t.pod(p).ip4);
    api.apply(
        &[
            service(
                "front",
                "10.96.0.50".parse().expect("ip"),
                80,
                8080,
                &[ep("a")],
            ),
            service(
                "svc-a",
                "10.96.0.51".parse().expect("ip"),
                80,
                8080,
                &[ep("a")],
            ),
            service(
                "other",
                "10.96.0.60".parse().expect("ip"),
                80,
                8080,
                &[ep("a")],
            ),
        ]
        .concat(),
    );
    api.create_pod(
        "mesh-test",
        "client",
        "node-1",
        t.pod("client").ip4,
        "skiff.dev/mesh: enabled",
    );
    let agent = start_agent(&t, &api, "node-1", &["--lease-duration", LEASE_FLAG]);
    // /ok goes to svc-a, /missing to a Service that does not exist yet.
    api.apply(&route(
        "mixed",
        "front",
        "  - matches: [{path: {type: PathPrefix, value: /ok}}]\n    backendRefs: [{name: svc-a, port: 80}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /missing}}]\n    backendRefs: [{name: svc-b, port: 80}]\n",
    ));
    api.apply(&route(
        "to-b",
        "other",
        "  - backendRefs: [{name: front, port: 80}]\n",
    ));
    let applied = Instant::now();
    until(Duration::from_secs(5), "BackendNotFound reported", || {
        condition(&api, "mixed", "ResolvedRefs").is_some_and(|c| c.1 == "BackendNotFound")
    });
    eprintln!("kubectl apply -> route status: {:?}", applied.elapsed());
    let (status_, reason, message, _) =
        condition(&api, "mixed", "ResolvedRefs").expect("ResolvedRefs");
    assert_eq!(
        (status_.as_str(), reason.as_str()),
        ("False", "BackendNotFound")
    );
    assert!(
        message
            .contains("spec.rules[1].backendRefs[0].name: Service mesh-test/svc-b does not exist"),
        "{message}"
    );
    assert_eq!(
        condition(&api, "mixed", "Accepted").map(|c| (c.0, c.1)),
        Some(("True".into(), "Accepted".into())),
        "the route is accepted: its other rule works"
    );
    assert_eq!(
        condition(&api, "to-b", "ResolvedRefs").map(|c| c.1),
        Some("ResolvedRefs".into())
    );

    let client = &t.pod("client").ns;
    let front = SocketAddr::new("10.96.0.50".parse().expect("ip"), 80);
    let get = |addr: SocketAddr, path: &str| client.http_get(addr, path);
    for _ in 0..5 {
        let ok = get(front, "/ok");
        assert!(
            ok.contains(" 200 ") && ok.contains("\"backend\": \"a\""),
            "{ok}\n{}",
            agent.log()
        );
        let missing = get(front, "/missing");
        assert!(
            missing.contains(" 500 "),
            "a request to the missing backend gets 500: {missing}"
        );
        let other = get(SocketAddr::new("10.96.0.60".parse().expect("ip"), 80), "/");
        assert!(
            other.contains(" 200 "),
            "another route keeps working: {other}"
        );
    }

    // The Service appears: the condition turns True and the requests reach it.
    api.apply(&service(
        "svc-b",
        "10.96.0.52".parse().expect("ip"),
        80,
        8080,
        &[ep("b")],
    ));
    let took = until(Duration::from_secs(5), "ResolvedRefs=True", || {
        condition(&api, "mixed", "ResolvedRefs").is_some_and(|c| c.0 == "True")
    });
    eprintln!("Service created -> ResolvedRefs=True: {took:?}");
    until(Duration::from_secs(2), "/missing reaches svc-b", || {
        get(front, "/missing").contains("\"backend\": \"b\"")
    });
    assert!(
        agent.log_lines().iter().any(|l| l["fields"]["message"]
            == "backendRef unresolved; the route stays in force"
            || l["message"] == "backendRef unresolved; the route stays in force"),
        "the agent logs the unresolved reference: {}",
        agent.log()
    );
}

fn mesh_policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {name}, namespace: mesh-test}}\nspec:\n{spec}"
    )
}

fn policy_accepted(api: &ApiServer, name: &str) -> Option<(String, String, String)> {
    let p = api.get("meshpolicy", "mesh-test", name);
    let c = p["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    Some((
        c["status"].as_str()?.into(),
        c["reason"].as_str()?.into(),
        c["message"].as_str().unwrap_or_default().into(),
    ))
}

#[test]
fn an_invalid_mesh_policy_is_not_accepted_naming_the_field_and_the_valid_one_stays() {
    if !privileged(
        "an_invalid_mesh_policy_is_not_accepted_naming_the_field_and_the_valid_one_stays",
    ) {
        return;
    }
    let t = Topology::new(&["client", "a"]);
    t.pod("a").ns.echo("a", 8080, &[]);
    let api = ApiServer::start_at(&t, "127.0.0.1:0");
    api.install_crds();
    let vip: IpAddr = "10.96.0.70".parse().expect("ip");
    api.apply(&service(
        "web",
        vip,
        80,
        8080,
        &[IpAddr::V4(t.pod("a").ip4)],
    ));
    api.create_pod(
        "mesh-test",
        "client",
        "node-1",
        t.pod("client").ip4,
        "skiff.dev/mesh: enabled",
    );
    api.apply(&mesh_policy(
        "base",
        "  headers: {set: {x-mesh-policy: base}}\n",
    ));
    let agent = start_agent(&t, &api, "node-1", &["--lease-duration", LEASE_FLAG]);
    let header = || {
        let raw = t.pod("client").ns.http_get(SocketAddr::new(vip, 80), "/");
        raw.contains("\"x-mesh-policy\": \"base\"")
    };
    until(Duration::from_secs(5), "base policy Accepted", || {
        policy_accepted(&api, "base").is_some_and(|c| c.0 == "True")
    });
    assert!(
        header(),
        "the base policy's header is injected: {}",
        agent.log()
    );

    // Valid for the CRD schema (a duration), invalid for the agent (zero).
    api.apply(&mesh_policy("bad", "  protocolDetectionTimeout: 0s\n"));
    let took = until(Duration::from_secs(5), "bad policy reported", || {
        policy_accepted(&api, "bad").is_some_and(|c| c.0 == "False")
    });
    eprintln!("kubectl apply -> MeshPolicy status: {took:?}");
    let (_, reason, message) = policy_accepted(&api, "bad").expect("condition");
    assert_eq!(reason, "Invalid");
    assert_eq!(
        message,
        "spec.protocolDetectionTimeout: must be greater than 0"
    );
    let bad = api.get("meshpolicy", "mesh-test", "bad");
    assert_eq!(
        bad["status"]["observedGeneration"],
        bad["metadata"]["generation"]
    );
    assert_eq!(
        policy_accepted(&api, "base").map(|c| c.0),
        Some("True".into())
    );
    for _ in 0..5 {
        assert!(header(), "the valid policy stays in force");
    }

    // An edit that breaks the policy in force is refused the same way: its status says why,
    // and its last valid version (the header) stays in force, as a bad file reload does.
    api.apply(&mesh_policy(
        "base",
        "  headers: {set: {x-mesh-policy: edited}}\n  protocolDetectionTimeout: 0s\n",
    ));
    until(Duration::from_secs(5), "broken edit reported", || {
        policy_accepted(&api, "base").is_some_and(|c| c.0 == "False")
    });
    let raw = t.node.http_get(mesh_tests::ADMIN, "/status");
    let s: serde_json::Value =
        serde_json::from_str(raw.split("\r\n\r\n").nth(1).unwrap_or_default()).expect("json");
    assert_eq!(
        s["kubernetes"]["kept_at_last_good_version"],
        serde_json::json!(["MeshPolicy mesh-test/base"]),
        "{s}"
    );
    for _ in 0..5 {
        assert!(header(), "the last good version stays in force");
    }
}
