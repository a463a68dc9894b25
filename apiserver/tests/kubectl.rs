//! The real kubectl (1.32) against the server: client-side and server-side apply, kustomize,
//! get, edit, label, annotate, watch, delete, CRDs and the error text of an invalid object.
//! Skipped with a message when kubectl is not installed, unless `CI` or
//! `MESH_REQUIRE_KUBECTL` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::ApiServer;
use serde_json::{Value, json};

fn kubectl_available() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var_os("CI").is_some() || std::env::var_os("MESH_REQUIRE_KUBECTL").is_some() {
            panic!("kubectl is required (CI or MESH_REQUIRE_KUBECTL is set) but not found");
        }
        eprintln!("skipping: kubectl not found");
    }
    found
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Kubectl<'a> {
    server: &'a ApiServer,
}

impl Kubectl<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.server.kubeconfig())
            .arg("--cache-dir")
            .arg(self.server.dir.path().join("cache"))
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run kubectl")
    }

    /// Runs kubectl and returns stdout, failing the test on a non-zero exit.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run_env(args, &[]);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f` of a manifest written to a file first.
    fn apply_text(&self, name: &str, manifest: &str) -> String {
        let path = self.server.dir.path().join(name);
        std::fs::write(&path, manifest).expect("write manifest");
        self.ok(&["apply", "-f", path.to_str().expect("path")])
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("kubectl JSON")
    }
}

#[test]
fn apply_edit_label_patch_delete() {
    if !kubectl_available() {
        return;
    }
    let s = ApiServer::start(&[]);
    let k = Kubectl { server: &s };
    let shop = fixture("shop.yaml");
    let out = k.ok(&["apply", "-f", shop.to_str().expect("path")]);
    for want in [
        "namespace/shop created",
        "service/web created",
        "endpointslice.discovery.k8s.io/web-abc created",
        "deployment.apps/web created",
    ] {
        assert!(out.contains(want), "{out}");
    }
    let out = k.ok(&["apply", "-f", shop.to_str().expect("path")]);
    assert!(out.contains("service/web unchanged"), "{out}");
    assert!(k.ok(&["get", "ns"]).contains("shop"));
    assert!(
        k.ok(&["get", "svc", "-n", "shop", "-o", "yaml"])
            .contains("targetPort: 8080")
    );
    let table = k.ok(&["get", "svc", "-n", "shop"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "{table}"
    );
    assert!(table.contains("80/TCP"), "{table}");

    // A changed file goes through kubectl's three-way strategic merge patch.
    let out = k.ok(&[
        "apply",
        "-f",
        fixture("shop-v2.yaml").to_str().expect("path"),
    ]);
    assert!(out.contains("service/web configured"), "{out}");
    let svc = k.json(&["get", "svc", "web", "-n", "shop"]);
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "http", "port": 81, "protocol": "TCP", "targetPort": 8080}])
    );
    let deploy = k.json(&["get", "deploy", "web", "-n", "shop"]);
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "nginx:2");
    assert!(
        c.get("env").is_none(),
        "removed from the file, removed from the object: {c}"
    );
    assert_eq!(deploy["metadata"]["generation"], 2);
    let slice = k.json(&["get", "endpointslice", "web-abc", "-n", "shop"]);
    assert_eq!(slice["endpoints"][0]["addresses"], json!(["10.0.0.6"]));

    // kubectl edit with a scripted editor.
    let editor = s.dir.path().join("editor.sh");
    std::fs::write(&editor, "#!/bin/sh\nsed -i 's/nginx:2/nginx:3/' \"$1\"\n").expect("editor");
    let status = Command::new("chmod")
        .arg("+x")
        .arg(&editor)
        .status()
        .expect("chmod");
    assert!(status.success());
    let out = k.run_env(
        &["edit", "deploy/web", "-n", "shop"],
        &[("EDITOR", editor.to_str().expect("path"))],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deployment.apps/web edited"));
    let deploy = k.json(&["get", "deploy", "web", "-n", "shop"]);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:3"
    );

    // kubectl scale goes through the /scale subresource.
    assert!(
        k.ok(&["scale", "deploy/web", "-n", "shop", "--replicas=3"])
            .contains("deployment.apps/web scaled")
    );
    assert_eq!(
        k.json(&["get", "deploy", "web", "-n", "shop"])["spec"]["replicas"],
        3
    );

    // Labels and annotations.
    k.ok(&["label", "ns", "shop", "skiff.dev/mesh=enabled"]);
    assert!(
        k.ok(&["get", "ns", "-l", "skiff.dev/mesh=enabled"])
            .contains("shop")
    );
    k.ok(&["label", "ns", "shop", "skiff.dev/mesh-"]);
    let ns = k.json(&["get", "ns", "shop"]);
    assert!(
        ns["metadata"]["labels"].get("skiff.dev/mesh").is_none(),
        "{ns}"
    );
    assert_eq!(ns["metadata"]["labels"]["team"], "a");
    k.ok(&["annotate", "svc", "web", "-n", "shop", "skiff.dev/note=hi"]);
    assert_eq!(
        k.json(&["get", "svc", "web", "-n", "shop"])["metadata"]["annotations"]["skiff.dev/note"],
        "hi"
    );

    // Delete, and the object is gone.
    let out = k.ok(&["delete", "svc", "web", "-n", "shop"]);
    assert!(out.contains("service \"web\" deleted"), "{out}");
    let out = k.run_env(&["get", "svc", "web", "-n", "shop"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("services \"web\" not found"));
    k.ok(&["delete", "ns", "shop"]);
    assert!(!k.ok(&["get", "ns"]).contains("shop"));
}

#[test]
fn custom_resources_through_kubectl() {
    if !kubectl_available() {
        return;
    }
    let s = ApiServer::start(&[]);
    let k = Kubectl { server: &s };
    let f = |n: &str| fixture(n).to_str().expect("path").to_string();
    k.apply_text(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n",
    );
    let out = k.ok(&[
        "apply",
        "-f",
        &f("meshpolicy-crd.yaml"),
        "-f",
        &f("httproute-crd.yaml"),
    ]);
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/meshpolicies.skiff.dev created"
        ),
        "{out}"
    );
    k.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/meshpolicies.skiff.dev",
        "--timeout=10s",
    ]);
    let out = k.ok(&[
        "apply",
        "-f",
        &f("meshpolicy.yaml"),
        "-f",
        &f("httproute.yaml"),
    ]);
    assert!(out.contains("meshpolicy.skiff.dev/web created"), "{out}");
    assert!(
        out.contains("httproute.gateway.networking.k8s.io/web created"),
        "{out}"
    );
    assert!(
        k.ok(&["get", "mp", "-n", "shop"]).contains("web"),
        "short names work"
    );
    // Server-side Table printing: the CRD's printer columns.
    let table = k.ok(&["get", "httproutes", "-n", "shop"]);
    assert!(
        table.starts_with("NAME") && table.contains("HOSTNAMES"),
        "{table}"
    );
    assert!(table.contains("web.shop.svc.cluster.local"), "{table}");
    let route = k.json(&[
        "get",
        "httproutes.v1beta1.gateway.networking.k8s.io",
        "web",
        "-n",
        "shop",
    ]);
    assert_eq!(
        route["apiVersion"], "gateway.networking.k8s.io/v1beta1",
        "every served version shows the object"
    );

    // The invalid object: kubectl's own error text, naming the field, and a failing exit.
    let out = k.run_env(&["apply", "-f", &f("meshpolicy-invalid.yaml")], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("The MeshPolicy \"bad\" is invalid: spec.rules[0].action: Unsupported value: \"Maybe\": supported values: \"Allow\", \"Deny\""),
        "{err}"
    );

    // A changed custom object is a JSON merge patch; edit works on custom objects too.
    let changed = s.dir.path().join("mp.yaml");
    let text = std::fs::read_to_string(fixture("meshpolicy.yaml")).expect("fixture");
    std::fs::write(&changed, text.replace("ports: [80, 443]", "ports: [8443]")).expect("write");
    let out = k.ok(&["apply", "-f", changed.to_str().expect("path")]);
    assert!(out.contains("meshpolicy.skiff.dev/web configured"), "{out}");
    assert_eq!(
        k.json(&["get", "mp", "web", "-n", "shop"])["spec"]["rules"][0]["ports"],
        json!([8443])
    );
    let editor = s.dir.path().join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/failMode: Closed/failMode: Open/' \"$1\"\n",
    )
    .expect("editor");
    assert!(
        Command::new("chmod")
            .arg("+x")
            .arg(&editor)
            .status()
            .expect("chmod")
            .success()
    );
    let out = k.run_env(
        &["edit", "mp/web", "-n", "shop"],
        &[("EDITOR", editor.to_str().expect("path"))],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        k.json(&["get", "mp", "web", "-n", "shop"])["spec"]["failMode"],
        "Open"
    );

    // PodMonitors exist only once their CRD is applied.
    let out = k.run_env(&["get", "podmonitors", "-A"], &[]);
    assert!(!out.status.success(), "no podmonitors before the CRD");
    let pm = s.dir.path().join("pm.yaml");
    std::fs::write(&pm, "apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata:\n  name: agent\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {app: skiff}\n  podMetricsEndpoints:\n  - {port: metrics, interval: 15s}\n").expect("write");
    let out = k.run_env(&["apply", "-f", pm.to_str().expect("path")], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no matches for kind \"PodMonitor\" in version \"monitoring.coreos.com/v1\"")
            && err.contains("ensure CRDs are installed first"),
        "{err}"
    );
    k.ok(&["apply", "-f", &f("podmonitor-crd.yaml")]);
    assert!(
        k.ok(&["api-resources", "--api-group=monitoring.coreos.com"])
            .contains("pmon")
    );
    k.ok(&["apply", "-f", pm.to_str().expect("path")]);
    assert!(k.ok(&["get", "pmon", "-n", "shop"]).contains("agent"));

    // Deleting the CRD deletes its objects and its API.
    k.ok(&["delete", "-f", &f("meshpolicy.yaml")]);
    k.ok(&["delete", "crd", "meshpolicies.skiff.dev"]);
    assert!(!k.ok(&["api-resources"]).contains("meshpolicies"));
}

#[test]
fn server_side_apply_kustomize_and_watch() {
    if !kubectl_available() {
        return;
    }
    let s = ApiServer::start(&[]);
    let k = Kubectl { server: &s };
    k.apply_text(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n",
    );
    let out = k.ok(&["apply", "-k", fixture("kustomize").to_str().expect("path")]);
    assert!(out.contains("configmap/skiff-config created"), "{out}");
    let cm = k.json(&["get", "cm", "skiff-config", "-n", "shop"]);
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "skiff"
    );

    let file = s.dir.path().join("ssa.yaml");
    std::fs::write(&file, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  namespace: shop\ndata:\n  a: '1'\n  b: '2'\n").expect("write");
    let out = k.ok(&["apply", "--server-side", "-f", file.to_str().expect("path")]);
    assert!(out.contains("configmap/ssa serverside-applied"), "{out}");
    std::fs::write(&file, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  namespace: shop\ndata:\n  a: '1'\n  c: '3'\n").expect("write");
    k.ok(&["apply", "--server-side", "-f", file.to_str().expect("path")]);
    assert_eq!(
        k.json(&["get", "cm", "ssa", "-n", "shop"])["data"],
        json!({"a": "1", "c": "3"})
    );

    // kubectl get -w prints changes as they happen. The configmap from kustomize shows up first,
    // which says the watch is open, so the test waits for output instead of sleeping.
    let mut watch = k
        .command(&["get", "cm", "-n", "shop", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |want: &dyn Fn(&str) -> bool, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if want(&line) => return,
                Ok(_) => {}
                Err(_) => panic!("kubectl get -w printed no {what}"),
            }
        }
    };
    wait_for(&|l| l.contains("skiff-config"), "initial object");
    k.apply_text("watched.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: watched\n  namespace: shop\ndata:\n  a: b\n");
    wait_for(
        &|l| l.starts_with("ADDED") && l.contains("watched"),
        "ADDED",
    );
    k.ok(&["delete", "configmap", "watched", "-n", "shop"]);
    wait_for(
        &|l| l.starts_with("DELETED") && l.contains("watched"),
        "DELETED",
    );
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn imperative_create_sends_protobuf() {
    if !kubectl_available() {
        return;
    }
    let s = ApiServer::start(&[]);
    let k = Kubectl { server: &s };
    assert!(
        k.ok(&["create", "namespace", "imp"])
            .contains("namespace/imp created")
    );
    k.ok(&[
        "create",
        "configmap",
        "c",
        "-n",
        "imp",
        "--from-literal=a=b",
    ]);
    k.ok(&[
        "create",
        "secret",
        "generic",
        "s",
        "-n",
        "imp",
        "--from-literal=pw=x",
    ]);
    k.ok(&["create", "serviceaccount", "robot", "-n", "imp"]);
    assert_eq!(
        k.json(&["get", "cm", "c", "-n", "imp"])["data"],
        json!({"a": "b"})
    );
    assert_eq!(
        k.json(&["get", "secret", "s", "-n", "imp"])["data"],
        json!({"pw": "eA=="})
    );
    assert!(
        k.ok(&["describe", "sa", "robot", "-n", "imp"])
            .contains("robot")
    );
    let out = k.run_env(
        &["create", "deployment", "d", "--image=x", "-n", "imp"],
        &[],
    );
    assert!(!out.status.success(), "other generators get 415");
}
