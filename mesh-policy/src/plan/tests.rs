use super::*;
use crate::{AuthzProtocol, PortRange};

fn prefix(s: &str) -> Prefix {
    s.parse().expect("prefix")
}

fn iface(s: &str) -> InterfaceName {
    s.parse().expect("interface name")
}

fn rule(key: &str, dst: Option<&str>, action: AuthzAction) -> AuthzRule {
    AuthzRule {
        key: key.into(),
        rule: key.into(),
        action,
        interfaces: Some(vec![iface("h1")]),
        src: None,
        dst: dst.map(prefix),
        ports: None,
        protocol: None,
    }
}

fn entry<'a>(plan: &'a AuthzPlan, scope: Option<&str>, dst: Option<&str>) -> &'a AuthzEntry {
    plan.entries
        .iter()
        .find(|e| {
            e.iface.as_deref() == scope
                && e.dst == dst.map(prefix)
                && (dst.is_some() || e.family == Family::V4)
        })
        .unwrap_or_else(|| panic!("no entry {scope:?} {dst:?} in {:#?}", plan.entries))
}

fn keys<'a>(plan: &'a AuthzPlan, e: &AuthzEntry) -> Vec<&'a str> {
    e.rules
        .iter()
        .map(|&i| plan.rules[i].key.as_str())
        .collect()
}

#[test]
fn most_specific_entry_holds_every_covering_rule_deny_first() {
    let plan = AuthzPlan::compile(
        vec![
            rule("r1", Some("10.0.0.0/8"), AuthzAction::Allow),
            rule("r2", Some("10.1.0.0/16"), AuthzAction::Allow),
            rule("r3", Some("10.1.2.0/24"), AuthzAction::Deny),
            rule("r4", Some("192.168.0.0/16"), AuthzAction::Deny),
            rule("r5", None, AuthzAction::Deny),
            rule("r6", Some("fd00::/8"), AuthzAction::Allow),
        ],
        BTreeMap::from([(iface("h1"), AuthzAction::Deny)]),
    )
    .expect("valid");
    let at = |dst| keys(&plan, entry(&plan, Some("h1"), Some(dst)));
    assert_eq!(at("10.1.2.0/24"), ["r3", "r5", "r1", "r2"]);
    assert_eq!(at("10.1.0.0/16"), ["r5", "r1", "r2"]);
    assert_eq!(at("10.0.0.0/8"), ["r5", "r1"]);
    assert_eq!(at("192.168.0.0/16"), ["r4", "r5"]);
    assert_eq!(at("fd00::/8"), ["r5", "r6"]);
    // Root entries per family carry the default and the destination-less rules only.
    let roots: Vec<&AuthzEntry> = plan.entries.iter().filter(|e| e.dst.is_none()).collect();
    assert_eq!(roots.len(), 2);
    for r in roots {
        assert_eq!(keys(&plan, r), ["r5"]);
        assert_eq!(r.default, AuthzAction::Deny);
    }
    // No entry for "all interfaces": no rule asks for it.
    assert!(plan.entries.iter().all(|e| e.iface.is_some()));
    assert_eq!(plan.entries.len(), 7);
}

#[test]
fn scopes_and_families_stay_apart() {
    let mut all = rule("all", None, AuthzAction::Deny);
    all.interfaces = None;
    all.src = Some(prefix("10.9.0.0/16"));
    let mut h2 = rule("h2", Some("10.0.0.0/8"), AuthzAction::Allow);
    h2.interfaces = Some(vec![iface("h2")]);
    let plan = AuthzPlan::compile(vec![all, h2], BTreeMap::new()).expect("valid");
    // The all-interfaces rule has an IPv4 source: only an IPv4 root for every interface.
    let any: Vec<&AuthzEntry> = plan.entries.iter().filter(|e| e.iface.is_none()).collect();
    assert_eq!(any.len(), 1);
    assert_eq!((any[0].family, any[0].dst), (Family::V4, None));
    assert_eq!(keys(&plan, any[0]), ["all"]);
    // h2's entries do not repeat the all-interfaces rule: the program looks both up.
    assert_eq!(
        keys(&plan, entry(&plan, Some("h2"), Some("10.0.0.0/8"))),
        ["h2"]
    );
    let h2_v6_root = plan
        .entries
        .iter()
        .find(|e| e.iface.as_deref() == Some("h2") && e.family == Family::V6)
        .expect("v6 root");
    assert!(h2_v6_root.rules.is_empty());
    assert_eq!(h2_v6_root.default, AuthzAction::Allow);
}

#[test]
fn problems_name_the_rule() {
    let mut mixed = rule("mixed", Some("fd00::/8"), AuthzAction::Allow);
    mixed.src = Some(prefix("10.0.0.0/8"));
    let mut no_ifaces = rule("none", None, AuthzAction::Allow);
    no_ifaces.interfaces = Some(vec![]);
    let errs = AuthzPlan::compile(vec![mixed, no_ifaces], BTreeMap::new()).expect_err("invalid");
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].contains("rule mixed: source 10.0.0.0/8 and destination fd00::/8"));
    assert!(errs[1].contains("rule none: empty interface list"));
}

#[test]
fn too_many_rules_on_one_entry_after_the_closure() {
    // 10 rules on /8 and 7 on /24: the /24 entry needs 17 slots.
    let rules: Vec<AuthzRule> = (0..17)
        .map(|i| {
            let dst = if i < 10 { "10.0.0.0/8" } else { "10.1.1.0/24" };
            rule(&format!("r{i}"), Some(dst), AuthzAction::Allow)
        })
        .collect();
    let errs = AuthzPlan::compile(rules.clone(), BTreeMap::new()).expect_err("overflow");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("authorization on h1, destination 10.1.1.0/24: 17 rules apply (r0, r1"),
        "{errs:?}"
    );
    // One fewer fits.
    assert!(AuthzPlan::compile(rules[1..].to_vec(), BTreeMap::new()).is_ok());
}

fn capture(prefix_text: &str, ports: &[&str]) -> CaptureRule {
    CaptureRule {
        prefix: prefix(prefix_text),
        ports: ports.iter().map(|p| p.parse().expect("port")).collect(),
    }
}

const POLICY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: alt, port: 81}]
---
apiVersion: skiff.dev/v1alpha1
kind: MeshPolicy
metadata: {name: mesh, namespace: shop}
spec:
  failMode: closed
  capture: [{cidr: 10.96.0.10, ports: [82, "8000-8100"]}]
  authorization:
    defaults: {h1: Deny}
    rules:
    - {name: web, action: Allow, interfaces: [h1], to: [10.96.0.0/16], ports: [80], protocol: TCP}
"#;

#[test]
fn the_plan_merges_policy_and_node_capture_and_takes_the_node_fail_mode() {
    let policy = Compiled::from_yaml(POLICY, "policy.yaml").expect("valid policy");
    let node = NodeSettings {
        interfaces: vec![iface("h2"), iface("h1"), iface("h2")],
        capture: vec![
            capture("10.96.0.10", &["8101-8200"]),
            capture("fd00::/64", &["*"]),
        ],
        fail_mode: None,
        mesh_node_ip: None,
    };
    let plan = policy.kernel_plan(&node).expect("fits");
    assert_eq!(plan.fail_mode, FailMode::Closed, "the policy's");
    assert_eq!(plan.interfaces, [iface("h1"), iface("h2")]);
    assert_eq!(
        plan.capture,
        [
            capture("10.96.0.10/32", &["80-82", "8000-8200"]),
            capture("fd00::/64", &["*"]),
        ]
    );
    let web = &plan.authz.rules[0];
    assert_eq!(web.key, "shop/mesh/web");
    assert_eq!(web.dst, Some(prefix("10.96.0.0/16")));
    assert_eq!(web.ports, PortRange::single(80));
    assert_eq!(web.protocol, Some(AuthzProtocol::Tcp));
    assert_eq!(plan.authz.defaults[&iface("h1")], AuthzAction::Deny);

    let open = NodeSettings {
        fail_mode: Some(FailMode::Open),
        ..node
    };
    assert_eq!(
        policy.kernel_plan(&open).expect("fits").fail_mode,
        FailMode::Open
    );
}

#[test]
fn a_prefix_with_too_many_port_ranges_is_refused_by_name() {
    let policy = Compiled::empty();
    let ports: Vec<String> = (1..=17u16).map(|p| (p * 10).to_string()).collect();
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    let node = NodeSettings {
        capture: vec![capture("10.1.0.0/16", &ports)],
        ..NodeSettings::default()
    };
    let err = policy.kernel_plan(&node).expect_err("too many ranges");
    assert_eq!(
        err.0,
        ["capture 10.1.0.0/16: 17 separate port ranges; at most 16 fit in one entry"]
    );
}
