//! Idempotent machine setup. Each step checks first and does nothing when already satisfied.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{exec, output};

/// bpf-linker version known to work with aya 0.14 and rustc's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz version of `cargo xtask fuzz`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Commands the tests, demo and benchmarks use, and the Debian package of each.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("nft", "nftables"),
    // The kube-proxy tests install kube-proxy's rules in both iptables flavours.
    ("iptables-legacy", "iptables"),
    ("iptables-nft", "iptables"),
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("socat", "socat"),
    ("iperf3", "iperf3"),
    ("bpftool", "bpftool"),
    // The mTLS tests read what crosses the underlay between two nodes.
    ("tcpdump", "tcpdump"),
    ("h2load", "nghttp2-client"),
    // `cargo xtask bench`: the peers the agent is measured against, and HTTP/1.1 load.
    ("haproxy", "haproxy"),
    ("nginx", "nginx"),
    ("wrk", "wrk"),
    ("nghttp", "nghttp2-client"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // `cargo xtask kernels`: boots Debian kernels under qemu, unpacks their modules.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("modprobe", "kmod"),
    ("depmod", "kmod"),
    ("xz", "xz-utils"),
    // The agent's allocator (jemalloc, built from source by tikv-jemalloc-sys).
    ("make", "make"),
];

/// Packages checked by name rather than by a command: `busybox` alone may be the dynamically
/// linked build, and the kernels' initramfs needs the static one.
const PACKAGES_BY_NAME: &[&str] = &["busybox-static"];

/// Python modules the tests import (with Debian's /usr/bin/python3), and their packages.
/// `ensurepip` (python3-venv) creates the virtualenv of the manifest checks.
const PYTHON_MODULES: &[(&str, &str)] =
    &[("grpc", "python3-grpcio"), ("ensurepip", "python3-venv")];

/// PyPI packages of the manifest checks (`cargo xtask manifests`), pinned, in a virtualenv of
/// Debian's /usr/bin/python3 (not whichever `python3` comes first on PATH, and not the system
/// site-packages, which Debian does not let pip change).
const PIP_PACKAGES: &[&str] = &["kubernetes-validate==1.37.0", "jsonschema==4.26.0"];

pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    packages()?;
    python_venv()?;
    Ok(())
}

/// The virtualenv the manifest checks run in.
fn venv() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/mesh-python")
}

/// The Python of that virtualenv.
pub fn python() -> PathBuf {
    venv().join("bin/python")
}

/// Creates the virtualenv and installs [`PIP_PACKAGES`] unless `pip freeze` already lists them.
fn python_venv() -> anyhow::Result<()> {
    let python = python();
    let python = python.to_string_lossy();
    let frozen = output(&python, &["-m", "pip", "freeze"]).unwrap_or_default();
    if PIP_PACKAGES
        .iter()
        .all(|p| frozen.lines().any(|l| l.eq_ignore_ascii_case(p)))
    {
        return Ok(());
    }
    eprintln!(
        "setup: installing {} in {}",
        PIP_PACKAGES.join(" "),
        venv().display()
    );
    exec(
        Command::new("/usr/bin/python3")
            .arg("-m")
            .arg("venv")
            .arg(venv()),
    )?;
    exec(
        Command::new(python.as_ref())
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PIP_PACKAGES),
    )?;
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup is required")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain");
        exec(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// bpf-linker must link with the LLVM that nightly rustc uses: point LLVM_PREFIX at a folder of
/// symlinks to the nightly sysroot's libLLVM and build it with the matching `llvm-NN` feature.
fn bpf_linker() -> anyhow::Result<()> {
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"]).context("nightly rustc")?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .with_context(|| format!("cannot read the LLVM version from {llvm}"))?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = PathBuf::from(home).join(".cache/mesh-llvm");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    );
    exec(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    Ok(())
}

/// cargo-fuzz for `cargo xtask fuzz` (the fuzz targets build with the nightly toolchain that
/// `rust_src` installs).
fn cargo_fuzz() -> anyhow::Result<()> {
    if output("cargo", &["fuzz", "--version"]).is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    exec(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
}

fn packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(bin, _)| output("sh", &["-c", &format!("command -v {bin}")]).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.extend(
        PYTHON_MODULES
            .iter()
            .filter(|(module, _)| {
                output("/usr/bin/python3", &["-c", &format!("import {module}")]).is_none()
            })
            .map(|(_, pkg)| *pkg),
    );
    missing.extend(PACKAGES_BY_NAME.iter().filter(|pkg| {
        output("dpkg-query", &["-W", "-f=${Status}", pkg])
            .is_none_or(|s| !s.contains("install ok installed"))
    }));
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if output("id", &["-u"]).is_none_or(|u| u.trim() != "0") {
        bail!("missing packages {missing:?}; run as root so setup can install them");
    }
    eprintln!("setup: installing {}", missing.join(" "));
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}
