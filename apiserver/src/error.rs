//! API errors and their `Status` form: every failure a client sees is a `metav1.Status` with the
//! code and reason the real API server uses, because kubectl and kube-rs branch on them.

use serde_json::{Value, json};

/// One entry of `details.causes`: which field was wrong and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    /// What is wrong, without the field path (the real server repeats the path in `field`).
    pub message: String,
    /// The field path, e.g. `spec.rules[0].action`.
    pub field: String,
}

/// Identifies the object an error is about, for the `details` of the Status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subject {
    pub group: String,
    pub kind: String,
    /// The plural resource name, which `NotFound` and `AlreadyExists` messages use.
    pub resource: String,
    pub name: String,
}

impl Subject {
    /// `pods` or `httproutes.gateway.networking.k8s.io`, as the real messages spell it.
    fn qualified_resource(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

/// Errors the API returns, sorted by the HTTP code they become.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found: {}", .0.name)]
    NotFound(Subject),
    /// A path that names no resource at all (404 without details).
    #[error("no route: {0}")]
    NoRoute(String),
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String),
    #[error("not acceptable: {0}")]
    NotAcceptable(String),
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("already exists: {}", .0.name)]
    AlreadyExists(Subject),
    #[error("conflict: {message}")]
    Conflict { subject: Subject, message: String },
    #[error("expired: {0}")]
    Expired(String),
    #[error("invalid: {} causes", causes.len())]
    Invalid {
        subject: Subject,
        causes: Vec<Cause>,
    },
    #[error("internal: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) | ApiError::NoRoute(_) => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::NotAcceptable(_) => 406,
            ApiError::AlreadyExists(_) | ApiError::Conflict { .. } => 409,
            ApiError::Expired(_) => 410,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Invalid { .. } => 422,
            ApiError::Internal(_) => 500,
        }
    }

    /// A `Conflict` for an update whose `metadata.resourceVersion` is stale, worded as the real
    /// server words it (kubectl shows it as is).
    pub fn stale(subject: Subject) -> Self {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
            subject.qualified_resource(),
            subject.name
        );
        ApiError::Conflict { subject, message }
    }

    /// The `metav1.Status` body.
    pub fn status(&self) -> Value {
        let (reason, message, details): (&str, String, Option<Value>) = match self {
            ApiError::BadRequest(m) => ("BadRequest", m.clone(), None),
            ApiError::NotFound(s) => (
                "NotFound",
                format!("{} \"{}\" not found", s.qualified_resource(), s.name),
                Some(details(s, None)),
            ),
            ApiError::NoRoute(_) => (
                "NotFound",
                "the server could not find the requested resource".to_string(),
                None,
            ),
            ApiError::MethodNotAllowed(m) => ("MethodNotAllowed", m.clone(), None),
            ApiError::NotAcceptable(m) => ("NotAcceptable", m.clone(), None),
            ApiError::UnsupportedMediaType(m) => ("UnsupportedMediaType", m.clone(), None),
            ApiError::AlreadyExists(s) => (
                "AlreadyExists",
                format!("{} \"{}\" already exists", s.qualified_resource(), s.name),
                Some(details(s, None)),
            ),
            ApiError::Conflict { subject, message } => {
                ("Conflict", message.clone(), Some(details(subject, None)))
            }
            ApiError::Expired(m) => ("Expired", m.clone(), None),
            ApiError::Invalid { subject, causes } => {
                let parts: Vec<String> = causes
                    .iter()
                    .map(|c| {
                        if c.field.is_empty() {
                            c.message.clone()
                        } else {
                            format!("{}: {}", c.field, c.message)
                        }
                    })
                    .collect();
                let joined = if parts.len() == 1 {
                    parts.concat()
                } else {
                    format!("[{}]", parts.join(", "))
                };
                (
                    "Invalid",
                    format!(
                        "{} \"{}\" is invalid: {}",
                        subject.qualified_kind(),
                        subject.name,
                        joined
                    ),
                    Some(details(subject, Some(causes))),
                )
            }
            ApiError::Internal(m) => ("InternalError", m.clone(), None),
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": self.code(),
        });
        if let Some(d) = details {
            status["details"] = d;
        }
        status
    }
}

fn details(s: &Subject, causes: Option<&[Cause]>) -> Value {
    let mut d = json!({ "name": s.name, "kind": if causes.is_some() { s.kind.clone() } else { s.resource.clone() } });
    if !s.group.is_empty() {
        d["group"] = json!(s.group);
    }
    if let Some(causes) = causes {
        d["causes"] = causes
            .iter()
            .map(|c| json!({ "reason": c.reason, "message": c.message, "field": c.field }))
            .collect();
    }
    d
}

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_message_names_the_field() {
        let e = ApiError::Invalid {
            subject: Subject {
                group: "example.com".into(),
                kind: "Widget".into(),
                resource: "widgets".into(),
                name: "w".into(),
            },
            causes: vec![Cause {
                reason: "FieldValueNotSupported",
                message: "Unsupported value: \"Maybe\": supported values: \"Allow\", \"Deny\""
                    .into(),
                field: "spec.rules[0].action".into(),
            }],
        };
        let s = e.status();
        assert_eq!(s["code"], 422);
        assert_eq!(
            s["message"],
            "Widget.example.com \"w\" is invalid: spec.rules[0].action: Unsupported value: \"Maybe\": supported values: \"Allow\", \"Deny\""
        );
        assert_eq!(s["details"]["causes"][0]["field"], "spec.rules[0].action");
    }
}
