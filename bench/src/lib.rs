//! Benchmark crate: see `benches/`.
