//! rtnetlink requests through the maintained `netlink-packet-route` types: one request, its
//! answers parsed by the crate, no hand-written attribute walking.
use std::net::IpAddr;

use mesh_policy::InterfaceName;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::attach::Mode;

/// Sends one request and returns the messages of its answer (a single message for a plain
/// `NLM_F_REQUEST`). Kernel errors become `Err`.
fn request(msg: RouteNetlinkMessage) -> std::io::Result<Vec<RouteNetlinkMessage>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let (reply, _) = socket.recv_from_full()?;
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < reply.len() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[offset..])
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::InnerMessage(m) => out.push(m),
            NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
            _ => {}
        }
        if len == 0 {
            break;
        }
        offset += len;
    }
    Ok(out)
}

/// The XDP mode of the program attached to `iface` (`IFLA_XDP_ATTACHED`).
pub fn xdp_mode(iface: &InterfaceName) -> Option<Mode> {
    let index = nix::net::if_::if_nametoindex(iface.as_str()).ok()?;
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    let answers = request(RouteNetlinkMessage::GetLink(msg)).ok()?;
    answers.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(link) => link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp.into_iter().find_map(|x| match x {
                LinkXdp::Attached(XdpAttached::Driver) => Some(Mode::Driver),
                LinkXdp::Attached(XdpAttached::SocketBuffer) => Some(Mode::Generic),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    })
}

/// `IFLA_INFO_KIND` of `iface` (`veth`, `bridge`, ...); `None` for devices without one
/// (physical NICs) or when it cannot be read.
pub fn link_kind(iface: &InterfaceName) -> Option<String> {
    let index = nix::net::if_::if_nametoindex(iface.as_str()).ok()?;
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    let answers = request(RouteNetlinkMessage::GetLink(msg)).ok()?;
    answers.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(link) => link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.into_iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(kind_name(&k)),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    })
}

/// The interface a packet to a pod's IP leaves the node by, as the kernel's route lookup
/// (`RTM_GETROUTE`, what `ip route get` asks) answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDevice {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: `veth`, `bridge`, ...; `None` for devices without one (physical NICs).
    pub kind: Option<String>,
}

/// Looks up the route to `ip` and the device it leaves by.
pub fn route_device(ip: IpAddr) -> std::io::Result<RouteDevice> {
    let mut msg = RouteMessage::default();
    msg.header.address_family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(ip)));
    let answers = request(RouteNetlinkMessage::GetRoute(msg))?;
    let index = answers
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => r.attributes.into_iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(i),
                _ => None,
            }),
            _ => None,
        })
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no route with an output device to {ip}"),
            )
        })?;
    let mut link = LinkMessage::default();
    link.header.index = index;
    let answers = request(RouteNetlinkMessage::GetLink(link))?;
    let mut device = RouteDevice {
        index,
        name: String::new(),
        kind: None,
    };
    for m in answers {
        if let RouteNetlinkMessage::NewLink(link) = m {
            for a in link.attributes {
                match a {
                    LinkAttribute::IfName(n) => device.name = n,
                    LinkAttribute::LinkInfo(infos) => {
                        device.kind = infos.into_iter().find_map(|i| match i {
                            LinkInfo::Kind(k) => Some(kind_name(&k)),
                            _ => None,
                        })
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(device)
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::Bridge => "bridge".into(),
        other => other.to_string(),
    }
}
