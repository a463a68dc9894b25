//! Policy routing that delivers captured packets to the agent: `ip rule fwmark MARK/MARK lookup
//! TABLE` plus `local default dev lo` in that table, for IPv4 and IPv6. The agent removes exactly
//! what it installed when it stops. The `ip` tool (iproute2) does the netlink work.
//!
//! [`Notrack`] adds one nftables rule in a table of the agent's own (`inet skiff_capture`, hook
//! prerouting, priority raw = -300, before conntrack at -200): `meta mark & MARK == MARK
//! notrack`. Why: kube-proxy (nftables or iptables mode) DNATs a Service VIP to an endpoint in the
//! node's `nat` PREROUTING chain, which runs after TC ingress. Without the rule, the captured SYN
//! to `VIP:port` (marked, `bpf_sk_assign`ed to the listener) gets a conntrack entry and is
//! rewritten to `endpoint:port`. The mark still routes it to `local` and the assigned listener
//! still takes it, but the request socket it creates has the *rewritten* address as its local
//! address. Conntrack turns the SYN-ACK's source back into the VIP, so the client answers; its ACK
//! reaches TC with the VIP tuple, `bpf_skc_lookup_tcp` finds no socket for it (the request socket
//! is keyed by the endpoint's address), so it goes on unmarked, is DNATed again, and never
//! completes the handshake: the client's request hangs, the SYN-ACK is retransmitted, the agent
//! accepts nothing and logs nothing. An untracked packet skips NAT (NAT needs a conntrack entry):
//! the listener sees the VIP as the local, i.e. original, destination and every later packet
//! matches the socket. Every packet of a captured flow is marked, so none of them is tracked.
//! The agent's upstream connection to the VIP is not marked: it is tracked, and kube-proxy's
//! OUTPUT DNAT sends it to an endpoint as for any host client. The reply direction needs nothing:
//! the listener's packets to the pod have the VIP as source and match no DNAT rule (conntrack
//! picks them up as an unreplied entry, which is harmless).
//!
//! The `nft` tool loads the rule (`nft -f -`, one transaction), as `ip` does the routing: of the
//! netlink crates, `rustables` is GPL-3.0 and needs bindgen, `nftnl` links the C libnftnl, and
//! `nf_tables` (0.1) is too young to carry a node's data path.
use std::{io::Write as _, process::Command};

use tracing::{debug, info, warn};

/// Rule preference: after the `local` table (0), before `main` (32766).
pub const RULE_PREF: u32 = 9000;

/// The agent's nftables table (its only content is the notrack chain).
pub const NOTRACK_TABLE: &str = "skiff_capture";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`ip {args}` failed: {reason}")]
    Command { args: String, reason: String },
    #[error(
        "cannot run `nft`: install nftables (`cargo xtask setup` does), or set \
         kube_proxy_notrack: false (MESH_KUBE_PROXY_NOTRACK=false) if nothing on this node DNATs \
         Service addresses"
    )]
    NftMissing { source: std::io::Error },
    #[error("`nft -f -` failed to {action} table inet {NOTRACK_TABLE}: {reason}")]
    Nft {
        action: &'static str,
        reason: String,
    },
}

/// Installed rules and routes; removed on [`PolicyRouting::remove`] or drop.
pub struct PolicyRouting {
    /// `ip` argument lists that undo what was installed, in order.
    undo: Vec<Vec<String>>,
    /// Adopted from a predecessor and not ours to remove until [`PolicyRouting::own`].
    adopted: Vec<Vec<String>>,
}

fn ip(args: &[String]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::Command {
            args: args.join(" "),
            reason: format!("cannot run ip: {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            args: args.join(" "),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl PolicyRouting {
    /// Installs the rule and local route for both families. IPv6 is skipped (with a warning) only
    /// when the namespace has IPv6 disabled.
    pub fn install(mark: u32, table: u32) -> Result<Self, Error> {
        Self::install_with(mark, table, false)
    }

    /// [`install`](Self::install) for an agent taking over from a running one: the rule it
    /// left is kept, not deleted and added again, so captured packets are never without a route
    /// to the listeners (they are the same sockets). The kernel refuses an identical rule with
    /// `File exists`, which here means installed. Nothing is removed on drop until
    /// [`own`](Self::own): a successor that fails before it is ready leaves the routing to the
    /// agent still running.
    pub fn adopt(mark: u32, table: u32) -> Result<Self, Error> {
        let mut pr = Self::install_with(mark, table, true)?;
        pr.adopted = std::mem::take(&mut pr.undo);
        Ok(pr)
    }

    /// The predecessor has handed over: what was adopted is this agent's to remove.
    pub fn own(&mut self) {
        self.undo.append(&mut self.adopted);
    }

    fn install_with(mark: u32, table: u32, adopt: bool) -> Result<Self, Error> {
        let mut pr = PolicyRouting {
            undo: Vec::new(),
            adopted: Vec::new(),
        };
        let fwmark = format!("{mark:#x}/{mark:#x}");
        let table = table.to_string();
        let pref = RULE_PREF.to_string();
        for (fam, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
            let rule = strings(&[
                fam, "rule", "add", "pref", &pref, "fwmark", &fwmark, "lookup", &table,
            ]);
            let route = strings(&[
                fam, "route", "replace", "local", default, "dev", "lo", "table", &table,
            ]);
            // A rule left by an agent that was killed is the same rule: replace it, not duplicate.
            let mut del_rule = rule.clone();
            del_rule[2] = "del".into();
            while !adopt && ip(&del_rule).is_ok() {
                debug!(family = fam, "removed a leftover capture rule");
            }
            let added = match ip(&rule) {
                Err(Error::Command { reason, .. }) if adopt && reason.contains("File exists") => {
                    debug!(family = fam, "kept the capture rule of the previous agent");
                    Ok(())
                }
                r => r,
            };
            if let Err(e) = added {
                if fam == "-6" && !std::path::Path::new("/proc/sys/net/ipv6").exists() {
                    warn!(error = %e, "IPv6 is disabled here; IPv6 capture is off");
                    continue;
                }
                return Err(e);
            }
            pr.undo.push(del_rule);
            ip(&route)?;
            let mut del_route = route.clone();
            del_route[2] = "del".into();
            pr.undo.push(del_route);
        }
        info!(%fwmark, %table, "policy routing installed");
        Ok(pr)
    }

    /// Removes what [`install`](Self::install) added.
    pub fn remove(&mut self) {
        for args in self.undo.drain(..).rev() {
            if let Err(e) = ip(&args) {
                warn!(error = %e, "removing policy routing");
            }
        }
    }
}

impl PolicyRouting {
    /// Leaves the rules and routes in place for the agent that took over (it removes them when
    /// it stops).
    pub fn forget(&mut self) {
        self.undo.clear();
    }
}

impl Drop for PolicyRouting {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The notrack rule for captured packets (see the module docs); removed on
/// [`Notrack::remove`] or drop.
pub struct Notrack {
    installed: bool,
    /// Installed over a predecessor's table; ours to remove after [`Notrack::own`].
    adopted: bool,
}

/// Runs `nft -f -` with `script` on stdin: one transaction, all or nothing.
fn nft(action: &'static str, script: &str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| Error::NftMissing { source })?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().map_err(|e| Error::Nft {
        action,
        reason: e.to_string(),
    })?;
    match written {
        Some(Ok(())) if out.status.success() => Ok(()),
        Some(Err(e)) => Err(Error::Nft {
            action,
            reason: format!("writing the rules: {e}"),
        }),
        _ => Err(Error::Nft {
            action,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// The install transaction. Declaring the table, deleting it and declaring it again in one
/// transaction replaces whatever a crashed agent left (or nothing) without a window in which
/// captured packets are tracked twice or not at all, and works on nft versions without `destroy`.
pub fn notrack_script(mark: u32) -> String {
    format!(
        "table inet {NOTRACK_TABLE}\n\
         delete table inet {NOTRACK_TABLE}\n\
         table inet {NOTRACK_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tmeta mark & {mark:#x} == {mark:#x} notrack\n\
         \t}}\n\
         }}\n"
    )
}

impl Notrack {
    /// Installs (or replaces) the table for IPv4 and IPv6 (`inet`).
    pub fn install(mark: u32) -> Result<Self, Error> {
        nft("install", &notrack_script(mark))?;
        info!(table = NOTRACK_TABLE, mark = %format!("{mark:#x}"), "conntrack bypass for captured packets installed");
        Ok(Notrack {
            installed: true,
            adopted: false,
        })
    }

    /// [`install`](Self::install) over a running predecessor's table (the same rule, replaced
    /// in one transaction); not removed on drop until [`own`](Self::own).
    pub fn adopt(mark: u32) -> Result<Self, Error> {
        let mut n = Self::install(mark)?;
        n.installed = false;
        n.adopted = true;
        Ok(n)
    }

    /// The predecessor has handed over: the table is this agent's to remove.
    pub fn own(&mut self) {
        if std::mem::take(&mut self.adopted) {
            self.installed = true;
        }
    }

    /// Removes the table [`install`](Self::install) added.
    pub fn remove(&mut self) {
        if std::mem::take(&mut self.installed)
            && let Err(e) = nft("remove", &format!("delete table inet {NOTRACK_TABLE}\n"))
        {
            warn!(error = %e, "removing the conntrack bypass");
        }
    }
}

impl Notrack {
    /// Leaves the table in place for the agent that took over.
    pub fn forget(&mut self) {
        self.installed = false;
    }
}

impl Drop for Notrack {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notrack_script_replaces_the_table_and_matches_the_mark_bits() {
        let s = notrack_script(0x400);
        assert!(s.starts_with("table inet skiff_capture\ndelete table inet skiff_capture\n"));
        assert!(
            s.contains("type filter hook prerouting priority raw;"),
            "{s}"
        );
        assert!(s.contains("meta mark & 0x400 == 0x400 notrack"), "{s}");
    }
}
