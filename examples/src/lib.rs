//! Reference platforms built from keelson crates: small, real programs a platform team
//! can start from.
//!
//! - `minipaas demo`: three replicas of [`hello`] deployed through a cluster store in
//!   memory, placed by the controller, run and health-checked by a node agent on the
//!   process driver, registered in in-memory discovery, served by the router on
//!   `127.0.0.1:8080` as `hello.localhost`, their output shipped to JSON-lines files.
//!   No server, no Docker, no protoc.
//! - `hello`: the tiny HTTP service the demo runs.
//!
//! The pieces are library functions, so the wiring can be read and reused:
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = keelson_examples::minipaas::DemoConfig::default();
//! let demo = keelson_examples::minipaas::Demo::start(config).await?;
//! println!("serving on {}", demo.listen_addr());
//! demo.shutdown().await?;
//! # Ok(())
//! # }
//! ```

/// The workspace README's Rust code, compiled as a doctest so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExamples;

pub mod backends;
pub mod ctl;
pub mod daemon;
#[cfg(feature = "docker")]
pub mod git_build;
pub mod hello;
#[cfg(feature = "etcd")]
pub mod localcloud;
pub mod logd;
pub mod logs_client;
pub mod metrics_http;
pub mod minipaas;
#[cfg(feature = "docker")]
pub mod pipeline;
pub mod pipeline_runs;
pub mod supervise;
#[cfg(feature = "docker")]
pub mod testgrid;

/// Logs of the interactive tools (`minipaas demo`): `tracing` events on stderr, filtered
/// by `RUST_LOG` (default `info`). Daemons use [`daemon::init_logging`].
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}
