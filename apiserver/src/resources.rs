//! The resource types the server knows: the built-ins it serves from the start and those that
//! CustomResourceDefinitions add, with the discovery documents built from them.

use std::cmp::Ordering;

use serde_json::{Value, json};

use crate::error::Cause;

/// Verbs of a resource, in the order the real discovery lists them.
const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// One served group/version/resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    /// "" for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Whether a `/status` subresource exists (and so the main resource ignores status writes).
    pub status: bool,
    /// The CRD's `openAPIV3Schema`, for validation and pruning of custom objects.
    pub schema: Option<Value>,
    /// The name of the CRD that defines this type, if any.
    pub crd: Option<String>,
    /// The CRD version's `additionalPrinterColumns`, for Table output.
    pub printer_columns: Vec<Value>,
    /// Where a `/scale` subresource reads and writes replicas, if the kind has one.
    pub scale: Option<Scale>,
}

/// The paths behind a `/scale` subresource (dotted, as in a CRD's `subresources.scale`).
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    pub spec_replicas: String,
    pub status_replicas: String,
    /// A string field holding a label selector (custom kinds), or None for kinds whose
    /// `spec.selector` is a LabelSelector object (Deployments).
    pub label_selector: Option<String>,
}

impl ResourceType {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The storage key shared by every version of a resource: objects are stored once and shown
    /// in whichever version is asked for.
    pub fn storage(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The entries of an APIResourceList for this type (and its status subresource).
    fn discovery(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": VERBS,
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.scale.is_some() {
            out.push(json!({
                "name": format!("{}/scale", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.status {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    categories: &'static [&'static str],
    status: bool,
}

#[allow(clippy::too_many_arguments)]
const fn b(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    categories: &'static [&'static str],
    status: bool,
) -> Builtin {
    Builtin {
        group,
        version,
        kind,
        plural,
        namespaced,
        short,
        categories,
        status,
    }
}

// A table reads better than rustfmt's one-argument-per-line layout.
#[rustfmt::skip]
const BUILTINS: &[Builtin] = &[
    // group, version, kind, plural, namespaced, short names, categories, status subresource
    b("", "v1", "Namespace", "namespaces", false, &["ns"], &[], true),
    b("", "v1", "Node", "nodes", false, &["no"], &[], true),
    b("", "v1", "Pod", "pods", true, &["po"], &["all"], true),
    b("", "v1", "Service", "services", true, &["svc"], &["all"], true),
    b("", "v1", "Endpoints", "endpoints", true, &["ep"], &[], false),
    b("", "v1", "ConfigMap", "configmaps", true, &["cm"], &[], false),
    b("", "v1", "Secret", "secrets", true, &[], &[], false),
    b("", "v1", "ServiceAccount", "serviceaccounts", true, &["sa"], &[], false),
    b("", "v1", "Event", "events", true, &["ev"], &[], false),
    b("apps", "v1", "DaemonSet", "daemonsets", true, &["ds"], &["all"], true),
    b("apps", "v1", "Deployment", "deployments", true, &["deploy"], &["all"], true),
    b("coordination.k8s.io", "v1", "Lease", "leases", true, &[], &[], false),
    b("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true, &[], &[], false),
    // kube-rs's event Recorder writes here; the real server shares storage with core events.
    b("events.k8s.io", "v1", "Event", "events", true, &["ev"], &[], false),
    b("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", false, &[], &[], false),
    b("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", false, &[], &[], false),
    b("rbac.authorization.k8s.io", "v1", "Role", "roles", true, &[], &[], false),
    b("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", true, &[], &[], false),
    b("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", false, &["crd", "crds"], &["api-extensions"], true),
];

/// The set of served types.
#[derive(Debug, Clone)]
pub struct Registry {
    types: Vec<ResourceType>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtins()
    }
}

impl Registry {
    pub fn builtins() -> Self {
        let types = BUILTINS
            .iter()
            .map(|t| ResourceType {
                group: t.group.into(),
                version: t.version.into(),
                kind: t.kind.into(),
                plural: t.plural.into(),
                singular: t.kind.to_lowercase(),
                namespaced: t.namespaced,
                short_names: t.short.iter().map(|s| s.to_string()).collect(),
                categories: t.categories.iter().map(|s| s.to_string()).collect(),
                status: t.status,
                schema: None,
                crd: None,
                printer_columns: Vec::new(),
                scale: (t.kind == "Deployment").then(|| Scale {
                    spec_replicas: ".spec.replicas".into(),
                    status_replicas: ".status.replicas".into(),
                    label_selector: None,
                }),
            })
            .collect();
        Registry { types }
    }

    pub fn types(&self) -> &[ResourceType] {
        &self.types
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// Any served version of a storage key (used to name objects in events and errors).
    pub fn find_storage(&self, storage: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.storage() == storage)
    }

    /// Registers (or re-registers) the types a CRD defines.
    pub fn add_crd(&mut self, crd: &Value) -> Result<(), Vec<Cause>> {
        let types = crd_types(crd)?;
        let name = crate::util::str_at(crd, "metadata.name").to_string();
        self.remove_crd(&name);
        self.types.extend(types);
        Ok(())
    }

    pub fn remove_crd(&mut self, name: &str) {
        self.types.retain(|t| t.crd.as_deref() != Some(name));
    }

    /// Groups in discovery order: built-in groups first, then CRD groups by name; each with its
    /// versions, preferred first.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for t in &self.types {
            match groups.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, versions)) => {
                    if !versions.contains(&t.version) {
                        versions.push(t.version.clone());
                    }
                }
                None => groups.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        for (_, versions) in &mut groups {
            versions.sort_by(|a, b| version_priority(a, b));
        }
        let builtin_count = groups
            .iter()
            .filter(|(g, _)| BUILTINS.iter().any(|b| b.group == g))
            .count();
        groups[builtin_count..].sort_by(|a, b| a.0.cmp(&b.0));
        groups
    }

    /// `GET /api`.
    pub fn api_versions(&self, server_address: &str) -> Value {
        json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        })
    }

    fn group_doc(name: &str, versions: &[String]) -> Value {
        let vs: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
            .collect();
        json!({
            "name": name,
            "versions": vs,
            "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
        })
    }

    /// `GET /apis`.
    pub fn api_group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .iter()
            .filter(|(g, _)| !g.is_empty())
            .map(|(g, vs)| Self::group_doc(g, vs))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /apis/<group>`.
    pub fn api_group(&self, group: &str) -> Option<Value> {
        self.groups()
            .iter()
            .find(|(g, _)| g == group && !g.is_empty())
            .map(|(g, vs)| {
                let mut doc = Self::group_doc(g, vs);
                doc["kind"] = json!("APIGroup");
                doc["apiVersion"] = json!("v1");
                doc
            })
    }

    /// `GET /api/v1` or `GET /apis/<group>/<version>`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let types: Vec<&ResourceType> = self
            .types
            .iter()
            .filter(|t| t.group == group && t.version == version)
            .collect();
        if types.is_empty() {
            return None;
        }
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        let resources: Vec<Value> = types.iter().flat_map(|t| t.discovery()).collect();
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": gv,
            "resources": resources,
        }))
    }
}

impl Registry {
    /// The aggregated discovery document (`apidiscovery.k8s.io/v2` `APIGroupDiscoveryList`) of
    /// the core group (`/api`) or of all named groups (`/apis`), which kubectl 1.32 asks for first.
    pub fn aggregated(&self, core: bool) -> Value {
        let items: Vec<Value> = self
            .groups()
            .iter()
            .filter(|(g, _)| g.is_empty() == core)
            .map(|(g, versions)| {
                let versions: Vec<Value> = versions
                    .iter()
                    .map(|v| {
                        let resources: Vec<Value> = self
                            .types
                            .iter()
                            .filter(|t| t.group == *g && t.version == *v)
                            .map(|t| t.aggregated())
                            .collect();
                        json!({"version": v, "resources": resources, "freshness": "Current"})
                    })
                    .collect();
                json!({"metadata": {"name": g}, "versions": versions})
            })
            .collect();
        json!({
            "kind": "APIGroupDiscoveryList",
            "apiVersion": "apidiscovery.k8s.io/v2",
            "metadata": {},
            "items": items,
        })
    }
}

impl ResourceType {
    fn aggregated(&self) -> Value {
        let gvk = json!({"group": self.group, "version": self.version, "kind": self.kind});
        let mut r = json!({
            "resource": self.plural,
            "responseKind": gvk,
            "scope": if self.namespaced { "Namespaced" } else { "Cluster" },
            "singularResource": self.singular,
            "verbs": VERBS,
        });
        if !self.short_names.is_empty() {
            r["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            r["categories"] = json!(self.categories);
        }
        let mut subresources = Vec::new();
        if self.status {
            subresources.push(json!({"subresource": "status", "responseKind": gvk, "verbs": ["get", "patch", "update"]}));
        }
        if self.scale.is_some() {
            subresources.push(json!({"subresource": "scale",
                "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
                "verbs": ["get", "patch", "update"]}));
        }
        if !subresources.is_empty() {
            r["subresources"] = json!(subresources);
        }
        r
    }
}

/// Kubernetes version priority: GA before beta before alpha, higher numbers first, then
/// anything else alphabetically.
pub fn version_priority(a: &str, b: &str) -> Ordering {
    fn parse(v: &str) -> (u8, u64, u64, String) {
        let Some(rest) = v.strip_prefix('v') else {
            return (3, 0, 0, v.to_string());
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(major) = digits.parse::<u64>() else {
            return (3, 0, 0, v.to_string());
        };
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return (0, u64::MAX - major, 0, String::new());
        }
        for (prefix, class) in [("beta", 1u8), ("alpha", 2u8)] {
            if let Some(n) = tail.strip_prefix(prefix)
                && let Ok(minor) = n.parse::<u64>()
            {
                return (class, u64::MAX - major, u64::MAX - minor, String::new());
            }
        }
        (3, 0, 0, v.to_string())
    }
    parse(a).cmp(&parse(b))
}

fn invalid(field: &str, message: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired",
        message: message.to_string(),
        field: field.to_string(),
    }
}

/// The types a CRD defines, or why it is invalid.
pub fn crd_types(crd: &Value) -> Result<Vec<ResourceType>, Vec<Cause>> {
    use crate::util::str_at;
    let mut causes = Vec::new();
    let group = str_at(crd, "spec.group");
    let plural = str_at(crd, "spec.names.plural");
    let kind = str_at(crd, "spec.names.kind");
    let scope = str_at(crd, "spec.scope");
    if group.is_empty() {
        causes.push(invalid("spec.group", "Required value"));
    }
    if plural.is_empty() {
        causes.push(invalid("spec.names.plural", "Required value"));
    }
    if kind.is_empty() {
        causes.push(invalid("spec.names.kind", "Required value"));
    }
    if scope != "Namespaced" && scope != "Cluster" {
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: \"{scope}\": supported values: \"Cluster\", \"Namespaced\""
            ),
            field: "spec.scope".into(),
        });
    }
    let name = str_at(crd, "metadata.name");
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: format!(
                "Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
            ),
            field: "metadata.name".into(),
        });
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(invalid(
            "spec.versions",
            "Required value: must have exactly one version marked as storage version",
        ));
    } else if versions
        .iter()
        .filter(|v| v["storage"] == json!(true))
        .count()
        != 1
    {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: "Invalid value: must have exactly one version marked as storage version"
                .into(),
            field: "spec.versions".into(),
        });
    }
    if !causes.is_empty() {
        return Err(causes);
    }
    let strings = |p: &str| -> Vec<String> {
        crd.pointer(p)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let singular = match str_at(crd, "spec.names.singular") {
        "" => kind.to_lowercase(),
        s => s.to_string(),
    };
    Ok(versions
        .iter()
        .filter(|v| v["served"] == json!(true))
        .map(|v| ResourceType {
            group: group.into(),
            version: v["name"].as_str().unwrap_or_default().into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: singular.clone(),
            namespaced: scope == "Namespaced",
            short_names: strings("/spec/names/shortNames"),
            categories: strings("/spec/names/categories"),
            status: v.pointer("/subresources/status").is_some(),
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            crd: Some(name.to_string()),
            scale: v.pointer("/subresources/scale").map(|sc| Scale {
                spec_replicas: sc["specReplicasPath"]
                    .as_str()
                    .unwrap_or(".spec.replicas")
                    .into(),
                status_replicas: sc["statusReplicasPath"]
                    .as_str()
                    .unwrap_or(".status.replicas")
                    .into(),
                label_selector: sc["labelSelectorPath"].as_str().map(str::to_string),
            }),
            printer_columns: v
                .get("additionalPrinterColumns")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_like_kubernetes() {
        let mut v = vec!["v1alpha2", "v1beta1", "v1", "v2", "foo", "v1alpha1"];
        v.sort_by(|a, b| version_priority(a, b));
        assert_eq!(v, ["v2", "v1", "v1beta1", "v1alpha2", "v1alpha1", "foo"]);
    }

    #[test]
    fn discovery_lists_status_subresource() {
        let r = Registry::builtins();
        let list = r.resource_list("", "v1").expect("core");
        let names: Vec<&str> = list["resources"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(names.contains(&"pods/status"));
        assert!(names.contains(&"configmaps"));
    }
}
