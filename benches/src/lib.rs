//! Benchmarks of keelson backends and peers.
