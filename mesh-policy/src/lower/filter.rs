//! Filters and backendRefs.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    Rule,
    Backend,
}

/// Lowers a filter list, returning each filter with its field path.
pub(super) fn lower_filters(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    filters: &[FilterView<'_>],
    level: Level,
    namespace: &str,
    services: &Services<'_>,
) -> Vec<(String, HttpFilter)> {
    if filters.len() > MAX_FILTERS {
        cx.error(
            at,
            field,
            format!(
                "at most {MAX_FILTERS} filters are allowed, found {}",
                filters.len()
            ),
        );
    }
    let mut out = Vec::new();
    let mut seen_types: HashSet<&str> = HashSet::new();
    for (i, filter) in filters.iter().enumerate() {
        let filter_field = format!("{field}[{i}]");
        let ty = filter.ty.as_str();
        if matches!(
            ty,
            "RequestHeaderModifier" | "ResponseHeaderModifier" | "RequestRedirect" | "URLRewrite"
        ) && !seen_types.insert(ty)
        {
            cx.error(
                at,
                format!("{filter_field}.type"),
                format!("{ty} filter cannot be repeated"),
            );
        }
        if let Some(lowered) =
            lower_filter(cx, at, &filter_field, filter, level, namespace, services)
        {
            out.push((filter_field, lowered));
        }
    }
    if seen_types.contains("RequestRedirect") && seen_types.contains("URLRewrite") {
        cx.error(
            at,
            field,
            "may specify either RequestRedirect or URLRewrite, but not both",
        );
    }
    out
}

pub(super) fn lower_filter(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    filter: &FilterView<'_>,
    level: Level,
    namespace: &str,
    services: &Services<'_>,
) -> Option<HttpFilter> {
    let ty = filter.ty.as_str();
    for config in &filter.other_configs {
        cx.error(
            at,
            format!("{field}.{config}"),
            format!("{config} filters are not supported"),
        );
    }
    let expected = match ty {
        "RequestHeaderModifier" => "requestHeaderModifier",
        "ResponseHeaderModifier" => "responseHeaderModifier",
        "RequestRedirect" => "requestRedirect",
        "URLRewrite" => "urlRewrite",
        "RequestMirror" => "requestMirror",
        other => {
            cx.error(
                at,
                format!("{field}.type"),
                format!("filter type {other} is not supported"),
            );
            return None;
        }
    };
    let present = [
        (
            "requestHeaderModifier",
            filter.request_header_modifier.is_some(),
        ),
        (
            "responseHeaderModifier",
            filter.response_header_modifier.is_some(),
        ),
        ("requestRedirect", filter.request_redirect.is_some()),
        ("urlRewrite", filter.url_rewrite.is_some()),
        ("requestMirror", filter.request_mirror.is_some()),
    ];
    for (config, set) in present {
        if set && config != expected {
            cx.error(
                at,
                format!("{field}.{config}"),
                format!("must not be set when type is {ty}"),
            );
        }
    }
    if !present.contains(&(expected, true)) {
        cx.error(
            at,
            format!("{field}.{expected}"),
            format!("required when type is {ty}"),
        );
        return None;
    }
    if level == Level::Backend && ty == "RequestRedirect" {
        cx.error(
            at,
            format!("{field}.type"),
            "RequestRedirect is not supported on backendRefs",
        );
        return None;
    }
    let config_field = format!("{field}.{expected}");
    if let Some(m) = &filter.request_header_modifier
        && ty == "RequestHeaderModifier"
    {
        return Some(HttpFilter::RequestHeaderModifier(lower_header_mod(
            cx,
            at,
            &config_field,
            m,
        )));
    }
    if let Some(m) = &filter.response_header_modifier
        && ty == "ResponseHeaderModifier"
    {
        return Some(HttpFilter::ResponseHeaderModifier(lower_header_mod(
            cx,
            at,
            &config_field,
            m,
        )));
    }
    if let Some(r) = &filter.request_redirect
        && ty == "RequestRedirect"
    {
        let errors_before = cx.errors.len();
        if let Some(hostname) = r.hostname
            && let Err(reason) = names::route_hostname(hostname, false)
        {
            cx.error(at, format!("{config_field}.hostname"), reason);
        }
        let port = r.port.and_then(|p| match u16::try_from(p) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                cx.error(
                    at,
                    format!("{config_field}.port"),
                    format!("port {p} is out of range 1-65535"),
                );
                None
            }
        });
        let status_code = match r.status_code {
            None => 302,
            Some(code) => match u16::try_from(code) {
                Ok(code) if REDIRECT_STATUS_CODES.contains(&code) => code,
                _ => {
                    cx.error(
                        at,
                        format!("{config_field}.statusCode"),
                        format!("{code} is not one of 301, 302, 303, 307, 308"),
                    );
                    302
                }
            },
        };
        let path = r
            .path
            .as_ref()
            .and_then(|p| lower_path_mod(cx, at, &format!("{config_field}.path"), p));
        return (cx.errors.len() == errors_before).then(|| {
            HttpFilter::RequestRedirect(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.hostname.map(str::to_owned),
                path,
                port,
                status_code,
            })
        });
    }
    if let Some(r) = &filter.url_rewrite
        && ty == "URLRewrite"
    {
        let errors_before = cx.errors.len();
        if let Some(hostname) = r.hostname
            && let Err(reason) = names::route_hostname(hostname, false)
        {
            cx.error(at, format!("{config_field}.hostname"), reason);
        }
        let path = r
            .path
            .as_ref()
            .and_then(|p| lower_path_mod(cx, at, &format!("{config_field}.path"), p));
        return (cx.errors.len() == errors_before).then(|| {
            HttpFilter::UrlRewrite(UrlRewrite {
                hostname: r.hostname.map(str::to_owned),
                path,
            })
        });
    }
    if let Some(m) = &filter.request_mirror
        && ty == "RequestMirror"
    {
        let errors_before = cx.errors.len();
        let backend = lower_backend_ref(
            cx,
            at,
            &format!("{config_field}.backendRef"),
            &m.backend,
            namespace,
            services,
            // A mirror to nowhere would be a silent no-op: still an error in both modes.
            false,
        );
        let fraction = match (m.percent, m.fraction) {
            (Some(_), Some(_)) => {
                cx.error(
                    at,
                    &config_field,
                    "only one of percent and fraction may be set",
                );
                None
            }
            (Some(percent), None) => match u32::try_from(percent) {
                Ok(p) if p <= 100 => Some(Fraction {
                    numerator: p,
                    denominator: 100,
                }),
                _ => {
                    cx.error(
                        at,
                        format!("{config_field}.percent"),
                        format!("{percent} is out of range 0-100"),
                    );
                    None
                }
            },
            (None, Some((numerator, denominator))) => {
                let denominator = denominator.unwrap_or(100);
                match (u32::try_from(numerator), u32::try_from(denominator)) {
                    (Ok(n), Ok(d)) if d > 0 && n <= d => Some(Fraction {
                        numerator: n,
                        denominator: d,
                    }),
                    _ => {
                        cx.error(
                            at,
                            format!("{config_field}.fraction"),
                            format!("{numerator}/{denominator}: numerator must be 0 or more and at most the denominator, which must be more than 0"),
                        );
                        None
                    }
                }
            }
            (None, None) => Some(Fraction::ALL),
        };
        if cx.errors.len() != errors_before {
            return None;
        }
        return Some(HttpFilter::RequestMirror(Mirror {
            backend: backend?,
            fraction: fraction?,
        }));
    }
    None
}

pub(super) fn lower_header_mod(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    m: &ModView<'_>,
) -> HeaderModifier {
    let check_list =
        |cx: &mut Cx, list_name: &str, entries: &[(&str, &str)]| -> Vec<(String, String)> {
            if entries.len() > MAX_HEADER_EDITS {
                cx.error(
                    at,
                    format!("{field}.{list_name}"),
                    format!("at most {MAX_HEADER_EDITS} entries are allowed"),
                );
            }
            let mut seen: Vec<String> = Vec::new();
            let mut out = Vec::new();
            for (i, (name, value)) in entries.iter().enumerate() {
                let entry = format!("{field}.{list_name}[{i}]");
                if let Err(reason) = names::header_name(name) {
                    cx.error(at, format!("{entry}.name"), reason);
                    continue;
                }
                let lower = name.to_ascii_lowercase();
                if seen.contains(&lower) {
                    cx.error(
                        at,
                        format!("{entry}.name"),
                        format!("duplicate header {name:?}"),
                    );
                    continue;
                }
                seen.push(lower);
                if value.contains(['\r', '\n', '\0']) || value.len() > MAX_VALUE_LEN {
                    cx.error(
                        at,
                        format!("{entry}.value"),
                        "must be at most 4096 characters without CR, LF or NUL",
                    );
                    continue;
                }
                out.push(((*name).to_owned(), (*value).to_owned()));
            }
            out
        };
    let set = check_list(cx, "set", &m.set);
    let add = check_list(cx, "add", &m.add);
    if m.remove.len() > MAX_HEADER_EDITS {
        cx.error(
            at,
            format!("{field}.remove"),
            format!("at most {MAX_HEADER_EDITS} entries are allowed"),
        );
    }
    let mut remove: Vec<String> = Vec::new();
    for (i, name) in m.remove.iter().enumerate() {
        if let Err(reason) = names::header_name(name) {
            cx.error(at, format!("{field}.remove[{i}]"), reason);
        } else if remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            cx.error(
                at,
                format!("{field}.remove[{i}]"),
                format!("duplicate header {name:?}"),
            );
        } else {
            remove.push(name.clone());
        }
    }
    HeaderModifier { set, add, remove }
}

pub(super) fn lower_path_mod(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    p: &PathModView<'_>,
) -> Option<PathModifier> {
    let (value_name, value, other_name, other) = match p.ty.as_str() {
        "ReplaceFullPath" => ("replaceFullPath", p.full, "replacePrefixMatch", p.prefix),
        "ReplacePrefixMatch" => ("replacePrefixMatch", p.prefix, "replaceFullPath", p.full),
        other => {
            cx.error(
                at,
                format!("{field}.type"),
                format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
            );
            return None;
        }
    };
    if other.is_some() {
        cx.error(
            at,
            format!("{field}.{other_name}"),
            format!("must not be set when type is {}", p.ty),
        );
        return None;
    }
    let Some(value) = value else {
        cx.error(
            at,
            format!("{field}.{value_name}"),
            format!("required when type is {}", p.ty),
        );
        return None;
    };
    if !value.is_empty()
        && let Err(reason) = check_path_value(value)
    {
        cx.error(at, format!("{field}.{value_name}"), reason);
        return None;
    }
    Some(if p.ty == "ReplaceFullPath" {
        PathModifier::ReplaceFullPath(value.to_owned())
    } else {
        PathModifier::ReplacePrefixMatch(value.to_owned())
    })
}

pub(super) fn lower_backend_ref(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    reference: &RefView<'_>,
    namespace: &str,
    services: &Services<'_>,
    may_be_unresolved: bool,
) -> Option<Backend> {
    let errors_before = cx.errors.len();
    let weight = match reference.weight {
        None => 1,
        Some(w) if (0..=MAX_WEIGHT).contains(&w) => w.unsigned_abs(),
        Some(w) => {
            cx.error(
                at,
                format!("{field}.weight"),
                format!("weight {w} is out of range 0-{MAX_WEIGHT}"),
            );
            0
        }
    };
    let group = reference.group.unwrap_or("");
    let kind = reference.kind.unwrap_or("Service");
    let unresolved = |cx: &mut Cx, suffix: &str, problem: RefProblem, message: String| {
        let field = format!("{field}.{suffix}");
        (may_be_unresolved && cx.unresolved(at, field.clone(), problem, message.clone()))
            .then(|| Backend {
                service: ServiceRef {
                    namespace: reference.namespace.unwrap_or(namespace).to_owned(),
                    name: reference.name.to_owned(),
                },
                port: reference
                    .port
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or(0),
                endpoints: Vec::new(),
                weight,
                filters: Vec::new(),
                unresolved: true,
            })
            .or_else(|| {
                if !may_be_unresolved {
                    cx.error(at, field, message);
                }
                None
            })
    };
    if !matches!(group, "" | "core") || kind != "Service" {
        return unresolved(
            cx,
            "kind",
            RefProblem::InvalidKind,
            format!("backendRef is {kind} (group {group:?}); only core Services are supported"),
        );
    }
    if let Some(ns) = reference.namespace
        && ns != namespace
    {
        return unresolved(
            cx,
            "namespace",
            RefProblem::RefNotPermitted,
            format!(
                "backendRef to namespace {ns:?} needs a ReferenceGrant, which is not supported"
            ),
        );
    }
    let Some((_, service)) = services.get(namespace, reference.name) else {
        // The CRD requires a port for a Service reference: checked before going on without it.
        if reference.port.is_none() {
            cx.error(
                at,
                format!("{field}.port"),
                "port is required when referring to a Service",
            );
            return None;
        }
        return unresolved(
            cx,
            "name",
            RefProblem::BackendNotFound,
            format!("Service {namespace}/{} does not exist", reference.name),
        );
    };
    let port = match reference.port {
        None => {
            cx.error(
                at,
                format!("{field}.port"),
                "port is required when referring to a Service",
            );
            return None;
        }
        Some(p) => match u16::try_from(p) {
            Ok(p) if p > 0 => p,
            _ => {
                cx.error(
                    at,
                    format!("{field}.port"),
                    format!("port {p} is out of range 1-65535"),
                );
                return None;
            }
        },
    };
    let Some(service_port) = service.ports.iter().find(|p| p.port == port && p.tcp) else {
        cx.error(
            at,
            format!("{field}.port"),
            format!(
                "Service {} has no TCP port {port} (it has {})",
                service.id,
                port_list(service)
            ),
        );
        return None;
    };
    if cx.errors.len() != errors_before {
        return None;
    }
    Some(Backend {
        service: service.id.clone(),
        port,
        endpoints: service_port.endpoints.clone(),
        weight,
        filters: Vec::new(),
        unresolved: false,
    })
}
