//! rtnetlink requests through the maintained `netlink-packet-route` types: one request, its
//! answers parsed by the crate, no hand-written attribute walking.
use mesh_policy::InterfaceName;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
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
