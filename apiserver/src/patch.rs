//! The three patch formats (JSON merge patch, JSON patch, strategic merge patch) and the merge
//! that server-side apply uses.
//!
//! Strategic merge patch needs each list's merge key, which the real server takes from Go struct
//! tags. This server knows them for the built-in fields kubectl patches (see [`list_strategy`]);
//! every other list is replaced whole, which is also what the real server does for lists without
//! a `patchStrategy`.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// RFC 7386: objects merge recursively, `null` deletes, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<Vec<String>, ApiError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| bad(format!("invalid JSON pointer {path:?}")))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, ApiError> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| bad(format!("jsonpatch: missing path element {t:?}")))?,
            Value::Array(a) => {
                let i: usize = t
                    .parse()
                    .map_err(|_| bad(format!("jsonpatch: bad array index {t:?}")))?;
                a.get_mut(i)
                    .ok_or_else(|| bad(format!("jsonpatch: index {i} out of range")))?
            }
            _ => return Err(bad(format!("jsonpatch: cannot descend into {t:?}"))),
        };
    }
    Ok(cur)
}

fn pointer_get(doc: &Value, path: &str) -> Result<Value, ApiError> {
    doc.pointer(path)
        .cloned()
        .ok_or_else(|| bad(format!("jsonpatch: path {path:?} does not exist")))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), ApiError> {
    let tokens = split_pointer(path)?;
    let Some((last, parents)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parents)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
            } else {
                let i: usize = last
                    .parse()
                    .map_err(|_| bad(format!("jsonpatch: bad array index {last:?}")))?;
                if i > a.len() {
                    return Err(bad(format!("jsonpatch: index {i} out of range")));
                }
                a.insert(i, value);
            }
        }
        _ => return Err(bad(format!("jsonpatch: cannot add at {path:?}"))),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, ApiError> {
    let tokens = split_pointer(path)?;
    let (last, parents) = tokens
        .split_last()
        .ok_or_else(|| bad("jsonpatch: cannot remove the root"))?;
    match parent_mut(doc, parents)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| bad(format!("jsonpatch: path {path:?} does not exist"))),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| bad(format!("jsonpatch: bad array index {last:?}")))?;
            if i >= a.len() {
                return Err(bad(format!("jsonpatch: index {i} out of range")));
            }
            Ok(a.remove(i))
        }
        _ => Err(bad(format!("jsonpatch: cannot remove {path:?}"))),
    }
}

/// RFC 6902.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| bad("json patch must be an array of operations"))?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or_else(|| bad("jsonpatch: operation has no path"))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| bad("jsonpatch: operation has no value"))
        };
        let from = || {
            op["from"]
                .as_str()
                .ok_or_else(|| bad("jsonpatch: operation has no from"))
        };
        match op["op"].as_str().unwrap_or_default() {
            "add" => add(doc, path, value()?)?,
            "remove" => {
                remove(doc, path)?;
            }
            "replace" => {
                pointer_get(doc, path)?;
                *doc.pointer_mut(path)
                    .ok_or_else(|| bad(format!("jsonpatch: path {path:?} does not exist")))? =
                    value()?;
            }
            "move" => {
                let v = remove(doc, from()?)?;
                add(doc, path, v)?;
            }
            "copy" => {
                let v = pointer_get(doc, from()?)?;
                add(doc, path, v)?;
            }
            "test" => {
                if pointer_get(doc, path)? != value()? {
                    return Err(ApiError::Invalid {
                        subject: Default::default(),
                        causes: vec![crate::error::Cause {
                            reason: "FieldValueInvalid",
                            message: format!("testing value {path} failed"),
                            field: String::new(),
                        }],
                    });
                }
            }
            other => return Err(bad(format!("jsonpatch: unknown operation {other:?}"))),
        }
    }
    Ok(())
}

/// How a list merges under strategic merge patch and server-side apply.
#[derive(Debug, Clone, PartialEq)]
pub enum ListStrategy {
    /// Elements are objects identified by these keys (one for strategic merge patch; one or more
    /// for `x-kubernetes-list-map-keys`).
    MergeByKey(Vec<String>),
    /// A set of scalars (`finalizers`).
    MergePrimitives,
    /// The patch's list replaces the old one.
    Replace,
}

/// Merge keys of the built-in fields kubectl patches, from the `patchMergeKey` tags of the
/// Kubernetes API types. `path` is the object path of the list's parent (field names only).
pub fn list_strategy(path: &[String], field: &str) -> ListStrategy {
    use ListStrategy::*;
    let key = |k: &str| MergeByKey(vec![k.to_string()]);
    let in_container = path.iter().any(|p| {
        matches!(
            p.as_str(),
            "containers" | "initContainers" | "ephemeralContainers"
        )
    });
    match field {
        "containers" | "initContainers" | "ephemeralContainers" => key("name"),
        "env" | "volumes" | "imagePullSecrets" | "resourceClaims" | "secrets" => key("name"),
        "volumeMounts" => key("mountPath"),
        "volumeDevices" => key("devicePath"),
        "ports" if in_container => key("containerPort"),
        // Service.spec.ports; EndpointSlice and Endpoints ports are atomic.
        "ports" if path.len() == 1 && path[0] == "spec" => key("port"),
        "conditions" => key("type"),
        "addresses" if path.last().map(String::as_str) == Some("status") => key("type"),
        "hostAliases" => key("ip"),
        "topologySpreadConstraints" => key("topologyKey"),
        "ownerReferences" => key("uid"),
        "finalizers" if path.last().map(String::as_str) == Some("metadata") => MergePrimitives,
        _ => Replace,
    }
}

/// Strips directives and `null`s from new content, which the patch brings in whole.
fn clean(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, v)| !k.starts_with('$') && !v.is_null())
                .map(|(k, v)| (k.clone(), clean(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|v| v.get("$patch").is_none())
                .map(clean)
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Applies a strategic merge patch to `target`. `strategy` decides how each list merges.
pub fn strategic_merge(
    target: &mut Value,
    patch: &Value,
    strategy: &dyn Fn(&[String], &str) -> ListStrategy,
) -> Result<(), ApiError> {
    let mut path = Vec::new();
    smp_value(target, patch, &mut path, strategy)
}

fn smp_value(
    target: &mut Value,
    patch: &Value,
    path: &mut Vec<String>,
    strategy: &dyn Fn(&[String], &str) -> ListStrategy,
) -> Result<(), ApiError> {
    let Value::Object(p) = patch else {
        *target = clean(patch);
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = clean(patch);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(bad(format!("unknown patch type: {other}"))),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match v {
            Value::Object(vm) => {
                if vm.get("$patch").and_then(Value::as_str) == Some("delete") {
                    t.remove(k);
                    continue;
                }
                path.push(k.clone());
                let r = smp_value(t.entry(k.clone()).or_insert(Value::Null), v, path, strategy);
                path.pop();
                r?;
            }
            Value::Array(items) => {
                let s = strategy(path, k);
                let old = match t.remove(k) {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                };
                path.push(k.clone());
                let merged = merge_list(old, items, s, path, strategy);
                path.pop();
                t.insert(k.clone(), Value::Array(merged?));
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = v.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(a)) = t.get_mut(field) {
                a.retain(|x| !gone.contains(x));
            }
        }
    }
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            let order = v.as_array().cloned().unwrap_or_default();
            let keys = match strategy(path, field) {
                ListStrategy::MergeByKey(keys) => Some(keys),
                _ => None,
            };
            if let Some(Value::Array(a)) = t.get_mut(field) {
                reorder(a, &order, keys.as_deref());
            }
        }
    }
    if let Some(retain) = p.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

/// Whether two list elements have the same merge key values (all keys, at least one present).
fn same_key(a: &Value, b: &Value, keys: &[String]) -> bool {
    keys.iter().any(|k| a.get(k).is_some()) && keys.iter().all(|k| a.get(k) == b.get(k))
}

fn merge_list(
    mut old: Vec<Value>,
    items: &[Value],
    s: ListStrategy,
    path: &mut Vec<String>,
    strategy: &dyn Fn(&[String], &str) -> ListStrategy,
) -> Result<Vec<Value>, ApiError> {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .map(clean)
            .collect());
    }
    match s {
        ListStrategy::Replace => Ok(items.iter().map(clean).collect()),
        ListStrategy::MergePrimitives => {
            for i in items {
                if !old.contains(i) {
                    old.push(i.clone());
                }
            }
            Ok(old)
        }
        ListStrategy::MergeByKey(keys) => {
            for item in items {
                if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                    old.retain(|o| !same_key(o, item, &keys));
                    continue;
                }
                match old.iter_mut().find(|o| same_key(o, item, &keys)) {
                    Some(o) if item.is_object() => smp_value(o, item, path, strategy)?,
                    _ => old.push(clean(item)),
                }
            }
            Ok(old)
        }
    }
}

/// `$setElementOrder`: listed elements first in the given order, the rest after, as they were.
fn reorder(list: &mut Vec<Value>, order: &[Value], keys: Option<&[String]>) {
    let mut rest = std::mem::take(list);
    for o in order {
        let pos = rest.iter().position(|e| match keys {
            Some(k) => same_key(e, o, k),
            None => e == o,
        });
        if let Some(pos) = pos {
            list.push(rest.remove(pos));
        }
    }
    list.extend(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(target: Value, patch: Value) -> Value {
        let mut t = target;
        strategic_merge(&mut t, &patch, &list_strategy).expect("patch");
        t
    }

    #[test]
    fn merge_patch_deletes_with_null() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(t, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut t = json!({"metadata": {"labels": {"a/b": "x"}}, "l": [1, 2]});
        json_patch(
            &mut t,
            &json!([
                {"op": "remove", "path": "/metadata/labels/a~1b"},
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "replace", "path": "/l/0", "value": 0},
                {"op": "test", "path": "/l/1", "value": 2},
                {"op": "copy", "from": "/l", "path": "/m"},
                {"op": "move", "from": "/m", "path": "/n"}
            ]),
        )
        .expect("patch");
        assert_eq!(
            t,
            json!({"metadata": {"labels": {}}, "l": [0, 2, 3], "n": [0, 2, 3]})
        );
        assert!(json_patch(&mut t, &json!([{"op": "test", "path": "/l/0", "value": 9}])).is_err());
        assert!(
            json_patch(
                &mut t,
                &json!([{"op": "replace", "path": "/zz", "value": 9}])
            )
            .is_err()
        );
    }

    #[test]
    fn smp_merges_containers_by_name_and_keeps_order() {
        let t = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}
        ]}});
        let p = json!({"spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}, {"name": "c"}],
            "containers": [
                {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]},
                {"name": "c", "image": "c:1"}
            ]
        }});
        let r = smp(t, p);
        assert_eq!(
            r["spec"]["containers"],
            json!([
                {"name": "b", "image": "b:1"},
                {"name": "a", "image": "a:2", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "c", "image": "c:1"}
            ])
        );
    }

    #[test]
    fn smp_directives() {
        let t = json!({
            "metadata": {"finalizers": ["a", "b"], "labels": {"x": "1", "y": "2"}},
            "spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}],
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
                     "selector": {"a": "b"},
                     "tolerations": [{"key": "k"}]}
        });
        let p = json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "finalizers": ["c"], "labels": {"x": null}},
            "spec": {
                "ports": [{"port": 443, "$patch": "delete"}, {"port": 80, "targetPort": 8080}],
                "strategy": {"$retainKeys": ["type"], "type": "Recreate"},
                "selector": {"$patch": "replace", "c": "d"},
                "tolerations": [{"key": "j"}]
            }
        });
        let r = smp(t, p);
        assert_eq!(r["metadata"]["finalizers"], json!(["b", "c"]));
        assert_eq!(r["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(
            r["spec"]["ports"],
            json!([{"port": 80, "name": "http", "targetPort": 8080}])
        );
        assert_eq!(r["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(r["spec"]["selector"], json!({"c": "d"}));
        assert_eq!(r["spec"]["tolerations"], json!([{"key": "j"}]));
    }

    #[test]
    fn smp_list_replace_directive() {
        let t = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        let r = smp(
            t,
            json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "c"}]}}),
        );
        assert_eq!(r["spec"]["containers"], json!([{"name": "c"}]));
    }
}
