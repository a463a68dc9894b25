//! The policy side of mutual TLS: workloads from Pod objects, mTLS modes per namespace, and
//! authorization by source identity (userspace only, never in the kernel plan).

use std::net::IpAddr;

use super::*;
use crate::{AuthzAction, Identity, MtlsMode, NodeSettings};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn pod(namespace: &str, name: &str, extra_meta: &str, spec: &str, status: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{extra_meta}spec:\n{spec}status:\n{status}"
    )
}

/// A running pod on node `n1` (10.0.0.1) with the given IP and ServiceAccount.
fn running(namespace: &str, name: &str, pod_ip: &str, sa: &str) -> String {
    pod(
        namespace,
        name,
        "",
        &format!(
            "  serviceAccountName: {sa}\n  nodeName: n1\n  containers: [{{name: c, image: busybox}}]\n"
        ),
        &format!(
            "  phase: Running\n  hostIP: 10.0.0.1\n  podIP: {pod_ip}\n  podIPs: [{{ip: {pod_ip}}}]\n"
        ),
    )
}

fn namespace(name: &str, label: Option<&str>) -> String {
    let labels = label.map_or(String::new(), |v| {
        format!("  labels: {{skiff.dev/mesh: {v}}}\n")
    });
    format!("---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n{labels}")
}

fn mesh_policy(name: &str, created: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata:\n  name: {name}\n  namespace: skiff\n  creationTimestamp: \"{created}\"\nspec:\n{spec}"
    )
}

fn id(principal: &str) -> Identity {
    Identity::from_spiffe(principal).expect("a workload SPIFFE ID")
}

#[test]
fn workloads_are_found_by_ip_with_identity_node_and_enrolment() {
    let text = [
        namespace("shop", Some("enabled")),
        namespace("plain", None),
        running("shop", "web", "10.244.1.5", "web"),
        // A pod of an enrolled namespace that opts out.
        pod(
            "shop",
            "legacy",
            "  labels: {skiff.dev/mesh: disabled, app: legacy}\n",
            "  nodeName: n2\n",
            "  phase: Running\n  hostIPs: [{ip: 10.0.0.2}, {ip: \"fd00::2\"}]\n  podIP: 10.244.2.7\n  podIPs: [{ip: 10.244.2.7}, {ip: \"fd00:244::7\"}]\n",
        ),
        // A pod of a namespace that is not enrolled that opts in; no ServiceAccount named.
        pod(
            "plain",
            "opted-in",
            "  labels: {skiff.dev/mesh: enabled}\n",
            "  nodeName: n1\n",
            "  phase: Pending\n  podIP: 10.244.1.9\n",
        ),
        running("plain", "outside", "10.244.1.10", "default"),
    ]
    .concat();
    let compiled = compile(&text);
    assert_eq!(compiled.summary().workloads, 4);

    let web = compiled.workload(ip("10.244.1.5")).expect("web by its IP");
    assert_eq!(
        (
            web.namespace.as_str(),
            web.name.as_str(),
            web.service_account.as_str()
        ),
        ("shop", "web", "web")
    );
    assert_eq!(web.node_ip, Some(ip("10.0.0.1")));
    assert_eq!(web.node_name.as_deref(), Some("n1"));
    assert!(web.enrolled, "its namespace is enrolled");
    assert_eq!(
        web.principal("cluster.local"),
        "spiffe://cluster.local/ns/shop/sa/web"
    );

    // Both families of a dual-stack pod, and an IPv4-mapped address as IPv4.
    let legacy = compiled
        .workload(ip("fd00:244::7"))
        .expect("by its IPv6 address");
    assert_eq!(legacy.name, "legacy");
    assert!(
        !legacy.enrolled,
        "the pod's own label overrides its namespace"
    );
    assert_eq!(legacy.node_ips, vec![ip("10.0.0.2"), ip("fd00::2")]);
    assert_eq!(
        compiled.workload(ip("::ffff:10.244.2.7")).map(|w| &w.name),
        Some(&"legacy".to_string())
    );

    let opted_in = compiled
        .workload(ip("10.244.1.9"))
        .expect("pending with an IP");
    assert!(opted_in.enrolled);
    assert_eq!(opted_in.service_account, "default");
    assert_eq!(opted_in.node_ip, None);
    assert!(
        !compiled
            .workload(ip("10.244.1.10"))
            .expect("listed")
            .enrolled
    );
    assert!(compiled.workload(ip("10.244.9.9")).is_none());
}

#[test]
fn pods_that_do_not_own_their_ip_are_left_out() {
    // A hostNetwork pod shows its node's IP; a finished pod keeps an IP that has been reused.
    let text = [
        pod(
            "kube-system",
            "proxy",
            "",
            "  hostNetwork: true\n",
            "  phase: Running\n  podIP: 10.0.0.1\n",
        ),
        pod(
            "kube-system",
            "proxy-2",
            "",
            "  hostNetwork: true\n",
            "  phase: Running\n  podIP: 10.0.0.1\n",
        ),
        pod(
            "shop",
            "job",
            "",
            "  nodeName: n1\n",
            "  phase: Succeeded\n  podIP: 10.244.1.5\n",
        ),
        running("shop", "web", "10.244.1.5", "web"),
        pod("shop", "new", "", "  nodeName: n1\n", "  phase: Pending\n"),
    ]
    .concat();
    let compiled = compile(&text);
    assert!(compiled.workload(ip("10.0.0.1")).is_none());
    assert_eq!(
        compiled.workload(ip("10.244.1.5")).map(|w| &w.name),
        Some(&"web".to_string())
    );
    assert_eq!(compiled.summary().workloads, 1);
}

#[test]
fn a_kubectl_pod_dump_parses_and_is_stripped() {
    // What `kubectl get pod -o yaml` prints, trimmed: fields the engine does not read are
    // accepted and dropped.
    let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-7d9f\n  namespace: shop\n  uid: 1b2c\n  annotations: {kubectl.kubernetes.io/restartedAt: x}\n  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web, uid: u}]\nspec:\n  serviceAccountName: web\n  serviceAccount: web\n  nodeName: n1\n  containers:\n  - name: web\n    image: nginx\n    ports: [{containerPort: 80}]\n  volumes: [{name: v, emptyDir: {}}]\nstatus:\n  phase: Running\n  hostIP: 10.0.0.1\n  podIP: 10.244.1.5\n  conditions: [{type: Ready, status: \"True\"}]\n  containerStatuses: [{name: web, ready: true, restartCount: 0, image: nginx, imageID: x, started: true, state: {running: {}}}]\n";
    let objects = crate::parse_documents(text, "pods.yaml").expect("parses");
    let crate::Resource::Pod(pod) = &objects[0].resource else {
        panic!("a Pod");
    };
    assert!(pod.metadata.annotations.is_none());
    let spec = pod.spec.as_ref().expect("spec");
    assert!(spec.containers.is_empty() && spec.volumes.is_none());
    assert_eq!(spec.service_account_name.as_deref(), Some("web"));
    let status = pod.status.as_ref().expect("status");
    assert!(status.container_statuses.is_none());
    assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1));
    assert_eq!(objects[0].display_name(), "Pod shop/web-7d9f");
}

#[test]
fn bad_pods_are_reported_by_field() {
    let errs = errors(&pod(
        "shop",
        "bad",
        "",
        "  serviceAccountName: Web_SA\n  nodeName: n1\n",
        "  phase: Runing\n  hostIP: 10.0.0.1\n  hostIPs: [{ip: 10.0.0.1}, {ip: \"fd00::zz\"}]\n  podIP: x\n  podIPs: [{ip: 10.244.1.300}]\n",
    ));
    assert_error(&errs, "status.podIP", "\"x\" is not an IP address");
    assert_error(
        &errs,
        "status.podIPs[0].ip",
        "\"10.244.1.300\" is not an IP address",
    );
    assert_error(
        &errs,
        "status.hostIPs[1].ip",
        "\"fd00::zz\" is not an IP address",
    );
    assert_error(&errs, "spec.serviceAccountName", "lower-case alphanumeric");
    assert_error(
        &errs,
        "status.phase",
        "\"Runing\" is not one of Pending, Running",
    );
    assert!(errs.iter().all(|e| e.object == "Pod shop/bad"), "{errs:#?}");
}

#[test]
fn two_running_pods_with_one_ip_name_each_other() {
    let text = [
        running("shop", "a", "10.244.1.5", "web"),
        running("shop", "b", "10.244.1.6", "web"),
        running("other", "c", "10.244.1.5", "web"),
    ]
    .concat();
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].object, "Pod other/c");
    assert_error(
        &errs,
        "status.podIP",
        "10.244.1.5 is also the IP of Pod shop/a (test.yaml#1)",
    );
}

#[test]
fn mtls_mode_per_namespace_oldest_policy_wins() {
    assert_eq!(compile("").mtls_mode("shop"), MtlsMode::Permissive);
    let text = [
        mesh_policy(
            "young",
            "2024-01-01T00:00:00Z",
            "  mtls:\n    mode: STRICT\n    namespaces: {legacy: STRICT, payments: PERMISSIVE, shop: PERMISSIVE}\n",
        ),
        mesh_policy(
            "old",
            "2020-01-01T00:00:00Z",
            "  mtls:\n    namespaces: {payments: STRICT}\n",
        ),
    ]
    .concat();
    let compiled = compile(&text);
    assert_eq!(compiled.mtls_mode("payments"), MtlsMode::Strict, "old wins");
    assert_eq!(compiled.mtls_mode("shop"), MtlsMode::Permissive);
    assert_eq!(compiled.mtls_mode("legacy"), MtlsMode::Strict);
    assert_eq!(
        compiled.mtls_mode("anything-else"),
        MtlsMode::Strict,
        "only the young policy sets the mode"
    );

    let errs = errors(&mesh_policy(
        "bad",
        "2020-01-01T00:00:00Z",
        "  mtls:\n    mode: strict\n",
    ));
    assert_error(&errs, "spec.mtls.mode", "unknown variant `strict`");
    let errs = errors(&mesh_policy(
        "bad",
        "2020-01-01T00:00:00Z",
        "  mtls:\n    namespaces: {Shop: STRICT}\n",
    ));
    assert_error(
        &errs,
        "spec.mtls.namespaces[\"Shop\"]",
        "not a namespace name",
    );
}

/// A policy with L4 rules by address and by identity on the pod `10.244.2.7:8080`.
fn identity_policy() -> Compiled {
    compile(&mesh_policy(
        "authz",
        "2020-01-01T00:00:00Z",
        r#"  authorization:
    defaults: {h1: Deny}
    rules:
    - name: shop-may-call
      action: Allow
      to: [10.244.2.7/32]
      namespaces: [shop]
    - name: admins-anywhere
      action: Allow
      principals: ["*/sa/admin"]
    - name: no-evil
      action: Deny
      to: [10.244.2.0/24]
      principals: ["spiffe://cluster.local/ns/shop/sa/evil", "spiffe://other.td/*"]
    - name: no-bad-subnet
      action: Deny
      from: [10.244.9.0/24]
    - name: local-web
      action: Allow
      interfaces: [h1]
      ports: [8080]
"#,
    ))
}

#[test]
fn inbound_deny_before_allow_with_principals() {
    let policy = identity_policy();
    let dst = addr("10.244.2.7:8080");
    let src = ip("10.244.1.5");
    let decide = |who: Option<&Identity>, src: IpAddr, iface: Option<&str>| {
        let d = policy.authorize_inbound(who, src, dst, iface);
        (d.allowed, d.rule.unwrap_or("default"))
    };
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let evil = id("spiffe://cluster.local/ns/shop/sa/evil");
    let foreign = id("spiffe://other.td/ns/shop/sa/admin");
    let admin = id("spiffe://cluster.local/ns/ops/sa/admin");
    let stranger = id("spiffe://cluster.local/ns/ops/sa/batch");

    assert_eq!(
        decide(Some(&web), src, None),
        (true, "skiff/authz/shop-may-call")
    );
    // evil is in `shop` too: the Deny wins over the Allow by namespace.
    assert_eq!(
        decide(Some(&evil), src, None),
        (false, "skiff/authz/no-evil")
    );
    // A prefix pattern: a whole other trust domain, even for an admin.
    assert_eq!(
        decide(Some(&foreign), src, None),
        (false, "skiff/authz/no-evil")
    );
    assert_eq!(
        decide(Some(&admin), src, None),
        (true, "skiff/authz/admins-anywhere")
    );
    // No rule matches; through the tunnel there is no interface, so the default is Allow.
    assert_eq!(decide(Some(&stranger), src, None), (true, "default"));
    // The same from a local pod on h1: that interface's default.
    assert_eq!(
        decide(Some(&stranger), src, Some("h1")),
        (true, "skiff/authz/local-web")
    );
    let other_port =
        policy.authorize_inbound(Some(&stranger), src, addr("10.244.2.7:9090"), Some("h1"));
    assert_eq!((other_port.allowed, other_port.rule), (false, None));
    // A Deny by address applies whatever the identity.
    assert_eq!(
        decide(Some(&admin), ip("10.244.9.1"), None),
        (false, "skiff/authz/no-bad-subnet")
    );
    // Plaintext: identity rules neither allow nor deny it.
    assert_eq!(decide(None, src, None), (true, "default"));
    assert_eq!(
        decide(None, src, Some("h1")),
        (true, "skiff/authz/local-web")
    );
    // IPv4-mapped addresses from a dual-stack socket decide as IPv4.
    let mapped = policy.authorize_inbound(
        Some(&evil),
        ip("::ffff:10.244.1.5"),
        addr("[::ffff:10.244.2.7]:8080"),
        None,
    );
    assert_eq!(
        (mapped.allowed, mapped.rule),
        (false, Some("skiff/authz/no-evil"))
    );
}

#[test]
fn identity_rules_never_reach_the_kernel_plan() {
    let policy = identity_policy();
    let names: Vec<&str> = policy
        .settings()
        .authorization
        .identity
        .iter()
        .map(|r| r.l4.name())
        .collect();
    assert_eq!(
        names,
        [
            "skiff/authz/shop-may-call",
            "skiff/authz/admins-anywhere",
            "skiff/authz/no-evil"
        ]
    );
    let plan = policy.kernel_plan(&NodeSettings::default()).expect("fits");
    let keys: Vec<&str> = plan.authz.rules.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["skiff/authz/no-bad-subnet", "skiff/authz/local-web"]);
    // The Deny by principal on 10.244.2.0/24 left no entry for that destination: it is not
    // turned into a drop of everything sent there.
    assert!(
        plan.authz
            .entries
            .iter()
            .all(|e| e.dst.is_none_or(|d| d.to_string() != "10.244.2.0/24")),
        "{:#?}",
        plan.authz.entries
    );
    assert_eq!(
        plan.authz.defaults.values().collect::<Vec<_>>(),
        [&AuthzAction::Deny]
    );

    // Only identity rules: nothing for the kernel to do.
    let only = compile(&mesh_policy(
        "p",
        "2020-01-01T00:00:00Z",
        "  authorization:\n    rules:\n    - {name: a, action: Deny, from: [10.1.0.0/16], principals: [\"*\"]}\n",
    ));
    let plan = only.kernel_plan(&NodeSettings::default()).expect("fits");
    assert!(plan.authz.is_empty());
    assert!(
        !only
            .authorize_inbound(
                Some(&id("spiffe://td/ns/a/sa/b")),
                ip("10.1.2.3"),
                addr("10.9.9.9:80"),
                None
            )
            .allowed
    );
    assert!(
        only.authorize_inbound(None, ip("10.1.2.3"), addr("10.9.9.9:80"), None)
            .allowed
    );
}

#[test]
fn principals_and_namespaces_are_validated_naming_rule_and_field() {
    let errs = errors(&mesh_policy(
        "p",
        "2020-01-01T00:00:00Z",
        r#"  authorization:
    rules:
    - name: ok
      action: Allow
      principals: ["spiffe://td/ns/shop/*"]
    - name: broken
      action: Allow
      principals: ["spiffe://td/ns/prod*", "td/ns/a/sa/b", "spiffe://td/ns/shop/sa/Web"]
      namespaces: [Shop]
    http:
    - name: no-admin
      paths: [/admin]
      principals: ["*/x/admin"]
    - name: deny-ops
      namespaces: [ops]
"#,
    ));
    assert_error(
        &errs,
        "spec.authorization.rules[1].principals[0]",
        "'*' may only stand for whole leading or trailing path segments",
    );
    assert_error(
        &errs,
        "spec.authorization.rules[1].principals[1]",
        "is not a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>) (rule \"broken\")",
    );
    assert_error(
        &errs,
        "spec.authorization.rules[1].principals[2]",
        "service account: \"Web\" is not a valid DNS name",
    );
    assert_error(
        &errs,
        "spec.authorization.rules[1].namespaces[0]",
        "not a namespace name (rule \"broken\")",
    );
    assert_error(
        &errs,
        "spec.authorization.http[0].principals[0]",
        "expected \"sa\", found \"x\" (rule \"no-admin\")",
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");
}

#[test]
fn http_deny_by_identity() {
    let policy = compile(&mesh_policy(
        "p",
        "2020-01-01T00:00:00Z",
        r#"  authorization:
    http:
    - name: guests-read-only
      methods: [DELETE, PUT]
      principals: ["*/sa/guest"]
    - name: no-ops-admin
      paths: [/admin]
      namespaces: [ops]
"#,
    ));
    let none = |_: &str| None;
    let denied = |who: Option<&Identity>, method: &str, path: &str| {
        policy
            .http_denied_by(who, method, path, none)
            .map(|r| r.name.as_str())
    };
    let guest = id("spiffe://td/ns/shop/sa/guest");
    let ops = id("spiffe://td/ns/ops/sa/deployer");
    assert_eq!(
        denied(Some(&guest), "DELETE", "/x"),
        Some("skiff/p/guests-read-only")
    );
    assert_eq!(denied(Some(&guest), "GET", "/x"), None);
    assert_eq!(
        denied(Some(&ops), "GET", "/admin/users"),
        Some("skiff/p/no-ops-admin")
    );
    assert_eq!(denied(Some(&ops), "GET", "/public"), None);
    // Plaintext: unknown source, so rules by identity deny nothing; the proxy's existing
    // identity-less check (`HttpDeny::matches`) agrees.
    assert_eq!(denied(None, "DELETE", "/admin"), None);
    let rules = &policy.settings().authorization.http;
    assert!(rules.iter().all(|r| !r.matches("DELETE", "/admin", none)));
}

#[test]
fn the_manifest_example_compiles_and_decides_as_its_comments_say() {
    let policy = compile(include_str!(
        "../../../manifests/examples/meshpolicy-mtls.yaml"
    ));
    assert_eq!(policy.mtls_mode("payments"), MtlsMode::Strict);
    assert_eq!(policy.mtls_mode("shop"), MtlsMode::Permissive);
    let payments = addr("10.244.3.4:8443");
    let checkout = id("spiffe://cluster.local/ns/shop/sa/checkout");
    let partner = id("spiffe://partner.example/ns/shop/sa/checkout");
    let decision = policy.authorize_inbound(Some(&checkout), ip("10.244.1.2"), payments, None);
    assert_eq!(
        (decision.allowed, decision.rule),
        (true, Some("skiff-system/mtls/checkout-to-payments"))
    );
    let decision = policy.authorize_inbound(Some(&partner), ip("10.244.1.2"), payments, None);
    assert_eq!(
        (decision.allowed, decision.rule),
        (false, Some("skiff-system/mtls/no-untrusted-domains"))
    );
    let guest = id("spiffe://cluster.local/ns/shop/sa/guest");
    assert!(
        policy
            .http_denied_by(Some(&guest), "POST", "/cart", |_| None)
            .is_some()
    );
    assert!(
        policy
            .http_denied_by(Some(&guest), "GET", "/cart", |_| None)
            .is_none()
    );
    assert!(
        policy
            .kernel_plan(&NodeSettings::default())
            .expect("fits")
            .authz
            .is_empty()
    );
}

#[test]
fn the_plan_lists_this_nodes_enrolled_strict_pods_only() {
    let text = [
        namespace("shop", Some("enabled")),
        namespace("pay", Some("enabled")),
        namespace("plain", None),
        running("shop", "web", "10.244.1.5", "web"),
        running("pay", "api", "10.244.1.6", "api"),
        // STRICT but not in the mesh: nothing could reach it through the tunnel.
        running("plain", "outside", "10.244.1.7", "default"),
        // STRICT, enrolled, on another node (and dual-stack).
        pod(
            "pay",
            "api-2",
            "",
            "  serviceAccountName: api\n  nodeName: n2\n",
            "  phase: Running\n  hostIPs: [{ip: 10.0.0.2}, {ip: \"fd00::2\"}]\n  podIP: 10.244.2.6\n  podIPs: [{ip: 10.244.2.6}, {ip: \"fd00:244::6\"}]\n",
        ),
        mesh_policy(
            "mesh",
            "2026-01-01T00:00:00Z",
            "  mtls:\n    namespaces: {pay: STRICT, plain: STRICT}\n",
        ),
    ]
    .concat();
    let policy = compile(&text);
    let on = |node: &str| NodeSettings {
        mesh_node_ip: Some(ip(node)),
        ..NodeSettings::default()
    };
    let plan = policy.kernel_plan(&on("10.0.0.1")).expect("fits");
    assert_eq!(plan.strict, [ip("10.244.1.6")], "pay/api only");
    let plan = policy.kernel_plan(&on("fd00::2")).expect("fits");
    assert_eq!(
        plan.strict,
        [ip("10.244.2.6"), ip("fd00:244::6")],
        "a node found by any of its IPs, both families of its pod"
    );
    let plan = policy.kernel_plan(&NodeSettings::default()).expect("fits");
    assert!(
        plan.strict.is_empty(),
        "without the mesh there is no tunnel, so nothing is STRICT"
    );
}
