//! Every request of `shared/conformance/cases/*/cases.json`, in process: echo backends like
//! `echo_backend.py` listen on `127.100.<case>.<n>:8080` in place of the `${BACKEND_x}` pods,
//! the proxy serves loopback connections as if captured for the called Service's
//! `clusterIP:80`, and each answer is checked the way `run.py` checks it (status, backend,
//! request headers present and absent, response headers, rewritten path and host, redirect
//! scheme/host/port/path, weights, mirrors including percentages), plus the case-29 rule that
//! the named header reaches the backend exactly once and names it.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use mesh_http::{Config, Proxy};
use mesh_policy::PolicyStore;
use serde_json::Value;

/// The cases of the suite in `MESH_CONFORMANCE_DIR`, or by default in `shared/conformance` beside
/// the repository.
fn cases_dir() -> PathBuf {
    std::env::var_os("MESH_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"))
        .join("cases")
}

/// Placeholders (`echo_v1` for `${BACKEND_echo_v1}`), sorted.
fn placeholders(policy: &str) -> Vec<String> {
    let mut names = BTreeSet::new();
    let mut rest = policy;
    while let Some(start) = rest.find("${BACKEND_") {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        names.insert(rest[start + 10..start + end].to_owned());
        rest = &rest[start + end + 1..];
    }
    names.into_iter().collect()
}

/// Location split like Python's `urlsplit`: scheme, hostname, port, path.
fn split_url(url: &str) -> (String, Option<String>, Option<u16>, String) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (String::new(), None, None, url.to_owned());
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = path.split(['?', '#']).next().unwrap_or("").to_owned();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            (h.to_owned(), p.parse().ok())
        }
        _ => (authority.to_owned(), None),
    };
    (
        scheme.to_ascii_lowercase(),
        Some(host.to_ascii_lowercase()),
        port,
        path,
    )
}

fn string_pairs(value: &Value) -> Vec<(String, String)> {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Sends the case's request on a fresh connection, as curl does.
async fn send(listen: SocketAddr, request: &Value) -> Result<Answer, String> {
    let method = request["method"].as_str().unwrap_or("GET");
    let host = request["host"].as_str().unwrap_or("");
    let path = request["path"].as_str().unwrap_or("/");
    let mut headers: Vec<(String, String)> = vec![
        ("User-Agent".into(), "curl/8.5.0".into()),
        ("Accept".into(), "*/*".into()),
    ];
    headers.extend(string_pairs(&request["headers"]));
    if !request["backend_set_response_headers"].is_null() {
        let set: Vec<String> = string_pairs(&request["backend_set_response_headers"])
            .into_iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        headers.push(("X-Echo-Set-Header".into(), set.join(",")));
    }
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let exchange = async {
        let mut client = H1::connect(listen).await;
        let response = client
            .raw_send(request_of(method, host, path, &refs))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(read_answer(response).await)
    };
    tokio::time::timeout(Duration::from_secs(12), exchange)
        .await
        .map_err(|_| "no response within 12 s".to_owned())?
}

fn request_of(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> http::Request<http_body_util::Full<Bytes>> {
    request(method, host, path, headers, Bytes::new())
}

/// `run.py`'s `check`, on one answer.
fn check(expect: &Value, answer: &Answer) -> Vec<String> {
    let mut errors = Vec::new();
    let accepted: Vec<u64> = match expect["status_any_of"].as_array() {
        Some(list) => list.iter().filter_map(Value::as_u64).collect(),
        None => vec![expect["status"].as_u64().unwrap_or(0)],
    };
    if !accepted.contains(&u64::from(answer.status)) {
        return vec![format!("status {}, want {accepted:?}", answer.status)];
    }
    let body = answer.json();
    if let Some(backend) = expect["backend"].as_str()
        && body["backend"].as_str() != Some(backend)
    {
        errors.push(format!("backend {}, want {backend}", body["backend"]));
    }
    let seen = &body["headers"];
    for (name, want) in string_pairs(&expect["request_headers_present"]) {
        let got = seen[name.to_ascii_lowercase()].as_str();
        if got != Some(want.as_str()) {
            errors.push(format!("backend header {name}={got:?}, want {want:?}"));
        }
    }
    for name in expect["request_headers_absent"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !seen[name.to_ascii_lowercase()].is_null() {
            errors.push(format!("backend header {name} present, want absent"));
        }
    }
    for (name, want) in string_pairs(&expect["response_headers"]) {
        let got = answer.header(&name);
        if got.as_deref() != Some(want.as_str()) {
            errors.push(format!("response header {name}={got:?}, want {want:?}"));
        }
    }
    for name in expect["response_headers_absent"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if answer.header(name).is_some() {
            errors.push(format!("response header {name} present, want absent"));
        }
    }
    if let Some(want) = expect["rewritten_path"].as_str()
        && !body.is_null()
    {
        let path = body["path"].as_str().unwrap_or("");
        let path = path.split('?').next().unwrap_or("");
        if path != want {
            errors.push(format!("backend path {path}, want {want}"));
        }
    }
    if let Some(want) = expect["rewritten_host"].as_str() {
        let host = seen["host"].as_str().unwrap_or("");
        let host = host.split(':').next().unwrap_or("");
        if host != want {
            errors.push(format!("backend host {host}, want {want}"));
        }
    }
    if expect["redirect"].is_object() {
        let want = &expect["redirect"];
        let location = answer.header("location").unwrap_or_default();
        let (scheme, host, port, path) = split_url(&location);
        if want["scheme"].as_str() != Some(scheme.as_str()) {
            errors.push(format!("redirect scheme {scheme}, want {}", want["scheme"]));
        }
        if let Some(want_host) = want["host"].as_str()
            && host.as_deref() != Some(want_host)
        {
            errors.push(format!("redirect host {host:?}, want {want_host}"));
        }
        let want_port = match &want["port"] {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        };
        match want_port {
            None => {
                if !matches!(port, None | Some(80) | Some(443)) {
                    errors.push(format!("redirect port {port:?}, want default"));
                }
            }
            Some(p) => {
                if port.map(u64::from) != Some(p) {
                    errors.push(format!("redirect port {port:?}, want {p}"));
                }
            }
        }
        if want["path"].as_str() != Some(path.as_str()) {
            errors.push(format!("redirect path {path}, want {}", want["path"]));
        }
        if let Some(location_want) = expect["redirect_location"].as_str()
            && location != location_want
        {
            errors.push(format!(
                "Location {location}, want {location_want} (spec default)"
            ));
        }
    }
    errors
}

/// Waits until `count` stops growing (mirrors are fire-and-forget).
async fn settle(count: impl Fn() -> usize) -> usize {
    let mut last = count();
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = count();
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_millis(200) {
            break;
        }
    }
    last
}

async fn run_request(
    case: &Value,
    listen: SocketAddr,
    backends: &HashMap<String, Echo>,
) -> Vec<String> {
    let request = &case["request"];
    let expect = &case["expect"];
    let path = request["path"].as_str().unwrap_or("/");

    if let Some(weights) = expect["weights"].as_object() {
        let samples = expect["weights_samples"].as_u64().unwrap_or(500);
        let tolerance = expect["weights_tolerance"].as_f64().unwrap_or(0.05);
        let mut counts: HashMap<String, u64> = HashMap::new();
        for _ in 0..samples {
            if let Ok(answer) = send(listen, request).await
                && answer.status == 200
                && let Some(backend) = answer.backend()
            {
                *counts.entry(backend).or_default() += 1;
            }
        }
        let n = counts.values().sum::<u64>().max(1) as f64;
        let mut errors: Vec<String> = weights
            .iter()
            .filter_map(|(backend, w)| {
                let share = counts.get(backend).copied().unwrap_or(0) as f64 / n;
                let w = w.as_f64().unwrap_or(0.0);
                ((share - w).abs() > tolerance)
                    .then(|| format!("share {backend} {share:.3}, want {w}"))
            })
            .collect();
        let nonzero = weights.values().filter(|w| w.as_f64() > Some(0.0)).count();
        if counts.len() != nonzero {
            errors.push(format!(
                "backends hit {counts:?}, want {nonzero} with weight > 0"
            ));
        }
        return errors;
    }

    if let (Some(header), Some(repeat)) = (
        expect["request_header_names_backend"].as_str(),
        expect["repeat"].as_u64(),
    ) {
        let mut errors = Vec::new();
        for _ in 0..repeat {
            match send(listen, request).await {
                Ok(answer) => {
                    errors.extend(check(expect, &answer));
                    let backend = answer.backend().unwrap_or_default();
                    let value = answer.seen_header(header);
                    if value.as_deref() != Some(backend.as_str()) {
                        errors.push(format!("header {header}={value:?} at backend {backend}"));
                    }
                }
                Err(e) => errors.push(e),
            }
            if !errors.is_empty() {
                break;
            }
        }
        return errors;
    }

    let mirrors: Vec<&Value> = expect["mirrored_to"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if let Some(fraction) = mirrors.iter().find_map(|m| m["fraction"].as_f64()) {
        let samples = expect["mirror_samples"].as_u64().unwrap_or(500);
        let stddevs = expect["mirror_tolerance_stddevs"].as_f64().unwrap_or(3.0);
        let mut errors = Vec::new();
        let mirror_backends: Vec<&Echo> = mirrors
            .iter()
            .filter_map(|m| backends.get(m["backend"].as_str().unwrap_or("")))
            .collect();
        let before: Vec<usize> = mirror_backends
            .iter()
            .map(|b| b.requests().iter().filter(|s| s.path == path).count())
            .collect();
        for i in 0..samples {
            match send(listen, request).await {
                Ok(answer) => {
                    let problems = check(expect, &answer);
                    if !problems.is_empty() && i == 0 {
                        errors.extend(problems);
                    }
                }
                Err(e) => {
                    errors.push(e);
                    break;
                }
            }
        }
        for (backend, before) in mirror_backends.iter().zip(before) {
            let mirrored = settle(|| backend.requests().iter().filter(|s| s.path == path).count())
                .await
                - before;
            let n = samples as f64;
            let mean = n * fraction;
            let sd = (n * fraction * (1.0 - fraction)).sqrt();
            if (mirrored as f64 - mean).abs() > stddevs * sd {
                errors.push(format!(
                    "mirrored {mirrored} of {samples} to {}, want {mean:.0} ± {:.0}",
                    backend.name,
                    stddevs * sd
                ));
            }
        }
        return errors;
    }

    let before: Vec<(String, usize)> = mirrors
        .iter()
        .filter_map(|m| m["backend"].as_str())
        .map(|b| {
            let n = backends.get(b).map_or(0, |e| {
                e.requests().iter().filter(|s| s.path == path).count()
            });
            (b.to_owned(), n)
        })
        .collect();
    let mut errors = match send(listen, request).await {
        Ok(answer) => check(expect, &answer),
        Err(e) => vec![format!("no response: {e}")],
    };
    for (name, before) in before {
        let Some(echo) = backends.get(&name) else {
            errors.push(format!("mirror backend {name} unknown"));
            continue;
        };
        let got = settle(|| echo.requests().iter().filter(|s| s.path == path).count()).await;
        if got <= before {
            errors.push(format!("mirror {name} got no copy"));
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_conformance_cases() {
    init_tracing();
    let dir = cases_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "conformance cases not found at {} ({e}; the test needs the shared/ folder beside the \
             repository, or MESH_CONFORMANCE_DIR set to the suite)",
            dir.display()
        )
    });
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("cases.json").exists())
        .collect();
    dirs.sort();
    let only: Option<Vec<String>> = std::env::var("CONFORMANCE_ONLY")
        .ok()
        .map(|s| s.split(',').map(str::to_owned).collect());
    let (mut total, mut passed, mut failures) = (0, 0, Vec::new());
    for (index, case_dir) in dirs.iter().enumerate() {
        let name = case_dir.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(only) = &only
            && !only.iter().any(|o| name.starts_with(o.as_str()))
        {
            continue;
        }
        let policy = std::fs::read_to_string(case_dir.join("policy.yaml")).unwrap();
        let cases: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(case_dir.join("cases.json")).unwrap())
                .unwrap();
        let mut text = policy.clone();
        let mut backends = HashMap::new();
        for (i, holder) in placeholders(&policy).iter().enumerate() {
            let addr = lo(100, index as u8 + 1, i as u8 + 1);
            let service = holder.replace('_', "-");
            backends.insert(service.clone(), echo(&service, addr).await);
            text = text.replace(&format!("${{BACKEND_{holder}}}"), &addr.ip().to_string());
        }
        let compiled = compile(&text);
        let dump = compiled.to_json();
        let vip_of = |service: &str| -> Option<SocketAddr> {
            dump["services"].as_array()?.iter().find_map(|s| {
                let name = s["service"].as_str()?.split('/').nth(1)?;
                (name == service && s["port"] == 80).then(|| {
                    let ip = s["vips"][0].as_str()?.parse().ok()?;
                    Some(SocketAddr::new(ip, 80))
                })?
            })
        };
        let proxy = Proxy::new(Config::default(), Arc::new(PolicyStore::new(compiled)));
        let mut listeners: HashMap<String, SocketAddr> = HashMap::new();
        for case in &cases {
            let call = case["call_service"].as_str().unwrap_or_default().to_owned();
            total += 1;
            let listen = match listeners.get(&call) {
                Some(l) => *l,
                None => {
                    let Some(vip) = vip_of(&call) else {
                        failures.push(format!("FAIL {name} :: no VIP for {call}"));
                        continue;
                    };
                    let (listen, _) = serve_on(proxy.clone(), vip, false).await;
                    listeners.insert(call.clone(), listen);
                    listen
                }
            };
            let errors = run_request(case, listen, &backends).await;
            if errors.is_empty() {
                passed += 1;
            } else {
                failures.push(format!(
                    "FAIL {name} :: {} :: {}",
                    case["name"].as_str().unwrap_or("?"),
                    errors.join("; ")
                ));
            }
        }
    }
    for failure in &failures {
        println!("{failure}");
    }
    println!(
        "conformance: {passed} of {total} requests passed ({} cases)",
        dirs.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
