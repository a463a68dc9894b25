//! Policy routing that delivers captured packets to the agent: `ip rule fwmark MARK/MARK lookup
//! TABLE` plus `local default dev lo` in that table, for IPv4 and IPv6. The agent removes exactly
//! what it installed when it stops. The `ip` tool (iproute2) does the netlink work.
use std::process::Command;

use tracing::{debug, info, warn};

/// Rule preference: after the `local` table (0), before `main` (32766).
pub const RULE_PREF: u32 = 9000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`ip {args}` failed: {reason}")]
    Command { args: String, reason: String },
}

/// Installed rules and routes; removed on [`PolicyRouting::remove`] or drop.
pub struct PolicyRouting {
    /// `ip` argument lists that undo what was installed, in order.
    undo: Vec<Vec<String>>,
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
        let mut pr = PolicyRouting { undo: Vec::new() };
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
            while ip(&del_rule).is_ok() {
                debug!(family = fam, "removed a leftover capture rule");
            }
            if let Err(e) = ip(&rule) {
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

impl Drop for PolicyRouting {
    fn drop(&mut self) {
        self.remove();
    }
}
