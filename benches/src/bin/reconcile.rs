//! `reconcile`: the reconciler on a seeded cluster of `--allocs` allocations (default a
//! million) in groups of 100 over 1,000 nodes, with the noise a real pass sees: ten lost
//! nodes (1% of allocations), 0.5% failed, 0.5% already stopping, a hundred groups scaled
//! up and a hundred down, a hundred on a new version. Prints the median and worst of
//! `--runs` passes against the target (issue 5: ≤ 200 ms for a million), and checks the
//! result against the seeded noise so a fast wrong answer cannot pass.
//!
//! `cargo run --release -p keelson-benches --bin reconcile`

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use keelson_benches::SplitMix;
use keelson_scheduler::{reconcile, AllocRecord, AllocStatus, DesiredGroup};

#[derive(Parser, Debug)]
#[command(about = "the reconciler on a million allocations")]
struct Args {
    /// Allocations in the cluster.
    #[arg(long, default_value_t = 1_000_000)]
    allocs: usize,
    /// Passes (the median is reported).
    #[arg(long, default_value_t = 11)]
    runs: usize,
    /// Workload seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const PER_GROUP: usize = 100;
const NODES: u64 = 1_000;

fn main() -> ExitCode {
    let args = Args::parse();
    let groups = (args.allocs / PER_GROUP).max(1);
    let mut rng = SplitMix::new(args.seed);
    let mut desired: Vec<DesiredGroup> = (0..groups)
        .map(|g| DesiredGroup {
            job: format!("job-{:05}", g / 4),
            group: format!("group-{}", g % 4),
            version: 1,
            count: PER_GROUP as u32,
            ..DesiredGroup::default()
        })
        .collect();
    let mut allocs = Vec::with_capacity(args.allocs);
    for (g, d) in desired.iter().enumerate() {
        for k in 0..PER_GROUP {
            let status = match rng.below(1000) {
                0..=4 => AllocStatus::Failed,
                5..=9 => AllocStatus::Stopping,
                10..=19 => AllocStatus::Pending,
                _ => AllocStatus::Running,
            };
            allocs.push(AllocRecord {
                id: format!("alloc-{g:06}-{k:03}"),
                job: d.job.clone(),
                group: d.group.clone(),
                version: 1,
                node: format!("node-{:04}", rng.below(NODES)),
                status,
                ports: Vec::new(),
                since_ms: 0,
                volumes: Vec::new(),
                resources: Default::default(),
                restarts: 0,
                slot: None,
                address: None,
                prefer_address: None,
            });
        }
    }
    // Ten lost nodes; groups 0..100 scaled up by 5, 100..200 down by 5, 200..300 on version 2.
    let lost: HashSet<String> = (0..10).map(|n| format!("node-{:04}", n * 97)).collect();
    for d in desired.iter_mut().take(100) {
        d.count += 5;
    }
    for d in desired.iter_mut().skip(100).take(100) {
        d.count -= 5;
    }
    for d in desired.iter_mut().skip(200).take(100) {
        d.version = 2;
    }
    let mut times = Vec::with_capacity(args.runs);
    let mut result = None;
    for _ in 0..args.runs {
        let started = Instant::now();
        let r = reconcile(&desired, &allocs, &lost);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        result = Some(r);
    }
    let Some(r) = result else {
        eprintln!("reconcile: --runs must be at least 1");
        return ExitCode::FAILURE;
    };
    // The answer must match the seeded noise.
    let count = |f: &dyn Fn(&AllocRecord) -> bool| allocs.iter().filter(|a| f(a)).count();
    let expect_lost = count(&|a| a.status != AllocStatus::Stopping && lost.contains(&a.node));
    let expect_failed = count(&|a| a.status == AllocStatus::Failed && !lost.contains(&a.node));
    let placed: u64 = r.place.iter().map(|(_, n)| u64::from(*n)).sum();
    let wanted: u64 = desired.iter().map(|d| u64::from(d.count)).sum();
    let live = count(&|a| matches!(a.status, AllocStatus::Running | AllocStatus::Pending) && !lost.contains(&a.node)) as u64;
    let surplus_stops = r.stop.len() - expect_failed;
    let checks = [
        ("lost", r.lost.len() == expect_lost),
        ("deploy", r.deploy.len() == if groups >= 300 { 100 } else { 0 }),
        ("counts", live + placed - surplus_stops as u64 == wanted),
    ];
    if let Some((what, _)) = checks.iter().find(|(_, ok)| !ok) {
        eprintln!(
            "reconcile: wrong {what}: lost {} (want {expect_lost}), stop {}, place {placed}, deploy {}",
            r.lost.len(),
            r.stop.len(),
            r.deploy.len()
        );
        return ExitCode::FAILURE;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "reconcile: {} allocations in {groups} groups; {} lost, {} stopped, {placed} to place, {} groups to deploy",
        args.allocs,
        r.lost.len(),
        r.stop.len(),
        r.deploy.len()
    );
    println!("median {median:.1} ms, worst {:.1} ms over {} runs (target for 1,000,000: <= 200 ms)", times[times.len() - 1], args.runs);
    println!("ratio reconcile-ms/target: {:.2}", median / 200.0);
    ExitCode::SUCCESS
}
