//! Reading policy: multi-document YAML into typed [`Object`]s.
//!
//! Each document is first read as a generic YAML value so that `apiVersion` and `kind` choose the
//! type, then deserialized through `serde_path_to_error` so that a wrong type or an unknown enum
//! value becomes a [`ValidationError`] with the field path (`spec.rules[0].matches[0].method`).
//! Before any of that, [`crate::bounds`] refuses text too large, too deep or with aliases that
//! expand too far, and files are read no further than the size limit.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::bounds::MAX_POLICY_BYTES;
use crate::error::{LoadError, ValidationError};
use crate::model::{DEFAULT_NAMESPACE, Object, Resource};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const MESH_POLICY_API_VERSION: &str = "skiff.dev/v1alpha1";

/// Parses multi-document YAML text. `source_name` (usually the file name) prefixes each
/// document's source, `name#N` with N counted from 1.
///
/// Empty documents and documents holding only comments are skipped. Every other document must be
/// one of the supported kinds. Pods and Namespaces are kept only for the fields the engine reads
/// ([`crate::strip_pod`]), so a `kubectl get pods -o yaml` dump can be given as it is. All errors in the text are
/// returned, not only the first, except that text over the limits of [`crate::bounds`] is
/// refused whole with one error.
pub fn parse_documents(text: &str, source_name: &str) -> Result<Vec<Object>, Vec<ValidationError>> {
    let (objects, errors) = parse_documents_partial(text, source_name);
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

/// Like [`parse_documents`], but returns the documents that parsed alongside the errors of
/// those that did not, so that a caller can validate the rest and report everything at once.
pub fn parse_documents_partial(
    text: &str,
    source_name: &str,
) -> (Vec<Object>, Vec<ValidationError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    if let Err(refusal) = crate::bounds::check(text) {
        let source = format!("{source_name}#{}", refusal.document);
        errors.push(ValidationError::new(
            "document",
            &source,
            "",
            format!("refused: {}", refusal.reason),
        ));
        return (objects, errors);
    }
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let source = format!("{source_name}#{}", index + 1);
        let value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(error) => {
                errors.push(ValidationError::new(
                    "document",
                    &source,
                    "",
                    format!("not valid YAML: {error}"),
                ));
                // The YAML stream cannot be resynchronized after a syntax error (the document
                // iterator would keep repeating it), so the rest of this text is not read.
                break;
            }
        };
        match parse_value(value, &source) {
            Ok(Some(resource)) => objects.push(Object { source, resource }),
            Ok(None) => {}
            Err(error) => errors.push(*error),
        }
    }
    (objects, errors)
}

/// Loads a policy file, or every `*.yaml` / `*.yml` file directly inside a directory, in file
/// name order. Sources are named by file name (`routes.yaml#2`).
pub fn load_path(path: impl AsRef<Path>) -> Result<Vec<Object>, LoadError> {
    let (objects, errors) = load_path_partial(path.as_ref())?;
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(LoadError::Invalid(errors))
    }
}

/// [`load_path`] that keeps the documents that parsed alongside the errors (I/O errors still
/// fail the whole load).
pub(crate) fn load_path_partial(
    path: &Path,
) -> Result<(Vec<Object>, Vec<ValidationError>), LoadError> {
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |error| LoadError::Io { path, error }
    };
    let metadata = fs::metadata(path).map_err(io_error(path))?;
    let files: Vec<PathBuf> = if metadata.is_dir() {
        let mut files = Vec::new();
        for entry in fs::read_dir(path).map_err(io_error(path))? {
            let entry = entry.map_err(io_error(path))?;
            let file = entry.path();
            let is_yaml = file
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "yaml" || e == "yml");
            if is_yaml && file.is_file() {
                files.push(file);
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };

    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let mut total = 0usize;
    for file in &files {
        let text = read_bounded(file, MAX_POLICY_BYTES - total, total)?;
        total += text.len();
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.display().to_string());
        let (parsed, found) = parse_documents_partial(&text, &name);
        objects.extend(parsed);
        errors.extend(found);
    }
    Ok((objects, errors))
}

/// Reads a policy file as UTF-8, refusing it without reading further once it holds more than
/// `room` bytes (`before` is what the files before it held). The length in the metadata is
/// checked first but not trusted: a file may grow, and `/proc`-like files report 0.
fn read_bounded(file: &Path, room: usize, before: usize) -> Result<String, LoadError> {
    let too_large = |size: u64| LoadError::TooLarge {
        path: file.to_path_buf(),
        size: size + before as u64,
        total: before > 0,
        limit: MAX_POLICY_BYTES,
    };
    let io_error = |error| LoadError::Io {
        path: file.to_path_buf(),
        error,
    };
    let handle = fs::File::open(file).map_err(io_error)?;
    let length = handle.metadata().map_err(io_error)?.len();
    if length > room as u64 {
        return Err(too_large(length));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
    handle
        .take(room as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() > room {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        io_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8: {e}"),
        ))
    })
}

/// Parses one document; `Ok(None)` for documents that are skipped.
fn parse_value(mut value: Value, source: &str) -> Result<Option<Resource>, Box<ValidationError>> {
    if value.is_null() {
        return Ok(None);
    }
    let Value::Mapping(map) = &value else {
        return Err(Box::new(ValidationError::new(
            "document",
            source,
            "",
            "a policy document must be a mapping with apiVersion, kind and metadata",
        )));
    };
    let kind = map.get("kind");
    let api_version = map.get("apiVersion");
    let label = describe(&value);
    let error = |field: &str, reason: String| {
        Box::new(ValidationError::new(label.clone(), source, field, reason))
    };
    let kind = match kind {
        Some(Value::String(kind)) => kind.clone(),
        Some(_) => return Err(error("kind", "must be a string".into())),
        None => return Err(error("kind", "missing".into())),
    };
    let api_version = match api_version {
        Some(Value::String(v)) => v.clone(),
        Some(_) => return Err(error("apiVersion", "must be a string".into())),
        None => return Err(error("apiVersion", "missing".into())),
    };
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version.as_str()),
    };

    let unsupported = |expected: &str| {
        Err(error(
            "apiVersion",
            format!("{api_version} is not a supported version of {kind} (expected {expected})"),
        ))
    };
    let resource = match kind.as_str() {
        "Namespace" => {
            if api_version != "v1" {
                return unsupported("v1");
            }
            let namespace = typed(value, &label, source)?;
            Resource::Namespace(Arc::new(crate::workload::strip_namespace(namespace)))
        }
        "Pod" => {
            if api_version != "v1" {
                return unsupported("v1");
            }
            Resource::Pod(Arc::new(crate::workload::strip_pod(typed(
                value, &label, source,
            )?)))
        }
        "Service" => {
            if api_version != "v1" {
                return unsupported("v1");
            }
            Resource::Service(Arc::new(typed(value, &label, source)?))
        }
        "EndpointSlice" => {
            if api_version != "discovery.k8s.io/v1" {
                return unsupported("discovery.k8s.io/v1");
            }
            Resource::EndpointSlice(Arc::new(typed(value, &label, source)?))
        }
        "HTTPRoute" => {
            if group != GATEWAY_GROUP || !matches!(version, "v1" | "v1beta1") {
                return unsupported("gateway.networking.k8s.io/v1");
            }
            Resource::HttpRoute(Arc::new(typed(value, &label, source)?))
        }
        "GRPCRoute" => {
            if group != GATEWAY_GROUP || !matches!(version, "v1" | "v1alpha2") {
                return unsupported("gateway.networking.k8s.io/v1");
            }
            Resource::GrpcRoute(Arc::new(typed(value, &label, source)?))
        }
        "TLSRoute" => {
            if group != GATEWAY_GROUP || !matches!(version, "v1alpha2" | "v1alpha3" | "v1") {
                return unsupported("gateway.networking.k8s.io/v1alpha2, v1alpha3 or v1");
            }
            if version == "v1alpha2" {
                // v1alpha2 made hostnames optional (no hostnames: any SNI); the v1 type needs
                // the field.
                if let Some(Value::Mapping(spec)) = value.get_mut("spec") {
                    spec.entry(Value::String("hostnames".into()))
                        .or_insert_with(|| Value::Sequence(Vec::new()));
                }
            }
            Resource::TlsRoute(Arc::new(typed(value, &label, source)?))
        }
        "TCPRoute" => {
            if group != GATEWAY_GROUP || version != "v1alpha2" {
                return unsupported("gateway.networking.k8s.io/v1alpha2");
            }
            Resource::TcpRoute(Arc::new(typed(value, &label, source)?))
        }
        "MeshPolicy" => {
            if api_version != MESH_POLICY_API_VERSION {
                return unsupported(MESH_POLICY_API_VERSION);
            }
            Resource::MeshPolicy(Arc::new(typed(value, &label, source)?))
        }
        other => {
            return Err(error(
                "kind",
                format!(
                    "unknown kind {other} ({api_version}); supported: Service, EndpointSlice, \
                     HTTPRoute, GRPCRoute, TLSRoute, TCPRoute, MeshPolicy, Pod, Namespace"
                ),
            ));
        }
    };
    Ok(Some(resource))
}

fn typed<T: DeserializeOwned>(
    value: Value,
    label: &str,
    source: &str,
) -> Result<T, Box<ValidationError>> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let field = error.path().to_string();
        let field = if field == "." { String::new() } else { field };
        Box::new(ValidationError::new(
            label,
            source,
            field,
            error.into_inner().to_string(),
        ))
    })
}

/// `Kind namespace/name` from an untyped document, as far as it can be read.
fn describe(value: &Value) -> String {
    let kind = value.get("kind").and_then(Value::as_str);
    let Some(kind) = kind else {
        return "document".to_owned();
    };
    let metadata = value.get("metadata");
    let field = |name: &str| {
        metadata
            .and_then(|m| m.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let name = field("name").unwrap_or("<unnamed>");
    // Cluster-scoped: named as `Object::display_name` names it.
    if kind == "Namespace" {
        return format!("{kind} {name}");
    }
    let namespace = field("namespace").unwrap_or(DEFAULT_NAMESPACE);
    match field("name") {
        Some(name) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {namespace}/<unnamed>"),
    }
}
