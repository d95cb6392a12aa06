//! Reference platforms built from keelson crates.
