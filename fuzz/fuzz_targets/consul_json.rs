//! Consul agent responses (a compromised or broken agent): every response type keelson
//! reads, and the conversions it makes from them.
#![no_main]
use keelson_discovery::consul_api::{parse, HealthServiceEntry, KvPair};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse::<Vec<HealthServiceEntry>>("health", data) {
        for e in &entries {
            let _ = e.to_instance();
        }
    }
    if let Ok(pairs) = parse::<Vec<KvPair>>("kv", data) {
        for p in &pairs {
            let _ = p.value_bytes();
        }
    }
});
