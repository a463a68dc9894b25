//! A minimal OpenAPI v3 description: one document per group/version with a PATCH operation per
//! resource path that declares the `fieldValidation` parameter. kubectl reads exactly that to
//! decide that the server validates fields itself (so it skips client-side schema validation,
//! which would need full schemas); custom kinds also carry their CRD schema for `kubectl explain`.

use serde_json::{Map, Value, json};

use crate::resources::{Registry, ResourceType};

fn fnv(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `GET /openapi/v3`: the paths of the per-group-version documents, with a content hash so that
/// kubectl's cache notices new CRDs.
pub fn root(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for (group, versions) in registry.groups() {
        for v in versions {
            let p = gv_path(&group, &v);
            let hash = fnv(&document(registry, &group, &v).to_string());
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash}")}),
            );
        }
    }
    json!({"paths": paths})
}

fn schema_name(rt: &ResourceType) -> String {
    let group = if rt.group.is_empty() {
        "core"
    } else {
        &rt.group
    };
    format!("{group}.{}.{}", rt.version, rt.kind)
}

fn operations(rt: &ResourceType) -> Value {
    let gvk = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
    let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let body_ref = json!({"$ref": format!("#/components/schemas/{}", schema_name(rt))});
    let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": body_ref}}}});
    json!({
        "get": {"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": ok},
        "put": {"x-kubernetes-action": "put", "x-kubernetes-group-version-kind": gvk,
                "parameters": [query("dryRun"), query("fieldManager"), query("fieldValidation")],
                "responses": ok},
        "patch": {"x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk,
                  "parameters": [query("dryRun"), query("fieldManager"), query("fieldValidation"), query("force")],
                  "responses": ok},
        "delete": {"x-kubernetes-action": "delete", "x-kubernetes-group-version-kind": gvk, "responses": ok},
    })
}

/// `GET /openapi/v3/api/v1` or `/openapi/v3/apis/<group>/<version>`.
pub fn document(registry: &Registry, group: &str, version: &str) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for rt in registry
        .types()
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let base = format!("/{}", gv_path(group, version));
        let item = if rt.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", rt.plural)
        } else {
            format!("{base}/{}/{{name}}", rt.plural)
        };
        paths.insert(item.clone(), operations(rt));
        if rt.status {
            paths.insert(format!("{item}/status"), operations(rt));
        }
        let mut schema = rt.schema.clone().unwrap_or_else(
            || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
        schema["x-kubernetes-group-version-kind"] =
            json!([{"group": rt.group, "version": rt.version, "kind": rt.kind}]);
        schemas.insert(schema_name(rt), schema);
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}
