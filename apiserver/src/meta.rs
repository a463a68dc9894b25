//! Validation of object metadata every kind shares: names by kind (DNS labels, subdomains, RBAC
//! path segments), label keys and values, annotation keys, with the real server's messages.

use serde_json::Value;

use crate::error::Cause;
use crate::resources::ResourceType;
use crate::util::str_at;

fn matches(re: &str, s: &str) -> bool {
    regex::Regex::new(re).is_ok_and(|r| r.is_match(s))
}

const DNS1123_LABEL: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_SUBDOMAIN: &str = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1035_LABEL: &str = "[a-z]([-a-z0-9]*[a-z0-9])?";
const LABEL_VALUE: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const QUALIFIED_NAME: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";

/// Why `name` is not a valid name for `kind`, in the real server's words.
fn name_problem(kind: &str, name: &str) -> Option<String> {
    if matches!(
        kind,
        "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
    ) {
        // RBAC names are path segments, so `system:controller:x` is fine.
        return (name == "." || name == ".." || name.contains('/') || name.contains('%')).then(
            || format!("Invalid value: \"{name}\": may not contain '/' or '%' or be '.' or '..'"),
        );
    }
    let (re, max, what, examples) = match kind {
        "Namespace" => (
            DNS1123_LABEL,
            63,
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            "'my-name',  or '123-abc'",
        ),
        "Service" => (
            DNS1035_LABEL,
            63,
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
            "'my-name',  or 'abc-123'",
        ),
        _ => (
            DNS1123_SUBDOMAIN,
            253,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            "'example.com'",
        ),
    };
    if name.len() > max {
        return Some(format!(
            "Invalid value: \"{name}\": must be no more than {max} characters"
        ));
    }
    (!matches(&format!("^{re}$"), name)).then(|| {
        format!("Invalid value: \"{name}\": {what} (e.g. {examples}, regex used for validation is '{re}')")
    })
}

/// Why a label key is invalid: an optional DNS subdomain prefix, then a qualified name.
fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !matches(&format!("^{DNS1123_SUBDOMAIN}$"), p))
    {
        return Some(format!(
            "Invalid value: \"{key}\": prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '{DNS1123_SUBDOMAIN}')"
        ));
    }
    if name.is_empty() || name.len() > 63 || !matches(&format!("^{QUALIFIED_NAME}$"), name) {
        return Some(format!(
            "Invalid value: \"{key}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '{QUALIFIED_NAME}')"
        ));
    }
    None
}

pub fn metadata_causes(rt: &ResourceType, obj: &Value) -> Vec<Cause> {
    let invalid = |field: &str, message: String| Cause {
        reason: "FieldValueInvalid",
        message,
        field: field.to_string(),
    };
    let name = str_at(obj, "metadata.name");
    if name.is_empty() {
        return vec![Cause {
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".into(),
            field: "metadata.name".into(),
        }];
    }
    let mut causes = Vec::new();
    if let Some(problem) = name_problem(&rt.kind, name) {
        causes.push(invalid("metadata.name", problem));
    }
    for field in ["labels", "annotations"] {
        let path = format!("metadata.{field}");
        let Some(m) = obj["metadata"].get(field).filter(|m| !m.is_null()) else {
            continue;
        };
        let Some(m) = m.as_object() else {
            causes.push(invalid(
                &path,
                "Invalid value: must be a map of strings".into(),
            ));
            continue;
        };
        for (k, v) in m {
            let Some(v) = v.as_str() else {
                causes.push(invalid(
                    &format!("{path}.{k}"),
                    format!("Invalid value: {v}: must be a string"),
                ));
                continue;
            };
            if let Some(problem) = label_key_problem(k) {
                causes.push(invalid(&path, problem));
            }
            if field == "labels" && (v.len() > 63 || !matches(&format!("^{LABEL_VALUE}$"), v)) {
                causes.push(invalid(&path, format!("Invalid value: \"{v}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '{LABEL_VALUE}')")));
            }
        }
    }
    causes
}
