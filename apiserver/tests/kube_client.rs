//! A kube-rs 4.2 client against the server: typed CRUD, and a watcher/reflector that sees every
//! change and recovers after compaction (410, relist) and after a server restart.

mod common;

use std::time::Duration;

use common::ApiServer;
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Config};
use serde_json::json;

fn client(s: &ApiServer) -> Client {
    let config = Config::new(s.url().parse().expect("url"));
    Client::try_from(config).expect("client")
}

fn cm(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"app": "t"}}, "data": {"v": value}}),
    )
    .expect("configmap")
}

/// Waits until the watcher stream yields an event accepted by `want`.
async fn until<S>(
    stream: &mut S,
    what: &str,
    mut want: impl FnMut(&watcher::Event<ConfigMap>) -> bool,
) where
    S: Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Err(_) | Ok(None) => panic!("no {what} within 20s"),
            Ok(Some(Ok(e))) if want(&e) => return,
            Ok(Some(_)) => {}
        }
    }
}

fn applied(e: &watcher::Event<ConfigMap>, name: &str, v: &str) -> bool {
    matches!(e, watcher::Event::Apply(c) | watcher::Event::InitApply(c)
        if c.metadata.name.as_deref() == Some(name)
            && c.data.as_ref().and_then(|d| d.get("v")).map(String::as_str) == Some(v))
}

#[tokio::test]
async fn typed_crud_and_list() {
    let s = ApiServer::start(&[]);
    let c = client(&s);
    let ns: Api<Namespace> = Api::all(c.clone());
    let names: Vec<String> = ns
        .list(&ListParams::default())
        .await
        .expect("list namespaces")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(names.contains(&"default".to_string()));
    let cms: Api<ConfigMap> = Api::namespaced(c, "default");
    let made = cms
        .create(&PostParams::default(), &cm("a", "1"))
        .await
        .expect("create");
    assert!(made.metadata.uid.is_some());
    let err = cms
        .create(&PostParams::default(), &cm("a", "1"))
        .await
        .expect_err("exists");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err:?}"
    );
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .expect("merge patch");
    cms.patch("a", &PatchParams::apply("test").force(), &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"v": "3"}})))
        .await
        .expect("apply");
    let got = cms.get("a").await.expect("get");
    assert_eq!(
        got.data
            .as_ref()
            .and_then(|d| d.get("v"))
            .map(String::as_str),
        Some("3")
    );
    for i in 0..7 {
        cms.create(&PostParams::default(), &cm(&format!("p{i}"), "x"))
            .await
            .expect("create");
    }
    let page = cms
        .list(&ListParams::default().limit(3))
        .await
        .expect("page");
    assert_eq!(page.items.len(), 3);
    assert!(page.metadata.continue_.is_some());
    let selected = cms
        .list(
            &ListParams::default()
                .labels("app=t")
                .fields("metadata.name=p3"),
        )
        .await
        .expect("select");
    assert_eq!(selected.items.len(), 1);
    let meta = cms.get_metadata("p3").await.expect("get_metadata");
    assert_eq!(meta.metadata.name.as_deref(), Some("p3"));
    let metas = cms
        .list_metadata(&ListParams::default().labels("app=t"))
        .await
        .expect("list_metadata");
    assert_eq!(metas.items.len(), 8);
    cms.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let err = cms.get("a").await.expect_err("gone");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );
}

#[tokio::test]
async fn watcher_and_reflector_follow_changes_and_recover() {
    let mut s = ApiServer::start(&[]);
    let c = client(&s);
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    cms.create(&PostParams::default(), &cm("early", "1"))
        .await
        .expect("create");

    let (reader, writer) = reflector::store::<ConfigMap>();
    let mut stream = reflector(writer, watcher(cms.clone(), watcher::Config::default()))
        .default_backoff()
        .boxed();
    until(&mut stream, "initial list", |e| {
        matches!(e, watcher::Event::InitDone)
    })
    .await;
    assert_eq!(reader.state().len(), 1);

    cms.create(&PostParams::default(), &cm("w", "1"))
        .await
        .expect("create");
    until(&mut stream, "ADDED", |e| applied(e, "w", "1")).await;
    cms.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .expect("patch");
    until(&mut stream, "MODIFIED", |e| applied(e, "w", "2")).await;
    cms.delete("early", &DeleteParams::default())
        .await
        .expect("delete");
    until(
        &mut stream,
        "DELETED",
        |e| matches!(e, watcher::Event::Delete(c) if c.metadata.name.as_deref() == Some("early")),
    )
    .await;
    assert_eq!(reader.state().len(), 1);

    // Compaction ends the watch; the resumed watch gets 410 and the watcher relists.
    let http = s.client();
    let (code, _) = http.post("/_test/compact", &json!({})).await;
    assert_eq!(code, 200);
    cms.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "3"}})),
    )
    .await
    .expect("patch");
    until(&mut stream, "relist after 410", |e| {
        matches!(e, watcher::Event::Init)
    })
    .await;
    until(&mut stream, "state after relist", |e| applied(e, "w", "3")).await;

    // A restarted server keeps its objects; the watcher reconnects and relists.
    s.restart();
    let cms2: Api<ConfigMap> = Api::namespaced(client(&s), "default");
    cms2.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "4"}})),
    )
    .await
    .expect("patch after restart");
    until(&mut stream, "state after restart", |e| applied(e, "w", "4")).await;
    cms2.create(&PostParams::default(), &cm("late", "1"))
        .await
        .expect("create");
    until(&mut stream, "ADDED after restart", |e| {
        applied(e, "late", "1")
    })
    .await;
    let mut names: Vec<String> = reader
        .state()
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["late", "w"]);
}

#[tokio::test]
async fn discovery_and_custom_resources() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    use kube::discovery::Discovery;

    let s = ApiServer::start(&[]);
    let c = client(&s);
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/meshpolicy-crd.yaml"
    ))
    .expect("fixture");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("crd yaml");
    let made = crds
        .create(&PostParams::default(), &crd)
        .await
        .expect("create crd");
    let established = made
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    assert!(established);

    let gvk = GroupVersionKind::gvk("skiff.dev", "v1alpha1", "MeshPolicy");
    for aggregated in [false, true] {
        let d = Discovery::new(c.clone());
        let d = if aggregated {
            d.run_aggregated().await
        } else {
            d.run().await
        }
        .expect("discovery");
        let (ar, caps) = d.resolve_gvk(&gvk).expect("MeshPolicy discovered");
        assert_eq!(ar.plural, "meshpolicies");
        assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
        assert!(
            d.resolve_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"))
                .is_some()
        );
    }

    let ar = ApiResource::from_gvk_with_plural(&gvk, "meshpolicies");
    let mps: Api<DynamicObject> = Api::namespaced_with(c.clone(), "default", &ar);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "skiff.dev/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": "p"}, "spec": {"rules": [{"action": "Allow", "ports": [80]}]}
    }))
    .expect("object");
    mps.create(&PostParams::default(), &obj)
        .await
        .expect("create");
    let mut bad = obj.clone();
    bad.metadata.name = Some("bad".into());
    bad.data["spec"]["rules"][0]["action"] = json!("Maybe");
    let err = mps
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("invalid");
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert!(
                s.message
                    .contains("spec.rules[0].action: Unsupported value: \"Maybe\""),
                "{}",
                s.message
            );
        }
        other => panic!("{other:?}"),
    }
    let status = mps
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observed": 1}})),
        )
        .await
        .expect("status");
    assert_eq!(status.data["status"]["observed"], 1);
}

#[tokio::test]
async fn streaming_list_watcher() {
    let s = ApiServer::start(&[]);
    let cms: Api<ConfigMap> = Api::namespaced(client(&s), "default");
    cms.create(&PostParams::default(), &cm("one", "1"))
        .await
        .expect("create");
    let mut stream = watcher(cms.clone(), watcher::Config::default().streaming_lists()).boxed();
    until(&mut stream, "initial event", |e| applied(e, "one", "1")).await;
    until(&mut stream, "end of initial events", |e| {
        matches!(e, watcher::Event::InitDone)
    })
    .await;
    cms.create(&PostParams::default(), &cm("two", "2"))
        .await
        .expect("create");
    until(&mut stream, "ADDED", |e| applied(e, "two", "2")).await;
}

#[tokio::test]
async fn metadata_watcher() {
    let s = ApiServer::start(&[]);
    let cms: Api<ConfigMap> = Api::namespaced(client(&s), "default");
    let metas: Api<kube::core::PartialObjectMeta<ConfigMap>> =
        Api::namespaced(client(&s), "default");
    let mut stream = watcher(metas, watcher::Config::default()).boxed();
    cms.create(&PostParams::default(), &cm("m", "1"))
        .await
        .expect("create");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let e = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("event in time");
        if let Some(Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m))) = e
            && m.metadata.name.as_deref() == Some("m")
        {
            assert_eq!(
                m.types.map(|t| t.kind),
                Some("PartialObjectMetadata".to_string())
            );
            break;
        }
    }
}
