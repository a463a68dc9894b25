//! Parsing and loading: document handling, directories, settings merge, dumps.

use std::time::Duration;

use super::*;
use crate::{FailMode, LoadError, PolicyStore, Resource, load_path, parse_documents};

#[test]
fn empty_and_comment_documents_are_skipped() {
    let text = format!(
        "# leading comment\n---\n---\n# only a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n{}",
        service("web", "10.96.0.1")
    );
    let objects = parse_documents(&text, "p.yaml").expect("parses");
    assert_eq!(objects.len(), 3);
    // Namespaces are kept for their labels (enrolment); cluster-scoped, so named without one.
    assert!(matches!(objects[0].resource, Resource::Namespace(_)));
    assert_eq!(objects[0].display_name(), "Namespace shop");
    assert!(matches!(objects[1].resource, Resource::Service(_)));
    assert!(matches!(objects[2].resource, Resource::EndpointSlice(_)));
    // Document numbers count every document, skipped or not.
    assert_eq!(objects[0].source, "p.yaml#3");
}

#[test]
fn yaml_syntax_error_is_reported_once() {
    let errs = errors("apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].reason.contains("not valid YAML"), "{errs:#?}");
}

#[test]
fn tls_route_versions() {
    for version in ["v1alpha2", "v1alpha3", "v1"] {
        let hostnames = if version == "v1alpha2" {
            ""
        } else {
            "  hostnames: [a.example.com]\n"
        };
        let text = format!(
            "{}---\napiVersion: gateway.networking.k8s.io/{version}\nkind: TLSRoute\nmetadata: {{name: t, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n{hostnames}  rules: [{{backendRefs: [{{name: v1, port: 80}}]}}]\n",
            base()
        );
        let compiled = compile(&text);
        assert!(
            compiled.route_tls(web(), Some("a.example.com")).is_some(),
            "{version}"
        );
    }
}

#[test]
fn load_directory_in_file_name_order() {
    let dir = std::env::temp_dir().join(format!("mesh-policy-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("b-routes.yml"), http_route("r", "", "")).expect("write");
    std::fs::write(dir.join("a-services.yaml"), base()).expect("write");
    std::fs::write(dir.join("notes.txt"), "not policy").expect("write");
    let objects = load_path(&dir).expect("loads");
    assert_eq!(objects.len(), 11);
    assert_eq!(objects[0].source, "a-services.yaml#1");
    assert_eq!(objects[10].source, "b-routes.yml#1");
    let compiled = Compiled::load(&dir).expect("compiles");
    assert_eq!(compiled.summary().http_routes, 1);
    let single = load_path(dir.join("b-routes.yml")).expect("loads a file");
    assert_eq!(single.len(), 1);

    std::fs::write(
        dir.join("c-bad.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: p}\n",
    )
    .expect("write");
    let Err(LoadError::Invalid(errs)) = load_path(&dir) else {
        panic!("should fail");
    };
    assert_eq!(errs[0].source, "c-bad.yaml#1");
    let message = LoadError::Invalid(errs).to_string();
    assert!(
        message.starts_with(
            "invalid policy: Deployment default/p (c-bad.yaml#1) kind: unknown kind Deployment"
        ),
        "{message}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");

    let missing = load_path(dir.join("nope"));
    assert!(matches!(missing, Err(LoadError::Io { .. })));
    assert_eq!(missing.err().map(|e| e.label()), Some("io"));
}

#[test]
fn mesh_settings_merge_oldest_wins_per_field() {
    let policy = |name: &str, ts: &str, spec: &str| {
        format!(
            "---\napiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata:\n  name: {name}\n  namespace: skiff\n  creationTimestamp: \"{ts}\"\nspec:\n{spec}"
        )
    };
    let text = [
        policy(
            "young",
            "2024-01-01T00:00:00Z",
            "  failMode: open\n  protocolDetectionTimeout: 250ms\n  headers: {requestId: true, forwarded: false, set: {X-Team: young, X-Young: y}}\n",
        ),
        policy(
            "old",
            "2020-01-01T00:00:00Z",
            "  failMode: closed\n  headers: {requestId: false, set: {x-team: old}}\n",
        ),
    ]
    .concat();
    let compiled = compile(&text);
    let settings = compiled.settings();
    assert_eq!(settings.fail_mode, FailMode::Closed);
    assert_eq!(
        settings.protocol_detection_timeout,
        Duration::from_millis(250)
    );
    assert!(!settings.headers.request_id, "old wins");
    assert!(!settings.headers.forwarded, "only young sets it");
    assert!(settings.headers.trace_context, "default");
    assert_eq!(
        settings.headers.set,
        vec![
            ("X-Young".to_string(), "y".to_string()),
            ("x-team".to_string(), "old".to_string())
        ]
    );
    assert_eq!(settings.sources, vec!["skiff/old", "skiff/young"]);

    let defaults = compile("");
    assert_eq!(defaults.settings().fail_mode, FailMode::Open);
    assert_eq!(
        defaults.settings().protocol_detection_timeout,
        Duration::from_millis(100)
    );
}

#[test]
fn summary_json_and_store() {
    let text = format!(
        "{}{}",
        base(),
        http_route(
            "r",
            "",
            "  hostnames: [web.shop]\n  rules:\n  - matches: [{path: {type: Exact, value: /a}}]\n    backendRefs: [{name: v1, port: 8080}]\n"
        )
    );
    let compiled = compile(&text);
    let summary = compiled.summary();
    assert_eq!(summary.services, 5);
    assert_eq!(summary.service_ports, 10);
    assert_eq!(summary.endpoints, 10);
    assert_eq!(summary.http_routes, 1);
    assert_eq!(summary.capture_rules, 5);
    assert!(
        summary
            .to_string()
            .starts_with("services=5 service_ports=10 endpoints=10 http_routes=1")
    );

    let json = compiled.to_json();
    let services = json["services"].as_array().expect("services");
    assert_eq!(services.len(), 10);
    let web80 = &services[0];
    assert_eq!(web80["service"], "shop/web");
    assert_eq!(web80["port"], 80);
    assert_eq!(web80["endpoints"][0], "10.244.0.1:8080");
    assert_eq!(
        web80["httpRoutes"]["web.shop"][0]["route"],
        "HTTPRoute shop/r"
    );
    assert_eq!(json["settings"]["fail_mode"], "open");
    assert!(serde_json::to_string(&json).is_ok());

    let store = PolicyStore::default();
    assert_eq!(store.current().summary().services, 0);
    let old = store.replace(compiled);
    assert_eq!(old.summary().services, 0);
    assert_eq!(store.current().summary().http_routes, 1);
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-policy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads `path`, checking that the refusal came quickly, and returns the error text.
fn refused(path: &std::path::Path) -> (LoadError, String) {
    let start = std::time::Instant::now();
    let error = crate::Compiled::load(path).expect_err("hostile policy refused");
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    let text = error.to_string();
    (error, text)
}

#[test]
fn a_file_of_tens_of_mib_is_refused_before_it_is_read() {
    let dir = TempDir::new("large");
    let file = dir.0.join("policy.yaml");
    // Sparse: 40 MiB that take no disk and would take 40 MiB of memory to read.
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(40 << 20))
        .expect("sparse file");
    let (error, text) = refused(&file);
    assert_eq!(error.label(), "too_large");
    assert!(text.contains("policy.yaml"), "{text}");
    assert!(text.contains("41943040 bytes"), "{text}");
    assert!(
        text.contains(&crate::MAX_POLICY_BYTES.to_string()),
        "{text}"
    );
}

#[test]
fn a_directory_is_limited_as_a_whole() {
    let dir = TempDir::new("large-dir");
    let third = crate::MAX_POLICY_BYTES / 3 + 1;
    for name in ["a.yaml", "b.yaml", "c.yaml"] {
        // Valid YAML (a comment), just large.
        let text = format!("#{}\n", "x".repeat(third));
        std::fs::write(dir.0.join(name), text).expect("write");
    }
    let (error, text) = refused(&dir.0);
    assert_eq!(error.label(), "too_large");
    assert!(text.contains("c.yaml"), "{text}");
    assert!(text.contains("with the files before it"), "{text}");
}

#[test]
fn deep_nesting_and_alias_bombs_are_refused_naming_the_file() {
    let dir = TempDir::new("hostile");
    let mut bomb = String::from("apiVersion: v1\nkind: Service\nmetadata: {name: lol}\n");
    bomb.push_str("a0: &a0 [\"lol\"]\n");
    for level in 1..10 {
        let refs = vec![format!("*a{}", level - 1); 10].join(", ");
        bomb.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
    }
    let cases = [
        ("laughs.yaml", bomb, "once aliases are expanded"),
        ("deep.yaml", "[".repeat(200), "nested deeper than 64"),
        // Just under the size limit, all nesting: refused before the parser buffers it.
        (
            "wide.yaml",
            "[".repeat(crate::MAX_POLICY_BYTES - 16),
            "a flow collection",
        ),
        (
            "block.yaml",
            (0..200)
                .map(|d| format!("{}k{d}:\n", " ".repeat(d)))
                .collect::<String>(),
            "nested deeper than 64",
        ),
    ];
    for (name, text, want) in cases {
        let file = dir.0.join(name);
        std::fs::write(&file, text).expect("write");
        let (error, text) = refused(&file);
        assert_eq!(error.label(), "invalid", "{text}");
        assert!(text.contains(&format!("{name}#1")), "{text}");
        assert!(text.contains(want), "{text}");
        std::fs::remove_file(&file).expect("remove");
    }
}

#[test]
fn from_yaml_refuses_hostile_text_too() {
    let errs = errors(&"{a: ".repeat(1000));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].reason.contains("nested deeper"), "{errs:#?}");
}
