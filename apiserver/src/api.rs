//! The verbs on objects: get, list, create, update, patch, apply and delete, with the metadata
//! bookkeeping, validation and per-kind behaviour (Service ClusterIPs, CRD registration,
//! namespace cascade) the real server performs.

use serde_json::{Map, Value, json};

use crate::error::{ApiError, Cause, Result, Subject};
use crate::patch;
use crate::resources::ResourceType;
use crate::schema;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::Store;
use crate::util::{now_secs, rfc3339, str_at, uid};

const CRD_STORAGE: &str = "apiextensions.k8s.io/customresourcedefinitions";
const NS_STORAGE: &str = "/namespaces";

/// Options of a write request.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub field_manager: Option<String>,
    /// `fieldValidation=Strict`: unknown fields fail instead of being dropped.
    pub strict: bool,
    pub force: bool,
    pub dry_run: bool,
}

/// How a PATCH body is to be read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or_default().trim() {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

pub fn subject(rt: &ResourceType, name: &str) -> Subject {
    Subject {
        group: rt.group.clone(),
        kind: rt.kind.clone(),
        resource: rt.plural.clone(),
        name: name.to_string(),
    }
}

/// The object as the requested version shows it: objects are stored once for all versions.
pub fn render(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(rt.api_version());
    o["kind"] = json!(rt.kind);
    o
}

pub(crate) fn not_found(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::NotFound(subject(rt, name))
}

pub fn get(store: &Store, rt: &ResourceType, ns: &str, name: &str) -> Result<Value> {
    store
        .get(&rt.storage(), ns, name)
        .map(|o| render(rt, o))
        .ok_or_else(|| not_found(rt, name))
}

/// Query parameters of a list.
#[derive(Debug, Default)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

/// Whether an object is in the namespace scope of a request ("" means all namespaces).
pub fn in_scope(ns: &str, obj: &Value) -> bool {
    ns.is_empty() || str_at(obj, "metadata.namespace") == ns
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"rv": rv, "ns": ns, "name": name}).to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String, String)> {
    use base64::Engine;
    let bad = || ApiError::BadRequest(format!("continue key is not valid: {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    Ok((
        v["rv"].as_u64().ok_or_else(bad)?,
        v["ns"].as_str().unwrap_or_default().to_string(),
        v["name"].as_str().unwrap_or_default().to_string(),
    ))
}

/// Lists objects. Without MVCC history, every page is read from the current state; a continue
/// token carries the first page's resourceVersion, which expires with compaction as in etcd.
pub fn list(store: &Store, rt: &ResourceType, ns: &str, opts: &ListOptions) -> Result<Value> {
    let mut list_rv = store.rv;
    let mut after: Option<(String, String)> = None;
    if let Some(token) = opts.continue_token.as_deref().filter(|t| !t.is_empty()) {
        let (rv, cns, cname) = decode_continue(token)?;
        if rv < store.compacted {
            return Err(ApiError::Expired(CONTINUE_EXPIRED.into()));
        }
        list_rv = rv;
        after = Some((cns, cname));
    } else if let Some(rv) = opts
        .resource_version
        .as_deref()
        .filter(|r| !r.is_empty() && *r != "0")
    {
        let rv: u64 = rv
            .parse()
            .map_err(|_| ApiError::BadRequest(format!("invalid resource version {rv:?}")))?;
        if opts.resource_version_match.as_deref() == Some("Exact") && rv != store.rv {
            // Only the current state is kept: an older exact version is as gone as a compacted one.
            return Err(ApiError::Expired(format!(
                "too old resource version: {rv} ({})",
                store.rv
            )));
        }
    }
    let empty = Default::default();
    let objects = store.objects.get(&rt.storage()).unwrap_or(&empty);
    let mut matching = objects
        .iter()
        .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
        .filter(|(_, o)| in_scope(ns, o) && opts.labels.matches(o) && opts.fields.matches(o));
    let mut items = Vec::new();
    let mut last_key = None;
    let limit = opts.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    for (k, o) in matching.by_ref() {
        if items.len() == limit {
            // One more exists: this page ends at the previous key.
            let remaining = 1 + matching.count();
            let (lns, lname): &(String, String) = last_key.unwrap_or(k);
            let mut meta = json!({
                "resourceVersion": list_rv.to_string(),
                "continue": encode_continue(list_rv, lns, lname),
                "remainingItemCount": remaining,
            });
            if remaining == 0 {
                meta.as_object_mut().map(|m| m.remove("remainingItemCount"));
            }
            return Ok(list_doc(rt, items, meta));
        }
        items.push(render(rt, o));
        last_key = Some(k);
    }
    Ok(list_doc(
        rt,
        items,
        json!({"resourceVersion": list_rv.to_string()}),
    ))
}

fn list_doc(rt: &ResourceType, items: Vec<Value>, metadata: Value) -> Value {
    json!({
        "kind": rt.list_kind(),
        "apiVersion": rt.api_version(),
        "metadata": metadata,
        "items": items,
    })
}

fn body_object(body: Value) -> Result<Map<String, Value>> {
    match body {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::BadRequest(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml".into(),
        )),
    }
}

/// Checks the body's apiVersion/kind against the path, as the real decoder does.
fn check_type(rt: &ResourceType, obj: &mut Map<String, Value>) -> Result<()> {
    if let Some(kind) = obj.get("kind").and_then(Value::as_str)
        && kind != rt.kind
    {
        return Err(ApiError::BadRequest(format!(
            "the API version in the data ({}) does not match the expected API version ({})",
            obj.get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            rt.api_version()
        )));
    }
    obj.insert("apiVersion".into(), json!(rt.api_version()));
    obj.insert("kind".into(), json!(rt.kind));
    Ok(())
}

/// Prunes and validates a custom object against its schema.
fn check_schema(rt: &ResourceType, obj: &mut Value, strict: bool) -> Result<()> {
    let Some(schema) = &rt.schema else {
        return Ok(());
    };
    let removed = schema::prune(obj, schema);
    if strict && !removed.is_empty() {
        let fields: Vec<String> = removed
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        return Err(ApiError::BadRequest(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
            rt.kind,
            rt.version,
            rt.kind,
            fields.join(", ")
        )));
    }
    schema::apply_defaults(obj, schema);
    let causes = schema::validate(obj, schema);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            subject: subject(rt, str_at(obj, "metadata.name")),
            causes,
        })
    }
}

pub(crate) fn content_without(obj: &Value, skip: &[&str]) -> Value {
    match obj {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !skip.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Per-kind defaults and side effects before a write is stored.
fn prepare_kind(
    store: &mut Store,
    rt: &ResourceType,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<()> {
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Service") => {
            let spec = &mut obj["spec"];
            if !spec.is_object() {
                *spec = json!({});
            }
            if spec.get("type").is_none() {
                spec["type"] = json!("ClusterIP");
            }
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports {
                    if p.get("protocol").is_none() {
                        p["protocol"] = json!("TCP");
                    }
                    if p.get("targetPort").is_none()
                        && let Some(port) = p.get("port").cloned()
                    {
                        p["targetPort"] = port;
                    }
                }
            }
            let kept = old.and_then(|o| o.pointer("/spec/clusterIP")).cloned();
            if spec["type"] != json!("ExternalName") && spec.get("clusterIP").is_none() {
                let ip = match kept {
                    Some(ip) => ip,
                    None => {
                        let n = store.next_cluster_ip;
                        store.next_cluster_ip += 1;
                        json!(format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff))
                    }
                };
                spec["clusterIPs"] = json!([ip.clone()]);
                spec["clusterIP"] = ip;
            }
        }
        ("apps", "Deployment")
            if obj["spec"].is_object() && obj["spec"].get("replicas").is_none() =>
        {
            obj["spec"]["replicas"] = json!(1);
        }
        ("", "Namespace") => {
            obj["status"] = json!({"phase": "Active"});
            let name = str_at(obj, "metadata.name").to_string();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            // Validates the CRD; the types are registered once it is stored.
            crate::resources::crd_types(obj).map_err(|causes| ApiError::Invalid {
                subject: subject(rt, str_at(obj, "metadata.name")),
                causes,
            })?;
            let storage_version = obj
                .pointer("/spec/versions")
                .and_then(Value::as_array)
                .and_then(|vs| vs.iter().find(|v| v["storage"] == json!(true)))
                .and_then(|v| v["name"].as_str())
                .unwrap_or_default()
                .to_string();
            // Conditions keep their transition times across updates; storedVersions only grows.
            let conditions = match old.and_then(|o| o.pointer("/status/conditions")) {
                Some(c) => c.clone(),
                None => {
                    let now = rfc3339(now_secs());
                    json!([
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                         "message": "no conflicts found", "lastTransitionTime": now},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                         "message": "the initial names have been accepted", "lastTransitionTime": now}
                    ])
                }
            };
            let mut stored: Vec<Value> = old
                .and_then(|o| o.pointer("/status/storedVersions"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if !stored.contains(&json!(storage_version)) {
                stored.push(json!(storage_version));
            }
            obj["status"] = json!({
                "acceptedNames": obj["spec"]["names"].clone(),
                "conditions": conditions,
                "storedVersions": stored,
            });
        }
        _ => {}
    }
    Ok(())
}

/// Side effects after a write is stored.
fn after_write(store: &mut Store, rt: &ResourceType, obj: &Value) {
    if rt.storage() == CRD_STORAGE {
        // Validated in prepare_kind; a failure here would leave the CRD serving nothing.
        let _ = store.registry.add_crd(obj);
    }
}

fn persist(store: &Store) -> Result<()> {
    store.save().map_err(|e| ApiError::Internal(e.to_string()))
}

pub fn create(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    body: Value,
    opts: &WriteOptions,
) -> Result<Value> {
    let mut m = body_object(body)?;
    check_type(rt, &mut m)?;
    let mut obj = Value::Object(m);
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    let body_ns = str_at(&obj, "metadata.namespace").to_string();
    if rt.namespaced {
        if !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        obj["metadata"]["namespace"] = json!(ns);
        if store.get(NS_STORAGE, "", ns).is_none() {
            return Err(ApiError::NotFound(Subject {
                group: String::new(),
                kind: "Namespace".into(),
                resource: "namespaces".into(),
                name: ns.into(),
            }));
        }
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    let generate = str_at(&obj, "metadata.generateName").to_string();
    if str_at(&obj, "metadata.name").is_empty() && !generate.is_empty() {
        obj["metadata"]["name"] = json!(format!("{generate}{}", crate::util::name_suffix()));
    }
    let mut causes = crate::meta::metadata_causes(rt, &obj);
    if !causes.is_empty() {
        return Err(ApiError::Invalid {
            subject: subject(rt, str_at(&obj, "metadata.name")),
            causes: std::mem::take(&mut causes),
        });
    }
    let name = str_at(&obj, "metadata.name").to_string();
    if store
        .get(&rt.storage(), if rt.namespaced { ns } else { "" }, &name)
        .is_some()
    {
        return Err(ApiError::AlreadyExists(subject(rt, &name)));
    }
    // The status subresource owns status: a create cannot set it, except for the kinds whose
    // creators report status themselves (a kubelet registering its Node).
    if rt.status && !(rt.crd.is_none() && rt.kind == "Node") {
        obj.as_object_mut().map(|m| m.remove("status"));
        if rt.crd.is_none() && rt.kind == "Pod" {
            obj["status"] = json!({"phase": "Pending"});
        }
    }
    check_schema(rt, &mut obj, opts.strict)?;
    prepare_kind(store, rt, &mut obj, None)?;
    // Kinds with a spec count their spec changes; ConfigMaps, Secrets and the like do not.
    let has_generation = obj.get("spec").is_some() || rt.crd.is_some();
    let meta = &mut obj["metadata"];
    meta["uid"] = json!(uid());
    meta["creationTimestamp"] = json!(rfc3339(now_secs()));
    if has_generation {
        meta["generation"] = json!(1);
    }
    for field in ["resourceVersion", "deletionTimestamp", "selfLink"] {
        meta.as_object_mut().map(|m| m.remove(field));
    }
    if let Some(manager) = &opts.field_manager {
        crate::apply::record_manager(&mut obj, manager, "Update", rt, None);
    }
    if opts.dry_run {
        return Ok(render(rt, &obj));
    }
    let stored = store.put(&rt.storage(), obj);
    after_write(store, rt, &stored);
    persist(store)?;
    Ok(render(rt, &stored))
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Part {
    Main,
    Status,
}

/// Replaces an object (PUT, and the last step of every patch).
pub fn update(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    body: Value,
    part: Part,
    opts: &WriteOptions,
) -> Result<Value> {
    let ns = if rt.namespaced { ns } else { "" };
    let old = store
        .get(&rt.storage(), ns, name)
        .cloned()
        .ok_or_else(|| not_found(rt, name))?;
    let mut m = body_object(body)?;
    check_type(rt, &mut m)?;
    let mut obj = Value::Object(m);
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    let body_name = str_at(&obj, "metadata.name");
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let body_rv = str_at(&obj, "metadata.resourceVersion");
    if body_rv.is_empty() && rt.crd.is_some() {
        // Built-in kinds allow unconditional updates; custom resources do not.
        return Err(ApiError::Invalid {
            subject: subject(rt, name),
            causes: vec![Cause {
                reason: "FieldValueInvalid",
                message: "Invalid value: 0x0: must be specified for an update".into(),
                field: "metadata.resourceVersion".into(),
            }],
        });
    }
    if !body_rv.is_empty() && body_rv != str_at(&old, "metadata.resourceVersion") {
        return Err(ApiError::stale(subject(rt, name)));
    }
    if part == Part::Status {
        // Only status changes through /status; the rest stays as stored, except the field
        // managers' record, which a status write updates too (`subresource: status`).
        let status = obj.get("status").cloned();
        let managed = obj.pointer("/metadata/managedFields").cloned();
        obj = old.clone();
        if let Some(m) = managed {
            obj["metadata"]["managedFields"] = m;
        }
        match status {
            Some(s) => obj["status"] = s,
            None => {
                obj.as_object_mut().map(|m| m.remove("status"));
            }
        }
    } else if rt.status {
        match old.get("status") {
            Some(s) => obj["status"] = s.clone(),
            None => {
                obj.as_object_mut().map(|m| m.remove("status"));
            }
        }
    }
    // Identity and system fields are not the client's to change.
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "generation",
        "namespace",
        "name",
    ] {
        match old["metadata"].get(field) {
            Some(v) => obj["metadata"][field] = v.clone(),
            None => {
                obj["metadata"].as_object_mut().map(|m| m.remove(field));
            }
        }
    }
    if old["metadata"].get("managedFields").is_some()
        && obj["metadata"].get("managedFields").is_none()
    {
        obj["metadata"]["managedFields"] = old["metadata"]["managedFields"].clone();
    }
    let causes = crate::meta::metadata_causes(rt, &obj);
    if !causes.is_empty() {
        return Err(ApiError::Invalid {
            subject: subject(rt, name),
            causes,
        });
    }
    check_schema(rt, &mut obj, opts.strict)?;
    prepare_kind(store, rt, &mut obj, Some(&old))?;
    let skip = ["metadata", "status", "apiVersion", "kind"];
    if old["metadata"].get("generation").is_some()
        && content_without(&obj, &skip) != content_without(&old, &skip)
    {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
        obj["metadata"]["generation"] = json!(g + 1);
    }
    if let Some(manager) = &opts.field_manager
        && obj != old
    {
        crate::apply::record_manager(&mut obj, manager, "Update", rt, None);
    }
    // A finalized object whose last finalizer is gone is deleted, as the real server does.
    let finalizers_gone = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty);
    if opts.dry_run {
        return Ok(render(rt, &obj));
    }
    if old["metadata"].get("deletionTimestamp").is_some() && finalizers_gone {
        store.put(&rt.storage(), obj);
        let gone = store.remove(&rt.storage(), ns, name);
        persist(store)?;
        return Ok(render(rt, &gone.unwrap_or_default()));
    }
    if obj == with_rv(&old, &obj) {
        // A no-op write keeps its resourceVersion and sends no event.
        return Ok(render(rt, &old));
    }
    let stored = store.put(&rt.storage(), obj);
    after_write(store, rt, &stored);
    persist(store)?;
    Ok(render(rt, &stored))
}

/// `old` with the resourceVersion `new` carries, to compare contents only.
fn with_rv(old: &Value, new: &Value) -> Value {
    let mut o = old.clone();
    match new["metadata"].get("resourceVersion") {
        Some(rv) => o["metadata"]["resourceVersion"] = rv.clone(),
        None => {
            o["metadata"]
                .as_object_mut()
                .map(|m| m.remove("resourceVersion"));
        }
    }
    o
}

/// Applies a PATCH (any of the four kinds). Returns the object and whether apply created it.
#[allow(clippy::too_many_arguments)]
pub fn patch(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    kind: PatchKind,
    body: &[u8],
    part: Part,
    opts: &WriteOptions,
) -> Result<(Value, bool)> {
    let ns = if rt.namespaced { ns } else { "" };
    let parse_json = || -> Result<Value> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))
    };
    let current = store.get(&rt.storage(), ns, name).cloned();
    if kind == PatchKind::Apply {
        let manager = opts.field_manager.clone().ok_or_else(|| {
            ApiError::BadRequest(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".into(),
            )
        })?;
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::BadRequest("apply patch is not UTF-8".into()))?;
        let applied: Value = serde_yaml::from_str(text)
            .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))?;
        if !applied.is_object() {
            return Err(ApiError::BadRequest("apply patch must be an object".into()));
        }
        let applied_name = str_at(&applied, "metadata.name");
        if !applied_name.is_empty() && applied_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({applied_name}) does not match the name on the URL ({name})"
            )));
        }
        return crate::apply::apply(store, rt, ns, name, applied, current, part, &manager, opts);
    }
    let current = current.ok_or_else(|| not_found(rt, name))?;
    let mut obj = current.clone();
    match kind {
        PatchKind::Json => patch::json_patch(&mut obj, &parse_json()?)?,
        PatchKind::Merge => patch::merge_patch(&mut obj, &parse_json()?),
        PatchKind::Strategic => {
            if rt.crd.is_some() {
                return Err(ApiError::UnsupportedMediaType("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".into()));
            }
            patch::strategic_merge(&mut obj, &parse_json()?, &patch::list_strategy)?
        }
        PatchKind::Apply => {}
    }
    let r = update(store, rt, ns, name, obj, part, opts)?;
    Ok((r, false))
}

/// Deletes an object, or marks it for deletion while finalizers remain.
/// `DeleteOptions.preconditions`: the delete happens only if the object still is this one.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

pub fn delete(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    dry_run: bool,
    preconditions: &Preconditions,
) -> Result<Value> {
    let ns = if rt.namespaced { ns } else { "" };
    let storage = rt.storage();
    let old = store
        .get(&storage, ns, name)
        .cloned()
        .ok_or_else(|| not_found(rt, name))?;
    for (what, want, have) in [
        ("UID", &preconditions.uid, str_at(&old, "metadata.uid")),
        (
            "ResourceVersion",
            &preconditions.resource_version,
            str_at(&old, "metadata.resourceVersion"),
        ),
    ] {
        if let Some(want) = want
            && want != have
        {
            let subject = subject(rt, name);
            let message = format!(
                "Operation cannot be fulfilled on {}{} \"{name}\": Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}",
                rt.plural,
                if rt.group.is_empty() {
                    String::new()
                } else {
                    format!(".{}", rt.group)
                },
            );
            return Err(ApiError::Conflict { subject, message });
        }
    }
    if dry_run {
        return Ok(render(rt, &old));
    }
    let has_finalizers = old
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    // Namespaces are deleted at once (there is no namespace controller to finalize them).
    if has_finalizers && storage != NS_STORAGE {
        if old["metadata"].get("deletionTimestamp").is_some() {
            return Ok(render(rt, &old));
        }
        let mut obj = old;
        obj["metadata"]["deletionTimestamp"] = json!(rfc3339(now_secs()));
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        let stored = store.put(&storage, obj);
        persist(store)?;
        return Ok(render(rt, &stored));
    }
    if storage == NS_STORAGE {
        let contained: Vec<(String, String)> = store
            .objects
            .iter()
            .flat_map(|(s, objs)| {
                objs.keys()
                    .filter(|(ons, _)| ons == name)
                    .map(move |(_, n)| (s.clone(), n.clone()))
            })
            .collect();
        for (s, n) in contained {
            store.remove(&s, name, &n);
        }
    }
    if storage == CRD_STORAGE {
        let group = str_at(&old, "spec.group");
        let plural = str_at(&old, "spec.names.plural");
        let cr_storage = format!("{group}/{plural}");
        let keys: Vec<(String, String)> = store
            .objects
            .get(&cr_storage)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        for (cns, cname) in keys {
            store.remove(&cr_storage, &cns, &cname);
        }
        store.registry.remove_crd(name);
    }
    let gone = store
        .remove(&storage, ns, name)
        .ok_or_else(|| not_found(rt, name))?;
    persist(store)?;
    let mut shown = render(rt, &gone);
    if storage == NS_STORAGE {
        shown["status"] = json!({"phase": "Terminating"});
    }
    Ok(shown)
}

/// DELETE on a collection: deletes every selected object and returns them as a list.
pub fn delete_collection(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    opts: &ListOptions,
) -> Result<Value> {
    let list = list(store, rt, ns, opts)?;
    let mut deleted = Vec::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let ins = str_at(item, "metadata.namespace").to_string();
        let iname = str_at(item, "metadata.name").to_string();
        deleted.push(delete(
            store,
            rt,
            &ins,
            &iname,
            false,
            &Preconditions::default(),
        )?);
    }
    Ok(list_doc(
        rt,
        deleted,
        json!({"resourceVersion": store.rv.to_string()}),
    ))
}
