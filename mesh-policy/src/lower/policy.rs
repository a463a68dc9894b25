//! MeshPolicy: capture entries, header defaults, detection timeout.

use super::*;

/// Validates a MeshPolicy, appends its capture entries, returns its detection timeout.
pub(super) fn lower_mesh_policy(
    cx: &mut Cx,
    at: &At<'_>,
    spec: &MeshPolicySpec,
    capture: &mut Vec<CaptureEntry>,
) -> Option<Duration> {
    for (i, entry) in spec.capture.iter().enumerate() {
        if let Some(lowered) = lower_capture(cx, at, &format!("spec.capture[{i}]"), entry) {
            capture.push(lowered);
        }
    }
    if let Some(headers) = &spec.headers {
        for (name, value) in &headers.set {
            let field = format!("spec.headers.set[{name:?}]");
            if let Err(reason) = names::header_name(name) {
                cx.error(at, &field, reason);
            } else if value.contains(['\r', '\n', '\0']) || value.len() > MAX_VALUE_LEN {
                cx.error(
                    at,
                    &field,
                    "value must be at most 4096 characters without CR, LF or NUL",
                );
            }
        }
    }
    let timeout = spec.protocol_detection_timeout.as_deref()?;
    match names::duration(timeout) {
        Ok(d) if d.is_zero() => {
            cx.error(
                at,
                "spec.protocolDetectionTimeout",
                "must be greater than 0",
            );
            None
        }
        Ok(d) => Some(d),
        Err(reason) => {
            cx.error(at, "spec.protocolDetectionTimeout", reason);
            None
        }
    }
}

pub(super) fn lower_capture(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    entry: &CaptureSpec,
) -> Option<CaptureEntry> {
    let network = match parse_cidr(&entry.cidr) {
        Ok(network) => Some(network),
        Err(reason) => {
            cx.error(at, format!("{field}.cidr"), reason);
            None
        }
    };
    let mut ports = Vec::new();
    for (i, spec) in entry.ports.iter().enumerate() {
        match parse_port_spec(spec) {
            Ok(range) => ports.push(range),
            Err(reason) => cx.error(at, format!("{field}.ports[{i}]"), reason),
        }
    }
    if entry.ports.is_empty() {
        ports.push((1, u16::MAX));
    }
    let (ip, len) = network?;
    (ports.len() == entry.ports.len().max(1)).then_some((ip, len, ports))
}

/// `10.96.0.0/16`, `fd00::/64`, or a bare address (a single host). Host bits are cleared.
pub(super) fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = match cidr.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (cidr, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{cidr:?} is not a CIDR (like 10.96.0.0/16 or fd00::/64)"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(len) => len
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{cidr:?}: prefix length must be 0-{max}"))?,
    };
    let network = match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    };
    Ok((network, len))
}

/// `80`, `"8000-8100"`, `"*"`.
pub(super) fn parse_port_spec(spec: &PortSpec) -> Result<(u16, u16), String> {
    let port = |n: i64| -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {n} is out of range 1-65535"))
    };
    match spec {
        PortSpec::Number(n) => port(*n).map(|p| (p, p)),
        PortSpec::Text(text) => {
            let text = text.trim();
            if text == "*" {
                return Ok((1, u16::MAX));
            }
            let parse = |s: &str| -> Result<u16, String> {
                let n: i64 = s.trim().parse().map_err(|_| {
                    format!("{text:?} is not a port, a range like \"8000-8100\", or \"*\"")
                })?;
                port(n)
            };
            match text.split_once('-') {
                Some((low, high)) => {
                    let (low, high) = (parse(low)?, parse(high)?);
                    if low > high {
                        return Err(format!("{text:?}: the range is empty ({low} > {high})"));
                    }
                    Ok((low, high))
                }
                None => parse(text).map(|p| (p, p)),
            }
        }
    }
}
