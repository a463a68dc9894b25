//! Services, EndpointSlices and endpoint resolution.

use super::*;

pub(super) fn lower_service(
    cx: &mut Cx,
    at: &At<'_>,
    service: &Service,
    resource: &Resource,
) -> ServiceIr {
    let id = ServiceRef {
        namespace: resource.namespace().to_owned(),
        name: resource.name().to_owned(),
    };
    let mut ir = ServiceIr {
        id,
        vips: Vec::new(),
        ports: Vec::new(),
    };
    let Some(spec) = &service.spec else {
        cx.error(at, "spec", "missing");
        return ir;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        // No virtual IP to capture; routes cannot attach to it.
        return ir;
    }
    let parse_vip = |cx: &mut Cx, field: &str, value: &str| -> Option<IpAddr> {
        if value.is_empty() || value == "None" {
            return None;
        }
        match value.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                cx.error(
                    at,
                    field,
                    format!("{value:?} is not an IP address (or \"None\" for a headless Service)"),
                );
                None
            }
        }
    };
    if let Some(ip) = spec
        .cluster_ip
        .as_deref()
        .and_then(|v| parse_vip(cx, "spec.clusterIP", v))
    {
        ir.vips.push(ip);
    }
    for (i, value) in spec.cluster_ips.iter().flatten().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        if i == 0
            && let Some(primary) = spec.cluster_ip.as_deref().filter(|p| !p.is_empty())
            && primary != value
        {
            cx.error(at, &field, format!("must equal spec.clusterIP ({primary})"));
        }
        if let Some(ip) = parse_vip(cx, &field, value)
            && !ir.vips.contains(&ip)
        {
            ir.vips.push(ip);
        }
    }

    let ports = spec.ports.as_deref().unwrap_or(&[]);
    let mut names_seen = HashSet::new();
    let mut numbers_seen = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
            cx.error(
                at,
                format!("{field}.protocol"),
                format!("{protocol:?} is not TCP, UDP or SCTP"),
            );
        }
        let number = match u16::try_from(port.port) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                cx.error(
                    at,
                    format!("{field}.port"),
                    format!("port {} is out of range 1-65535", port.port),
                );
                None
            }
        };
        let name = port.name.as_deref().filter(|n| !n.is_empty());
        match name {
            None if ports.len() > 1 => cx.error(
                at,
                format!("{field}.name"),
                "port name is required when a Service has more than one port",
            ),
            None => {}
            Some(name) => {
                if let Err(reason) = names::dns_label(name) {
                    cx.error(at, format!("{field}.name"), reason);
                }
                if !names_seen.insert(name) {
                    cx.error(
                        at,
                        format!("{field}.name"),
                        format!("duplicate port name {name:?}"),
                    );
                }
            }
        }
        if let Some(n) = number
            && !numbers_seen.insert((n, protocol))
        {
            cx.error(
                at,
                format!("{field}.port"),
                format!("duplicate port {n}/{protocol}"),
            );
        }
        let target = match &port.target_port {
            None => number.map(Target::Number),
            Some(IntOrString::Int(t)) => match u16::try_from(*t) {
                Ok(t) if t > 0 => Some(Target::Number(t)),
                _ => {
                    cx.error(
                        at,
                        format!("{field}.targetPort"),
                        format!("port {t} is out of range 1-65535"),
                    );
                    None
                }
            },
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(t) if t > 0 => Some(Target::Number(t)),
                _ if is_port_name(s) => Some(Target::Named),
                _ => {
                    cx.error(
                        at,
                        format!("{field}.targetPort"),
                        format!("{s:?} is neither a port number nor a valid port name"),
                    );
                    None
                }
            },
        };
        if let (Some(port_number), Some(target)) = (number, target) {
            ir.ports.push(PortIr {
                port: port_number,
                name: name.map(str::to_owned),
                app_protocol: port.app_protocol.clone(),
                target,
                tcp: protocol == "TCP",
                endpoints: Vec::new(),
            });
        }
    }
    ir
}

/// IANA service name: at most 15 characters, lower-case alphanumerics and `-`, at least one
/// letter.
pub(super) fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

#[derive(Debug)]
pub(super) struct SliceIr {
    /// `(name, port)`; name empty when unnamed.
    ports: Vec<(String, u16)>,
    /// Ready addresses.
    addresses: Vec<IpAddr>,
}

pub(super) fn lower_slice(
    cx: &mut Cx,
    at: &At<'_>,
    slice: &EndpointSlice,
    include_not_ready: bool,
) -> SliceIr {
    let family = slice.address_type.as_str();
    if !matches!(family, "IPv4" | "IPv6" | "FQDN") {
        cx.error(
            at,
            "addressType",
            format!("{family:?} is not IPv4, IPv6 or FQDN"),
        );
    }
    let mut ir = SliceIr {
        ports: Vec::new(),
        addresses: Vec::new(),
    };
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        match port.port.map(u16::try_from) {
            Some(Ok(n)) if n > 0 => ir.ports.push((port.name.clone().unwrap_or_default(), n)),
            Some(_) => cx.error(
                at,
                format!("ports[{i}].port"),
                format!(
                    "port {} is out of range 1-65535",
                    port.port.unwrap_or_default()
                ),
            ),
            None => {}
        }
    }
    if family == "FQDN" {
        // Names would need DNS at connection time; not supported as endpoints.
        return ir;
    }
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let ready = endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false);
        for (j, address) in endpoint.addresses.iter().enumerate() {
            let parsed = address.parse::<IpAddr>().ok().filter(|ip| match ip {
                IpAddr::V4(_) => family == "IPv4",
                IpAddr::V6(_) => family == "IPv6",
            });
            match parsed {
                Some(ip) if ready || include_not_ready => ir.addresses.push(ip),
                Some(_) => {}
                None => cx.error(
                    at,
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{address:?} is not an {family} address"),
                ),
            }
        }
    }
    ir
}

/// Endpoints of one Service port: each slice's port with the same name; when the slice names
/// no ports at all, the numeric targetPort.
pub(super) fn resolve_endpoints(port: &PortIr, slices: &[SliceIr]) -> Vec<SocketAddr> {
    let name = port.name.as_deref().unwrap_or("");
    let mut endpoints = Vec::new();
    for slice in slices {
        let by_name = slice.ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
        let names_absent = slice.ports.iter().all(|(n, _)| n.is_empty());
        let number = by_name.or(match &port.target {
            Target::Number(n) if names_absent => Some(*n),
            _ => None,
        });
        let Some(number) = number else { continue };
        for address in &slice.addresses {
            let endpoint = SocketAddr::new(*address, number);
            if !endpoints.contains(&endpoint) {
                endpoints.push(endpoint);
            }
        }
    }
    endpoints
}
