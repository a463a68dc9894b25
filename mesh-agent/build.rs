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
    hot_text_first()?;
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
    // Read whole before writing: without a shared folder both are the same file.
    let object = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
    std::fs::write(&to, without_dwarf(&object)?)
        .with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}

/// The eBPF object without its DWARF sections (and their relocations). The programs are built
/// with debug info because bpf-linker derives the BTF from it, but once `.BTF` and `.BTF.ext`
/// exist nothing reads the DWARF: it was 650 of the object's 836 KB, embedded in the agent and
/// read at every start.
fn without_dwarf(object: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut elf = object::build::elf::Builder::read(object).context("parsing the eBPF object")?;
    for section in elf.sections.iter_mut() {
        let name = section.name.as_slice();
        if name.starts_with(b".debug") || name.starts_with(b".rel.debug") {
            section.delete = true;
        }
    }
    elf.delete_orphans();
    // LLVM keeps section names in `.strtab` with the symbol names; the writer wants a
    // section-name table of its own.
    let names = elf.sections.add();
    names.name = b".shstrtab"[..].into();
    names.sh_type = object::elf::SHT_STRTAB;
    names.sh_addralign = 1;
    names.data = object::build::elf::SectionData::SectionString;
    let mut out = Vec::new();
    elf.write(&mut out).context("writing the eBPF object")?;
    Ok(out)
}

/// `<target>/ebpf` for OUT_DIR `<target>/<profile>/build/mesh-agent-<hash>/out` (also with a
/// `--target` triple folder in between); OUT_DIR itself if its shape is not that.
fn shared_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|p| p.join("CACHEDIR.TAG").exists())
        .map_or_else(|| out_dir.to_path_buf(), |target| target.join("ebpf"))
}

/// Release builds of the agent link the functions listed in `hot-text.order` (those that run at
/// start-up and on the data path, written by `cargo xtask layout`) first in `.text`, in that
/// order. The kernel maps code in 64 KiB windows around each page that runs; together, the
/// functions an idle agent runs fill a few windows instead of keeping most of the text mapped.
/// Names the binary no longer has are skipped. Only on x86_64 Linux, where rustc links with lld.
fn hot_text_first() -> anyhow::Result<()> {
    let order = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("hot-text.order");
    println!("cargo:rerun-if-changed={}", order.display());
    let target = std::env::var("TARGET")?;
    if std::env::var("PROFILE")? == "release" && target == "x86_64-unknown-linux-gnu" {
        let order = order.to_str().context("non-UTF-8 path")?;
        println!("cargo:rustc-link-arg-bin=mesh-agent=-Wl,--symbol-ordering-file={order}");
        println!("cargo:rustc-link-arg-bin=mesh-agent=-Wl,--no-warn-symbol-ordering");
        if glibc_has_relr() {
            // Relative relocations packed (DT_RELR, glibc 2.36+): the dynamic loader reads
            // about 10 KB at start instead of 620 KB of `.rela.dyn` entries.
            println!("cargo:rustc-link-arg-bin=mesh-agent=-Wl,-z,pack-relative-relocs");
        }
    }
    Ok(())
}

/// Whether this machine's glibc loads packed relative relocations (2.36 and later): a binary
/// that has them does not start on an older one.
fn glibc_has_relr() -> bool {
    let Ok(out) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    // "glibc 2.36"
    let text = String::from_utf8_lossy(&out.stdout);
    let mut numbers = text
        .trim()
        .trim_start_matches("glibc ")
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (2, 36)
}
