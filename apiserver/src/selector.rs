//! Label and field selectors, parsed from the query string once and matched against objects.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::error::ApiError;
use crate::util::get_path;

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits at commas that are not inside parentheses (`a in (x,y),b`).
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.into_iter().filter(|t| !t.is_empty()).collect()
}

fn bad(sel: &str, why: &str) -> ApiError {
    ApiError::BadRequest(format!("unable to parse requirement: {why}: {sel:?}"))
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            reqs.push(parse_label_term(term).ok_or_else(|| bad(term, "invalid selector"))?);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        self.0.iter().all(|r| {
            let v = labels.and_then(|l| l.get(&r.key)).and_then(Value::as_str);
            match &r.op {
                Op::Eq(x) => v == Some(x.as_str()),
                // As in Kubernetes, != and notin also match objects without the label.
                Op::NotEq(x) => v != Some(x.as_str()),
                Op::In(set) => v.is_some_and(|v| set.contains(v)),
                Op::NotIn(set) => !v.is_some_and(|v| set.contains(v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

fn parse_set(s: &str) -> Option<BTreeSet<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_label_term(t: &str) -> Option<Requirement> {
    let req = |key: &str, op: Op| {
        let key = key.trim();
        valid_key(key).then(|| Requirement {
            key: key.to_string(),
            op,
        })
    };
    if let Some(key) = t.strip_prefix('!') {
        return req(key, Op::NotExists);
    }
    if let Some((key, rest)) = t.split_once(char::is_whitespace) {
        let rest = rest.trim_start();
        if let Some(set) = rest.strip_prefix("notin") {
            return req(key, Op::NotIn(parse_set(set)?));
        }
        if let Some(set) = rest.strip_prefix("in") {
            return req(key, Op::In(parse_set(set)?));
        }
    }
    for (sep, ctor) in [
        ("!=", Op::NotEq as fn(String) -> Op),
        ("==", Op::Eq),
        ("=", Op::Eq),
    ] {
        if let Some((k, v)) = t.split_once(sep) {
            return req(k, ctor(v.trim().to_string()));
        }
    }
    if let Some((k, v)) = t.split_once('>') {
        return req(k, Op::Gt(v.trim().parse().ok()?));
    }
    if let Some((k, v)) = t.split_once('<') {
        return req(k, Op::Lt(v.trim().parse().ok()?));
    }
    req(t, Op::Exists)
}

/// A parsed field selector: only equality and inequality on the fields the real server indexes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Fields beyond `metadata.name`/`metadata.namespace` that the real server accepts per kind.
fn kind_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "Secret" => &["type"],
        "Event" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        "Namespace" => &["status.phase"],
        "Node" => &["spec.unschedulable"],
        _ => &[],
    }
}

impl FieldSelector {
    pub fn parse(s: &str, kind: &str) -> Result<Self, ApiError> {
        let mut out = Vec::new();
        for term in split_terms(s) {
            let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid field selector: {term:?}"
                )));
            };
            let key = key.trim();
            if key != "metadata.name"
                && key != "metadata.namespace"
                && !kind_fields(kind).contains(&key)
            {
                return Err(ApiError::BadRequest(format!(
                    "field label not supported: {key}"
                )));
            }
            out.push((key.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(key, eq, want)| {
            let have = match get_path(obj, key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                // The real server indexes a missing field as "".
                _ => String::new(),
            };
            (have == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn label_operators() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let m = |s: &str| LabelSelector::parse(s).expect("parse").matches(&o);
        assert!(m("app=web"));
        assert!(m("app==web"));
        assert!(!m("app!=web"));
        assert!(m("app in (web, db)"));
        assert!(!m("app notin (web,db)"));
        assert!(m("tier"));
        assert!(!m("!tier"));
        assert!(m("!missing"));
        assert!(m("missing!=x"));
        assert!(m("app in (web),tier=front"));
        assert!(!m("app in (db),tier=front"));
        assert!(m(""));
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        let m = |s: &str| FieldSelector::parse(s, "Pod").expect("parse").matches(&o);
        assert!(m("metadata.name=a"));
        assert!(m("spec.nodeName=n1,metadata.namespace==ns"));
        assert!(!m("spec.nodeName!=n1"));
        assert!(FieldSelector::parse("spec.nodeName=x", "Service").is_err());
    }
}
