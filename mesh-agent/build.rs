//! Builds `mesh-ebpf` for bpfel-unknown-none (nightly + bpf-linker, see `cargo xtask setup`) and
//! leaves the object in OUT_DIR, where `ebpf::OBJECT` embeds it: the agent ships as one binary.
//!
//! `aya_build` builds in a cargo target folder under OUT_DIR, and OUT_DIR differs between
//! `cargo clippy`, `cargo build` and `cargo test`: each built `core` (build-std) and the program
//! again, about a minute apiece, three times per CI run. Here it builds in one folder per
//! workspace target folder (`<target>/ebpf`), so the second and third builds find everything
//! fresh, and the object is copied to this OUT_DIR.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .ok_or_else(|| anyhow!("mesh-agent has no parent folder"))?
        .join("mesh-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let shared = shared_dir(&out_dir);
    std::fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    // SAFETY: a build script is single-threaded here; nothing else reads the environment.
    unsafe { std::env::set_var("OUT_DIR", &shared) };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building mesh-ebpf (run `cargo xtask setup` if nightly, rust-src or bpf-linker is missing)")?;
    // SAFETY: as above.
    unsafe { std::env::set_var("OUT_DIR", &out_dir) };
    let (from, to) = (shared.join("mesh-ebpf"), out_dir.join("mesh-ebpf"));
    // Without a shared folder the object is already in place: copying a file onto itself
    // would truncate it to nothing.
    if from != to {
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// `<target>/ebpf` for OUT_DIR `<target>/<profile>/build/mesh-agent-<hash>/out` (also with a
/// `--target` triple folder in between); OUT_DIR itself if its shape is not that.
fn shared_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|p| p.join("CACHEDIR.TAG").exists())
        .map_or_else(|| out_dir.to_path_buf(), |target| target.join("ebpf"))
}
