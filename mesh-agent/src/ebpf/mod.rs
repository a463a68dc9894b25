//! The only code that touches aya. It loads the embedded eBPF object and writes kernel plans
//! (`mesh_policy::KernelPlan`) into it; it never parses or validates policy.
//!
//! - [`capture`]: the capture settings and tries;
//! - [`authz`]: the authorization maps (generation swap), rule ids and counters, and where the
//!   authorization program of each interface runs (TC on veths, XDP elsewhere);
//! - [`strict`]: STRICT mTLS, the destinations refused plaintext and the egress program;
//! - [`attach`]: attaching, replacing in place and detaching programs, with pinned links;
//! - [`netlink`]: rtnetlink queries;
//! - `maps`: typed map access by `mesh_common` name.
//!
//! [`Programs::apply`] makes the kernel match a plan: maps first, then the interfaces: the
//! capture program is attached to every interface of the plan and detached from the ones that
//! left it, the authorization program likewise while the plan has authorization to enforce, and
//! the STRICT program while the plan has STRICT destinations.
pub mod attach;
pub mod authz;
pub mod capture;
pub mod kernel;
mod maps;
pub mod netlink;
pub mod strict;

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{LpmTrie, MapData, PerCpuArray, SockMap},
    programs::{SchedClassifier, SkLookup, links::PinnedLink},
};
use mesh_common::{
    counters,
    redirect::{self, AddrV4, AddrV6, PortSet},
};
use mesh_policy::{CaptureRule, InterfaceName, KernelPlan, Prefix};
use tracing::{info, warn};

use self::attach::Attached;

/// The compiled eBPF object, embedded at build time by aya-build.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Name of the TC capture program in the object.
pub const CAPTURE_PROGRAM: &str = "capture";
const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;
const COUNTERS_PIN: &str = "counters";
/// The sk_lookup program that gives the listener to a SYN a TIME_WAIT socket took
/// (`mesh-ebpf`'s `steer`), and where its link is pinned.
const STEER_PROGRAM: &str = "steer";
const STEER_PIN: &str = "steer";
/// Version of what the agent keeps in `bpffs_dir`: the pin names (`capture-<iface>`,
/// `authz-<iface>`, `steer`, `counters`), the program type behind each link and the counters map's
/// layout. A successor reuses pins only of its own version; raise it when any of these changes.
/// (`strict-<iface>` came later without a raise: a pin name added is one a predecessor never
/// made, so the names it did make keep their meaning.)
pub const PIN_LAYOUT: u32 = 1;
/// bpffs holds no regular files, but it does hold symlinks: the version is the link's target.
const LAYOUT_PIN: &str = "layout";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF program {0:?} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("attaching to interface {iface:?}: {reason}")]
    Attach { iface: String, reason: String },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("capture rule for {prefix}: {reason}")]
    Rule { prefix: Prefix, reason: String },
    #[error("unknown interfaces in authorization rules: {}", .0.join(", "))]
    UnknownInterfaces(Vec<String>),
    #[error("{0}")]
    Kernel(String),
    #[error("eBPF program logs: {0}")]
    Log(String),
    #[error(
        "the pins in {} have layout {found:?}, this agent understands {}: stop the agent \
         that made them with SIGTERM (a clean stop removes them) or remove the folder, then start \
         this one",
        .dir.display(), layout_name(PIN_LAYOUT)
    )]
    Layout { dir: PathBuf, found: String },
}

fn layout_name(v: u32) -> String {
    format!("skiff-pins-v{v}")
}

/// Refuses pins of another layout version; records this version in a folder without one. A
/// folder without a version holds pins of the agents before versioning, which had the names and
/// types of version 1.
fn check_layout(dir: &Path) -> Result<(), Error> {
    let link = dir.join(LAYOUT_PIN);
    match std::fs::read_link(&link) {
        Ok(target) if target.as_os_str() == layout_name(PIN_LAYOUT).as_str() => Ok(()),
        Ok(target) => Err(Error::Layout {
            dir: dir.to_path_buf(),
            found: target.to_string_lossy().into_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::os::unix::fs::symlink(layout_name(PIN_LAYOUT), &link).map_err(|e| Error::Pin {
                path: link,
                reason: e.to_string(),
            })
        }
        Err(e) => Err(Error::Pin {
            path: link,
            reason: e.to_string(),
        }),
    }
}

/// Reads the programs' log records (a ring buffer) and emits them through `log`, which the
/// agent's subscriber turns into `tracing` events of target `mesh_ebpf`.
pub type ProgramLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Forwards the programs' log records until the task is dropped.
pub async fn forward_logs(logger: ProgramLogger) {
    // SAFETY: the logger owns its ring buffer's fd; it stays open and the same for as long as
    // the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        warn!("eBPF program logs: cannot poll the log ring buffer");
        return;
    };
    loop {
        let Ok(mut ready) = fd.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Packets and bytes one authorization rule decided (summed over its entries and CPUs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzCount {
    pub rule: String,
    pub action: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// The loaded object, the links it has on the interfaces, and the plan it enforces.
pub struct Programs {
    bpf: Ebpf,
    logger: Option<ProgramLogger>,
    kernel: kernel::Kernel,
    dir: PathBuf,
    mark: u32,
    capture: BTreeMap<InterfaceName, Attached>,
    authz: BTreeMap<InterfaceName, Attached>,
    strict: BTreeMap<InterfaceName, Attached>,
    rule_ids: authz::RuleIds,
    /// The last plan applied, with the counter id of each authorization rule.
    plan: Option<(KernelPlan, Vec<u32>)>,
    /// What the capture tries hold, when known (`None` after a failed write: then they are
    /// read back before the next one).
    capture_written: Option<Vec<CaptureRule>>,
    /// The `steer` link, once the listeners are set.
    steer: Option<PinnedLink>,
    /// Set by [`Programs::release`]: the links belong to a successor and must outlive us.
    released: bool,
}

impl Programs {
    /// Loads the object (nothing attached yet) and pins the capture counters in `bpffs_dir`.
    /// `mark` is set on every packet handed to the agent. With `log`, the programs' debug logs
    /// are on; [`Programs::take_logger`] then gives the reader to poll.
    pub fn load(bpffs_dir: &Path, mark: u32, log: bool) -> Result<Self, Error> {
        let kernel = kernel::Kernel::probe();
        kernel.require().map_err(Error::Kernel)?;
        if !kernel.tcx {
            info!(release = %kernel.release, "no TCX links before Linux 6.6: capture attaches as a clsact filter");
        }
        ensure_bpffs(bpffs_dir)?;
        check_layout(bpffs_dir)?;
        // Off, the level is a frozen global: the verifier removes the log statements.
        let level = if log { aya_log::Level::Debug as u8 } else { 0 };
        let mut bpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .load(OBJECT)?;
        let logger = if log {
            Some(aya_log::EbpfLogger::init(&mut bpf).map_err(|e| Error::Log(e.to_string()))?)
        } else {
            None
        };
        let mut programs = Programs {
            bpf,
            logger,
            kernel,
            dir: bpffs_dir.to_path_buf(),
            mark,
            capture: BTreeMap::new(),
            authz: BTreeMap::new(),
            strict: BTreeMap::new(),
            rule_ids: authz::RuleIds::default(),
            plan: None,
            capture_written: None,
            steer: None,
            released: false,
        };
        programs.pin_counters()?;
        Ok(programs)
    }

    /// The programs' log reader, when loaded with logs on (once).
    pub fn take_logger(&mut self) -> Option<ProgramLogger> {
        self.logger.take()
    }

    /// Makes the kernel enforce `plan`: settings, capture tries and authorization maps, then
    /// the attachments. On error the maps may hold part of the plan; the caller keeps its
    /// last good policy and applies again later.
    pub fn apply(&mut self, plan: &KernelPlan) -> Result<(), Error> {
        capture::write_settings(&mut self.bpf, plan.fail_mode, self.mark)?;
        let written = self.capture_written.take();
        capture::write_rules(&mut self.bpf, &plan.capture, written.as_deref())?;
        self.capture_written = Some(plan.capture.clone());
        let (ids, fresh) = self.rule_ids.assign(&plan.authz.rules);
        authz::write(&mut self.bpf, &plan.authz, &ids, &fresh)?;
        strict::write(&mut self.bpf, &plan.strict)?;
        self.plan = Some((plan.clone(), ids));
        self.sync_links(plan)
    }

    /// Attaches every program the plan uses where it says, and detaches the rest.
    fn sync_links(&mut self, plan: &KernelPlan) -> Result<(), Error> {
        let Programs {
            bpf,
            dir,
            kernel,
            capture,
            authz,
            strict,
            ..
        } = self;
        let tcx = kernel.tcx;
        let when = |used: bool| -> &[InterfaceName] { if used { &plan.interfaces } else { &[] } };
        sync_links(capture, &plan.interfaces, |missing| {
            capture::attach(bpf, missing, dir, tcx)
        })?;
        sync_links(authz, when(!plan.authz.is_empty()), |missing| {
            authz::attach(bpf, missing, dir, tcx)
        })?;
        sync_links(strict, when(!plan.strict.is_empty()), |missing| {
            strict::attach(bpf, missing, dir, tcx)
        })
    }

    /// Plaintext connection openings STRICT refused, by interface.
    pub fn strict_refused(&self) -> Vec<(String, u64)> {
        strict::refused(&self.bpf).unwrap_or_default()
    }

    /// What `/status` shows: attached interfaces and modes, map fill levels.
    pub fn status(&self) -> serde_json::Value {
        // Counted from what was written when that is known: reading back 10,000 prefixes per
        // `/status` would hold the lock that policy updates wait for.
        let (v4, v6) = match &self.capture_written {
            Some(rules) => {
                let v4 = rules.iter().filter(|r| r.prefix.is_ipv4()).count();
                (v4, rules.len() - v4)
            }
            None => (
                maps::get::<LpmTrie<&MapData, AddrV4, PortSet>>(
                    &self.bpf,
                    redirect::MAP_CAPTURE_V4,
                )
                .map_or(0, |t| t.keys().count()),
                maps::get::<LpmTrie<&MapData, AddrV6, PortSet>>(
                    &self.bpf,
                    redirect::MAP_CAPTURE_V6,
                )
                .map_or(0, |t| t.keys().count()),
            ),
        };
        let listeners = maps::get::<SockMap<&MapData>>(&self.bpf, redirect::MAP_LISTENERS)
            .map_or(0, |m| m.indices().filter(|i| i.is_ok()).count());
        let strict_links = |m: &BTreeMap<InterfaceName, Attached>| {
            m.values()
                .map(|a| {
                    serde_json::json!({
                        "name": a.iface,
                        "mode": a.mode.as_str(),
                        "pin": a.pin,
                    })
                })
                .collect::<Vec<_>>()
        };
        let links = |m: &BTreeMap<InterfaceName, Attached>| {
            m.values()
                .map(|a| {
                    serde_json::json!({
                        "name": a.iface,
                        "hook": a.mode.hook(),
                        "mode": a.mode.as_str(),
                        "pin": a.pin,
                    })
                })
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "authorization": {
                "programs": {"tc ingress": authz::TC_PROGRAM, "xdp": authz::PROGRAM},
                "placement": "veths: TC ingress before capture (XDP on a veth takes TSO/GSO from \
                              the pod's side); other devices: XDP",
                "interfaces": links(&self.authz),
                "rules": self.plan.as_ref().map_or(0, |(p, _)| p.authz.rules.len()),
            },
            "kernel": self.kernel,
            "capture": {
                "program": CAPTURE_PROGRAM,
                "hook": "tc ingress",
                "mode": if self.kernel.tcx { "tcx" } else { "clsact" },
                "interfaces": links(&self.capture),
                "fail_mode": self.plan.as_ref().map(|(p, _)| p.fail_mode.to_string()),
            },
            "mtls_strict": {
                "program": strict::PROGRAM,
                "hook": attach::STRICT_SLOT.hook(),
                "interfaces": strict_links(&self.strict),
                "destinations": self.plan.as_ref().map_or(0, |(p, _)| p.strict.len()),
                "max_per_family": mesh_common::mtls::MAX_STRICT,
            },
            "maps": {
                redirect::MAP_CAPTURE_V4: {"entries": v4, "max": redirect::MAX_PREFIXES},
                redirect::MAP_CAPTURE_V6: {"entries": v6, "max": redirect::MAX_PREFIXES},
                redirect::MAP_LISTENERS: {"entries": listeners, "max": redirect::MAX_LISTENERS},
            },
        })
    }

    /// Puts the agent's listeners in the SockMap the program assigns SYNs to.
    pub fn set_listeners(
        &mut self,
        v4: &impl AsRawFd,
        v6: Option<&impl AsRawFd>,
    ) -> Result<(), Error> {
        let name = redirect::MAP_LISTENERS;
        let mut map: SockMap<_> = maps::get_mut(&mut self.bpf, name)?;
        map.set(redirect::LISTENER_V4, v4, 0)
            .map_err(maps::err(name))?;
        if let Some(v6) = v6 {
            map.set(redirect::LISTENER_V6, v6, 0)
                .map_err(maps::err(name))?;
        }
        if self.steer.is_none() {
            let prog: &mut SkLookup = self
                .bpf
                .program_mut(STEER_PROGRAM)
                .ok_or(Error::MissingProgram(STEER_PROGRAM))?
                .try_into()?;
            if prog.fd().is_err() {
                prog.load()?;
            }
            self.steer = Some(attach::sk_lookup(prog, &self.dir.join(STEER_PIN))?);
        }
        Ok(())
    }

    /// Removes the listeners from the SockMap: new connections follow the fail mode.
    pub fn clear_listeners(&mut self) {
        if let Ok(mut map) = maps::get_mut::<SockMap<_>>(&mut self.bpf, redirect::MAP_LISTENERS) {
            for slot in [redirect::LISTENER_V4, redirect::LISTENER_V6] {
                let _ = map.clear_index(&slot);
            }
        }
    }

    /// Current capture counter values, summed over CPUs.
    pub fn counters(&self) -> Result<[u64; counters::MAX_ENTRIES as usize], Error> {
        sum_counters(&maps::get(&self.bpf, counters::MAP_NAME)?)
    }

    fn pin_counters(&mut self) -> Result<(), Error> {
        let path = self.dir.join(COUNTERS_PIN);
        let _ = std::fs::remove_file(&path);
        self.bpf
            .map(counters::MAP_NAME)
            .ok_or(Error::MissingMap(counters::MAP_NAME))?
            .pin(&path)
            .map_err(|e| Error::Pin {
                path,
                reason: e.to_string(),
            })
    }

    /// Per-rule authorization counters of the rules in force, by rule name and action.
    pub fn authz_counts(&self) -> Vec<AuthzCount> {
        let Some((plan, ids)) = &self.plan else {
            return Vec::new();
        };
        let Ok(stats) = authz::stats(&self.bpf) else {
            return Vec::new();
        };
        let mut by_rule: BTreeMap<(&str, &'static str), (u64, u64)> = BTreeMap::new();
        for (rule, id) in plan.authz.rules.iter().zip(ids) {
            let action = match rule.action {
                mesh_policy::AuthzAction::Allow => "allow",
                mesh_policy::AuthzAction::Deny => "deny",
            };
            let c = stats.rules.get(id).copied().unwrap_or_default();
            let e = by_rule.entry((&rule.rule, action)).or_default();
            e.0 += c.packets;
            e.1 += c.bytes;
        }
        by_rule
            .into_iter()
            .map(|((rule, action), (packets, bytes))| AuthzCount {
                rule: rule.to_string(),
                action,
                packets,
                bytes,
            })
            .collect()
    }

    /// Unpins and detaches every link; the interfaces are left as they were before the agent.
    pub fn detach(&mut self) {
        if let Err(e) = attach::detach_all(std::mem::take(&mut self.authz).into_values().collect())
        {
            warn!(error = %e, "detaching authorization");
        }
        if let Err(e) = attach::detach_all(std::mem::take(&mut self.strict).into_values().collect())
        {
            warn!(error = %e, "detaching STRICT mTLS");
        }
        for (iface, a) in std::mem::take(&mut self.capture) {
            if let Err(e) = attach::detach(a) {
                warn!(iface = %iface, error = %e, "detaching capture");
            }
        }
        if let Some(link) = self.steer.take() {
            attach::detach_sk_lookup(link, &self.dir.join(STEER_PIN));
        }
        let _ = std::fs::remove_file(self.dir.join(COUNTERS_PIN));
        let _ = std::fs::remove_file(self.dir.join(LAYOUT_PIN));
        let _ = std::fs::remove_dir(&self.dir);
        info!("programs detached");
    }

    /// While taking over (until the predecessor is told this agent is ready), a failure must
    /// not detach: the links are the predecessor's too, and it reclaims them
    /// ([`Programs::reclaim`]). With `true`, dropping `self` releases instead of detaching.
    pub fn release_on_drop(&mut self, release: bool) {
        self.released = release;
    }

    /// After a successor failed before it was ready: attaches this agent's programs again
    /// through the pinned links (an atomic replacement, as at any start), so its maps, the
    /// ones its policy updates write, are the ones in use again.
    pub fn reclaim(&mut self) -> Result<(), Error> {
        self.release_links();
        let Some((plan, _)) = self.plan.clone() else {
            return Ok(());
        };
        self.sync_links(&plan)?;
        info!("programs attached again after a failed takeover");
        Ok(())
    }

    /// Lets go of every interface link without detaching (see [`attach::release`]).
    fn release_links(&mut self) {
        let links = std::mem::take(&mut self.capture)
            .into_values()
            .chain(std::mem::take(&mut self.authz).into_values())
            .chain(std::mem::take(&mut self.strict).into_values());
        for a in links {
            attach::release(a);
        }
    }

    /// Hands the attachments to a successor that took over (see `handover`): links stay
    /// attached and pinned, the counters pin stays, and dropping `self` detaches nothing.
    pub fn release(&mut self) {
        self.released = true;
        self.release_links();
        // The successor attached its own sk_lookup link and pinned it in place of ours: closing
        // ours (no longer pinned) takes our program out of the namespace, and leaves its.
        drop(self.steer.take());
        info!("programs left attached for the agent that took over");
    }
}

impl Drop for Programs {
    fn drop(&mut self) {
        if !self.released {
            self.detach();
        }
    }
}

/// The object's TC program `name`, loaded into the kernel on first use.
fn classifier<'a>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, Error> {
    let prog: &mut SchedClassifier = bpf
        .program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    Ok(prog)
}

/// Removes and returns the links whose interface is not in `want`.
/// Detaches the links of interfaces not in `want`, then attaches (with `attach`) to those of
/// `want` that have no link yet.
fn sync_links(
    links: &mut BTreeMap<InterfaceName, Attached>,
    want: &[InterfaceName],
    attach: impl FnOnce(&[InterfaceName]) -> Result<Vec<Attached>, Error>,
) -> Result<(), Error> {
    attach::detach_all(drop_unwanted(links, want))?;
    let missing: Vec<InterfaceName> = want
        .iter()
        .filter(|i| !links.contains_key(*i))
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for a in attach(&missing)? {
        links.insert(a.iface.clone(), a);
    }
    Ok(())
}

fn drop_unwanted(
    links: &mut BTreeMap<InterfaceName, Attached>,
    want: &[InterfaceName],
) -> Vec<Attached> {
    let gone: Vec<InterfaceName> = links
        .keys()
        .filter(|i| !want.contains(i))
        .cloned()
        .collect();
    gone.iter().filter_map(|i| links.remove(i)).collect()
}

fn sum_counters<T: std::borrow::Borrow<MapData>>(
    arr: &PerCpuArray<T, u64>,
) -> Result<[u64; counters::MAX_ENTRIES as usize], Error> {
    let mut out = [0u64; counters::MAX_ENTRIES as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        let v = arr
            .get(&(i as u32), 0)
            .map_err(maps::err(counters::MAP_NAME))?;
        *slot = v.iter().sum();
    }
    Ok(out)
}

/// Reads the counters pinned in `dir` by a running (or killed) agent.
pub fn pinned_counters(dir: &Path) -> Result<[u64; counters::MAX_ENTRIES as usize], Error> {
    let path = dir.join(COUNTERS_PIN);
    let data = MapData::from_pin(&path).map_err(maps::err(counters::MAP_NAME))?;
    let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(maps::err(counters::MAP_NAME))?;
    sum_counters(&arr)
}

/// Makes sure `dir` is on a bpf filesystem, mounting one at /sys/fs/bpf if none is there.
fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root)
            .map_err(|e| Error::Bpffs(format!("creating {}: {e}", root.display())))?;
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::Bpffs(format!("mounting bpffs at {}: {e}", root.display())))?;
        info!(path = %root.display(), "mounted bpffs");
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Bpffs(format!("creating {}: {e}", dir.display())))?;
    if !is_bpffs(dir) {
        return Err(Error::Bpffs(format!(
            "{} is not on a bpf filesystem (mount one with `mount -t bpf bpf DIR`)",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map names the agent writes (from `mesh_common`) are the names the object declares:
    /// `#[map]` in mesh-ebpf takes literals, so this is where a mismatch shows.
    #[test]
    fn every_shared_map_name_is_in_the_object() {
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        let declared: std::collections::BTreeSet<&str> =
            obj.maps.keys().map(String::as_str).collect();
        let mut shared = vec![
            redirect::MAP_CAPTURE_V4,
            redirect::MAP_CAPTURE_V6,
            redirect::MAP_LISTENERS,
            redirect::MAP_TW_SYNS,
            redirect::MAP_TW_LAST,
            redirect::MAP_SETTINGS,
            counters::MAP_NAME,
            mesh_common::authz::MAP_GENERATION,
            mesh_common::authz::MAP_RULE_STATS,
            mesh_common::authz::MAP_IFACE_STATS,
            mesh_common::mtls::MAP_STRICT_V4,
            mesh_common::mtls::MAP_STRICT_V6,
            mesh_common::mtls::MAP_REFUSED,
        ];
        shared.extend(mesh_common::authz::MAP_V4);
        shared.extend(mesh_common::authz::MAP_V6);
        shared.extend(mesh_common::authz::MAP_LISTS);
        for name in shared {
            assert!(declared.contains(name), "{name} not in {declared:?}");
        }
    }
}
