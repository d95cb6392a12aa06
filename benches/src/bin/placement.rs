//! `placement`: keelson's placement engine on seeded workloads, against offline
//! best-fit-decreasing and Nomad-like / Kubernetes-like reference policies, with an
//! independent validator. Exits non-zero if the validator finds a violation.
//!
//! `cargo run --release -p keelson-benches --bin placement -- --workload plain`
//! (also `spread`, `stateful`, `churn`; `--nodes` and `--tasks` scale it down).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use keelson_benches::placement::{best_fit_decreasing, cluster, jobs, kubernetes_like, lower_bound, nomad_like, RefResult, Workload};
use keelson_benches::SplitMix;
use keelson_scheduler::conformance::validate_cluster;
use keelson_scheduler::{ClusterState, EngineConfig, Job, TaskGroup};

#[derive(Parser, Debug)]
struct Args {
    /// plain, spread, stateful or churn.
    #[arg(long, default_value = "plain")]
    workload: Workload,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Tasks in the workload (jobs of 500 tasks).
    #[arg(long, default_value_t = 1_000_000)]
    tasks: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the reference policies (faster).
    #[arg(long)]
    no_references: bool,
}

fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Largest (max - min) tasks per zone over the jobs that spread.
fn spread_skew(state: &ClusterState, jobs: &[Job]) -> u64 {
    let zone: BTreeMap<&str, &str> =
        state.nodes().iter().map(|n| (n.id.as_str(), n.attributes.get("zone").map_or("", String::as_str))).collect();
    let zones: Vec<&str> = {
        let mut z: Vec<&str> = zone.values().copied().collect();
        z.sort();
        z.dedup();
        z
    };
    let mut counts: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    let allocs = state.allocations();
    for a in &allocs {
        if jobs.iter().any(|j| j.id == a.job && j.groups.iter().any(|g| g.spread.is_some())) {
            *counts.entry(a.job.as_str()).or_default().entry(zone.get(a.node.as_str()).copied().unwrap_or("")).or_default() += 1;
        }
    }
    counts
        .values()
        .map(|per| {
            zones.iter().map(|z| per.get(z).copied().unwrap_or(0)).max().unwrap_or(0)
                - zones.iter().map(|z| per.get(z).copied().unwrap_or(0)).min().unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

fn report(name: &str, placed: u64, total: u64, took: Duration, non_empty: u64, lb: u64, bfd: Option<u64>, skew: Option<u64>) {
    let bfd = bfd.map_or(String::new(), |b| format!(", {:.3}x BFD ({b})", non_empty as f64 / b.max(1) as f64));
    let skew = skew.map_or(String::new(), |s| format!("; spread skew {s}"));
    println!(
        "{name:<12} placed {placed}/{total} in {:.3} s = {:.0} placements/s; non-empty nodes {non_empty} = {:.3}x lower bound ({lb}){bfd}{skew}",
        took.as_secs_f64(),
        per_sec(placed, took),
        non_empty as f64 / lb.max(1) as f64
    );
}

fn main() -> ExitCode {
    let args = Args::parse();
    let snap = cluster(args.nodes, args.seed);
    let mut all_jobs = jobs(args.workload, args.nodes, args.tasks, args.seed);
    let lb = lower_bound(&all_jobs);
    println!("workload {:?}: {} nodes, {} tasks in {} jobs, seed {}", args.workload, args.nodes, args.tasks, all_jobs.len(), args.seed);
    let config = EngineConfig::default();
    let mut state = match ClusterState::from_snapshot(&snap) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bad cluster: {e}");
            return ExitCode::FAILURE;
        }
    };

    let t = Instant::now();
    let mut placed = 0u64;
    for job in &all_jobs {
        match state.place(job, &config) {
            Ok(plan) => placed += plan.placements.len() as u64,
            Err(e) => {
                eprintln!("job {} rejected: {e}", job.id);
                return ExitCode::FAILURE;
            }
        }
    }
    let took = t.elapsed();
    let bfd = (!args.no_references).then(|| best_fit_decreasing(&snap, &all_jobs));
    let skew = (args.workload == Workload::Spread).then(|| spread_skew(&state, &all_jobs));
    report("keelson", placed, args.tasks, took, state.non_empty_nodes() as u64, lb, bfd.as_ref().map(|b| b.non_empty), skew);
    let keelson_rate = per_sec(placed, took);
    let keelson_nodes = state.non_empty_nodes() as u64;

    if args.workload == Workload::Churn {
        // 10% of allocations stop.
        let mut rng = SplitMix::new(args.seed ^ 0xc4);
        let allocs = state.allocations();
        let mut stopped: BTreeMap<String, u32> = BTreeMap::new();
        for a in &allocs {
            if rng.below(10) == 0 && state.remove_allocation(&a.id).is_ok() {
                *stopped.entry(a.job.clone()).or_default() += 1;
            }
        }
        let n_stopped: u64 = stopped.values().map(|n| u64::from(*n)).sum();
        let before = state.non_empty_nodes();
        let t = Instant::now();
        match state.rebalance(&all_jobs, 200_000) {
            Ok(plan) => println!(
                "rebalance    after {n_stopped} stops: {} moves free {} of {before} non-empty nodes ({:.1}% of all nodes) in {:.3} s",
                plan.moves.len(),
                plan.freed_nodes.len(),
                100.0 * plan.freed_nodes.len() as f64 / args.nodes.max(1) as f64,
                t.elapsed().as_secs_f64()
            ),
            Err(e) => eprintln!("rebalance failed: {e}"),
        }
        // Re-place the stopped tasks.
        let replacements: Vec<Job> = all_jobs
            .iter()
            .filter_map(|j| {
                stopped
                    .get(&j.id)
                    .map(|n| Job { groups: j.groups.iter().map(|g| TaskGroup { count: *n, ..g.clone() }).collect(), ..j.clone() })
            })
            .collect();
        let t = Instant::now();
        let mut re = 0u64;
        for job in &replacements {
            re += state.place(job, &config).map_or(0, |p| p.placements.len() as u64);
        }
        let took = t.elapsed();
        println!(
            "re-place     {re}/{n_stopped} in {:.3} s = {:.0} placements/s; non-empty nodes {}",
            took.as_secs_f64(),
            per_sec(re, took),
            state.non_empty_nodes()
        );
    }

    // Latency on the loaded cluster: a 1,000-task job, and one-task jobs (dry runs).
    let template = all_jobs[0].groups[0].clone();
    let mut big = Vec::new();
    for i in 0..20 {
        let job = Job::new(format!("probe-big-{i}"), vec![TaskGroup { count: 1000, ..template.clone() }]);
        let t = Instant::now();
        let _ = state.plan(&job, &config);
        big.push(t.elapsed());
    }
    let mut one = Vec::new();
    for i in 0..1000 {
        let g = &all_jobs[i % all_jobs.len()].groups[0];
        let job = Job::new(format!("probe-one-{i}"), vec![TaskGroup { count: 1, ..g.clone() }]);
        let t = Instant::now();
        let _ = state.plan(&job, &config);
        one.push(t.elapsed());
    }
    println!(
        "latency      1000-task job plan p50 {:.2} ms, max {:.2} ms (n=20); one-task plan p50 {:.1} us, p99 {:.1} us (n=1000)",
        percentile(&mut big, 0.5).as_secs_f64() * 1e3,
        percentile(&mut big, 1.0).as_secs_f64() * 1e3,
        percentile(&mut one, 0.5).as_secs_f64() * 1e6,
        percentile(&mut one, 0.99).as_secs_f64() * 1e6
    );

    if !args.no_references {
        let refs: [(&str, Box<dyn Fn() -> RefResult>); 2] = [
            ("nomad-like", Box::new(|| nomad_like(&snap, &all_jobs, args.seed))),
            ("k8s-like", Box::new(|| kubernetes_like(&snap, &all_jobs))),
        ];
        for (name, run) in refs {
            let t = Instant::now();
            let r = run();
            let took = t.elapsed();
            report(name, r.placed, args.tasks, took, r.non_empty, lb, bfd.as_ref().map(|b| b.non_empty), skew.map(|_| r.spread_skew));
            println!("ratio placements/s keelson/{name}: {:.2}", keelson_rate / per_sec(r.placed, took));
            println!("ratio non-empty-nodes keelson/{name}: {:.3}", keelson_nodes as f64 / r.non_empty.max(1) as f64);
        }
        if let Some(b) = &bfd {
            println!("ratio non-empty-nodes keelson/bfd: {:.3}", keelson_nodes as f64 / b.non_empty.max(1) as f64);
        }
    }
    println!("ratio non-empty-nodes keelson/lower-bound: {:.3}", keelson_nodes as f64 / lb.max(1) as f64);

    // The independent validator over the whole final cluster.
    all_jobs.sort_by(|a, b| a.id.cmp(&b.id));
    match validate_cluster(&state.to_snapshot(), &all_jobs) {
        Ok(()) => {
            println!("validator: 0 violations over {} allocations", state.allocation_count());
            ExitCode::SUCCESS
        }
        Err(v) => {
            println!("validator: {} violations, first: {}", v.len(), v[0]);
            ExitCode::FAILURE
        }
    }
}
