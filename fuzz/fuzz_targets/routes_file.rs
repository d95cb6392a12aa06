//! A routes file (JSON a person wrote, or a file an attacker could plant): parse and
//! build every route; typed errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(file) = keelson_routing::RoutesFile::parse(text) {
            let _ = file.changes();
        }
    }
});
