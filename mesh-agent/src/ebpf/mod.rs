//! The only code that touches aya: loads the embedded eBPF object, fills the capture maps,
//! attaches `capture` to each interface as a pinned TCX link, puts the listeners in the SockMap and
//! reads the per-CPU counters.
//!
//! Links are pinned in `bpffs_dir` so that capture outlives the process: a new agent replaces the
//! program atomically (no window where traffic bypasses the mesh), and if the agent dies the
//! program stays and applies the fail mode. A clean shutdown unpins and detaches.
pub mod authz;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapData, PerCpuArray, SockMap, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use mesh_common::{
    counters,
    redirect::{self, AddrV4, AddrV6, PortRange, PortSet, Settings},
};
use tracing::{info, warn};

use crate::config::{CaptureRule, Config, FailMode, Prefix};

/// The compiled eBPF object, embedded at build time by aya-build.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

const PROGRAM: &str = "capture";
const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;
const COUNTERS_PIN: &str = "counters";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {PROGRAM:?}: {0}")]
    Program(#[from] aya::programs::ProgramError),
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
    #[error("authorization: {0}")]
    Authz(#[from] authz::Error),
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// The loaded, attached capture program.
pub struct Capture {
    bpf: Ebpf,
    links: Vec<(String, PathBuf, Option<PinnedLink>)>,
    dir: PathBuf,
    /// XDP authorization links; attached once a policy has authorization rules.
    authz: Vec<authz::Attached>,
    /// Stable counter id of each authorization entry key, kept across reloads.
    authz_ids: std::collections::HashMap<String, u32>,
    /// Rule name and action of each id, for metrics.
    authz_names: std::collections::HashMap<u32, (String, &'static str)>,
    interfaces: Vec<String>,
}

/// Packets and bytes one authorization rule decided (summed over its entries and CPUs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzCount {
    pub rule: String,
    pub action: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

impl Capture {
    /// Loads the object, writes settings and capture rules, attaches to every interface.
    pub fn load(cfg: &Config, fail_mode: FailMode, rules: &[CaptureRule]) -> Result<Self, Error> {
        ensure_bpffs(&cfg.bpffs_dir)?;
        let bpf = EbpfLoader::new().load(OBJECT)?;
        let mut cap = Capture {
            bpf,
            links: Vec::new(),
            dir: cfg.bpffs_dir.clone(),
            authz: Vec::new(),
            authz_ids: std::collections::HashMap::new(),
            authz_names: std::collections::HashMap::new(),
            interfaces: cfg.interfaces.clone(),
        };
        cap.set_settings(fail_mode, cfg.mark)?;
        cap.sync_rules(rules)?;
        cap.pin_counters()?;
        let prog: &mut SchedClassifier = cap
            .bpf
            .program_mut(PROGRAM)
            .ok_or_else(|| Error::Bpffs(format!("program {PROGRAM} missing from the object")))?
            .try_into()?;
        prog.load()?;
        for iface in &cfg.interfaces {
            let pin = cap.dir.join(format!("capture-{iface}"));
            let link = attach(prog, iface, &pin)?;
            cap.links.push((iface.clone(), pin, Some(link)));
            info!(iface, mode = "tcx", "capture attached at TC ingress");
        }
        Ok(cap)
    }

    /// What `/status` shows: attached interfaces and modes, map fill levels, listeners.
    pub fn status(&self) -> serde_json::Value {
        let v4 = self
            .bpf
            .map(redirect::MAP_CAPTURE_V4)
            .and_then(|m| LpmTrie::<_, AddrV4, PortSet>::try_from(m).ok())
            .map_or(0, |t| t.keys().count());
        let v6 = self
            .bpf
            .map(redirect::MAP_CAPTURE_V6)
            .and_then(|m| LpmTrie::<_, AddrV6, PortSet>::try_from(m).ok())
            .map_or(0, |t| t.keys().count());
        let listeners = self
            .bpf
            .map(redirect::MAP_LISTENERS)
            .and_then(|m| SockMap::try_from(m).ok())
            .map_or(0, |m: SockMap<&MapData>| {
                m.indices().filter(|i| i.is_ok()).count()
            });
        serde_json::json!({
            "authorization": {
                "program": authz::PROGRAM,
                "hook": "xdp",
                "interfaces": self.authz.iter().map(|a| serde_json::json!({"name": a.iface, "mode": a.mode.as_str(), "pin": a.pin})).collect::<Vec<_>>(),
                "rules": self.authz_names.len(),
            },
            "capture": {
                "program": PROGRAM,
                "hook": "tc ingress",
                "mode": "tcx",
                "interfaces": self.links.iter().map(|(i, p, _)| serde_json::json!({"name": i, "pin": p})).collect::<Vec<_>>(),
            },
            "maps": {
                redirect::MAP_CAPTURE_V4: {"entries": v4, "max": redirect::MAX_PREFIXES},
                redirect::MAP_CAPTURE_V6: {"entries": v6, "max": redirect::MAX_PREFIXES},
                redirect::MAP_LISTENERS: {"entries": listeners, "max": redirect::MAX_LISTENERS},
            },
        })
    }

    /// Writes the fail mode and packet mark the program applies.
    pub fn set_settings(&mut self, fail_mode: FailMode, mark: u32) -> Result<(), Error> {
        let settings = Settings {
            fail_mode: match fail_mode {
                FailMode::Open => redirect::FAIL_OPEN,
                FailMode::Closed => redirect::FAIL_CLOSED,
            },
            mark,
        };
        let mut arr: Array<_, Settings> = Array::try_from(
            self.bpf
                .map_mut(redirect::MAP_SETTINGS)
                .ok_or(Error::MissingMap(redirect::MAP_SETTINGS))?,
        )
        .map_err(map_err(redirect::MAP_SETTINGS))?;
        arr.set(0, settings, 0)
            .map_err(map_err(redirect::MAP_SETTINGS))
    }

    /// Makes the kernel capture maps hold exactly `rules` (ports of equal prefixes merged).
    pub fn sync_rules(&mut self, rules: &[CaptureRule]) -> Result<(), Error> {
        let mut v4: BTreeMap<(u32, [u8; 4]), PortSet> = BTreeMap::new();
        let mut v6: BTreeMap<(u32, [u8; 16]), PortSet> = BTreeMap::new();
        let mut merged: BTreeMap<Prefix, Vec<(u16, u16)>> = BTreeMap::new();
        for r in rules {
            merged.entry(r.prefix).or_default().extend(&r.ports);
        }
        for (prefix, ports) in merged {
            let set = port_set(&ports).map_err(|reason| Error::Rule { prefix, reason })?;
            match prefix.addr {
                IpAddr::V4(a) => v4.insert((prefix.len as u32, a.octets()), set),
                IpAddr::V6(a) => v6.insert((prefix.len as u32, a.octets()), set),
            };
        }
        {
            let mut trie: LpmTrie<_, AddrV4, PortSet> = LpmTrie::try_from(
                self.bpf
                    .map_mut(redirect::MAP_CAPTURE_V4)
                    .ok_or(Error::MissingMap(redirect::MAP_CAPTURE_V4))?,
            )
            .map_err(map_err(redirect::MAP_CAPTURE_V4))?;
            let old: Vec<_> = trie.keys().filter_map(Result::ok).collect();
            for (&(len, addr), set) in &v4 {
                trie.insert(&Key::new(len, AddrV4 { addr_be: addr }), set, 0)
                    .map_err(map_err(redirect::MAP_CAPTURE_V4))?;
            }
            for k in old {
                if !v4.contains_key(&(k.prefix_len(), k.data().addr_be)) {
                    trie.remove(&k).map_err(map_err(redirect::MAP_CAPTURE_V4))?;
                }
            }
        }
        let mut trie: LpmTrie<_, AddrV6, PortSet> = LpmTrie::try_from(
            self.bpf
                .map_mut(redirect::MAP_CAPTURE_V6)
                .ok_or(Error::MissingMap(redirect::MAP_CAPTURE_V6))?,
        )
        .map_err(map_err(redirect::MAP_CAPTURE_V6))?;
        let old: Vec<_> = trie.keys().filter_map(Result::ok).collect();
        for (&(len, addr), set) in &v6 {
            trie.insert(&Key::new(len, AddrV6 { addr_be: addr }), set, 0)
                .map_err(map_err(redirect::MAP_CAPTURE_V6))?;
        }
        for k in old {
            if !v6.contains_key(&(k.prefix_len(), k.data().addr_be)) {
                trie.remove(&k).map_err(map_err(redirect::MAP_CAPTURE_V6))?;
            }
        }
        Ok(())
    }

    /// Puts the agent's listeners in the SockMap the program assigns SYNs to.
    pub fn set_listeners(
        &mut self,
        v4: &impl AsRawFd,
        v6: Option<&impl AsRawFd>,
    ) -> Result<(), Error> {
        let mut map: SockMap<_> = SockMap::try_from(
            self.bpf
                .map_mut(redirect::MAP_LISTENERS)
                .ok_or(Error::MissingMap(redirect::MAP_LISTENERS))?,
        )
        .map_err(map_err(redirect::MAP_LISTENERS))?;
        map.set(redirect::LISTENER_V4, v4, 0)
            .map_err(map_err(redirect::MAP_LISTENERS))?;
        if let Some(v6) = v6 {
            map.set(redirect::LISTENER_V6, v6, 0)
                .map_err(map_err(redirect::MAP_LISTENERS))?;
        }
        Ok(())
    }

    /// Removes the listeners from the SockMap: new connections follow the fail mode.
    pub fn clear_listeners(&mut self) {
        if let Some(m) = self.bpf.map_mut(redirect::MAP_LISTENERS)
            && let Ok(mut map) = SockMap::try_from(m)
        {
            for slot in [redirect::LISTENER_V4, redirect::LISTENER_V6] {
                let _ = map.clear_index(&slot);
            }
        }
    }

    /// Current counter values, summed over CPUs.
    pub fn counters(&self) -> Result<[u64; counters::MAX_ENTRIES as usize], Error> {
        let map = self
            .bpf
            .map(counters::MAP_NAME)
            .ok_or(Error::MissingMap(counters::MAP_NAME))?;
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(map_err(counters::MAP_NAME))?;
        sum_counters(&arr)
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

    /// Writes the authorization rules (an atomic generation swap in the kernel) and attaches the
    /// XDP program to the capture interfaces the first time there is something to enforce.
    pub fn apply_authz(&mut self, a: &mesh_policy::Authorization) -> Result<(), Error> {
        let mut rules = Vec::with_capacity(a.rules.len());
        for r in &a.rules {
            let next = self.authz_ids.len() as u32 + 1;
            let id = *self.authz_ids.entry(r.key.clone()).or_insert(next);
            let action = match r.action {
                mesh_policy::AuthzAction::Allow => authz::Action::Allow,
                mesh_policy::AuthzAction::Deny => authz::Action::Deny,
            };
            self.authz_names.insert(
                id,
                (
                    r.rule.clone(),
                    if action == authz::Action::Allow {
                        "allow"
                    } else {
                        "deny"
                    },
                ),
            );
            rules.push(authz::Rule {
                id,
                name: r.key.clone(),
                interfaces: r.interfaces.clone(),
                src: r.src,
                dst: r.dst,
                ports: r.ports,
                protocol: match r.protocol {
                    None => authz::Protocol::Any,
                    Some(mesh_policy::AuthzProtocol::Tcp) => authz::Protocol::Tcp,
                    Some(mesh_policy::AuthzProtocol::Udp) => authz::Protocol::Udp,
                },
                action,
            });
        }
        let defaults = a
            .defaults
            .iter()
            .map(|(i, act)| {
                let act = match act {
                    mesh_policy::AuthzAction::Allow => authz::Action::Allow,
                    mesh_policy::AuthzAction::Deny => authz::Action::Deny,
                };
                (i.clone(), act)
            })
            .collect();
        let set = authz::RuleSet { rules, defaults };
        set.validate().map_err(authz::Error::Invalid)?;
        authz::apply(&mut self.bpf, &set)?;
        if self.authz.is_empty() && !(set.rules.is_empty() && set.defaults.is_empty()) {
            let interfaces = self.interfaces.clone();
            self.authz = authz::attach(&mut self.bpf, &interfaces, &self.dir)?;
        }
        Ok(())
    }

    /// Per-rule XDP counters, by rule name and action.
    pub fn authz_counts(&self) -> Vec<AuthzCount> {
        let Ok(stats) = authz::stats(&self.bpf) else {
            return Vec::new();
        };
        let mut by_rule: BTreeMap<(String, &'static str), (u64, u64)> = BTreeMap::new();
        for (id, c) in &stats.rules {
            if let Some((rule, action)) = self.authz_names.get(id) {
                let e = by_rule.entry((rule.clone(), action)).or_default();
                e.0 += c.packets;
                e.1 += c.bytes;
            }
        }
        by_rule
            .into_iter()
            .map(|((rule, action), (packets, bytes))| AuthzCount {
                rule,
                action,
                packets,
                bytes,
            })
            .collect()
    }

    /// Unpins and detaches every link; the interfaces are left as they were before the agent.
    pub fn detach(&mut self) {
        if !self.authz.is_empty()
            && let Err(e) = authz::detach(std::mem::take(&mut self.authz))
        {
            warn!(error = %e, "detaching XDP authorization");
        }
        for (iface, path, link) in self.links.drain(..) {
            if let Some(link) = link {
                match link.unpin() {
                    Ok(fd) => drop(fd),
                    Err(e) => warn!(iface, error = %e, "unpinning capture link"),
                }
            }
            let _ = std::fs::remove_file(&path);
            info!(iface, "capture detached");
        }
        let _ = std::fs::remove_file(self.dir.join(COUNTERS_PIN));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Attaches `prog` to `iface` at TC ingress, atomically replacing a link a previous agent pinned
/// at `pin`, and pins the new link there.
fn attach(prog: &mut SchedClassifier, iface: &str, pin: &Path) -> Result<PinnedLink, Error> {
    let attach_err = |reason: String| Error::Attach {
        iface: iface.to_string(),
        reason,
    };
    let replaced = match PinnedLink::from_pin(pin) {
        Ok(old) => {
            let old: Result<SchedClassifierLink, _> = FdLink::from(old).try_into();
            match old
                .map_err(|e| e.to_string())
                .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()))
            {
                Ok(id) => {
                    info!(
                        iface,
                        "replaced the capture program of a previous agent in place"
                    );
                    Some(id)
                }
                Err(e) => {
                    warn!(iface, error = %e, "stale pinned link could not be reused; attaching anew");
                    None
                }
            }
        }
        Err(_) => None,
    };
    let _ = std::fs::remove_file(pin);
    let id = match replaced {
        Some(id) => id,
        None => prog.attach(iface, TcAttachType::Ingress).map_err(|e| {
            attach_err(format!(
                "{e} (does the interface exist in this network namespace?)"
            ))
        })?,
    };
    let link = prog.take_link(id)?;
    let fd: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| attach_err(e.to_string()))?;
    fd.pin(pin).map_err(|e| Error::Pin {
        path: pin.to_path_buf(),
        reason: e.to_string(),
    })
}

fn port_set(ports: &[(u16, u16)]) -> Result<PortSet, String> {
    let mut sorted: Vec<(u16, u16)> = ports.to_vec();
    sorted.sort_unstable();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (a, b) in sorted {
        match merged.last_mut() {
            Some(last) if a as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    if merged.is_empty() {
        return Err("no ports".into());
    }
    if merged.len() > redirect::MAX_PORT_RANGES {
        return Err(format!(
            "{} separate port ranges; at most {} fit",
            merged.len(),
            redirect::MAX_PORT_RANGES
        ));
    }
    let mut set = PortSet {
        count: merged.len() as u32,
        ..Default::default()
    };
    for (slot, (a, b)) in set.ranges.iter_mut().zip(merged) {
        *slot = PortRange { first: a, last: b };
    }
    Ok(set)
}

fn sum_counters<T: std::borrow::Borrow<MapData>>(
    arr: &PerCpuArray<T, u64>,
) -> Result<[u64; counters::MAX_ENTRIES as usize], Error> {
    let mut out = [0u64; counters::MAX_ENTRIES as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        let v = arr
            .get(&(i as u32), 0)
            .map_err(map_err(counters::MAP_NAME))?;
        *slot = v.iter().sum();
    }
    Ok(out)
}

/// Reads the counters pinned in `dir` by a running (or killed) agent.
pub fn pinned_counters(dir: &Path) -> Result<[u64; counters::MAX_ENTRIES as usize], Error> {
    let path = dir.join(COUNTERS_PIN);
    let data = MapData::from_pin(&path).map_err(map_err(counters::MAP_NAME))?;
    let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(map_err(counters::MAP_NAME))?;
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

    #[test]
    fn port_ranges_merge_and_sort() {
        let s = port_set(&[(443, 443), (80, 80), (81, 90), (85, 100)]).expect("fits");
        assert_eq!(s.count, 2);
        assert_eq!(
            s.ranges[0],
            PortRange {
                first: 80,
                last: 100
            }
        );
        assert_eq!(
            s.ranges[1],
            PortRange {
                first: 443,
                last: 443
            }
        );
        assert!(s.contains(95) && s.contains(443) && !s.contains(101));
    }

    #[test]
    fn too_many_ranges_is_an_error() {
        let many: Vec<_> = (1..=40u16).map(|p| (p * 10, p * 10)).collect();
        assert!(port_set(&many).is_err());
    }
}
