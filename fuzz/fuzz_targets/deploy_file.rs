//! Deploy and job files: strict parsing of a group version, a run and a job.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = keelson_scheduler::parse_strict::<keelson_scheduler::GroupSpec>("group", text);
        let _ = keelson_scheduler::parse_strict::<keelson_scheduler::RunSpec>("run", text);
        let _ = keelson_scheduler::Job::from_json(text);
    }
});
