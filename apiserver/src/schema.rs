//! Structural-schema pruning and OpenAPI v3 validation of custom objects against their CRD's
//! `openAPIV3Schema`, with the messages and cause reasons of the real server (kube-openapi).
//! Defaults (`default`) are applied like the real server's structural defaulting. CEL rules
//! (`x-kubernetes-validations`) and `allOf`/`anyOf`/`oneOf`/`not` are not evaluated.

use serde_json::{Map, Value};

use crate::error::Cause;

/// Removes fields the schema does not declare (and `null`s where the schema does not allow them),
/// returning the paths removed so that strict field validation can report them.
pub fn prune(obj: &mut Value, schema: &Value) -> Vec<String> {
    let mut removed = Vec::new();
    if let Value::Object(m) = obj {
        prune_map(m, schema, "", true, &mut removed);
    }
    removed
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn preserves(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true)
}

fn prune_value(v: &mut Value, schema: &Value, path: &str, removed: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            let embedded = schema["x-kubernetes-embedded-resource"] == Value::Bool(true);
            prune_map(m, schema, path, embedded, removed);
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for (i, item) in a.iter_mut().enumerate() {
                    prune_value(item, items, &format!("{path}[{i}]"), removed);
                }
            }
        }
        _ => {}
    }
}

fn prune_map(
    m: &mut Map<String, Value>,
    schema: &Value,
    path: &str,
    keep_type_meta: bool,
    removed: &mut Vec<String>,
) {
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let keep_all = preserves(schema) || matches!(additional, Some(Value::Bool(true)));
    let keys: Vec<String> = m.keys().cloned().collect();
    for k in keys {
        if keep_type_meta
            && matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
            && (path.is_empty() || props.is_none_or(|p| !p.contains_key(&k)))
        {
            continue;
        }
        let child = props
            .and_then(|p| p.get(&k))
            .or(additional.filter(|a| a.is_object()));
        let child_path = join(path, &k);
        match child {
            Some(s) => {
                if m.get(&k).is_some_and(Value::is_null) && s["nullable"] != Value::Bool(true) {
                    // Structural schemas drop nulls of non-nullable fields instead of failing.
                    m.remove(&k);
                    continue;
                }
                if let Some(v) = m.get_mut(&k) {
                    prune_value(v, s, &child_path, removed);
                }
            }
            None if keep_all => {}
            None => {
                m.remove(&k);
                removed.push(child_path);
            }
        }
    }
}

/// Fills in `default` values of missing properties, as the real server does on every write:
/// only inside objects that exist, and recursively into what it just defaulted.
pub fn apply_defaults(v: &mut Value, schema: &Value) {
    match v {
        Value::Object(m) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, s) in props {
                    if !m.contains_key(k)
                        && let Some(d) = s.get("default")
                    {
                        m.insert(k.clone(), d.clone());
                    }
                    if let Some(child) = m.get_mut(k) {
                        apply_defaults(child, s);
                    }
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let known = schema.get("properties").and_then(Value::as_object);
                for (k, child) in m.iter_mut() {
                    if known.is_none_or(|p| !p.contains_key(k)) {
                        apply_defaults(child, additional);
                    }
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for item in a {
                    apply_defaults(item, items);
                }
            }
        }
        _ => {}
    }
}

/// Validates `v` against `schema`, returning every violation.
pub fn validate(v: &Value, schema: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    check(v, schema, "", &mut causes);
    causes
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn invalid(causes: &mut Vec<Cause>, path: &str, value: &Value, what: String) {
    causes.push(Cause {
        reason: "FieldValueInvalid",
        message: format!("Invalid value: {}: {path} in body {what}", show(value)),
        field: path.to_string(),
    });
}

fn type_matches(v: &Value, ty: &str) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => v.is_number(),
        _ => true,
    }
}

fn check(v: &Value, schema: &Value, path: &str, causes: &mut Vec<Cause>) {
    if v.is_null() {
        if schema["nullable"] == Value::Bool(true) {
            return;
        }
        if schema.get("type").is_some() {
            causes.push(Cause {
                reason: "FieldValueTypeInvalid",
                message: format!(
                    "Invalid value: \"null\": {path} in body must be of type {}: \"null\"",
                    schema["type"].as_str().unwrap_or("object")
                ),
                field: path.to_string(),
            });
        }
        return;
    }
    let int_or_string = schema["x-kubernetes-int-or-string"] == Value::Bool(true);
    if int_or_string {
        if !(v.is_string() || type_matches(v, "integer")) {
            causes.push(Cause {
                reason: "FieldValueTypeInvalid",
                message: format!(
                    "Invalid value: \"{0}\": {path} in body must be of type integer,string: \"{0}\"",
                    type_name(v)
                ),
                field: path.to_string(),
            });
            return;
        }
    } else if let Some(ty) = schema.get("type").and_then(Value::as_str)
        && !type_matches(v, ty)
    {
        // kube-openapi reports the type name, not the value, on both sides.
        causes.push(Cause {
            reason: "FieldValueTypeInvalid",
            message: format!(
                "Invalid value: \"{0}\": {path} in body must be of type {ty}: \"{0}\"",
                type_name(v)
            ),
            field: path.to_string(),
        });
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(show).collect();
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {}: supported values: {}",
                show(v),
                list.join(", ")
            ),
            field: path.to_string(),
        });
    }
    match v {
        Value::String(s) => check_string(v, s, schema, path, causes),
        Value::Number(n) => check_number(v, n.as_f64().unwrap_or(0.0), schema, path, causes),
        Value::Array(a) => {
            let len = a.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && len < min
            {
                invalid(causes, path, v, format!("should have at least {min} items"));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && len > max
            {
                causes.push(Cause {
                    reason: "FieldValueTooMany",
                    message: format!("Too many: {len}: must have at most {max} items"),
                    field: path.to_string(),
                });
            }
            if let Some(items) = schema.get("items") {
                for (i, item) in a.iter().enumerate() {
                    check(item, items, &format!("{path}[{i}]"), causes);
                }
            }
        }
        Value::Object(m) => {
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !m.contains_key(r) {
                        causes.push(Cause {
                            reason: "FieldValueRequired",
                            message: "Required value".into(),
                            field: join(path, r),
                        });
                    }
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let len = m.len() as u64;
            if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
                && len < min
            {
                invalid(
                    causes,
                    path,
                    v,
                    format!("should have at least {min} properties"),
                );
            }
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && len > max
            {
                causes.push(Cause {
                    reason: "FieldValueTooMany",
                    message: format!("Too many: {len}: must have at most {max} items"),
                    field: path.to_string(),
                });
            }
            for (k, child) in m {
                // metadata is validated as ObjectMeta, not by the CRD schema.
                if path.is_empty() && matches!(k.as_str(), "metadata" | "apiVersion" | "kind") {
                    continue;
                }
                if let Some(s) = props.and_then(|p| p.get(k)).or(additional) {
                    check(child, s, &join(path, k), causes);
                }
            }
        }
        _ => {}
    }
}

fn check_string(v: &Value, s: &str, schema: &Value, path: &str, causes: &mut Vec<Cause>) {
    let len = s.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && len > max
    {
        causes.push(Cause {
            reason: "FieldValueTooLong",
            message: format!("Too long: may not be more than {max} bytes"),
            field: path.to_string(),
        });
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && len < min
    {
        invalid(
            causes,
            path,
            v,
            format!("should be at least {min} chars long"),
        );
    }
    if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
        match regex::Regex::new(p) {
            Ok(re) if !re.is_match(s) => {
                invalid(causes, path, v, format!("should match '{p}'"));
            }
            _ => {}
        }
    }
    if let Some(f) = schema.get("format").and_then(Value::as_str)
        && !format_ok(f, s)
    {
        invalid(causes, path, v, format!("must be of type {f}: {}", show(v)));
    }
}

fn format_ok(format: &str, s: &str) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let re = |p: &str| regex::Regex::new(p).is_ok_and(|r| r.is_match(s));
    match format {
        "ipv4" => s.parse::<Ipv4Addr>().is_ok(),
        "ipv6" => s.parse::<Ipv6Addr>().is_ok(),
        "ip" => s.parse::<IpAddr>().is_ok(),
        "cidr" => s
            .split_once('/')
            .is_some_and(|(a, l)| a.parse::<IpAddr>().is_ok() && l.parse::<u8>().is_ok()),
        "date-time" => {
            re(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
        }
        "date" => re(r"^\d{4}-\d{2}-\d{2}$"),
        "uuid" => {
            re(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
        }
        "hostname" => re(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        "email" => re(r"^[^@\s]+@[^@\s]+$"),
        "byte" => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(s).is_ok()
        }
        _ => true,
    }
}

fn check_number(v: &Value, n: f64, schema: &Value, path: &str, causes: &mut Vec<Cause>) {
    let excl_min = schema["exclusiveMinimum"] == Value::Bool(true);
    let excl_max = schema["exclusiveMaximum"] == Value::Bool(true);
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        if excl_min && n <= min {
            invalid(
                causes,
                path,
                v,
                format!("should be greater than {}", num(min)),
            );
        } else if n < min {
            invalid(
                causes,
                path,
                v,
                format!("should be greater than or equal to {}", num(min)),
            );
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        if excl_max && n >= max {
            invalid(causes, path, v, format!("should be less than {}", num(max)));
        } else if n > max {
            invalid(
                causes,
                path,
                v,
                format!("should be less than or equal to {}", num(max)),
            );
        }
    }
    if let Some(m) = schema.get("multipleOf").and_then(Value::as_f64)
        && m != 0.0
        && (n / m).fract() != 0.0
    {
        invalid(
            causes,
            path,
            v,
            format!("should be a multiple of {}", num(m)),
        );
    }
}

fn num(f: f64) -> String {
    if f.fract() == 0.0 {
        format!("{}", f as i64)
    } else {
        f.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["rules"],
                    "properties": {
                        "replicas": {"type": "integer", "minimum": 1, "maximum": 10},
                        "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                        "port": {"x-kubernetes-int-or-string": true},
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "rules": {"type": "array", "maxItems": 2, "items": {
                            "type": "object",
                            "properties": {"action": {"type": "string", "enum": ["Allow", "Deny"]}}
                        }}
                    }
                }
            }
        })
    }

    #[test]
    fn enum_violation_names_the_field() {
        let obj = json!({"spec": {"rules": [{"action": "Allow"}, {"action": "Maybe"}]}});
        let c = validate(&obj, &schema());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].field, "spec.rules[1].action");
        assert_eq!(
            c[0].message,
            "Unsupported value: \"Maybe\": supported values: \"Allow\", \"Deny\""
        );
    }

    #[test]
    fn other_keywords() {
        let obj = json!({"spec": {"replicas": 11, "name": "ABCDEFG", "port": true,
                                  "labels": {"a": 1}}});
        let c = validate(&obj, &schema());
        let fields: Vec<&str> = c.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&"spec.rules"), "{c:?}");
        assert!(fields.contains(&"spec.replicas"));
        assert!(fields.contains(&"spec.name"));
        assert!(fields.contains(&"spec.port"));
        assert!(fields.contains(&"spec.labels.a"));
        let replicas = c
            .iter()
            .find(|c| c.field == "spec.replicas")
            .expect("replicas");
        assert_eq!(
            replicas.message,
            "Invalid value: 11: spec.replicas in body should be less than or equal to 10"
        );
    }

    #[test]
    fn defaults_fill_missing_fields_inside_existing_objects() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "rules": {"type": "array", "items": {"type": "object", "properties": {
                "matches": {"type": "array", "default": [{"path": {"type": "PathPrefix", "value": "/"}}],
                            "items": {"type": "object", "properties": {"path": {"type": "object", "properties": {
                                "type": {"type": "string", "default": "PathPrefix"},
                                "value": {"type": "string", "default": "/"}}}}}},
                "weight": {"type": "integer", "default": 1}}}},
            "absent": {"type": "object", "properties": {"x": {"type": "integer", "default": 5}}}}}}});
        let mut obj = json!({"spec": {"rules": [{}, {"matches": [{"path": {"value": "/api"}}], "weight": 3}]}});
        apply_defaults(&mut obj, &schema);
        assert_eq!(
            obj,
            json!({"spec": {"rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "weight": 1},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "weight": 3}
            ]}})
        );
    }

    #[test]
    fn prunes_unknown_fields() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
            "spec": {"rules": [], "bogus": 1, "extra": {"anything": 1}, "labels": {"k": "v"}, "name": null},
            "other": true});
        let mut removed = prune(&mut obj, &schema());
        removed.sort();
        assert_eq!(removed, vec!["other".to_string(), "spec.bogus".to_string()]);
        assert_eq!(obj["spec"]["extra"]["anything"], 1);
        assert_eq!(obj["spec"]["labels"]["k"], "v");
        assert!(obj["spec"].get("name").is_none());
        assert_eq!(obj["metadata"]["name"], "a");
    }
}
