//! Builds `mesh-ebpf` for bpfel-unknown-none (nightly + bpf-linker, see `cargo xtask setup`) and
//! leaves the object in OUT_DIR, where `ebpf::OBJECT` embeds it: the agent ships as one binary.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .ok_or_else(|| anyhow!("mesh-agent has no parent folder"))?
        .join("mesh-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building mesh-ebpf (run `cargo xtask setup` if nightly, rust-src or bpf-linker is missing)")
}
