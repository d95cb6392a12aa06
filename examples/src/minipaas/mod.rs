//! `minipaas`: a small Heroku over keelson's crates.
//!
//! - [`demo`]: the whole platform on embedded defaults, no servers (`minipaas demo`).
//! - [`manifest`]: an app's `minipaas.toml` (its services: image or Dockerfile,
//!   replicas, resources, env, domains, health check, volumes, strategy and gates),
//!   parsed strictly, and turned into scheduler group specs.
//! - [`apps`]: apps, their config and their secrets in the cluster's `KeyValue`.
//! - [`releases`]: deploys, config changes and rollbacks as versions of the apps'
//!   scheduler groups, and the timeline read back from them.
//! - [`platform`]: every operation of the platform (info, deploy, config, scale, ps,
//!   runs, domains) over any `KeyValue`; [`api`] serves it over HTTP with
//!   [`dashboard`]'s pages, [`client`] is the CLI's side, [`git`] the push deploys.

pub mod api;
pub mod apps;
pub mod client;
pub mod dashboard;
mod demo;
pub mod git;
pub mod manifest;
pub mod platform;
pub mod releases;
#[cfg(all(feature = "etcd", feature = "docker"))]
pub mod up;

pub use demo::{Demo, DemoConfig, DemoError, HOST, SERVICE};
