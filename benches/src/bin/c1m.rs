//! `c1m`: a million allocations committed through the cluster store on a real etcd, as
//! the controller commits them (see `keelson_benches::c1m`): 10,000 nodes, 2,000 jobs of
//! 500 tasks. Prints allocations per second end to end against Nomad's published C1M
//! rate (not measured here), etcd writes and bytes per allocation, commit latency per
//! job, and the delay from commit to a node agent's watch; the stored state is checked
//! by the independent validator first.
//!
//! `cargo run --release -p keelson-benches --bin c1m -- [--nodes N --jobs J --tasks T]`

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use keelson_benches::c1m::{quantile, run, C1mConfig, BIG_JOB_TASKS, NOMAD_C1M_ALLOCS_PER_S};
use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue};

#[derive(Parser, Debug)]
#[command(about = "a million allocations through the cluster store on real etcd")]
struct Args {
    /// Nodes registered.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Jobs submitted.
    #[arg(long, default_value_t = 2_000)]
    jobs: usize,
    /// Tasks per job.
    #[arg(long, default_value_t = 500)]
    tasks: u32,
    /// Jobs of 1,000 tasks committed after the others (their commit latency is reported
    /// on its own).
    #[arg(long, default_value_t = 20)]
    big_jobs: usize,
    /// Nodes whose agent watch is sampled for the commit-to-watch delay.
    #[arg(long, default_value_t = 100)]
    sample_nodes: usize,
    /// etcd's backend quota in GiB (the run fails early if the disk has less free).
    #[arg(long, default_value_t = 8)]
    quota_gib: u64,
}

fn free_bytes(path: &std::path::Path) -> Result<u64, String> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| format!("statvfs {}: {e}", path.display()))?;
    Ok(st.blocks_available() * st.fragment_size())
}

async fn bench(args: Args) -> Result<(), String> {
    let quota = args.quota_gib << 30;
    let tmp = std::env::temp_dir();
    let free = free_bytes(&tmp)?;
    if free < quota + (1 << 30) {
        return Err(format!(
            "{} has {} MiB free; etcd's quota of {} GiB needs {} MiB (pass a smaller --quota-gib, or free space)",
            tmp.display(),
            free >> 20,
            args.quota_gib,
            (quota + (1 << 30)) >> 20
        ));
    }
    let quota_flag = format!("--quota-backend-bytes={quota}");
    let etcd =
        keelson_testkit::etcd::Etcd::start_with(&[&quota_flag, "--auto-compaction-mode=revision", "--auto-compaction-retention=100000"])
            .map_err(|e| format!("etcd: {e}"))?;
    let kv: Arc<dyn KeyValue> =
        Arc::new(EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.map_err(|e| format!("connecting to etcd: {e}"))?);
    let config =
        C1mConfig { nodes: args.nodes, jobs: args.jobs, tasks: args.tasks, big_jobs: args.big_jobs, sample_nodes: args.sample_nodes };
    println!(
        "c1m: {} nodes, {} jobs of {} tasks then {} of {BIG_JOB_TASKS}, on etcd ({} GiB quota)",
        args.nodes, args.jobs, args.tasks, args.big_jobs, args.quota_gib
    );
    let began = Instant::now();
    let every = (args.jobs / 20).max(1);
    let report = run(kv, "c1m", config, |done| {
        if done % every == 0 && done <= args.jobs {
            let rate = (done * args.tasks as usize) as f64 / began.elapsed().as_secs_f64();
            eprintln!("c1m: {done}/{} jobs, {rate:.0} allocations/s so far", args.jobs);
        }
    })
    .await?;
    if !report.violations.is_empty() {
        return Err(format!("the validator found {} violations, first: {}", report.violations.len(), report.violations[0]));
    }
    println!("validator: {} allocations, no violation", report.allocations);
    println!("allocations committed: {} in {:.1} s", report.allocations, report.elapsed.as_secs_f64());
    println!("allocations per second (end to end): {:.0}", report.allocs_per_s());
    println!("etcd writes per allocation: {:.2}; bytes per allocation: {:.0}", report.writes_per_alloc, report.bytes_per_alloc);
    println!(
        "commit latency of a {}-task job: p50 {:?}, p99 {:?}",
        args.tasks,
        quantile(&report.commit_latencies, 0.5),
        quantile(&report.commit_latencies, 0.99)
    );
    println!(
        "commit latency of a {BIG_JOB_TASKS}-task job ({} jobs): p50 {:?}, p99 {:?}",
        report.big_commit_latencies.len(),
        quantile(&report.big_commit_latencies, 0.5),
        quantile(&report.big_commit_latencies, 0.99)
    );
    println!(
        "job submission to agent watch, a bound of commit to watch ({} allocations on {} sampled nodes, {} seen before the commit call returned): p50 {:?}, p99 {:?}",
        report.watch_delays.len(),
        args.sample_nodes,
        report.seen_before_return,
        quantile(&report.watch_delays, 0.5),
        quantile(&report.watch_delays, 0.99)
    );
    println!("Nomad's C1M: {NOMAD_C1M_ALLOCS_PER_S:.0} allocations/s (published by HashiCorp, not measured here)");
    println!("ratio c1m-allocs-per-s keelson/nomad-c1m: {:.2}", report.allocs_per_s() / NOMAD_C1M_ALLOCS_PER_S);
    Ok(())
}

fn main() -> ExitCode {
    keelson_benches::run_bench_main("c1m", bench(Args::parse()))
}
