//! Just enough Kubernetes protobuf to read what kubectl's generators send
//! (`kubectl create namespace|configmap|secret|serviceaccount`): the `k8s\0` envelope around a
//! `runtime.Unknown`, and the messages of those four kinds, turned into the JSON the rest of the
//! server works with. Field numbers are those of the `generated.proto` files of k8s.io/api.

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::error::ApiError;

const MAGIC: &[u8] = b"k8s\0";

fn bad(msg: &str) -> ApiError {
    ApiError::BadRequest(format!("decoding protobuf: {msg}"))
}

/// One field of a message: its number and its value (varints as integers, everything
/// length-delimited as bytes; fixed-width fields are skipped, none of the kinds here use them).
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, ApiError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or_else(|| bad("truncated varint"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("varint too long"))
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, ApiError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((num, Field::Varint(varint(buf, &mut pos)?))),
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| bad("length"))?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or_else(|| bad("truncated field"))?;
                out.push((num, Field::Bytes(&buf[pos..end])));
                pos = end;
            }
            1 => pos += 8,
            5 => pos += 4,
            _ => return Err(bad("unsupported wire type")),
        }
    }
    if pos > buf.len() {
        return Err(bad("truncated fixed-width field"));
    }
    Ok(out)
}

fn string(b: &[u8]) -> Result<Value, ApiError> {
    std::str::from_utf8(b)
        .map(|s| json!(s))
        .map_err(|_| bad("string is not UTF-8"))
}

fn b64(b: &[u8]) -> Value {
    json!(base64::engine::general_purpose::STANDARD.encode(b))
}

/// A `map<string, string|bytes>` entry: key = 1, value = 2.
fn map_entry(b: &[u8], value_is_bytes: bool) -> Result<(String, Value), ApiError> {
    let mut key = String::new();
    let mut value = if value_is_bytes { b64(&[]) } else { json!("") };
    for (num, f) in fields(b)? {
        if let Field::Bytes(x) = f {
            match num {
                1 => key = string(x)?.as_str().unwrap_or_default().to_string(),
                2 if value_is_bytes => value = b64(x),
                2 => value = string(x)?,
                _ => {}
            }
        }
    }
    Ok((key, value))
}

fn insert_map(
    m: &mut Map<String, Value>,
    name: &str,
    b: &[u8],
    bytes: bool,
) -> Result<(), ApiError> {
    let (k, v) = map_entry(b, bytes)?;
    if let Value::Object(inner) = m.entry(name).or_insert_with(|| json!({})) {
        inner.insert(k, v);
    }
    Ok(())
}

fn push(m: &mut Map<String, Value>, name: &str, v: Value) {
    if let Value::Array(a) = m.entry(name).or_insert_with(|| json!([])) {
        a.push(v);
    }
}

fn object_meta(b: &[u8]) -> Result<Value, ApiError> {
    let mut m = Map::new();
    for (num, f) in fields(b)? {
        match (num, f) {
            (1, Field::Bytes(x)) => drop(m.insert("name".into(), string(x)?)),
            (2, Field::Bytes(x)) => drop(m.insert("generateName".into(), string(x)?)),
            (3, Field::Bytes(x)) => drop(m.insert("namespace".into(), string(x)?)),
            (6, Field::Bytes(x)) => drop(m.insert("resourceVersion".into(), string(x)?)),
            (11, Field::Bytes(x)) => insert_map(&mut m, "labels", x, false)?,
            (12, Field::Bytes(x)) => insert_map(&mut m, "annotations", x, false)?,
            (14, Field::Bytes(x)) => push(&mut m, "finalizers", string(x)?),
            _ => {}
        }
    }
    Ok(Value::Object(m))
}

fn object(kind: &str, b: &[u8]) -> Result<Value, ApiError> {
    let mut m = Map::new();
    for (num, f) in fields(b)? {
        match (kind, num, f) {
            (_, 1, Field::Bytes(x)) => drop(m.insert("metadata".into(), object_meta(x)?)),
            ("Namespace", 2, Field::Bytes(x)) => {
                let mut spec = Map::new();
                for (n, f) in fields(x)? {
                    if let (1, Field::Bytes(s)) = (n, f) {
                        push(&mut spec, "finalizers", string(s)?);
                    }
                }
                m.insert("spec".into(), Value::Object(spec));
            }
            ("ConfigMap", 2, Field::Bytes(x)) => insert_map(&mut m, "data", x, false)?,
            ("ConfigMap", 3, Field::Bytes(x)) => insert_map(&mut m, "binaryData", x, true)?,
            ("ConfigMap", 4, Field::Varint(v)) | ("Secret", 5, Field::Varint(v)) => {
                drop(m.insert("immutable".into(), json!(v != 0)))
            }
            ("Secret", 2, Field::Bytes(x)) => insert_map(&mut m, "data", x, true)?,
            ("Secret", 3, Field::Bytes(x)) => drop(m.insert("type".into(), string(x)?)),
            ("Secret", 4, Field::Bytes(x)) => insert_map(&mut m, "stringData", x, false)?,
            ("ServiceAccount", 3, Field::Bytes(x)) => {
                let mut r = Map::new();
                for (n, f) in fields(x)? {
                    if let (1, Field::Bytes(s)) = (n, f) {
                        r.insert("name".into(), string(s)?);
                    }
                }
                push(&mut m, "imagePullSecrets", Value::Object(r));
            }
            ("ServiceAccount", 4, Field::Varint(v)) => {
                drop(m.insert("automountServiceAccountToken".into(), json!(v != 0)))
            }
            _ => {}
        }
    }
    Ok(Value::Object(m))
}

/// Decodes a protobuf request body for `kind`, or says which kinds it can read.
pub fn decode(kind: &str, body: &[u8]) -> Result<Value, ApiError> {
    if !matches!(
        kind,
        "Namespace" | "ConfigMap" | "Secret" | "ServiceAccount"
    ) {
        return Err(ApiError::UnsupportedMediaType(format!(
            "this test server reads protobuf only for Namespace, ConfigMap, Secret and ServiceAccount, not {kind}: send JSON or YAML (kubectl apply/create -f)"
        )));
    }
    let unknown = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing k8s envelope"))?;
    let raw = fields(unknown)?
        .into_iter()
        .find_map(|(num, f)| match (num, f) {
            (2, Field::Bytes(raw)) => Some(raw),
            _ => None,
        })
        .ok_or_else(|| bad("envelope without raw object"))?;
    object(kind, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(num: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![(num << 3) | 2, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn decodes_a_configmap() {
        let mut meta = field(1, b"cfg");
        meta.extend(field(3, b"ns"));
        meta.extend(field(
            11,
            &[field(1, b"app").as_slice(), field(2, b"web").as_slice()].concat(),
        ));
        let mut cm = field(1, &meta);
        cm.extend(field(
            2,
            &[field(1, b"k").as_slice(), field(2, b"v").as_slice()].concat(),
        ));
        let mut unknown = field(
            1,
            &[
                field(1, b"v1").as_slice(),
                field(2, b"ConfigMap").as_slice(),
            ]
            .concat(),
        );
        unknown.extend(field(2, &cm));
        let body = [MAGIC, unknown.as_slice()].concat();
        let v = decode("ConfigMap", &body).expect("decode");
        assert_eq!(
            v,
            json!({"metadata": {"name": "cfg", "namespace": "ns", "labels": {"app": "web"}}, "data": {"k": "v"}})
        );
        assert!(decode("Pod", &body).is_err());
        assert!(decode("ConfigMap", &body[..body.len() - 1]).is_err());
    }
}
