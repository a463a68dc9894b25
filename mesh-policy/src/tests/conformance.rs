//! The shared Gateway API conformance cases (`shared/conformance/cases`), checked without a
//! network: every policy must validate and compile, and for every request that does not depend
//! on randomness (weights, mirror fractions) the route table must pick what the suite expects.
//!
//! Checked per request: the outcome class (Matched / NotFound / NoRoutes) implied by the
//! status; for single-backend rules the backend Service; for redirects the status code and
//! `Location`; for rewrites the path and host; the request and response headers after applying
//! the header modifier filters; the mirror backends; timeouts for the 504 cases.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;
use crate::{HttpAction, HttpDecision, HttpFilter, Resource, parse_documents};

/// The cases of the suite in `MESH_CONFORMANCE_DIR`, or by default in `shared/conformance` beside
/// the repository.
fn cases_dir() -> PathBuf {
    std::env::var_os("MESH_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"))
        .join("cases")
}

/// Replaces `${BACKEND_x}` with `10.201.N.2`, N counting distinct names from 1.
fn substitute(policy: &str) -> String {
    let mut names = BTreeSet::new();
    let mut rest = policy;
    while let Some(start) = rest.find("${BACKEND_") {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        names.insert(rest[start..start + end + 1].to_owned());
        rest = &rest[start + end + 1..];
    }
    let mut out = policy.to_owned();
    for (i, name) in names.iter().enumerate() {
        out = out.replace(name, &format!("10.201.{}.2", i + 1));
    }
    out
}

/// Values of a header, joined with `,` in order, as the suite compares them.
fn joined(headers: &[(String, String)], name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

fn string_map(value: &Value) -> Vec<(String, String)> {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the headers the backend receives and the client gets back.
fn check_headers(
    decision: Option<&HttpDecision<'_>>,
    backend_filters: &[HttpFilter],
    request: &Value,
    expect: &Value,
    problems: &mut Vec<String>,
) {
    let rule_filters = decision.map(|d| d.filters()).unwrap_or_default();
    let filters: Vec<&HttpFilter> = rule_filters.iter().chain(backend_filters).collect();
    let mut sent = string_map(&request["headers"]);
    let mut received = string_map(&request["backend_set_response_headers"]);
    for filter in &filters {
        match filter {
            HttpFilter::RequestHeaderModifier(m) => m.apply(&mut sent),
            HttpFilter::ResponseHeaderModifier(m) => m.apply(&mut received),
            _ => {}
        }
    }
    for (name, value) in string_map(&expect["request_headers_present"]) {
        let got = joined(&sent, &name);
        if got.as_deref() != Some(value.as_str()) {
            problems.push(format!(
                "request header {name}: want {value:?}, got {got:?}"
            ));
        }
    }
    for name in string_list(&expect["request_headers_absent"]) {
        if let Some(got) = joined(&sent, &name) {
            problems.push(format!(
                "request header {name} should be absent, got {got:?}"
            ));
        }
    }
    for (name, value) in string_map(&expect["response_headers"]) {
        let got = joined(&received, &name);
        if got.as_deref() != Some(value.as_str()) {
            problems.push(format!(
                "response header {name}: want {value:?}, got {got:?}"
            ));
        }
    }
    for name in string_list(&expect["response_headers_absent"]) {
        if let Some(got) = joined(&received, &name) {
            problems.push(format!(
                "response header {name} should be absent, got {got:?}"
            ));
        }
    }
}

/// Problems with one request; empty when the route table agrees with the expectation.
fn check_request(compiled: &Compiled, vip: SocketAddr, case: &Value) -> Vec<String> {
    let request = &case["request"];
    let expect = &case["expect"];
    let method = request["method"].as_str().unwrap_or("GET");
    let host = request["host"].as_str().unwrap_or("");
    let path = request["path"].as_str().unwrap_or("/");
    let headers_owned = string_map(&request["headers"]);
    let headers: Vec<(&str, &str)> = headers_owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let parts = RequestParts {
        method,
        host,
        path,
        headers: &headers,
    };
    let status = expect["status"].as_u64().unwrap_or(0);
    let timeout_case = expect["status_any_of"].is_array();
    let mut problems = Vec::new();
    let outcome = compiled.route_http(vip, &parts);
    let call_service = case["call_service"].as_str().unwrap_or("");

    match (status, outcome) {
        (404, HttpOutcome::NotFound) => {}
        (404, other) => problems.push(format!("want 404, got {other:?}")),
        (300..=399, HttpOutcome::Matched(d)) => match d.action() {
            HttpAction::Redirect(redirect) => {
                if u64::from(redirect.status_code) != status {
                    problems.push(format!(
                        "redirect status {} != {status}",
                        redirect.status_code
                    ));
                }
                if let Some(want) = expect["redirect_location"].as_str() {
                    let got = redirect.location("http", host, vip.port(), path, d.path);
                    if got != want {
                        problems.push(format!("Location {got:?} != {want:?}"));
                    }
                }
            }
            other => problems.push(format!("want redirect {status}, got {other:?}")),
        },
        (_, HttpOutcome::Matched(d)) if status == 200 || timeout_case => {
            if d.action() != HttpAction::Forward {
                problems.push(format!("want forward, got {:?}", d.action()));
            }
            let backends = d.backends();
            let single = (backends.len() == 1).then(|| &backends[0]);
            if let (Some(want), Some(backend)) = (expect["backend"].as_str(), single)
                && backend.service.name != want
            {
                problems.push(format!("backend {} != {want}", backend.service.name));
            }
            let backend_filters = single.map(|b| b.filters.as_slice()).unwrap_or_default();
            check_headers(Some(&d), backend_filters, request, expect, &mut problems);
            let rewrite = d.filters().iter().find_map(|f| match f {
                HttpFilter::UrlRewrite(r) => Some(r),
                _ => None,
            });
            if let Some(want) = expect["rewritten_path"].as_str() {
                let plain = path.split('?').next().unwrap_or(path);
                let got = rewrite
                    .and_then(|r| r.path.as_ref())
                    .map_or_else(|| plain.to_owned(), |m| m.apply(d.path, plain));
                if got != want {
                    problems.push(format!("rewritten path {got:?} != {want:?}"));
                }
            }
            if let Some(want) = expect["rewritten_host"].as_str() {
                let got = rewrite.and_then(|r| r.hostname.as_deref()).unwrap_or(host);
                if got != want {
                    problems.push(format!("rewritten host {got:?} != {want:?}"));
                }
            }
            let mirrors: Vec<&str> = d
                .filters()
                .iter()
                .filter_map(|f| match f {
                    HttpFilter::RequestMirror(m) => Some(m.backend.service.name.as_str()),
                    _ => None,
                })
                .collect();
            for want in expect["mirrored_to"].as_array().into_iter().flatten() {
                let name = want["backend"].as_str().unwrap_or("");
                if !mirrors.contains(&name) {
                    problems.push(format!("no mirror to {name} (mirrors: {mirrors:?})"));
                }
            }
            if timeout_case {
                let t = d.timeouts();
                let set = |x: Option<std::time::Duration>| x.is_some_and(|x| !x.is_zero());
                if !set(t.request) && !set(t.backend_request) {
                    problems.push(format!("want a timeout for a 504 case, got {t:?}"));
                }
            }
        }
        (200, HttpOutcome::NoRoutes) => {
            // Forwarded to the called Service itself.
            if let Some(want) = expect["backend"].as_str()
                && want != call_service
            {
                problems.push(format!("no routes: {call_service} answers, want {want}"));
            }
            check_headers(None, &[], request, expect, &mut problems);
        }
        (status, other) => problems.push(format!("want {status}, got {other:?}")),
    }
    problems
}

#[test]
fn conformance_cases_route_as_expected() {
    let dir = cases_dir();
    assert!(
        dir.is_dir(),
        "conformance cases not found at {} (the test needs the shared/ folder beside the repository, or MESH_CONFORMANCE_DIR set to the suite)",
        dir.display()
    );
    let mut case_dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read cases dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("policy.yaml").is_file())
        .collect();
    case_dirs.sort();
    assert_eq!(case_dirs.len(), 30, "expected 30 case directories");

    let (mut checked, mut agreed, mut skipped) = (0, 0, 0);
    let mut failures = Vec::new();
    for case_dir in &case_dirs {
        let name = case_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let policy =
            substitute(&std::fs::read_to_string(case_dir.join("policy.yaml")).expect("policy"));
        let objects = match parse_documents(&policy, "policy.yaml") {
            Ok(objects) => objects,
            Err(errs) => {
                failures.push(format!("{name}: parse: {errs:?}"));
                continue;
            }
        };
        let compiled = match Compiled::compile(&objects) {
            Ok(compiled) => compiled,
            Err(errs) => {
                let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
                failures.push(format!("{name}: invalid:\n  {}", lines.join("\n  ")));
                continue;
            }
        };
        let cases: Value = serde_json::from_str(
            &std::fs::read_to_string(case_dir.join("cases.json")).expect("cases.json"),
        )
        .expect("cases.json parses");
        for case in cases.as_array().expect("a list of cases") {
            let expect = &case["expect"];
            let random = expect.get("weights").is_some()
                || expect["mirrored_to"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m.get("fraction").is_some()));
            if random {
                skipped += 1;
                continue;
            }
            checked += 1;
            let call = case["call_service"].as_str().unwrap_or("");
            let vip = objects.iter().find_map(|o| match &o.resource {
                Resource::Service(s) if o.resource.name() == call => s
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.cluster_ip.as_deref())
                    .and_then(|ip| ip.parse().ok())
                    .map(|ip| SocketAddr::new(ip, 80)),
                _ => None,
            });
            let Some(vip) = vip else {
                failures.push(format!("{name}: no Service {call}"));
                continue;
            };
            let problems = check_request(&compiled, vip, case);
            if problems.is_empty() {
                agreed += 1;
            } else {
                failures.push(format!(
                    "{name} / {}: {}",
                    case["name"].as_str().unwrap_or("?"),
                    problems.join("; ")
                ));
            }
        }
    }
    println!(
        "conformance: {agreed}/{checked} requests agree ({skipped} weights/mirror-fraction requests skipped)"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 190, "only {checked} requests checked");
}
