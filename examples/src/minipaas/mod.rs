//! `minipaas`: a small Heroku over keelson's crates.
//!
//! - [`demo`]: the whole platform on embedded defaults, no servers (`minipaas demo`).
//! - [`manifest`]: an app's `minipaas.toml` (its services: image or Dockerfile,
//!   replicas, resources, env, domains, health check, volumes, strategy and gates),
//!   parsed strictly, and turned into scheduler group specs.
//! - [`apps`]: apps, their config and their secrets in the cluster's `KeyValue`.
//! - [`releases`]: deploys, config changes and rollbacks as versions of the apps'
//!   scheduler groups, and the timeline read back from them.

pub mod apps;
mod demo;
pub mod manifest;
pub mod releases;

pub use demo::{Demo, DemoConfig, DemoError, HOST, SERVICE};
