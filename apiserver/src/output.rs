//! The shapes a read can be answered in, chosen by the Accept header as the real server does:
//! the object itself, `PartialObjectMetadata` (kube-rs `metadata_watcher`, `get_metadata`), or a
//! `Table` (what `kubectl get` asks for, with the columns the real printers show for the common
//! built-ins and a CRD's `additionalPrinterColumns`).

use serde_json::{Value, json};

use crate::resources::ResourceType;
use crate::util::{now_secs, str_at};

/// How to present objects.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Shape {
    #[default]
    Object,
    Metadata,
    /// With the `meta.k8s.io` version asked for (`v1` or `v1beta1`).
    Table(&'static str),
}

impl Shape {
    /// The first media type of the Accept header this server can produce.
    pub fn from_accept(accept: &str) -> Shape {
        for media in accept.split(',') {
            let params: Vec<&str> = media.split(';').map(str::trim).collect();
            let base = params.first().copied().unwrap_or_default();
            if base != "application/json" && base != "*/*" && !base.is_empty() {
                continue;
            }
            let has = |p: &str| params.contains(&p);
            if has("g=meta.k8s.io") {
                if has("as=Table") {
                    return Shape::Table(if has("v=v1beta1") { "v1beta1" } else { "v1" });
                }
                if has("as=PartialObjectMetadata") || has("as=PartialObjectMetadataList") {
                    return Shape::Metadata;
                }
                continue;
            }
            return Shape::Object;
        }
        Shape::Object
    }

    /// One object (a GET, or a watch event's object).
    pub fn item(&self, rt: &ResourceType, obj: Value) -> Value {
        match self {
            Shape::Object => obj,
            Shape::Metadata => partial(&obj),
            Shape::Table(v) => table(rt, v, std::slice::from_ref(&obj), json!({})),
        }
    }

    /// A list response.
    pub fn list(&self, rt: &ResourceType, list: Value) -> Value {
        match self {
            Shape::Object => list,
            Shape::Metadata => {
                let items: Vec<Value> = list["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(partial)
                    .collect();
                json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                       "metadata": list["metadata"], "items": items})
            }
            Shape::Table(v) => {
                let items = list["items"].as_array().cloned().unwrap_or_default();
                table(rt, v, &items, list["metadata"].clone())
            }
        }
    }
}

fn partial(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

/// `duration.HumanDuration` of the real printers: 45s, 3m20s, 5h10m, 3d4h, 400d, 2y10d.
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if h < 24 * 365 * 2 {
        format!("{d}d")
    } else if h < 24 * 365 * 8 {
        let y = d / 365;
        if d % 365 == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{}d", d % 365)
        }
    } else {
        format!("{}y", d / 365)
    }
}

/// Parses `2026-12-01T15:50:38Z` back to seconds since the epoch.
fn parse_time(t: &str) -> Option<i64> {
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let mut tm = time
        .split('.')
        .next()?
        .split(':')
        .map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (tm.next()??, tm.next()??, tm.next()??);
    // Days from civil (Howard Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn age(obj: &Value) -> Value {
    match parse_time(str_at(obj, "metadata.creationTimestamp")) {
        Some(t) => json!(human_duration(now_secs() - t)),
        None => json!("<unknown>"),
    }
}

/// A column: name, type, and how to compute the cell.
struct Column {
    name: String,
    kind: &'static str,
    priority: i64,
    cell: Cell,
}

enum Cell {
    Name,
    Age,
    Path(String, bool),
    Func(fn(&Value) -> Value),
}

fn col(name: &str, cell: Cell) -> Column {
    Column {
        name: name.into(),
        kind: "string",
        priority: 0,
        cell,
    }
}

fn f(name: &str, func: fn(&Value) -> Value) -> Column {
    col(name, Cell::Func(func))
}

fn count(v: &Value) -> usize {
    match v {
        Value::Array(a) => a.len(),
        Value::Object(m) => m.len(),
        _ => 0,
    }
}

fn int(v: &Value, path: &str) -> i64 {
    crate::util::get_path(v, path)
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn or_none(s: String) -> Value {
    json!(if s.is_empty() {
        "<none>".to_string()
    } else {
        s
    })
}

fn builtin_columns(rt: &ResourceType) -> Vec<Column> {
    let mut cols = vec![col("Name", Cell::Name)];
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Namespace") => cols.push(f("Status", |o| json!(str_at(o, "status.phase")))),
        ("", "Pod") => {
            cols.push(f("Ready", |o| {
                let statuses = o
                    .pointer("/status/containerStatuses")
                    .and_then(Value::as_array);
                let ready = statuses
                    .into_iter()
                    .flatten()
                    .filter(|c| c["ready"] == json!(true))
                    .count();
                json!(format!("{ready}/{}", count(&o["spec"]["containers"])))
            }));
            cols.push(f("Status", |o| match str_at(o, "status.phase") {
                "" => json!("Pending"),
                p => json!(p),
            }));
            cols.push(f("Restarts", |o| {
                let n: i64 = o
                    .pointer("/status/containerStatuses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                    .sum();
                json!(n)
            }));
        }
        ("", "Service") => {
            cols.push(f("Type", |o| json!(str_at(o, "spec.type"))));
            cols.push(f("Cluster-IP", |o| {
                or_none(str_at(o, "spec.clusterIP").to_string())
            }));
            cols.push(f("External-IP", |o| {
                let ips: Vec<&str> = o
                    .pointer("/spec/externalIPs")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                or_none(ips.join(","))
            }));
            cols.push(f("Port(s)", |o| {
                let ports: Vec<String> = o
                    .pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
                    .collect();
                or_none(ports.join(","))
            }));
        }
        ("", "ConfigMap") => cols.push(f("Data", |o| {
            json!(count(&o["data"]) + count(&o["binaryData"]))
        })),
        ("", "Secret") => {
            cols.push(f("Type", |o| json!(str_at(o, "type"))));
            cols.push(f("Data", |o| json!(count(&o["data"]))));
        }
        ("", "ServiceAccount") => cols.push(f("Secrets", |o| json!(count(&o["secrets"])))),
        ("apps", "Deployment") => {
            cols.push(f("Ready", |o| {
                json!(format!(
                    "{}/{}",
                    int(o, "status.readyReplicas"),
                    o["spec"]["replicas"].as_i64().unwrap_or(1)
                ))
            }));
            cols.push(f("Up-to-date", |o| json!(int(o, "status.updatedReplicas"))));
            cols.push(f("Available", |o| {
                json!(int(o, "status.availableReplicas"))
            }));
        }
        ("apps", "DaemonSet") => {
            cols.push(f("Desired", |o| {
                json!(int(o, "status.desiredNumberScheduled"))
            }));
            cols.push(f("Current", |o| {
                json!(int(o, "status.currentNumberScheduled"))
            }));
            cols.push(f("Ready", |o| json!(int(o, "status.numberReady"))));
            cols.push(f("Up-to-date", |o| {
                json!(int(o, "status.updatedNumberScheduled"))
            }));
            cols.push(f("Available", |o| json!(int(o, "status.numberAvailable"))));
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            cols.push(f("AddressType", |o| json!(str_at(o, "addressType"))));
            cols.push(f("Ports", |o| {
                let ports: Vec<String> = o["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| p["port"].to_string())
                    .collect();
                or_none(ports.join(","))
            }));
            cols.push(f("Endpoints", |o| {
                let addrs: Vec<&str> = o["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
                    .filter_map(Value::as_str)
                    .collect();
                or_none(addrs.join(","))
            }));
        }
        ("coordination.k8s.io", "Lease") => {
            cols.push(f("Holder", |o| json!(str_at(o, "spec.holderIdentity"))));
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            cols.push(f("Created At", |o| {
                json!(str_at(o, "metadata.creationTimestamp"))
            }));
            return cols;
        }
        _ => {}
    }
    cols.push(col("Age", Cell::Age));
    cols
}

fn columns(rt: &ResourceType) -> Vec<Column> {
    if rt.printer_columns.is_empty() {
        return builtin_columns(rt);
    }
    let mut cols = vec![col("Name", Cell::Name)];
    for c in &rt.printer_columns {
        let path = c["jsonPath"].as_str().unwrap_or_default().to_string();
        let kind = match c["type"].as_str().unwrap_or("string") {
            "integer" => "integer",
            "number" => "number",
            "boolean" => "boolean",
            "date" => "date",
            _ => "string",
        };
        cols.push(Column {
            name: c["name"].as_str().unwrap_or_default().to_string(),
            kind,
            priority: c["priority"].as_i64().unwrap_or(0),
            cell: Cell::Path(path, kind == "date"),
        });
    }
    cols
}

/// The simple JSONPath of printer columns: `.spec.a.b`, `.spec.list[0].x`.
fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    for part in path
        .trim_start_matches('.')
        .split('.')
        .filter(|p| !p.is_empty())
    {
        let (key, index) = match part.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        if let Some(i) = index {
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

fn cell(c: &Column, obj: &Value) -> Value {
    match &c.cell {
        Cell::Name => json!(str_at(obj, "metadata.name")),
        Cell::Age => age(obj),
        Cell::Func(func) => func(obj),
        Cell::Path(path, is_date) => match json_path(obj, path) {
            None | Some(Value::Null) => Value::Null,
            Some(Value::String(s)) if *is_date => match parse_time(s) {
                Some(t) => json!(human_duration(now_secs() - t)),
                None => json!(s),
            },
            Some(v @ (Value::Array(_) | Value::Object(_))) => json!(v.to_string()),
            Some(v) => v.clone(),
        },
    }
}

fn table(rt: &ResourceType, version: &str, objects: &[Value], metadata: Value) -> Value {
    let cols = columns(rt);
    let defs: Vec<Value> = cols
        .iter()
        .map(|c| {
            json!({"name": c.name, "type": c.kind, "format": if matches!(c.cell, Cell::Name) { "name" } else { "" },
                   "description": "", "priority": c.priority})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| json!({"cells": cols.iter().map(|c| cell(c, o)).collect::<Vec<_>>(), "object": o}))
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": format!("meta.k8s.io/{version}"),
        "metadata": metadata,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_from_accept() {
        assert_eq!(Shape::from_accept(""), Shape::Object);
        assert_eq!(Shape::from_accept("application/json"), Shape::Object);
        assert_eq!(
            Shape::from_accept(
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
            ),
            Shape::Table("v1")
        );
        assert_eq!(
            Shape::from_accept(
                "application/vnd.kubernetes.protobuf;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
            ),
            Shape::Metadata
        );
        assert_eq!(
            Shape::from_accept("application/vnd.kubernetes.protobuf,application/json"),
            Shape::Object
        );
    }

    #[test]
    fn durations_like_kubectl() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(1500), "25m");
        assert_eq!(human_duration(5 * 3600 + 600), "5h10m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600), "3d4h");
        assert_eq!(parse_time("2026-12-01T15:50:38Z"), Some(1_796_140_238));
    }

    #[test]
    fn json_paths() {
        let o = json!({"spec": {"hostnames": ["a", "b"], "rules": [{"x": 1}]}});
        assert_eq!(json_path(&o, ".spec.rules[0].x"), Some(&json!(1)));
        assert_eq!(json_path(&o, ".spec.hostnames"), Some(&json!(["a", "b"])));
        assert_eq!(json_path(&o, ".spec.none"), None);
    }
}
