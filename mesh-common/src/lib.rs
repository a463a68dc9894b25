//! Types shared by the eBPF programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! One module per map family. Every map type is `#[repr(C)]`, has no implicit padding (checked at
//! compile time) and no `bool`, enum or `Option`, so the kernel and userspace agree on its bytes.
//! Fields that hold network-order values end in `_be`.
#![no_std]

pub mod authz;
pub mod counters;
pub mod mtls;
pub mod redirect;
