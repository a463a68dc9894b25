//! Marker library so that `mesh-agent`'s build script can depend on this package; the programs
//! themselves are the `mesh-ebpf` binary (built for `bpfel-unknown-none` by aya-build).
#![no_std]
