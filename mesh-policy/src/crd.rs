//! The `MeshPolicy` CustomResourceDefinition: the bounds and patterns its schema carries, the
//! `status` the agent writes, and the definition itself (`cargo xtask crds` writes it to
//! `manifests/crds/meshpolicy.yaml`).
//!
//! The schema rejects on the apiserver what can be told from one field (shapes, enums, lengths,
//! list bounds, unique rule names) so that `kubectl apply` fails early. It is never stricter
//! than [`crate::validate`], which still checks everything (CIDR values, port ranges, references
//! between objects) in both modes; in Kubernetes mode its errors go to `status` and the log,
//! each naming the field.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResourceExt as _;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::model::{MeshPolicy, PortSpec};

/// RFC 1123 label, as `names::dns_label` checks it (with `maxLength: 63`).
pub(crate) const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// An interface name as the authorization rules accept it: no `/`, space or NUL (with
/// `minLength: 1`, `maxLength: 15`).
pub(crate) const INTERFACE_PATTERN: &str = r"^[^/ \x00]+$";
/// The shape of an IPv4 or IPv6 address with an optional prefix length; the values are checked
/// by `parse_cidr`.
pub(crate) const CIDR_PATTERN: &str =
    r"^(([0-9]{1,3}\.){3}[0-9]{1,3}(/[0-9]{1,2})?|[0-9a-fA-F.]*:[0-9a-fA-F:.]*(/[0-9]{1,3})?)$";
/// Gateway API (GEP-2257) duration, the pattern of the Gateway API CRDs.
pub(crate) const DURATION_PATTERN: &str = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$";
/// An L7 deny path prefix.
pub(crate) const DENY_PATH_PATTERN: &str = r"^/[^?# ]*$";
/// An upper-case method name.
pub(crate) const METHOD_PATTERN: &str = r"^[A-Z]+$";
/// A header value the agent may inject: no CR, LF or NUL.
pub(crate) const HEADER_VALUE_PATTERN: &str = r"^[^\r\n\x00]*$";
/// The shape of a principal pattern: `*`, a SPIFFE ID, a SPIFFE ID prefix followed by `*`, or
/// `*` followed by a path suffix; `identity::PrincipalPattern` checks the names in it.
pub(crate) const PRINCIPAL_PATTERN: &str = r"^(\*|spiffe://[^*]*|spiffe://[^*]*\*|\*/[^*]+)$";
/// `80`, `"8000-8100"` or `"*"` as text; the numbers are checked by `parse_port_spec`.
const PORT_TEXT_PATTERN: &str = r"^(\*|[0-9]{1,5}(-[0-9]{1,5})?)$";

/// `spec.capture`: the kernel's capture tries hold this many prefixes per address family.
pub(crate) const MAX_CAPTURE: usize = mesh_common::redirect::MAX_PREFIXES as usize;
/// `spec.capture[].ports`: port ranges per prefix in the kernel's `PortSet` (the agent's own
/// `capture` setting has the same bound).
pub(crate) const MAX_CAPTURE_PORTS: usize = mesh_common::redirect::MAX_PORT_RANGES;
/// Entries one MeshPolicy's authorization may expand to (validation in `lower/policy.rs` uses
/// this constant too): every rule is at least one, and the product of its `from`, `to` and
/// `ports` is its count, so none of these lists can be longer either.
pub(crate) const MAX_AUTHZ_ENTRIES: usize = 1024;
/// `spec.authorization.rules`.
pub(crate) const MAX_AUTHZ_RULES: usize = MAX_AUTHZ_ENTRIES;
/// Interfaces named by one rule, or keys of `spec.authorization.defaults`: the interfaces the
/// XDP program keeps counters for.
pub(crate) const MAX_INTERFACES: usize = mesh_common::authz::MAX_IFACES as usize;
/// `spec.authorization.http`: the HTTP proxy checks every rule on every request, and the
/// apiserver needs a bound to estimate the cost of the rule's CEL check.
pub(crate) const MAX_HTTP_DENY_RULES: usize = 256;
/// `principals` and `namespaces` of one rule: every connection through the tunnel is checked
/// against them in userspace.
pub(crate) const MAX_PRINCIPALS: usize = 64;
/// The SPIFFE specification's limit on the length of an ID.
pub(crate) const MAX_PRINCIPAL_LEN: usize = 2048;
/// `spec.mtls.namespaces`.
pub(crate) const MAX_MTLS_NAMESPACES: usize = 1024;
/// Longest header value the agent injects (`lower/mod.rs` validates with this constant).
pub(crate) const MAX_HEADER_VALUE: usize = 4096;
/// Longest condition message the apiserver accepts.
const MAX_MESSAGE: usize = 32768;

/// CEL on `spec.authorization.defaults`: key lengths (`size` is constant-cost; the characters
/// are left to validation, as a per-character check of unbounded keys would exceed the
/// apiserver's CEL cost budget).
pub(crate) const INTERFACE_KEYS_RULE: &str = "self.all(k, size(k) >= 1 && size(k) <= 15)";
/// CEL on `spec.mtls.namespaces`: key lengths, as for the interface keys (the characters are
/// left to validation).
pub(crate) const NAMESPACE_KEYS_RULE: &str = "self.all(k, size(k) >= 1 && size(k) <= 63)";
/// CEL on an L7 deny rule: without a condition it would deny every request.
pub(crate) const HTTP_DENY_NOT_EMPTY_RULE: &str = "(has(self.paths) && size(self.paths) > 0) || \
     (has(self.methods) && size(self.methods) > 0) || (has(self.headers) && size(self.headers) > 0) || \
     (has(self.principals) && size(self.principals) > 0) || \
     (has(self.namespaces) && size(self.namespaces) > 0)";

/// The condition type the agent reports.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// `Accepted=True`: the policy is valid and in force.
pub const REASON_ACCEPTED: &str = "Accepted";
/// `Accepted=False`: validation failed; the message lists every error with its field.
pub const REASON_INVALID: &str = "Invalid";

/// What the agents report about a MeshPolicy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshPolicyStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: `True` with reason `Accepted` when the policy is in force, `False` with reason
    /// `Invalid` and every error (field and reason) in the message when it was rejected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"])
    )]
    pub conditions: Vec<Condition>,
}

impl MeshPolicyStatus {
    /// The status after validating `generation` of a policy: `Accepted=True` when `errors` is
    /// empty, else `Accepted=False` listing them (`field: reason`, `; `-separated, cut at the
    /// apiserver's 32 KiB message limit).
    pub fn validated(generation: Option<i64>, errors: &[ValidationError], now: Time) -> Self {
        let (status, reason, message) = if errors.is_empty() {
            ("True", REASON_ACCEPTED, "the policy is in force".to_owned())
        } else {
            let list: Vec<String> = errors
                .iter()
                .map(|e| match e.field.as_str() {
                    "" => e.reason.clone(),
                    field => format!("{field}: {}", e.reason),
                })
                .collect();
            let mut message = list.join("; ");
            if message.len() > MAX_MESSAGE {
                let mut end = MAX_MESSAGE - 3;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
                message.push_str("...");
            }
            ("False", REASON_INVALID, message)
        };
        Self {
            observed_generation: generation,
            conditions: vec![Condition {
                type_: CONDITION_ACCEPTED.to_owned(),
                status: status.to_owned(),
                reason: reason.to_owned(),
                message,
                observed_generation: generation,
                last_transition_time: now,
            }],
        }
    }
}

/// The CustomResourceDefinition of `meshpolicies.skiff.dev`.
pub fn definition() -> CustomResourceDefinition {
    MeshPolicy::crd()
}

/// `spec.failMode`. FailMode itself has no schema derive: its one definition is shared with the
/// agent's configuration (a test below keeps the two spellings equal).
pub(crate) fn fail_mode_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "enum": ["open", "closed"],
    })
}

/// `spec.headers.set`: header values the agent may inject (`schemars(inner(..))` does not reach
/// map values).
pub(crate) fn header_values_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "additionalProperties": {
            "type": "string",
            "maxLength": MAX_HEADER_VALUE,
            "pattern": HEADER_VALUE_PATTERN,
        },
    })
}

/// A port or range: the apiserver's int-or-string (as k8s-openapi's `IntOrString`), with the
/// checks of both forms at the same level: `minimum`/`maximum` apply to numbers only,
/// `pattern`/`maxLength` to strings only.
impl JsonSchema for PortSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortSpec".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A port (80), a range (\"8000-8100\") or every port (\"*\").",
            "x-kubernetes-int-or-string": true,
            "minimum": 1,
            "maximum": 65535,
            "maxLength": 11,
            "pattern": PORT_TEXT_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FailMode;
    use serde_json::{Value, json};

    fn schema() -> Value {
        let crd = definition();
        let version = &crd.spec.versions[0];
        serde_json::to_value(
            version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("derived schema"),
        )
        .expect("schema to JSON")
    }

    #[test]
    fn names_scope_and_status_subresource() {
        let crd = definition();
        assert_eq!(crd.metadata.name.as_deref(), Some("meshpolicies.skiff.dev"));
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "MeshPolicy");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
    }

    #[test]
    fn fail_mode_enum_matches_serde() {
        // Exhaustive: a new variant fails to compile here until the schema lists it.
        let all = [FailMode::Open, FailMode::Closed].map(|m| match m {
            FailMode::Open | FailMode::Closed => serde_json::to_value(m).expect("serializes"),
        });
        let schema = schema();
        assert_eq!(
            schema["properties"]["spec"]["properties"]["failMode"]["enum"],
            Value::Array(all.to_vec())
        );
    }

    #[test]
    fn schema_carries_enums_bounds_and_rules() {
        let schema = schema();
        let spec = &schema["properties"]["spec"];
        let authz = &spec["properties"]["authorization"]["properties"];
        let rule = &authz["rules"]["items"]["properties"];
        assert_eq!(rule["action"]["enum"], json!(["Allow", "Deny"]));
        assert_eq!(rule["protocol"]["enum"], json!(["TCP", "UDP"]));
        assert_eq!(rule["name"]["maxLength"], json!(63));
        assert_eq!(rule["interfaces"]["items"]["maxLength"], json!(15));
        assert_eq!(rule["to"]["items"]["pattern"], json!(CIDR_PATTERN));
        assert_eq!(authz["rules"]["x-kubernetes-list-type"], json!("map"));
        assert_eq!(
            authz["rules"]["x-kubernetes-list-map-keys"],
            json!(["name"])
        );
        assert_eq!(authz["rules"]["maxItems"], json!(MAX_AUTHZ_RULES));
        assert_eq!(
            authz["http"]["items"]["x-kubernetes-validations"][0]["rule"],
            json!(HTTP_DENY_NOT_EMPTY_RULE)
        );
        let capture = &spec["properties"]["capture"];
        assert_eq!(
            capture["items"]["properties"]["ports"]["maxItems"],
            json!(16)
        );
        assert_eq!(
            capture["items"]["properties"]["ports"]["items"]["x-kubernetes-int-or-string"],
            json!(true)
        );
        assert_eq!(
            spec["properties"]["protocolDetectionTimeout"]["pattern"],
            json!(DURATION_PATTERN)
        );
        assert_eq!(
            spec["properties"]["failMode"]["enum"],
            json!(["open", "closed"])
        );
        let set = &spec["properties"]["headers"]["properties"]["set"];
        assert_eq!(
            set["additionalProperties"]["maxLength"],
            json!(MAX_HEADER_VALUE)
        );
        assert_eq!(authz["defaults"]["maxProperties"], json!(MAX_INTERFACES));
    }

    #[test]
    fn schema_carries_mtls_and_identity_conditions() {
        let schema = schema();
        let spec = &schema["properties"]["spec"]["properties"];
        let mtls = &spec["mtls"]["properties"];
        assert_eq!(mtls["mode"]["enum"], json!(["STRICT", "PERMISSIVE"]));
        assert_eq!(
            mtls["namespaces"]["additionalProperties"]["enum"],
            json!(["STRICT", "PERMISSIVE"])
        );
        assert_eq!(
            mtls["namespaces"]["x-kubernetes-validations"][0]["rule"],
            json!(NAMESPACE_KEYS_RULE)
        );
        let authz = &spec["authorization"]["properties"];
        for rule in [
            &authz["rules"]["items"]["properties"],
            &authz["http"]["items"]["properties"],
        ] {
            assert_eq!(rule["principals"]["maxItems"], json!(MAX_PRINCIPALS));
            assert_eq!(
                rule["principals"]["items"]["pattern"],
                json!(PRINCIPAL_PATTERN)
            );
            assert_eq!(
                rule["namespaces"]["items"]["pattern"],
                json!(DNS_LABEL_PATTERN)
            );
        }
    }

    #[test]
    fn principal_pattern_is_never_stricter_than_validation() {
        // Every principal validation accepts has the schema's shape; the shapes the schema lets
        // through and validation refuses are left to validation, which names the reason.
        let shape = regex::Regex::new(PRINCIPAL_PATTERN).expect("pattern compiles");
        for ok in [
            "*",
            "spiffe://td/ns/a/sa/b",
            "spiffe://*",
            "spiffe://td/*",
            "spiffe://td/ns/a/*",
            "*/sa/b",
            "*/b",
            "*/ns/a/sa/b",
        ] {
            assert!(ok.parse::<crate::PrincipalPattern>().is_ok(), "{ok}");
            assert!(shape.is_match(ok), "{ok}");
        }
        for bad in ["**", "*/sa/*", "td/*", "*sa/b", "spiffe://td/*/sa/b"] {
            assert!(!shape.is_match(bad), "{bad}");
            assert!(bad.parse::<crate::PrincipalPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_is_required_as_in_the_crd() {
        // The generated object has no serde defaults for metadata and spec; the CRD's schema
        // requires spec too, so a file and the apiserver agree.
        assert_eq!(schema()["required"], json!(["spec"]));
        let errors = crate::parse_documents(
            "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: m}\n",
            "p.yaml",
        )
        .expect_err("no spec");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].reason.contains("missing field `spec`"),
            "{}",
            errors[0]
        );
        let empty =
            "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: m}\nspec: {}\n";
        assert!(crate::parse_documents(empty, "p.yaml").is_ok());
    }

    #[test]
    fn status_lists_every_error_with_its_field() {
        let now = Time(Default::default());
        let ok = MeshPolicyStatus::validated(Some(3), &[], now.clone());
        assert_eq!(ok.observed_generation, Some(3));
        assert_eq!(ok.conditions[0].status, "True");
        assert_eq!(ok.conditions[0].reason, REASON_ACCEPTED);

        let errors = [
            ValidationError::new(
                "MeshPolicy a/b",
                "k8s",
                "spec.capture[0].cidr",
                "not a CIDR",
            ),
            ValidationError::new("MeshPolicy a/b", "k8s", "", "whole object"),
        ];
        let bad = MeshPolicyStatus::validated(Some(4), &errors, now);
        let c = &bad.conditions[0];
        assert_eq!((c.type_.as_str(), c.status.as_str()), ("Accepted", "False"));
        assert_eq!(c.reason, REASON_INVALID);
        assert_eq!(c.message, "spec.capture[0].cidr: not a CIDR; whole object");
        assert_eq!(c.observed_generation, Some(4));
    }

    #[test]
    fn long_messages_are_cut_at_the_apiserver_limit() {
        let errors = vec![ValidationError::new("o", "s", "f", "é".repeat(MAX_MESSAGE)); 2];
        let status = MeshPolicyStatus::validated(None, &errors, Time(Default::default()));
        let message = &status.conditions[0].message;
        assert!(message.len() <= MAX_MESSAGE && message.ends_with("..."));
    }
}
