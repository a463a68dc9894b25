//! What the running kernel offers, probed before anything is loaded: a kernel that lacks a
//! feature the programs need is refused with one line naming the feature and the first Linux
//! version that has it, instead of a verifier dump later. Optional features choose a path:
//! without TCX (6.6) the capture program is attached through a netlink `clsact` filter.
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::Serialize;

/// A feature and the first Linux release that has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub since: &'static str,
}

/// Every feature the programs cannot do without.
pub const REQUIRED: &[Feature] = &[
    Feature {
        name: "XDP programs",
        since: "4.8",
    },
    Feature {
        name: "TC classifier programs",
        since: "4.1",
    },
    Feature {
        name: "LPM trie maps",
        since: "4.11",
    },
    Feature {
        name: "SockMap maps",
        since: "4.14",
    },
    Feature {
        name: "LRU per-CPU hash maps",
        since: "4.10",
    },
    Feature {
        name: "bpf_skc_lookup_tcp at TC",
        since: "5.2",
    },
    Feature {
        name: "bpf_sk_assign at TC",
        since: "5.7",
    },
    Feature {
        name: "bpf_xdp_load_bytes in XDP",
        since: "5.18",
    },
    Feature {
        name: "sk_lookup programs",
        since: "5.9",
    },
];

/// The probe results.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Kernel {
    /// `uname -r`.
    pub release: String,
    /// TCX links (6.6): capture attaches as a pinned link; otherwise as a netlink clsact filter.
    pub tcx: bool,
    /// `/sys/kernel/btf/vmlinux` exists (not needed by the programs; shown in `/status`).
    pub btf: bool,
    /// Required features this kernel lacks (empty on a usable kernel).
    #[serde(skip)]
    pub missing: Vec<Feature>,
}

impl Kernel {
    /// Probes the running kernel.
    pub fn probe() -> Kernel {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        // A probe that fails before it can tell counts as missing: the load would fail too.
        let program = |t| is_program_supported(t).unwrap_or(false);
        let map = |t| is_map_supported(t).unwrap_or(false);
        let helper = |t, h| is_helper_supported(t, h).unwrap_or(false);
        let found = [
            program(ProgramType::Xdp),
            program(ProgramType::SchedClassifier),
            map(MapType::LpmTrie),
            map(MapType::SockMap),
            map(MapType::LruPerCpuHash),
            helper(
                ProgramType::SchedClassifier,
                BpfHelper::BPF_FUNC_skc_lookup_tcp,
            ),
            helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_sk_assign),
            helper(ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_load_bytes),
            program(ProgramType::SkLookup),
        ];
        Kernel {
            release,
            tcx: aya::util::KernelVersion::current()
                .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0)),
            btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            missing: missing(&found),
        }
    }

    /// `Err` with one line naming the first missing feature, the kernel, and the Linux release
    /// that has the feature.
    pub fn require(&self) -> Result<(), String> {
        match self.missing.first() {
            None => Ok(()),
            Some(f) => Err(format!(
                "kernel {} lacks {} (Linux {} or newer has it){}",
                self.release,
                f.name,
                f.since,
                if self.missing.len() > 1 {
                    format!(
                        "; also missing: {}",
                        self.missing[1..]
                            .iter()
                            .map(|f| f.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    String::new()
                }
            )),
        }
    }
}

/// The required features whose probe (same order as [`REQUIRED`]) failed.
fn missing(found: &[bool]) -> Vec<Feature> {
    REQUIRED
        .iter()
        .zip(found)
        .filter(|(_, ok)| !**ok)
        .map(|(f, _)| *f)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_is_named_with_its_release() {
        let mut found = [true; 9];
        found[6] = false;
        let k = Kernel {
            release: "5.4.0".into(),
            tcx: false,
            btf: true,
            missing: missing(&found),
        };
        assert_eq!(
            k.require(),
            Err("kernel 5.4.0 lacks bpf_sk_assign at TC (Linux 5.7 or newer has it)".into())
        );
        found[7] = false;
        let k = Kernel {
            missing: missing(&found),
            ..k
        };
        assert!(
            k.require()
                .is_err_and(|e| e.ends_with("; also missing: bpf_xdp_load_bytes in XDP")),
            "{:?}",
            k.require()
        );
    }

    /// The kernel these tests run on has everything (CI runs on 6.x).
    #[test]
    fn this_kernel_has_every_required_feature() {
        let k = Kernel::probe();
        assert_eq!(k.require(), Ok(()), "{k:?}");
    }
}
