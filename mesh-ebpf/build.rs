//! Rebuild the eBPF object when bpf-linker changes (a new LLVM means new codegen).
use which::which;

fn main() {
    if let Ok(path) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
