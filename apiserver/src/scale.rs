//! The `/scale` subresource (`autoscaling/v1` `Scale`) of Deployments and of custom kinds whose
//! CRD declares `subresources.scale`: what `kubectl scale` and autoscalers talk to.

use serde_json::{Map, Value, json};

use crate::api::{self, PatchKind, WriteOptions};
use crate::error::{ApiError, Cause, Result};
use crate::patch;
use crate::resources::{ResourceType, Scale};
use crate::store::Store;
use crate::util::str_at;

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
}

fn read<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    segments(path).try_fold(obj, |cur, k| cur.get(k))
}

fn write_path(obj: &mut Value, path: &str, v: Value) {
    let parts: Vec<&str> = segments(path).collect();
    let Some((last, parents)) = parts.split_last() else {
        return;
    };
    let mut cur = obj;
    for p in parents {
        if !cur[*p].is_object() {
            cur[*p] = Value::Object(Map::new());
        }
        cur = &mut cur[*p];
    }
    cur[*last] = v;
}

/// A `metav1.LabelSelector` object as the selector string `Scale.status.selector` carries.
fn selector_string(sel: &Value) -> String {
    let mut terms: Vec<String> = sel["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        terms.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "DoesNotExist" => format!("!{key}"),
            _ => key.to_string(),
        });
    }
    terms.join(",")
}

fn scale_of(rt: &ResourceType, sc: &Scale, obj: &Value) -> Value {
    // Deployments default to one replica; the real server stores that default.
    let default = if rt.crd.is_none() { 1 } else { 0 };
    let selector = match &sc.label_selector {
        Some(p) => read(obj, p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        None => selector_string(&obj["spec"]["selector"]),
    };
    let mut meta = json!({});
    for k in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = obj["metadata"].get(k) {
            meta[k] = v.clone();
        }
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": meta,
        "spec": {"replicas": read(obj, &sc.spec_replicas).and_then(Value::as_i64).unwrap_or(default)},
        "status": {
            "replicas": read(obj, &sc.status_replicas).and_then(Value::as_i64).unwrap_or(0),
            "selector": selector,
        },
    })
}

fn paths(rt: &ResourceType) -> Result<&Scale> {
    rt.scale
        .as_ref()
        .ok_or_else(|| ApiError::NoRoute(format!("{}/scale", rt.plural)))
}

pub fn get(store: &Store, rt: &ResourceType, ns: &str, name: &str) -> Result<Value> {
    let obj = api::get(store, rt, ns, name)?;
    Ok(scale_of(rt, paths(rt)?, &obj))
}

/// PUT of a Scale: sets the replicas of the object, with the Scale's resourceVersion as the
/// precondition.
pub fn update(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    scale: &Value,
    opts: &WriteOptions,
) -> Result<Value> {
    let sc = paths(rt)?;
    let Some(replicas) = scale.pointer("/spec/replicas").and_then(Value::as_i64) else {
        return Err(ApiError::Invalid {
            subject: api::subject(rt, name),
            causes: vec![Cause {
                reason: "FieldValueRequired",
                message: "Required value".into(),
                field: "spec.replicas".into(),
            }],
        });
    };
    if replicas < 0 {
        return Err(ApiError::Invalid {
            subject: api::subject(rt, name),
            causes: vec![Cause {
                reason: "FieldValueInvalid",
                message: format!("Invalid value: {replicas}: must be greater than or equal to 0"),
                field: "spec.replicas".into(),
            }],
        });
    }
    let mut obj = api::get(store, rt, ns, name)?;
    let rv = str_at(scale, "metadata.resourceVersion");
    if !rv.is_empty() {
        obj["metadata"]["resourceVersion"] = json!(rv);
    }
    write_path(&mut obj, &sc.spec_replicas, json!(replicas));
    let updated = api::update(store, rt, ns, name, obj, api::Part::Main, opts)?;
    Ok(scale_of(rt, sc, &updated))
}

/// PATCH of a Scale, in any patch format but apply.
pub fn patch(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    kind: PatchKind,
    body: &[u8],
    opts: &WriteOptions,
) -> Result<Value> {
    let mut scale = get(store, rt, ns, name)?;
    let p: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))?;
    match kind {
        PatchKind::Json => patch::json_patch(&mut scale, &p)?,
        PatchKind::Merge => patch::merge_patch(&mut scale, &p),
        PatchKind::Strategic => patch::strategic_merge(&mut scale, &p, &patch::list_strategy)?,
        PatchKind::Apply => {
            return Err(ApiError::UnsupportedMediaType(
                "apply patches of /scale are not supported by this test server".into(),
            ));
        }
    }
    update(store, rt, ns, name, &scale, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_strings() {
        let sel = json!({"matchLabels": {"app": "web"}, "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "canary", "operator": "DoesNotExist"}]});
        assert_eq!(selector_string(&sel), "app=web,tier in (a,b),!canary");
    }

    #[test]
    fn writes_nested_paths() {
        let mut o = json!({});
        write_path(&mut o, ".spec.scaling.replicas", json!(3));
        assert_eq!(o, json!({"spec": {"scaling": {"replicas": 3}}}));
    }
}
