//! The distribution-spec harness against keelson's server (every check passes) and
//! against Debian's docker-registry, whose gaps must be exactly those documented in
//! `tests/data/distribution-2.8-gaps.txt` (and ARCHITECTURE.md's conformance table).

mod common;

use keelson_registry::client::{Client, ClientConfig};
use keelson_registry::conformance::spec;
use keelson_registry::server::ServerConfig;
use keelson_registry::{Registry, RegistryConfig};

fn failures(checks: &[spec::Check]) -> Vec<String> {
    checks.iter().filter_map(|c| c.outcome.as_ref().err().map(|e| format!("{}: {e}", c.name))).collect()
}

#[tokio::test]
async fn keelson_passes_every_check_of_the_spec_harness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::serve(Registry::open_dir(dir.path(), RegistryConfig::default()).expect("open"), ServerConfig::default()).await;
    let client = Client::new(&server.url(), None, ClientConfig::default()).expect("client");
    let checks = spec::run(&client, "conformance").await;
    assert!(checks.len() >= 35, "only {} checks ran", checks.len());
    let failed = failures(&checks);
    assert!(failed.is_empty(), "keelson fails:\n{}", failed.join("\n"));
    let fsck = server.registry.fsck().await.expect("fsck");
    assert!(fsck.is_clean(), "{fsck:?}");
}

#[tokio::test]
async fn debian_docker_registry_gaps_are_the_documented_ones() {
    let peer = keelson_testkit::distribution::Distribution::start().expect("docker-registry");
    let client = Client::new(&peer.url(), None, ClientConfig::default()).expect("client");
    let checks = spec::run(&client, "conformance").await;
    let mut gaps: Vec<&str> = checks.iter().filter(|c| c.outcome.is_err()).map(|c| c.name).collect();
    gaps.sort();
    let documented = include_str!("data/distribution-2.8-gaps.txt");
    let mut expected: Vec<&str> = documented.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    expected.sort();
    assert_eq!(gaps, expected, "docker-registry's failures changed:\n{}", failures(&checks).join("\n"));
}
