//! Consul API samples (`testkit/fixtures/consul`, in the format of Consul's docs) parse,
//! convert to keelson's types with Consul's rules, and bad input is a typed error.
#![cfg(feature = "consul")]

use std::time::Duration;

use keelson_discovery::consul_api::{
    parse, AgentService, CatalogServices, HealthServiceEntry, KvPair, ServiceRegistration, SessionCreated,
};
use keelson_discovery::{Error, Health, Registration, ServiceName};

fn fixture(name: &str) -> Vec<u8> {
    let path = keelson_testkit::consul::fixture(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()))
}

#[test]
fn health_service_sample_becomes_an_instance() {
    let entries: Vec<HealthServiceEntry> = parse("health/service", &fixture("health_service.json")).expect("parses verbatim");
    let i = entries[0].to_instance().expect("instance");
    assert_eq!((i.service.as_str(), i.id.as_str(), i.address.as_str(), i.port), ("redis", "redis", "10.1.10.12", 8000));
    assert_eq!(i.tags, vec!["primary"]);
    assert_eq!(i.meta.get("redis_version").map(String::as_str), Some("4.0"));
    assert_eq!(i.health, Health::Passing, "both checks passing");

    let mut critical = entries[0].clone();
    critical.checks[1].status = "critical".into();
    assert_eq!(critical.to_instance().expect("instance").health, Health::Critical, "a failing node check fails the instance");
    let mut warn = entries[0].clone();
    warn.checks[0].status = "warning".into();
    assert_eq!(warn.to_instance().expect("instance").health, Health::Warning);
    let mut no_address = entries[0].clone();
    no_address.service.address.clear();
    no_address.node.address = "10.9.9.9".into();
    assert_eq!(no_address.to_instance().expect("instance").address, "10.9.9.9", "falls back to the node address");
}

#[test]
fn other_samples_parse() {
    let services: CatalogServices = parse("catalog/services", &fixture("catalog_services.json")).expect("catalog");
    assert_eq!(services.get("postgresql").map(Vec::len), Some(2));
    assert_eq!(services.get("consul").map(Vec::len), Some(0));
    let kv: Vec<KvPair> = parse("kv", &fixture("kv_get.json")).expect("kv");
    assert_eq!((kv[0].key.as_str(), kv[0].modify_index, kv[0].value_bytes().expect("base64")), ("zip", 200, b"test".to_vec()));
    assert_eq!(kv[0].session.as_deref(), Some("9b2f0c4e-1d7a-4c3e-8f5b-6a0e2d9c7b14"));
    let session: SessionCreated = parse("session/create", &fixture("session_create.json")).expect("session");
    assert_eq!(session.id, "9b2f0c4e-1d7a-4c3e-8f5b-6a0e2d9c7b14");
    let agent: std::collections::BTreeMap<String, AgentService> =
        parse("agent/services", &fixture("agent_services.json")).expect("agent services");
    let redis = agent.get("redis").expect("redis registered");
    assert_eq!((redis.service.as_str(), redis.port), ("redis", 8000));
}

#[test]
fn registration_payload_has_a_ttl_check_within_consul_limits() {
    let reg = Registration::new(ServiceName::new("redis").expect("name"), "redis1", "127.0.0.1", 8000)
        .with_tag("primary")
        .with_ttl(Duration::from_secs(10));
    let body = serde_json::to_value(ServiceRegistration::from_registration(&reg).expect("payload")).expect("json");
    let sample: serde_json::Value = serde_json::from_slice(&fixture("agent_service_register_payload.json")).expect("sample");
    for field in ["ID", "Name", "Tags", "Address", "Port", "Meta", "Check"] {
        assert!(body.get(field).is_some() && sample.get(field).is_some(), "{field} named as in Consul's docs");
    }
    assert_eq!(body["Check"]["TTL"], "10s");
    assert_eq!(body["Check"]["CheckID"], "service:redis1");
    assert_eq!(body["Check"]["DeregisterCriticalServiceAfter"], "60s", "Consul's one-minute minimum");
}

#[test]
fn malformed_consul_json_and_values_are_typed_errors() {
    for body in [&b"{not json"[..], b"[{\"Node\": 3}]", b""] {
        match parse::<Vec<HealthServiceEntry>>("health/service", body) {
            Err(Error::Backend { backend: "consul", source }) => assert!(source.to_string().contains("health/service"), "{source}"),
            other => panic!("expected a typed error, got {other:?}"),
        }
    }
    let bad = KvPair { create_index: 1, modify_index: 1, key: "k".into(), flags: 0, value: Some("%%%".into()), session: None };
    assert!(matches!(bad.value_bytes(), Err(Error::Backend { .. })));
    let mut entries: Vec<HealthServiceEntry> = parse("health/service", &fixture("health_service.json")).expect("parses");
    entries[0].service.service = "Not A Label".into();
    assert!(matches!(entries[0].to_instance(), Err(Error::InvalidInput { field: "service name", .. })));
}
