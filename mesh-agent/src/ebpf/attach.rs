//! Attaching the programs to an interface, and detaching them.
//!
//! Links are pinned in the agent's bpffs folder (`capture-<iface>`, `authz-<iface>`) so that the
//! programs outlive the process: a new agent replaces a pinned link's program atomically (no
//! moment without a program), and a killed agent's program stays and applies the fail mode. A
//! clean detach unpins, which drops the last reference and detaches.
//!
//! Kernels before 6.6 have no TCX links: there a TC program is a `clsact` ingress filter at a
//! fixed priority and handle ([`TcSlot`]). A filter is not tied to a file descriptor, so it
//! outlives a killed agent the same way; the next agent replaces the filter's program in place
//! (netlink replace of the same priority and handle), and a clean detach deletes the filter.
//!
//! Two TC programs can share an interface's ingress: `authorize_tc` runs first (TCX: attached
//! before every other link; clsact: a lower priority), then `capture`. `refuse_plaintext` (STRICT
//! mTLS) runs at the egress, alone.
use std::path::{Path, PathBuf};

use aya::programs::{
    SchedClassifier, SkLookup, TcAttachType, Xdp, XdpMode,
    links::{FdLink, Link, LinkError, LinkOrder, PinnedLink},
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle, qdisc_add_clsact},
    xdp::XdpLink,
};
use mesh_policy::InterfaceName;
use serde::Serialize;
use tracing::{info, warn};

use super::{Error, netlink};

/// Where a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// TC ingress as a TCX link (kernel 6.6+).
    Tcx,
    /// TC ingress as a netlink `clsact` filter (kernels before 6.6).
    Clsact,
    /// XDP in the driver, before an skb is allocated.
    Driver,
    /// XDP in the stack, on the skb (the device has no native XDP).
    Generic,
    /// A previous agent's XDP link was reused and the kernel did not say which mode it has.
    Unknown,
}

impl Mode {
    /// The hook the mode belongs to, as `/status` names it.
    pub fn hook(self) -> &'static str {
        match self {
            Mode::Tcx | Mode::Clsact => "tc ingress",
            Mode::Driver | Mode::Generic | Mode::Unknown => "xdp",
        }
    }

    /// The mode as shown in `/status` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tcx => "tcx",
            Mode::Clsact => "clsact",
            Mode::Driver => "driver",
            Mode::Generic => "generic",
            Mode::Unknown => "unknown",
        }
    }
}

/// A program attached to an interface, its link pinned at `pin`.
#[derive(Debug)]
pub struct Attached {
    pub iface: InterfaceName,
    pub mode: Mode,
    /// Whether a previous agent's link was updated in place.
    pub replaced: bool,
    /// Where the link is pinned; `None` for a clsact filter (it has no link to pin).
    pub pin: Option<PathBuf>,
    link: Option<Handle>,
}

/// What keeps a program attached until [`detach`].
#[derive(Debug)]
enum Handle {
    Pinned(PinnedLink),
    Filter(SchedClassifierLink),
}

/// Where a TC program sits on an interface.
#[derive(Clone, Copy, Debug)]
pub struct TcSlot {
    /// What logs call it.
    pub what: &'static str,
    /// Ingress (packets leaving the pod) or egress (packets entering it).
    pub direction: TcAttachType,
    /// TCX: attached before every other link (else after them).
    pub first: bool,
    /// clsact filter priority and handle on kernels without TCX: fixed, so that the next agent
    /// finds and replaces it; a lower priority runs first.
    pub priority: u16,
    pub handle: TcHandle,
}

/// The capture program's place.
pub const CAPTURE_SLOT: TcSlot = TcSlot {
    what: "capture",
    direction: TcAttachType::Ingress,
    first: false,
    priority: 50,
    handle: TcHandle::new(0, 0x5c1f),
};

/// The TC authorization program's place: before capture, so a denied packet is never captured.
pub const AUTHZ_SLOT: TcSlot = TcSlot {
    what: "authorization",
    direction: TcAttachType::Ingress,
    first: true,
    priority: 40,
    handle: TcHandle::new(0, 0x5c1e),
};

/// STRICT mTLS's place: egress, where packets enter the pod.
pub const STRICT_SLOT: TcSlot = TcSlot {
    what: "STRICT mTLS",
    direction: TcAttachType::Egress,
    first: true,
    priority: 40,
    handle: TcHandle::new(0, 0x5c1d),
};

impl TcSlot {
    /// `tc ingress` or `tc egress`, as `/status` says.
    pub fn hook(&self) -> &'static str {
        match self.direction {
            TcAttachType::Egress => "tc egress",
            _ => "tc ingress",
        }
    }

    /// `TC ingress` or `TC egress`, as logs say.
    fn hook_phrase(&self) -> &'static str {
        match self.direction {
            TcAttachType::Egress => "TC egress",
            _ => "TC ingress",
        }
    }
}

/// Takes over the link a previous agent pinned at `pin`, if any, with `attach_to_link`.
fn take_over<L>(
    iface: &InterfaceName,
    pin: &Path,
    attach_to_link: impl FnOnce(L) -> Result<(), String>,
) -> bool
where
    L: TryFrom<FdLink, Error = LinkError>,
{
    let Ok(old) = PinnedLink::from_pin(pin) else {
        return false;
    };
    let taken = L::try_from(FdLink::from(old))
        .map_err(|e| e.to_string())
        .and_then(attach_to_link);
    // The old pin goes either way: its link is now ours, or dead.
    let _ = std::fs::remove_file(pin);
    match taken {
        Ok(()) => true,
        Err(e) => {
            warn!(iface = %iface, error = %e, "a pinned link could not be reused; attaching anew");
            false
        }
    }
}

fn pin_link(iface: &InterfaceName, link: FdLink, pin: &Path) -> Result<PinnedLink, Error> {
    link.pin(pin).map_err(|e| Error::Pin {
        path: pin.to_path_buf(),
        reason: format!("{e} (interface {iface})"),
    })
}

fn attach_err(iface: &InterfaceName, reason: String) -> Error {
    Error::Attach {
        iface: iface.to_string(),
        reason,
    }
}

/// Attaches `prog` at `iface`'s TC hook in `slot`, replacing a previous agent's program in
/// place: as a TCX link pinned at `pin` when the kernel has TCX, else as a clsact filter.
pub fn tc(
    prog: &mut SchedClassifier,
    slot: TcSlot,
    iface: &InterfaceName,
    pin: &Path,
    tcx: bool,
) -> Result<Attached, Error> {
    if !tcx {
        return tc_filter(prog, slot, iface);
    }
    let mut id = None;
    let replaced = take_over(iface, pin, |old: SchedClassifierLink| {
        id = Some(prog.attach_to_link(old).map_err(|e| e.to_string())?);
        Ok(())
    });
    let order = if slot.first {
        LinkOrder::first()
    } else {
        LinkOrder::last()
    };
    let id = match id {
        Some(id) => id,
        None => prog
            .attach_with_options(iface, slot.direction, TcAttachOptions::TcxOrder(order))
            .map_err(|e| {
                attach_err(
                    iface,
                    format!("{e} (does the interface exist in this network namespace?)"),
                )
            })?,
    };
    let link: FdLink = prog.take_link(id)?.try_into().map_err(|e: LinkError| {
        attach_err(iface, format!("not a bpf_link, cannot be pinned: {e}"))
    })?;
    let link = pin_link(iface, link, pin)?;
    info!(iface = %iface, mode = "tcx", replaced, "{} attached at {}", slot.what, slot.hook_phrase());
    Ok(Attached {
        iface: iface.clone(),
        mode: Mode::Tcx,
        replaced,
        pin: Some(pin.to_path_buf()),
        link: Some(Handle::Pinned(link)),
    })
}

/// The pre-6.6 path: a `clsact` filter at the slot's hook, priority and handle.
fn tc_filter(
    prog: &mut SchedClassifier,
    slot: TcSlot,
    iface: &InterfaceName,
) -> Result<Attached, Error> {
    // EEXIST when the interface has clsact already (ours from before, or another tool's).
    let _ = qdisc_add_clsact(iface);
    let previous =
        SchedClassifierLink::attached(iface, slot.direction, slot.priority, slot.handle, None)
            .map_err(|e| e.to_string());
    let (id, replaced) = match previous
        .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()))
    {
        Ok(id) => (id, true),
        Err(_) => {
            let id = prog
                .attach_with_options(
                    iface,
                    slot.direction,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: slot.priority,
                        handle: slot.handle,
                        ..Default::default()
                    }),
                )
                .map_err(|e| {
                    attach_err(
                        iface,
                        format!("clsact filter: {e} (does the interface exist in this network namespace?)"),
                    )
                })?;
            (id, false)
        }
    };
    let link = prog.take_link(id)?;
    info!(iface = %iface, mode = "clsact", replaced, "{} attached at {} (no TCX before Linux 6.6)", slot.what, slot.hook_phrase());
    Ok(Attached {
        iface: iface.clone(),
        mode: Mode::Clsact,
        replaced,
        pin: None,
        link: Some(Handle::Filter(link)),
    })
}

/// Attaches the authorization program at XDP on `iface`, in driver mode when the device
/// supports it and generic mode otherwise, replacing a previous agent's pinned link in place.
pub fn xdp(prog: &mut Xdp, iface: &InterfaceName, pin: &Path) -> Result<Attached, Error> {
    let mut id = None;
    let replaced = take_over(iface, pin, |old: XdpLink| {
        id = Some(prog.attach_to_link(old).map_err(|e| e.to_string())?);
        Ok(())
    });
    let (id, mode) = match id {
        Some(id) => {
            let mode = netlink::xdp_mode(iface).unwrap_or(Mode::Unknown);
            (id, mode)
        }
        None => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, Mode::Driver),
            Err(drv) => match prog.attach(iface, XdpMode::Skb) {
                Ok(id) => {
                    info!(iface = %iface, reason = %drv, "driver-mode XDP refused; using generic mode");
                    (id, Mode::Generic)
                }
                Err(skb) => {
                    return Err(attach_err(
                        iface,
                        format!(
                            "driver mode: {drv}; generic mode: {skb} (does the interface exist in this network namespace?)"
                        ),
                    ));
                }
            },
        },
    };
    let link: FdLink = prog.take_link(id)?.try_into().map_err(|e: LinkError| {
        attach_err(iface, format!("not a bpf_link, cannot be pinned: {e}"))
    })?;
    let link = pin_link(iface, link, pin)?;
    info!(iface = %iface, mode = mode.as_str(), replaced, "authorization attached at XDP");
    Ok(Attached {
        iface: iface.clone(),
        mode,
        replaced,
        pin: Some(pin.to_path_buf()),
        link: Some(Handle::Pinned(link)),
    })
}

/// Lets go of a link without detaching it: after a handover the successor attached through the
/// same pinned link (or filter) and holds it; closing this agent's reference leaves it attached.
pub fn release(mut a: Attached) {
    match a.link.take() {
        Some(Handle::Pinned(link)) => drop(link),
        // A taken filter link deletes the filter when dropped; the successor's program runs in
        // that very filter now.
        Some(Handle::Filter(link)) => std::mem::forget(link),
        None => {}
    }
}

/// Unpins and detaches (clean shutdown or an interface that left the plan); the interface is
/// left without the program.
pub fn detach(mut a: Attached) -> Result<(), Error> {
    match a.link.take() {
        Some(Handle::Pinned(link)) => {
            // Dropping the last reference detaches the program.
            let fd = link.unpin().map_err(|e| Error::Pin {
                path: a.pin.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?;
            drop(fd);
        }
        Some(Handle::Filter(link)) => link.detach()?,
        None => {}
    }
    if let Some(pin) = &a.pin {
        let _ = std::fs::remove_file(pin);
    }
    info!(iface = %a.iface, mode = a.mode.as_str(), "detached");
    Ok(())
}

/// Attaches `prog` (sk_lookup) to the network namespace the agent runs in, its link pinned at
/// `pin` so that it lives as long as the capture links it serves. A previous agent's link there
/// is dropped once the new one is attached (a namespace runs several sk_lookup programs in
/// turn, so there is no moment without one).
pub fn sk_lookup(prog: &mut SkLookup, pin: &Path) -> Result<PinnedLink, Error> {
    let err = |reason: String| Error::Attach {
        iface: "network namespace (sk_lookup)".into(),
        reason,
    };
    let netns = std::fs::File::open("/proc/self/ns/net")
        .map_err(|e| err(format!("opening /proc/self/ns/net: {e}")))?;
    let id = prog.attach(&netns).map_err(|e| err(e.to_string()))?;
    let link: FdLink = prog.take_link(id).map_err(|e| err(e.to_string()))?.into();
    if let Ok(old) = PinnedLink::from_pin(pin) {
        // Unpinned and closed: its last reference, so the old program leaves the namespace.
        let _ = old.unpin();
    }
    let _ = std::fs::remove_file(pin);
    link.pin(pin).map_err(|e| Error::Pin {
        path: pin.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Detaches what [`sk_lookup`] attached.
pub fn detach_sk_lookup(link: PinnedLink, pin: &Path) {
    match link.unpin() {
        Ok(fd) => drop(fd),
        Err(e) => warn!(error = %e, "unpinning the sk_lookup link"),
    }
    let _ = std::fs::remove_file(pin);
}

/// Detaches every link (see [`detach`]); every link is tried, the first failure is
/// returned.
pub fn detach_all(attached: Vec<Attached>) -> Result<(), Error> {
    let mut first = None;
    for a in attached {
        if let Err(e) = detach(a) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}
