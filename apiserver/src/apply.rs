//! Server-side apply: the applied configuration is merged into the live object, and
//! `metadata.managedFields` records per manager which fields it applied, so that a field a manager
//! stops applying is removed (unless another applier still applies it). Conflicts between
//! managers are not detected.

use serde_json::{Value, json};

use crate::api::{self, Part, WriteOptions, content_without, not_found};
use crate::error::{ApiError, Result};
use crate::patch::{self, ListStrategy};
use crate::resources::ResourceType;
use crate::store::Store;
use crate::util::{now_secs, rfc3339, str_at};

/// Lists in custom objects merge by their `x-kubernetes-list-map-keys` (`x-kubernetes-list-type:
/// map`) or as sets (`set`); all others are atomic.
fn schema_strategy(schema: Option<&Value>) -> impl Fn(&[String], &str) -> ListStrategy + '_ {
    move |path: &[String], field: &str| {
        let mut s = match schema {
            Some(s) => s,
            None => return ListStrategy::Replace,
        };
        for p in path.iter().chain(std::iter::once(&field.to_string())) {
            s = match s.pointer(&format!("/properties/{p}")) {
                Some(c) => c,
                None => match s.pointer("/items/properties").and_then(|ps| ps.get(p)) {
                    Some(c) => c,
                    None => return ListStrategy::Replace,
                },
            };
        }
        let keys = s
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array);
        match (
            s.get("x-kubernetes-list-type").and_then(Value::as_str),
            keys,
        ) {
            (Some("map"), Some(keys)) if !keys.is_empty() => ListStrategy::MergeByKey(
                keys.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            ),
            (Some("set"), _) => ListStrategy::MergePrimitives,
            _ => ListStrategy::Replace,
        }
    }
}

/// Field paths through maps (lists count as one field), to know what a manager applied.
fn leaf_paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                prefix.push(k.clone());
                leaf_paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => out.push(prefix.clone()),
    }
}

fn fields_v1(v: &Value) -> Value {
    match v {
        Value::Object(m) if !m.is_empty() => Value::Object(
            m.iter()
                .map(|(k, c)| (format!("f:{k}"), fields_v1(c)))
                .collect(),
        ),
        _ => json!({}),
    }
}

fn paths_of_fields_v1(f: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match f.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, c) in m {
                if let Some(name) = k.strip_prefix("f:") {
                    prefix.push(name.to_string());
                    paths_of_fields_v1(c, prefix, out);
                    prefix.pop();
                }
            }
        }
        _ => out.push(prefix.clone()),
    }
}

pub fn record_manager(
    obj: &mut Value,
    manager: &str,
    operation: &str,
    rt: &ResourceType,
    applied: Option<&Value>,
) {
    let mut entries: Vec<Value> = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    entries.retain(|e| !(e["manager"] == json!(manager) && e["operation"] == json!(operation)));
    let fields = match applied {
        Some(a) => fields_v1(&content_without(a, &["apiVersion", "kind"])),
        None => json!({}),
    };
    entries.push(json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": rt.api_version(),
        "time": rfc3339(now_secs()),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }));
    obj["metadata"]["managedFields"] = Value::Array(entries);
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for p in parents {
        cur = match cur.get_mut(p) {
            Some(c) => c,
            None => return,
        };
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

/// Server-side apply: the applied configuration merges into the object; fields this manager
/// applied before and no longer applies are removed unless another applier claims them.
/// Conflicts between managers are not detected.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    applied: Value,
    current: Option<Value>,
    part: Part,
    manager: &str,
    opts: &WriteOptions,
) -> Result<(Value, bool)> {
    // As on the real server, a resourceVersion in the applied object is a precondition: a
    // controller that read the object first (a read-modify-write of an atomic list) gets 409
    // if anyone wrote since.
    let want_rv = str_at(&applied, "metadata.resourceVersion");
    if let Some(cur) = &current
        && !want_rv.is_empty()
        && want_rv != str_at(cur, "metadata.resourceVersion")
    {
        return Err(ApiError::stale(api::subject(rt, name)));
    }
    let Some(current) = current else {
        if part == Part::Status {
            return Err(not_found(rt, name));
        }
        let mut obj = applied.clone();
        obj["metadata"]["name"] = json!(name);
        // The manager's entry is part of the created object, so watchers see it too.
        record_manager(&mut obj, manager, "Apply", rt, Some(&applied));
        let mut o = opts.clone();
        o.field_manager = None;
        let created = api::create(store, rt, ns, obj, &o)?;
        return Ok((created, true));
    };
    let mut obj = current.clone();
    let applied_clean = content_without(&applied, &["apiVersion", "kind"]);
    // Fields this manager applied last time and drops now.
    let mut old_paths = Vec::new();
    let mut other_paths = Vec::new();
    for e in current
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if e["operation"] != json!("Apply") {
            continue;
        }
        let target = if e["manager"] == json!(manager) {
            &mut old_paths
        } else {
            &mut other_paths
        };
        paths_of_fields_v1(&e["fieldsV1"], &mut Vec::new(), target);
    }
    let mut new_paths = Vec::new();
    leaf_paths(&applied_clean, &mut Vec::new(), &mut new_paths);
    for p in &old_paths {
        let kept = |ps: &Vec<Vec<String>>| ps.iter().any(|n| n.starts_with(p) || p.starts_with(n));
        if !kept(&new_paths) && !kept(&other_paths) {
            remove_path(&mut obj, p);
        }
    }
    let mut patch_doc = applied_clean.clone();
    if let Some(m) = patch_doc["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    if rt.crd.is_some() {
        let strategy = schema_strategy(rt.schema.as_ref());
        patch::strategic_merge(&mut obj, &patch_doc, &strategy)?;
    } else {
        patch::strategic_merge(&mut obj, &patch_doc, &patch::list_strategy)?;
    }
    record_manager(&mut obj, manager, "Apply", rt, Some(&applied));
    if part == Part::Status
        && let Some(last) = obj
            .pointer_mut("/metadata/managedFields")
            .and_then(Value::as_array_mut)
            .and_then(|entries| entries.last_mut())
    {
        last["subresource"] = json!("status");
    }
    let mut o = opts.clone();
    o.field_manager = None;
    let r = api::update(store, rt, ns, name, obj, part, &o)?;
    Ok((r, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_lists_merge_by_their_map_keys() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "listeners": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                          "items": {"type": "object"}},
            "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["port", "protocol"],
                      "items": {"type": "object"}},
            "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            "rules": {"type": "array", "items": {"type": "object"}}}}}});
        let mut live = json!({"spec": {
            "listeners": [{"name": "a", "port": 1}, {"name": "b", "port": 2}],
            "ports": [{"port": 53, "protocol": "UDP", "x": 1}, {"port": 53, "protocol": "TCP", "x": 2}],
            "tags": ["x"],
            "rules": [{"r": 1}, {"r": 2}]}});
        let applied = json!({"spec": {
            "listeners": [{"name": "b", "port": 3}],
            "ports": [{"port": 53, "protocol": "TCP", "x": 9}],
            "tags": ["y"],
            "rules": [{"r": 3}]}});
        let strategy = schema_strategy(Some(&schema));
        patch::strategic_merge(&mut live, &applied, &strategy).expect("merge");
        assert_eq!(
            live["spec"],
            json!({
                "listeners": [{"name": "a", "port": 1}, {"name": "b", "port": 3}],
                "ports": [{"port": 53, "protocol": "UDP", "x": 1}, {"port": 53, "protocol": "TCP", "x": 9}],
                "tags": ["x", "y"],
                "rules": [{"r": 3}]
            })
        );
    }
}
