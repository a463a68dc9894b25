//! The per-node agent as a library: `main.rs` is its command line, and the privileged
//! integration tests link the same modules (the eBPF writers in particular) instead of
//! compiling copies of them.
pub mod admin;
pub mod app;
pub mod config;
pub mod ebpf;
pub mod handover;
pub mod k8s;
pub mod memory;
pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod routing;
pub mod tunnel;
pub mod watch;
pub mod workers;
