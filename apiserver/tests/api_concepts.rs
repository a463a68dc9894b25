//! The Kubernetes API concepts kube-rs and kubectl rely on, checked over raw HTTP: resource
//! versions, list+watch consistency, expiry, bookmarks, paging, selectors, conflicts, patches,
//! schema validation and restarts.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{ApiServer, configmap, rv};
use serde_json::{Value, json};

const CM: &str = "/api/v1/namespaces/default/configmaps";
const SEC: Duration = Duration::from_secs(1);

#[tokio::test]
async fn resource_version_is_monotonic_across_kinds() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    let (code, ns) = c
        .post(
            "/api/v1/namespaces",
            &json!({"metadata": {"name": "rv-test"}}),
        )
        .await;
    assert_eq!(code, 201, "{ns}");
    let (_, cm) = c.post(CM, &configmap("a", json!({}))).await;
    let (_, svc) = c
        .post(
            "/api/v1/namespaces/default/services",
            &json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}),
        )
        .await;
    let (_, lease) = c
        .post(
            "/apis/coordination.k8s.io/v1/namespaces/default/leases",
            &json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "me"}}),
        )
        .await;
    let versions = [rv(&ns), rv(&cm), rv(&svc), rv(&lease)];
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    let (_, list) = c.get("/api/v1/services").await;
    assert_eq!(
        rv(&list),
        rv(&lease),
        "a list reports the latest version of all kinds"
    );
    assert_eq!(
        svc["spec"]["clusterIP"]
            .as_str()
            .map(|s| s.starts_with("10.96.")),
        Some(true)
    );
}

#[tokio::test]
async fn watch_from_a_list_sees_exactly_the_later_changes() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    c.post(CM, &configmap("before", json!({}))).await;
    let (_, list) = c.get(CM).await;
    let from = rv(&list);
    c.post(CM, &configmap("b", json!({}))).await;
    let (_, got) = c.get(&format!("{CM}/before")).await;
    let mut changed = got.clone();
    changed["data"]["k"] = json!("changed");
    let (code, _) = c.put(&format!("{CM}/before"), &changed).await;
    assert_eq!(code, 200);
    let (code, deleted) = c.delete(&format!("{CM}/b")).await;
    assert_eq!(code, 200);
    assert_eq!(
        deleted["metadata"]["name"], "b",
        "delete returns the object"
    );
    // An unrelated kind must not show up.
    c.post(
        "/api/v1/namespaces/default/secrets",
        &json!({"metadata": {"name": "x"}}),
    )
    .await;

    let (code, mut w) = c
        .watch(&format!("{CM}?watch=1&resourceVersion={from}"))
        .await;
    assert_eq!(code, 200);
    let mut seen = Vec::new();
    while let Some(e) = w.next(SEC).await {
        seen.push((
            e["type"].as_str().unwrap_or_default().to_string(),
            e["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ));
    }
    let want: Vec<(String, String)> = [("ADDED", "b"), ("MODIFIED", "before"), ("DELETED", "b")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(seen, want);

    // Live events arrive too, with increasing versions.
    let (_, mut w) = c
        .watch(&format!("{CM}?watch=true&resourceVersion={}", rv(&deleted)))
        .await;
    let (_, made) = c.post(CM, &configmap("live", json!({}))).await;
    let e = w.next(Duration::from_secs(5)).await.expect("live event");
    assert_eq!(e["type"], "ADDED");
    assert_eq!(rv(&e["object"]), rv(&made));
}

#[tokio::test]
async fn watch_without_version_starts_with_the_current_state() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    c.post(CM, &configmap("one", json!({}))).await;
    let (_, mut w) = c.watch(&format!("{CM}?watch=1")).await;
    let e = w.next(SEC).await.expect("synthetic ADDED");
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("one"))
    );
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_410() {
    let s = ApiServer::start(&["--compaction-window", "3"]);
    let c = s.client();
    let (_, first) = c.post(CM, &configmap("c0", json!({}))).await;
    for i in 1..6 {
        c.post(CM, &configmap(&format!("c{i}"), json!({}))).await;
    }
    let (code, mut w) = c
        .watch(&format!("{CM}?watch=1&resourceVersion={}", rv(&first)))
        .await;
    assert_eq!(
        code, 200,
        "the real server reports expiry inside the stream"
    );
    let e = w.next(SEC).await.expect("ERROR event");
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(w.ended_within(SEC).await);

    // Recent versions inside the window still resume.
    let (_, list) = c.get(CM).await;
    let (_, mut w) = c
        .watch(&format!("{CM}?watch=1&resourceVersion={}", rv(&list) - 1))
        .await;
    assert_eq!(w.next(SEC).await.expect("last event")["type"], "ADDED");

    // On demand, compaction expires everything handed out so far and ends open watches.
    let (_, mut open) = c
        .watch(&format!("{CM}?watch=1&resourceVersion={}", rv(&list)))
        .await;
    let (code, _) = c.post("/_test/compact", &json!({})).await;
    assert_eq!(code, 200);
    assert!(
        open.ended_within(Duration::from_secs(2)).await,
        "compaction closes watches"
    );
    let (_, mut w) = c
        .watch(&format!("{CM}?watch=1&resourceVersion={}", rv(&list)))
        .await;
    assert_eq!(w.next(SEC).await.expect("ERROR")["object"]["code"], 410);
}

#[tokio::test]
async fn expired_watch_as_http_410_when_asked() {
    let s = ApiServer::start(&["--expired-watch", "http"]);
    let c = s.client();
    let (_, list) = c.get(CM).await;
    c.post("/_test/compact", &json!({})).await;
    let (code, body) = c
        .get(&format!("{CM}?watch=1&resourceVersion={}", rv(&list)))
        .await;
    assert_eq!(code, 410);
    assert_eq!(body["reason"], "Expired");
}

#[tokio::test]
async fn bookmarks_arrive_and_timeout_ends_the_watch() {
    let s = ApiServer::start(&["--bookmark-interval", "1"]);
    let c = s.client();
    let (_, list) = c.get(CM).await;
    let (_, mut w) = c
        .watch(&format!(
            "{CM}?watch=1&allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds=3",
            rv(&list)
        ))
        .await;
    let e = w.next(Duration::from_secs(3)).await.expect("bookmark");
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(e["object"]["kind"], "ConfigMap");
    assert!(rv(&e["object"]) >= rv(&list));
    assert!(
        w.ended_within(Duration::from_secs(4)).await,
        "timeoutSeconds ends the watch"
    );

    let (_, mut w) = c
        .watch(&format!(
            "{CM}?watch=1&resourceVersion={}&timeoutSeconds=1",
            rv(&list)
        ))
        .await;
    let started = std::time::Instant::now();
    assert!(w.ended_within(Duration::from_secs(3)).await);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // sendInitialEvents: the state, then a bookmark marking its end.
    c.post(CM, &configmap("init", json!({}))).await;
    let (code, mut w) = c
        .watch(&format!("{CM}?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"))
        .await;
    assert_eq!(code, 200);
    assert_eq!(w.next(SEC).await.expect("ADDED")["type"], "ADDED");
    let end = w.next(SEC).await.expect("end bookmark");
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    let (code, status) = c.get(&format!("{CM}?watch=1&sendInitialEvents=true")).await;
    assert_eq!(code, 422, "{status}");
}

#[tokio::test]
async fn limit_and_continue_page_through_everything_once() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    let mut want = BTreeSet::new();
    for i in 0..23 {
        let name = format!("p{i:02}");
        c.post(CM, &configmap(&name, json!({}))).await;
        want.insert(name);
    }
    let mut got = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    let mut first_rv = None;
    loop {
        let (code, page) = c.get(&format!("{CM}?limit=5&continue={token}")).await;
        assert_eq!(code, 200, "{page}");
        pages += 1;
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 5);
        got.extend(items.iter().map(|i| {
            i["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }));
        first_rv.get_or_insert(rv(&page));
        assert_eq!(
            Some(rv(&page)),
            first_rv,
            "pages share the first page's version"
        );
        match page["metadata"]["continue"].as_str() {
            Some(t) if !t.is_empty() => {
                assert!(page["metadata"]["remainingItemCount"].as_u64().is_some());
                token = t.to_string();
            }
            _ => break,
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(got.len(), 23, "no duplicates");
    assert_eq!(got.iter().cloned().collect::<BTreeSet<_>>(), want);

    // A continue token outlives compaction no more than in etcd.
    let (_, page) = c.get(&format!("{CM}?limit=5")).await;
    let token = page["metadata"]["continue"]
        .as_str()
        .expect("token")
        .to_string();
    c.post("/_test/compact", &json!({})).await;
    let (code, status) = c.get(&format!("{CM}?limit=5&continue={token}")).await;
    assert_eq!(code, 410);
    assert_eq!(status["reason"], "Expired");
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            i["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn label_and_field_selectors() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    c.post(
        CM,
        &configmap("web", json!({"app": "web", "tier": "front"})),
    )
    .await;
    c.post(CM, &configmap("db", json!({"app": "db"}))).await;
    c.post(CM, &configmap("none", json!({}))).await;
    let q = |sel: &str| format!("{CM}?labelSelector={}", url_escape(sel));
    let cases = [
        ("app=web", vec!["web"]),
        ("app==db", vec!["db"]),
        ("app!=web", vec!["db", "none"]),
        ("app in (web,db)", vec!["db", "web"]),
        ("app notin (web)", vec!["db", "none"]),
        ("tier", vec!["web"]),
        ("!app", vec!["none"]),
        ("app,!tier", vec!["db"]),
    ];
    for (sel, want) in cases {
        let (code, list) = c.get(&q(sel)).await;
        assert_eq!(code, 200, "{sel}: {list}");
        assert_eq!(names(&list), want, "{sel}");
    }
    let (_, list) = c
        .get(&format!("{CM}?fieldSelector=metadata.name%3Ddb"))
        .await;
    assert_eq!(names(&list), ["db"]);
    let (_, list) = c
        .get("/api/v1/configmaps?fieldSelector=metadata.namespace%21%3Ddefault")
        .await;
    assert!(names(&list).is_empty());
    for (name, node) in [("p1", "n1"), ("p2", "n2")] {
        let (code, p) = c
            .post(
                "/api/v1/namespaces/default/pods",
                &json!({"metadata": {"name": name}, "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}}),
            )
            .await;
        assert_eq!(code, 201, "{p}");
    }
    let (_, list) = c.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dn2").await;
    assert_eq!(names(&list), ["p2"]);
    // A pod starts Pending whatever status it was created with; status comes through /status.
    let (_, p1) = c.get("/api/v1/namespaces/default/pods/p1").await;
    assert_eq!(p1["status"], json!({"phase": "Pending"}));
    let (code, _) = c
        .patch(
            "/api/v1/namespaces/default/pods/p1/status",
            "application/strategic-merge-patch+json",
            &json!({"status": {"phase": "Running", "podIP": "10.0.0.7"}}),
        )
        .await;
    assert_eq!(code, 200);
    let (_, list) = c
        .get("/api/v1/pods?fieldSelector=status.podIP%3D10.0.0.7,status.phase%3DRunning")
        .await;
    assert_eq!(names(&list), ["p1"]);
    let (code, status) = c.get(&format!("{CM}?fieldSelector=data.k%3Dx")).await;
    assert_eq!(code, 400, "{status}");

    // A change that takes an object out of a selector watch reads as DELETED.
    let (_, list) = c.get(&q("app=web")).await;
    let (_, mut w) = c
        .watch(&format!(
            "{CM}?watch=1&labelSelector=app%3Dweb&resourceVersion={}",
            rv(&list)
        ))
        .await;
    c.patch(
        &format!("{CM}/web"),
        "application/merge-patch+json",
        &json!({"metadata": {"labels": {"app": null}}}),
    )
    .await;
    assert_eq!(w.next(SEC).await.expect("event")["type"], "DELETED");
}

fn url_escape(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn conflicts_and_errors_are_status_objects() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    let (_, cm) = c.post(CM, &configmap("x", json!({}))).await;
    let (code, status) = c.post(CM, &configmap("x", json!({}))).await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );
    let mut stale = cm.clone();
    stale["data"]["k"] = json!("first");
    let (code, _) = c.put(&format!("{CM}/x"), &stale).await;
    assert_eq!(code, 200);
    stale["data"]["k"] = json!("second");
    let (code, status) = c.put(&format!("{CM}/x"), &stale).await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("Conflict")),
        "{status}"
    );
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("the object has been modified")
    );
    let (code, status) = c.get(&format!("{CM}/nope")).await;
    assert_eq!((code, status["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(status["message"], "configmaps \"nope\" not found");
    let (code, status) = c
        .post(
            "/api/v1/namespaces/missing/configmaps",
            &configmap("y", json!({})),
        )
        .await;
    assert_eq!(
        (code, status["message"].as_str()),
        (404, Some("namespaces \"missing\" not found"))
    );
    let (code, status) = c.post(CM, &json!({"metadata": {"name": "Bad_Name"}})).await;
    assert_eq!(code, 422);
    assert_eq!(status["details"]["causes"][0]["field"], "metadata.name");
    let (code, _) = c
        .send(http::Method::PUT, CM, "application/json", "{}")
        .await;
    assert_eq!(code, 405);
    let (code, status) = c
        .send(http::Method::POST, CM, "application/json", "{nope")
        .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    let (code, made) = c
        .post(CM, &json!({"metadata": {"generateName": "gen-"}}))
        .await;
    assert_eq!(code, 201);
    let name = made["metadata"]["name"].as_str().expect("name");
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    assert!(
        made["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36)
    );
    assert!(
        made["metadata"]["creationTimestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
}

#[tokio::test]
async fn patches() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"a": "1"}},
        "spec": {"selector": {"matchLabels": {"app": "d"}}, "template": {"metadata": {"labels": {"app": "d"}},
        "spec": {"containers": [{"name": "main", "image": "i:1", "env": [{"name": "A", "value": "1"}]},
                                {"name": "side", "image": "s:1"}]}}}});
    let path = "/apis/apps/v1/namespaces/default/deployments";
    let (code, made) = c.post(path, &deploy).await;
    assert_eq!(code, 201, "{made}");
    let item = format!("{path}/d");
    let (code, m) = c
        .patch(
            &item,
            "application/merge-patch+json",
            &json!({"metadata": {"labels": {"a": null, "b": "2"}}}),
        )
        .await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["metadata"]["labels"], json!({"b": "2"}));
    assert!(rv(&m) > rv(&made));
    let (code, m) = c
        .patch(
            &item,
            "application/strategic-merge-patch+json",
            &json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "main"}, {"name": "side"}],
                "containers": [{"name": "main", "image": "i:2", "env": [{"name": "B", "value": "2"}]},
                               {"name": "side", "$patch": "delete"}]}}}}),
        )
        .await;
    assert_eq!(code, 200, "{m}");
    let containers = &m["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers.as_array().map(Vec::len), Some(1));
    assert_eq!(containers[0]["image"], "i:2");
    assert_eq!(
        containers[0]["env"],
        json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
    );
    assert_eq!(
        m["metadata"]["generation"], 2,
        "a spec change bumps generation"
    );
    let (code, m) = c
        .patch(&item, "application/json-patch+json", &json!([{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "i:3"}]))
        .await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(
        m["spec"]["template"]["spec"]["containers"][0]["image"],
        "i:3"
    );
    let (code, _) = c
        .patch(
            &item,
            "application/merge-patch+json",
            &json!({"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 3}}),
        )
        .await;
    assert_eq!(code, 409, "a resourceVersion in a patch is a precondition");
    let (code, _) = c.patch(&item, "text/plain", &json!({})).await;
    assert_eq!(code, 415);

    // Status only changes through /status, and /status changes nothing else.
    let (code, m) = c
        .patch(
            &format!("{item}/status"),
            "application/merge-patch+json",
            &json!({"status": {"replicas": 1}, "spec": {"replicas": 9}}),
        )
        .await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["status"]["replicas"], 1);
    assert_eq!(
        m["spec"]["replicas"], 1,
        "defaulted at create, untouched by /status"
    );
    let (_, m) = c
        .patch(
            &item,
            "application/merge-patch+json",
            &json!({"status": {"replicas": 5}}),
        )
        .await;
    assert_eq!(m["status"]["replicas"], 1);

    // Server-side apply: creates, merges, and drops what the manager stopped applying.
    let cm_path = format!("{CM}/applied");
    let (code, _) = c
        .send(
            http::Method::PATCH,
            &cm_path,
            "application/apply-patch+yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  a: '1'\n",
        )
        .await;
    assert_eq!(code, 400, "fieldManager is required");
    let (code, m) = c
        .send(http::Method::PATCH, &format!("{cm_path}?fieldManager=test"), "application/apply-patch+yaml",
              "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  a: '1'\n  b: '2'\n")
        .await;
    assert_eq!(code, 201, "{m}");
    let (code, m) = c
        .send(http::Method::PATCH, &format!("{cm_path}?fieldManager=test"), "application/apply-patch+yaml",
              "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  a: '1'\n  c: '3'\n")
        .await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["data"], json!({"a": "1", "c": "3"}));
    assert_eq!(m["metadata"]["managedFields"][0]["manager"], "test");
}

fn crd() -> Value {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
      "metadata": {"name": "widgets.example.com"},
      "spec": {"group": "example.com", "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
          "schema": {"openAPIV3Schema": {"type": "object", "properties": {
            "spec": {"type": "object", "required": ["size"], "properties": {
              "size": {"type": "integer", "minimum": 1, "maximum": 10},
              "mode": {"type": "string", "default": "fast"},
              "rules": {"type": "array", "items": {"type": "object", "properties": {
                "action": {"type": "string", "enum": ["Allow", "Deny"]}}}}}},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]}})
}

#[tokio::test]
async fn custom_resources_are_registered_validated_and_pruned() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    let path = "/apis/example.com/v1/namespaces/default/widgets";
    let (code, _) = c.get(path).await;
    assert_eq!(code, 404, "not served before its CRD");
    let (code, made) = c
        .post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            &crd(),
        )
        .await;
    assert_eq!(code, 201, "{made}");
    assert_eq!(made["status"]["conditions"][1]["type"], "Established");
    let (_, groups) = c.get("/apis").await;
    assert!(
        groups["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .any(|g| g["name"] == "example.com")
    );
    let (_, res) = c.get("/apis/example.com/v1").await;
    assert_eq!(res["resources"][0]["name"], "widgets");
    assert_eq!(res["resources"][0]["shortNames"], json!(["wd"]));
    assert_eq!(res["resources"][1]["name"], "widgets/status");

    let bad = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
        "spec": {"size": 11, "rules": [{"action": "Allow"}, {"action": "Maybe"}]}});
    let (code, status) = c.post(path, &bad).await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["reason"], "Invalid");
    let causes = status["details"]["causes"].as_array().expect("causes");
    let fields: Vec<&str> = causes.iter().filter_map(|c| c["field"].as_str()).collect();
    assert_eq!(fields, ["spec.rules[1].action", "spec.size"]);
    assert!(status["message"].as_str().unwrap_or_default().contains(
        "spec.rules[1].action: Unsupported value: \"Maybe\": supported values: \"Allow\", \"Deny\""
    ));

    let good = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
        "spec": {"size": 3, "unknown": true}, "status": {"ready": true}});
    let (code, w) = c.post(path, &good).await;
    assert_eq!(code, 201, "{w}");
    assert!(
        w["spec"].get("unknown").is_none(),
        "unknown fields are pruned"
    );
    assert_eq!(w["spec"]["mode"], "fast", "schema defaults are applied");
    assert!(
        w.get("status").is_none(),
        "create ignores status when /status exists"
    );
    let (code, status) = c
        .post(
            &format!("{path}?fieldValidation=Strict"),
            &json!({"metadata": {"name": "w2"}, "spec": {"size": 1, "bogus": 1}}),
        )
        .await;
    assert_eq!(code, 400, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown field \"spec.bogus\"")
    );
    let (code, status) = c
        .patch(
            &format!("{path}/w"),
            "application/merge-patch+json",
            &json!({"spec": {"size": 0}}),
        )
        .await;
    assert_eq!(code, 422, "patches are validated too: {status}");
    let (code, _) = c
        .patch(
            &format!("{path}/w"),
            "application/strategic-merge-patch+json",
            &json!({}),
        )
        .await;
    assert_eq!(code, 415, "custom resources take no strategic merge patch");
    let (code, status) = c
        .put(&format!("{path}/w"), &json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 2}}))
        .await;
    assert_eq!(
        code, 422,
        "custom resources need a resourceVersion on update: {status}"
    );
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "metadata.resourceVersion"
    );
    let (code, st) = c
        .patch(
            &format!("{path}/w/status"),
            "application/merge-patch+json",
            &json!({"status": {"ready": true}}),
        )
        .await;
    assert_eq!((code, &st["status"]["ready"]), (200, &json!(true)));

    let (code, _) = c
        .delete("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com")
        .await;
    assert_eq!(code, 200);
    let (code, _) = c.get(path).await;
    assert_eq!(code, 404, "deleting the CRD removes its resource");
}

#[tokio::test]
async fn cluster_scoped_custom_resources_and_apply_on_status() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
      "metadata": {"name": "meshconfigs.skiff.dev"},
      "spec": {"group": "skiff.dev", "scope": "Cluster",
        "names": {"plural": "meshconfigs", "singular": "meshconfig", "kind": "MeshConfig"},
        "versions": [
          {"name": "v1beta1", "served": true, "storage": false,
           "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}},
          {"name": "v1", "served": true, "storage": true,
           "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.size", "statusReplicasPath": ".status.size"}},
           "schema": {"openAPIV3Schema": {"type": "object", "properties": {
             "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
             "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}}}},
          {"name": "v0", "served": false, "storage": false,
           "schema": {"openAPIV3Schema": {"type": "object"}}}]}});
    let (code, made) = c
        .post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            &crd,
        )
        .await;
    assert_eq!(code, 201, "{made}");
    let (_, group) = c.get("/apis/skiff.dev").await;
    assert_eq!(group["preferredVersion"]["version"], "v1");
    assert_eq!(
        group["versions"].as_array().map(Vec::len),
        Some(2),
        "v0 is not served"
    );
    let (code, mc) = c
        .post(
            "/apis/skiff.dev/v1/meshconfigs",
            &json!({"metadata": {"name": "global", "namespace": "ignored"}, "spec": {"x": 1}}),
        )
        .await;
    assert_eq!(code, 201, "{mc}");
    assert!(
        mc["metadata"].get("namespace").is_none(),
        "cluster-scoped objects have no namespace"
    );
    let (code, _) = c
        .get("/apis/skiff.dev/v1/namespaces/default/meshconfigs/global")
        .await;
    assert_eq!(code, 404, "no namespaced path for a cluster-scoped kind");
    let (code, old) = c.get("/apis/skiff.dev/v1beta1/meshconfigs/global").await;
    assert_eq!(
        (code, old["apiVersion"].as_str()),
        (200, Some("skiff.dev/v1beta1"))
    );
    let (code, _) = c.get("/apis/skiff.dev/v0/meshconfigs/global").await;
    assert_eq!(code, 404);

    let (code, scale) = c
        .patch(
            "/apis/skiff.dev/v1/meshconfigs/global/scale",
            "application/merge-patch+json",
            &json!({"spec": {"replicas": 4}}),
        )
        .await;
    assert_eq!((code, &scale["kind"]), (200, &json!("Scale")), "{scale}");
    let (_, got) = c.get("/apis/skiff.dev/v1/meshconfigs/global").await;
    assert_eq!(got["spec"]["size"], 4, "the CRD's specReplicasPath");
    let (code, st) = c
        .send(http::Method::PATCH, "/apis/skiff.dev/v1/meshconfigs/global/status?fieldManager=ctrl",
              "application/apply-patch+yaml", "apiVersion: skiff.dev/v1\nkind: MeshConfig\nmetadata:\n  name: global\nstatus:\n  ready: true\n")
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["status"]["ready"], true);
    assert_eq!(st["spec"]["x"], 1, "apply on /status leaves the spec alone");
    let (code, st) = c
        .patch(
            "/apis/skiff.dev/v1/meshconfigs/global/status",
            "application/merge-patch+json",
            &json!({"status": {"ready": "yes"}}),
        )
        .await;
    assert_eq!(code, 422, "status is validated too: {st}");
}

#[tokio::test]
async fn restart_keeps_objects_and_expires_old_versions() {
    let mut s = ApiServer::start(&[]);
    let c = s.client();
    c.post(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        &crd(),
    )
    .await;
    let (_, w) = c
        .post(
            "/apis/example.com/v1/namespaces/default/widgets",
            &json!({"metadata": {"name": "kept"}, "spec": {"size": 2}}),
        )
        .await;
    let (_, cm) = c.post(CM, &configmap("kept", json!({}))).await;
    s.restart();
    let c = s.client();
    let (code, got) = c.get(&format!("{CM}/kept")).await;
    assert_eq!(code, 200);
    assert_eq!(got["metadata"]["uid"], cm["metadata"]["uid"]);
    let (code, got) = c
        .get("/apis/example.com/v1/namespaces/default/widgets/kept")
        .await;
    assert_eq!(code, 200, "CRDs come back with their objects");
    assert_eq!(got["metadata"]["uid"], w["metadata"]["uid"]);
    let (_, list) = c.get(CM).await;
    assert!(rv(&list) > rv(&cm));
    let (_, mut watch) = c
        .watch(&format!("{CM}?watch=1&resourceVersion={}", rv(&cm)))
        .await;
    let e = watch.next(SEC).await.expect("ERROR");
    assert_eq!(
        (e["type"].as_str(), &e["object"]["code"]),
        (Some("ERROR"), &json!(410))
    );
    let (_, mut watch) = c
        .watch(&format!("{CM}?watch=1&resourceVersion={}", rv(&list)))
        .await;
    c.post(CM, &configmap("after", json!({}))).await;
    assert_eq!(watch.next(SEC).await.expect("event")["type"], "ADDED");
}

#[tokio::test]
async fn discovery_documents() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    let (_, v) = c.get("/version").await;
    assert_eq!(
        (v["major"].as_str(), v["minor"].as_str()),
        (Some("1"), Some("32"))
    );
    let (_, api) = c.get("/api").await;
    assert_eq!(api["versions"], json!(["v1"]));
    let (_, core) = c.get("/api/v1").await;
    let pods = core["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["name"] == "pods")
        .cloned()
        .expect("pods");
    assert_eq!(pods["shortNames"], json!(["po"]));
    assert_eq!(pods["namespaced"], true);
    let (_, apis) = c.get("/apis").await;
    let groups: Vec<&str> = apis["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    for g in [
        "apps",
        "discovery.k8s.io",
        "coordination.k8s.io",
        "rbac.authorization.k8s.io",
        "apiextensions.k8s.io",
    ] {
        assert!(groups.contains(&g), "{g}");
    }
    assert!(!groups.contains(&"monitoring.coreos.com"));
    // Aggregated discovery, as kubectl 1.32 asks for it.
    let accept =
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
    let (code, ct, agg) = c.get_accept("/apis", accept).await;
    assert_eq!(code, 200);
    assert_eq!(
        ct,
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    );
    assert_eq!(agg["kind"], "APIGroupDiscoveryList");
    let apps = agg["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|g| g["metadata"]["name"] == "apps")
        .expect("apps");
    let deploy = &apps["versions"][0]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["resource"] == "deployments")
        .cloned()
        .expect("deployments");
    assert_eq!(deploy["scope"], "Namespaced");
    assert_eq!(deploy["subresources"][0]["subresource"], "status");
    let (_, _, core) = c.get_accept("/api", accept).await;
    assert_eq!(core["items"][0]["metadata"]["name"], "");
    let (_, ct, _) = c.get_accept("/apis", "application/json").await;
    assert_eq!(
        ct, "application/json",
        "plain discovery without the aggregated Accept"
    );

    let (_, oa) = c.get("/openapi/v3").await;
    let url = oa["paths"]["apis/apps/v1"]["serverRelativeURL"]
        .as_str()
        .expect("url")
        .to_string();
    let (code, doc) = c.get(&url).await;
    assert_eq!(code, 200);
    let patch = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
    assert_eq!(
        patch["x-kubernetes-group-version-kind"]["kind"],
        "Deployment"
    );
    let (code, v2) = c.get("/openapi/v2").await;
    assert_eq!((code, v2), (200, json!("")), "an empty protobuf document");
}

#[tokio::test]
async fn namespace_delete_removes_its_objects() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    c.post("/api/v1/namespaces", &json!({"metadata": {"name": "gone"}}))
        .await;
    c.post(
        "/api/v1/namespaces/gone/configmaps",
        &configmap("a", json!({})),
    )
    .await;
    let (code, ns) = c.delete("/api/v1/namespaces/gone").await;
    assert_eq!(code, 200);
    assert_eq!(ns["metadata"]["name"], "gone");
    let (code, _) = c.get("/api/v1/namespaces/gone/configmaps/a").await;
    assert_eq!(code, 404);
    let (code, _) = c.get("/api/v1/namespaces/gone").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn finalizers_and_delete_preconditions() {
    let s = ApiServer::start(&[]);
    let c = s.client();
    let mut cm = configmap("held", json!({}));
    cm["metadata"]["finalizers"] = json!(["skiff.dev/cleanup"]);
    let (_, made) = c.post(CM, &cm).await;
    let (_, list) = c.get(CM).await;
    let (_, mut w) = c
        .watch(&format!("{CM}?watch=1&resourceVersion={}", rv(&list)))
        .await;

    // With a finalizer, delete only marks the object.
    let (code, marked) = c.delete(&format!("{CM}/held")).await;
    assert_eq!(code, 200);
    assert!(
        marked["metadata"]["deletionTimestamp"].is_string(),
        "{marked}"
    );
    let (code, _) = c.get(&format!("{CM}/held")).await;
    assert_eq!(code, 200, "still there while finalizers remain");
    assert_eq!(w.next(SEC).await.expect("MODIFIED")["type"], "MODIFIED");
    // Removing the last finalizer completes the deletion.
    let (code, _) = c
        .patch(
            &format!("{CM}/held"),
            "application/merge-patch+json",
            &json!({"metadata": {"finalizers": null}}),
        )
        .await;
    assert_eq!(code, 200);
    let (code, _) = c.get(&format!("{CM}/held")).await;
    assert_eq!(code, 404);
    let mut types = Vec::new();
    while let Some(e) = w.next(SEC).await {
        types.push(e["type"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(
        types.last().map(String::as_str),
        Some("DELETED"),
        "{types:?}"
    );
    assert!(made["metadata"]["uid"].is_string());

    // Preconditions in DeleteOptions.
    let (_, other) = c.post(CM, &configmap("guarded", json!({}))).await;
    let body = json!({"preconditions": {"uid": "not-the-uid"}}).to_string();
    let (code, status) = c
        .send(
            http::Method::DELETE,
            &format!("{CM}/guarded"),
            "application/json",
            &body,
        )
        .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("Conflict")),
        "{status}"
    );
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Precondition failed: UID in precondition")
    );
    let body = json!({"preconditions": {"uid": other["metadata"]["uid"], "resourceVersion": other["metadata"]["resourceVersion"]},
                      "propagationPolicy": "Foreground"})
        .to_string();
    let (code, _) = c
        .send(
            http::Method::DELETE,
            &format!("{CM}/guarded"),
            "application/json",
            &body,
        )
        .await;
    assert_eq!(code, 200);
    let body = json!({"dryRun": ["All"]}).to_string();
    let (code, _) = c
        .send(
            http::Method::DELETE,
            &format!("{CM}/gone-already"),
            "application/json",
            &body,
        )
        .await;
    assert_eq!(code, 404);
}
