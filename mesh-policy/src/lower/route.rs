//! Routes: hostnames, parentRefs, rules and matches.

use super::*;

pub(super) fn lower_route(
    cx: &mut Cx,
    at: &At<'_>,
    resource: &Resource,
    view: &RouteView<'_>,
    services: &Services<'_>,
) -> RouteIr {
    let namespace = resource.namespace();
    let id = Arc::new(RouteId {
        kind: view.kind,
        namespace: namespace.to_owned(),
        name: resource.name().to_owned(),
    });
    let mut ir = RouteIr {
        id,
        rank: 0,
        hostnames: Vec::new(),
        parents: Vec::new(),
        rules: Vec::new(),
        age: age(resource.metadata()),
    };
    for field in &view.unsupported {
        cx.error(
            at,
            format!("spec.{field}"),
            format!("{field} is not supported for mesh routes"),
        );
    }

    // Hostnames.
    if view.hostnames.len() > MAX_HOSTNAMES {
        cx.error(
            at,
            "spec.hostnames",
            format!(
                "at most {MAX_HOSTNAMES} hostnames are allowed, found {}",
                view.hostnames.len()
            ),
        );
    }
    for (i, hostname) in view.hostnames.iter().enumerate() {
        match names::route_hostname(hostname, true) {
            Ok(()) => {
                if !ir.hostnames.contains(hostname) {
                    ir.hostnames.push(hostname.clone());
                }
            }
            Err(reason) => cx.error(at, format!("spec.hostnames[{i}]"), reason),
        }
    }

    // Parents.
    if view.parent_refs.is_empty() {
        cx.error(
            at,
            "spec.parentRefs",
            "no parentRefs: a mesh route must name the Service it applies to",
        );
    }
    if view.parent_refs.len() > MAX_PARENT_REFS {
        cx.error(
            at,
            "spec.parentRefs",
            format!("at most {MAX_PARENT_REFS} parentRefs are allowed"),
        );
    }
    for (i, parent) in view.parent_refs.iter().enumerate() {
        if let Some(attachment) = lower_parent_ref(
            cx,
            at,
            &format!("spec.parentRefs[{i}]"),
            parent,
            namespace,
            services,
        ) && !ir.parents.contains(&attachment)
        {
            ir.parents.push(attachment);
        }
    }

    // Rules.
    let kind = view.kind;
    let default_rules;
    let rules: &[views::RuleView<'_>] = match (&view.rules, kind) {
        (Some(rules), _) => rules,
        (None, RouteKind::Http | RouteKind::Grpc) => {
            // CRD default: one rule matching everything, without backends.
            default_rules = [views::RuleView {
                name: None,
                http_matches: None,
                grpc_matches: None,
                filters: Vec::new(),
                backends: Vec::new(),
                timeouts: None,
                unsupported: Vec::new(),
            }];
            &default_rules
        }
        (None, _) => &[],
    };
    match kind {
        RouteKind::Http | RouteKind::Grpc => {
            if rules.is_empty() {
                cx.error(at, "spec.rules", "must have at least 1 rule");
            }
            if rules.len() > MAX_RULES {
                cx.error(
                    at,
                    "spec.rules",
                    format!(
                        "at most {MAX_RULES} rules are allowed, found {}",
                        rules.len()
                    ),
                );
            }
        }
        RouteKind::Tls | RouteKind::Tcp => {
            if rules.len() != 1 {
                cx.error(
                    at,
                    "spec.rules",
                    format!(
                        "exactly 1 rule is supported, found {}: {} rules have no matches, so further rules could never be chosen",
                        rules.len(),
                        kind.as_str()
                    ),
                );
            }
        }
    }
    let total_matches: usize = rules
        .iter()
        .map(|r| r.http_matches.map_or(0, <[_]>::len))
        .sum();
    if kind == RouteKind::Http && total_matches > MAX_MATCHES_PER_ROUTE {
        cx.error(
            at,
            "spec.rules",
            format!("the total number of matches across all rules must be at most {MAX_MATCHES_PER_ROUTE}, found {total_matches}"),
        );
    }
    let mut rule_names = HashSet::new();
    for (ri, rule) in rules.iter().enumerate() {
        let field = format!("spec.rules[{ri}]");
        if let Some(name) = rule.name {
            if let Err(reason) = names::dns_subdomain(name) {
                cx.error(at, format!("{field}.name"), reason);
            }
            if !rule_names.insert(name) {
                cx.error(
                    at,
                    format!("{field}.name"),
                    format!("duplicate rule name {name:?}"),
                );
            }
        }
        if let Some(lowered) = lower_rule(cx, at, &field, kind, rule, namespace, services) {
            ir.rules.push(lowered);
        }
    }
    ir
}

pub(super) fn lower_parent_ref(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    parent: &RefView<'_>,
    namespace: &str,
    services: &Services<'_>,
) -> Option<(usize, Option<u16>)> {
    let group = parent.group.unwrap_or("gateway.networking.k8s.io");
    let kind = parent.kind.unwrap_or("Gateway");
    if !matches!(group, "" | "core") || kind != "Service" {
        let reason = format!(
            "parentRef is {kind} (group {group:?}); mesh routes must name a Service (group \"\", kind Service)"
        );
        cx.error(at, format!("{field}.kind"), reason);
        return None;
    }
    if let Some(parent_ns) = parent.namespace
        && parent_ns != namespace
    {
        cx.error(
            at,
            format!("{field}.namespace"),
            format!("consumer routes (a parent Service in namespace {parent_ns:?}, the route in {namespace:?}) are not supported; put the route in the Service's namespace"),
        );
        return None;
    }
    let Some((index, service)) = services.get(namespace, parent.name) else {
        cx.error(
            at,
            format!("{field}.name"),
            format!("Service {namespace}/{} does not exist", parent.name),
        );
        return None;
    };
    let mut port = None;
    if let Some(number) = parent.port {
        match u16::try_from(number) {
            Ok(n) if n > 0 => match service.ports.iter().find(|p| p.port == n) {
                Some(p) if p.tcp => port = Some(n),
                Some(_) => {
                    cx.error(
                        at,
                        format!("{field}.port"),
                        format!("port {n} of Service {} is not a TCP port", service.id),
                    );
                    return None;
                }
                None => {
                    cx.error(
                        at,
                        format!("{field}.port"),
                        format!(
                            "Service {} has no port {n} (it has {})",
                            service.id,
                            port_list(service)
                        ),
                    );
                    return None;
                }
            },
            _ => {
                cx.error(
                    at,
                    format!("{field}.port"),
                    format!("port {number} is out of range 1-65535"),
                );
                return None;
            }
        }
    }
    if let Some(section) = parent.section_name {
        match service
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(section))
        {
            Some(p) if port.is_none_or(|n| n == p.port) => port = Some(p.port),
            Some(p) => {
                cx.error(
                    at,
                    format!("{field}.sectionName"),
                    format!(
                        "names port {} but port is {}",
                        p.port,
                        port.unwrap_or_default()
                    ),
                );
                return None;
            }
            None => {
                cx.error(
                    at,
                    format!("{field}.sectionName"),
                    format!("Service {} has no port named {section:?}", service.id),
                );
                return None;
            }
        }
    }
    Some((index, port))
}

pub(super) fn lower_rule(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    kind: RouteKind,
    rule: &views::RuleView<'_>,
    namespace: &str,
    services: &Services<'_>,
) -> Option<RuleIr> {
    let errors_before = cx.errors.len();
    for name in &rule.unsupported {
        cx.error(
            at,
            format!("{field}.{name}"),
            format!("{name} is not supported"),
        );
    }

    // Matches.
    let mut http = Vec::new();
    let mut grpc = Vec::new();
    match kind {
        RouteKind::Http => {
            let matches = rule.http_matches.unwrap_or(&[]);
            if matches.len() > MAX_MATCHES_PER_RULE {
                cx.error(
                    at,
                    format!("{field}.matches"),
                    format!(
                        "at most {MAX_MATCHES_PER_RULE} matches are allowed, found {}",
                        matches.len()
                    ),
                );
            }
            for (mi, m) in matches.iter().enumerate() {
                if let Some(matcher) =
                    lower_http_match(cx, at, &format!("{field}.matches[{mi}]"), m)
                {
                    http.push(matcher);
                }
            }
            if matches.is_empty() {
                http.push(HttpMatcher::catch_all());
            }
        }
        RouteKind::Grpc => {
            let matches = rule.grpc_matches.unwrap_or(&[]);
            if matches.len() > MAX_GRPC_MATCHES_PER_RULE {
                cx.error(
                    at,
                    format!("{field}.matches"),
                    format!(
                        "at most {MAX_GRPC_MATCHES_PER_RULE} matches are allowed, found {}",
                        matches.len()
                    ),
                );
            }
            for (mi, m) in matches.iter().enumerate() {
                if let Some(matcher) =
                    lower_grpc_match(cx, at, &format!("{field}.matches[{mi}]"), m)
                {
                    grpc.push(matcher);
                }
            }
            if matches.is_empty() {
                grpc.push(GrpcMatcher::default());
            }
        }
        RouteKind::Tls | RouteKind::Tcp => {}
    }

    // Filters.
    let filters = lower_filters(
        cx,
        at,
        &format!("{field}.filters"),
        &rule.filters,
        Level::Rule,
        namespace,
        services,
    );

    // Backends.
    if rule.backends.len() > MAX_BACKEND_REFS {
        cx.error(
            at,
            format!("{field}.backendRefs"),
            format!(
                "at most {MAX_BACKEND_REFS} backendRefs are allowed, found {}",
                rule.backends.len()
            ),
        );
    }
    if matches!(kind, RouteKind::Tls | RouteKind::Tcp) && rule.backends.is_empty() {
        cx.error(
            at,
            format!("{field}.backendRefs"),
            "at least 1 backendRef is required",
        );
    }
    let mut backends = Vec::new();
    let mut backend_filters = Vec::new();
    for (bi, reference) in rule.backends.iter().enumerate() {
        let backend_field = format!("{field}.backendRefs[{bi}]");
        let Some(mut backend) = lower_backend_ref(
            cx,
            at,
            &backend_field,
            &reference.reference,
            namespace,
            services,
            true,
        ) else {
            continue;
        };
        let lowered = lower_filters(
            cx,
            at,
            &format!("{backend_field}.filters"),
            &reference.filters,
            Level::Backend,
            namespace,
            services,
        );
        backend_filters.extend(lowered.iter().map(|(path, f)| (path.clone(), f.clone())));
        backend.filters = lowered.into_iter().map(|(_, f)| f).collect();
        backends.push(backend);
    }

    // Cross-field rules of the CRD.
    for (filter_field, filter) in &filters {
        if matches!(filter, HttpFilter::RequestRedirect(_)) && !rule.backends.is_empty() {
            cx.error(
                at,
                filter_field.clone(),
                "RequestRedirect filter must not be used together with backendRefs",
            );
        }
    }
    for (filter_field, filter) in filters.iter().chain(&backend_filters) {
        let (config, path) = match filter {
            HttpFilter::RequestRedirect(r) => ("requestRedirect", &r.path),
            HttpFilter::UrlRewrite(r) => ("urlRewrite", &r.path),
            _ => continue,
        };
        if matches!(path, Some(PathModifier::ReplacePrefixMatch(_)))
            && !single_prefix_match(rule.http_matches)
        {
            cx.error(
                at,
                format!("{filter_field}.{config}.path"),
                "ReplacePrefixMatch requires the rule to have exactly one match, of type PathPrefix",
            );
        }
    }

    // Timeouts.
    let mut timeouts = Timeouts::default();
    if let Some((request, backend_request)) = rule.timeouts {
        let parse = |cx: &mut Cx, name: &str, value: Option<&str>| {
            let value = value?;
            names::duration(value)
                .map_err(|reason| cx.error(at, format!("{field}.timeouts.{name}"), reason))
                .ok()
        };
        timeouts.request = parse(cx, "request", request);
        timeouts.backend_request = parse(cx, "backendRequest", backend_request);
        if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request)
            && !request.is_zero()
            && backend > request
        {
            cx.error(
                at,
                format!("{field}.timeouts.backendRequest"),
                format!(
                    "backendRequest timeout ({}) cannot be longer than request timeout ({})",
                    show(backend),
                    show(request)
                ),
            );
        }
    }

    if cx.errors.len() != errors_before {
        return None;
    }
    Some(RuleIr {
        http,
        grpc,
        rule: Arc::new(HttpRule {
            name: rule.name.map(str::to_owned),
            filters: filters.into_iter().map(|(_, f)| f).collect(),
            backends,
            timeouts,
            split: Split::default(),
        }),
    })
}

pub(super) fn show(duration: Duration) -> String {
    if duration.is_zero() {
        "0s (disabled)".to_owned()
    } else {
        format!("{duration:?}")
    }
}

/// Whether the rule has exactly one match and it is a PathPrefix (absent matches and an
/// absent path both default to PathPrefix `/`).
pub(super) fn single_prefix_match(matches: Option<&[HttpRouteRulesMatches]>) -> bool {
    match matches {
        None | Some([]) => true,
        Some([only]) => only
            .path
            .as_ref()
            .and_then(|p| p.r#type.as_ref())
            .is_none_or(|t| wire_name(t) == "PathPrefix"),
        Some(_) => false,
    }
}

pub(super) fn lower_http_match(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    m: &HttpRouteRulesMatches,
) -> Option<HttpMatcher> {
    let errors_before = cx.errors.len();
    let kind = m
        .path
        .as_ref()
        .and_then(|p| p.r#type.as_ref())
        .map_or_else(|| "PathPrefix".to_owned(), wire_name);
    let value = m
        .path
        .as_ref()
        .and_then(|p| p.value.clone())
        .unwrap_or_else(|| "/".to_owned());
    let value_field = format!("{field}.path.value");
    let path = match kind.as_str() {
        "Exact" | "PathPrefix" => match check_path_value(&value) {
            Err(reason) => {
                cx.error(at, &value_field, reason);
                None
            }
            Ok(()) if kind == "Exact" => Some((
                PathMatch::Exact(value.as_str().into()),
                PathMatchKind::Exact,
            )),
            Ok(()) => Some((
                PathMatch::Prefix(value.trim_end_matches('/').into()),
                PathMatchKind::PathPrefix,
            )),
        },
        _ => {
            if value.len() > MAX_PATH_LEN {
                cx.error(
                    at,
                    &value_field,
                    format!("must be at most {MAX_PATH_LEN} characters"),
                );
            }
            match names::user_regex(&value) {
                Ok(re) => Some((PathMatch::Regex(re), PathMatchKind::RegularExpression)),
                Err(reason) => {
                    cx.error(at, &value_field, reason);
                    None
                }
            }
        }
    };
    let headers = lower_value_matches(
        cx,
        at,
        &format!("{field}.headers"),
        MAX_HEADER_MATCHES,
        true,
        m.headers.iter().flatten().map(|h| {
            (
                h.name.as_str(),
                h.r#type.as_ref().map(wire_name),
                h.value.as_str(),
            )
        }),
    );
    let query = lower_value_matches(
        cx,
        at,
        &format!("{field}.queryParams"),
        MAX_QUERY_MATCHES,
        false,
        m.query_params.iter().flatten().map(|q| {
            (
                q.name.as_str(),
                q.r#type.as_ref().map(wire_name),
                q.value.as_str(),
            )
        }),
    );
    let (path, path_kind) = path?;
    if cx.errors.len() != errors_before {
        return None;
    }
    Some(HttpMatcher {
        path,
        matched: MatchedPath {
            kind: path_kind,
            value: value.into(),
        },
        method: m.method.as_ref().map(|method| wire_name(method).into()),
        headers,
        query,
    })
}

/// The Gateway API rules for Exact and PathPrefix values.
pub(super) fn check_path_value(value: &str) -> Result<(), String> {
    if !value.starts_with('/') {
        return Err(format!("{value:?} must start with '/'"));
    }
    if value.len() > MAX_PATH_LEN {
        return Err(format!("must be at most {MAX_PATH_LEN} characters"));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            return Err(format!("{value:?} must not contain {bad:?}"));
        }
    }
    if value.ends_with("/..") || value.ends_with("/.") {
        return Err(format!("{value:?} must not end with '/.' or '/..'"));
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let valid = bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
            if !valid {
                return Err(format!(
                    "{value:?} has a '%' not followed by two hex digits"
                ));
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b)) {
            return Err(format!(
                "{value:?} contains {:?}, which is not allowed in a path",
                char::from(b)
            ));
        }
        i += 1;
    }
    Ok(())
}

/// Header, query-param or gRPC header matches: `(name, type, value)`.
pub(super) fn lower_value_matches<'a>(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    max: usize,
    case_insensitive: bool,
    entries: impl Iterator<Item = (&'a str, Option<String>, &'a str)>,
) -> Vec<(Box<str>, ValueMatch)> {
    let mut out: Vec<(Box<str>, ValueMatch)> = Vec::new();
    let mut count = 0;
    for (i, (name, kind, value)) in entries.enumerate() {
        count += 1;
        if let Err(reason) = names::header_name(name) {
            cx.error(at, format!("{field}[{i}].name"), reason);
            continue;
        }
        if value.len() > MAX_VALUE_LEN {
            cx.error(
                at,
                format!("{field}[{i}].value"),
                format!("must be at most {MAX_VALUE_LEN} characters"),
            );
            continue;
        }
        let matcher = match kind.as_deref() {
            Some("RegularExpression") => match names::user_regex(value) {
                Ok(re) => ValueMatch::Regex(re),
                Err(reason) => {
                    cx.error(at, format!("{field}[{i}].value"), reason);
                    continue;
                }
            },
            _ => ValueMatch::Exact(value.into()),
        };
        let name: Box<str> = if case_insensitive {
            name.to_ascii_lowercase().into()
        } else {
            name.into()
        };
        // "Subsequent entries with an equivalent name MUST be ignored."
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, matcher));
        }
    }
    if count > max {
        cx.error(
            at,
            field,
            format!("at most {max} matches are allowed, found {count}"),
        );
    }
    out
}

pub(super) fn lower_grpc_match(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    m: &GrpcRouteRulesMatches,
) -> Option<GrpcMatcher> {
    let errors_before = cx.errors.len();
    let mut matcher = GrpcMatcher::default();
    if let Some(method) = &m.method {
        let regex = method
            .r#type
            .as_ref()
            .is_some_and(|t| wire_name(t) == "RegularExpression");
        let service = method.service.as_deref().filter(|s| !s.is_empty());
        let name = method.method.as_deref().filter(|s| !s.is_empty());
        if service.is_none() && name.is_none() {
            cx.error(
                at,
                format!("{field}.method"),
                "at least one of service and method is required",
            );
        }
        let lower = |cx: &mut Cx, part: &str, value: Option<&str>, exact_ok: fn(&str) -> bool| {
            let value = value?;
            let part_field = format!("{field}.method.{part}");
            if value.len() > MAX_PATH_LEN {
                cx.error(
                    at,
                    &part_field,
                    format!("must be at most {MAX_PATH_LEN} characters"),
                );
                return None;
            }
            if regex {
                names::user_regex(value)
                    .map(ValueMatch::Regex)
                    .map_err(|reason| cx.error(at, &part_field, reason))
                    .ok()
            } else if exact_ok(value) {
                Some(ValueMatch::Exact(value.into()))
            } else {
                cx.error(
                    at,
                    &part_field,
                    format!("{value:?} is not a valid gRPC {part} name"),
                );
                None
            }
        };
        matcher.service = lower(cx, "service", service, is_grpc_service);
        matcher.method = lower(cx, "method", name, is_grpc_method);
    }
    matcher.headers = lower_value_matches(
        cx,
        at,
        &format!("{field}.headers"),
        MAX_HEADER_MATCHES,
        true,
        m.headers.iter().flatten().map(|h| {
            (
                h.name.as_str(),
                h.r#type.as_ref().map(wire_name),
                h.value.as_str(),
            )
        }),
    );
    (cx.errors.len() == errors_before).then_some(matcher)
}

/// `^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$`
pub(super) fn is_grpc_service(s: &str) -> bool {
    let s = s.strip_prefix('.').unwrap_or(s);
    !s.is_empty() && s.split('.').all(is_grpc_method)
}

/// `^[A-Za-z_][A-Za-z_0-9]*$`
pub(super) fn is_grpc_method(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
