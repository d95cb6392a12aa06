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
use keelson_benches::placement::{
    best_fit_decreasing, cluster, feasible_zones, jobs, kubernetes_like, lower_bound, nomad_like, skew_over, RefResult, Workload,
};
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

/// Largest (max - min) tasks per zone, over the zones each spreading job can use.
fn spread_skew(state: &ClusterState, jobs: &[Job]) -> u64 {
    let zone_of: BTreeMap<&str, usize> = state
        .nodes()
        .iter()
        .map(|n| (n.id.as_str(), n.attributes.get("zone").and_then(|z| z.trim_start_matches('z').parse().ok()).unwrap_or(0)))
        .collect();
    let mut counts: BTreeMap<&str, [u64; 5]> = BTreeMap::new();
    let allocs = state.allocations();
    for a in &allocs {
        if let Some(z) = zone_of.get(a.node.as_str()).filter(|z| **z < 5) {
            counts.entry(a.job.as_str()).or_default()[*z] += 1;
        }
    }
    jobs.iter()
        .filter(|j| j.groups.iter().any(|g| g.spread.is_some()))
        .map(|j| skew_over(&counts.get(j.id.as_str()).copied().unwrap_or_default(), &feasible_zones(state.nodes(), &j.groups[0])))
        .max()
        .unwrap_or(0)
}

/// One policy's result on the workload.
struct Row<'a> {
    name: &'a str,
    placed: u64,
    took: Duration,
    non_empty: u64,
    skew: Option<u64>,
}

/// What every row is compared with.
struct Baseline {
    total: u64,
    lower_bound: u64,
    bfd: Option<u64>,
}

fn report(row: &Row<'_>, base: &Baseline) {
    let bfd = base.bfd.map_or(String::new(), |b| format!(", {:.3}x BFD ({b})", row.non_empty as f64 / b.max(1) as f64));
    let skew = row.skew.map_or(String::new(), |s| format!("; spread skew {s}"));
    println!(
        "{:<12} placed {}/{} in {:.3} s = {:.0} placements/s; non-empty nodes {} = {:.3}x lower bound ({}){bfd}{skew}",
        row.name,
        row.placed,
        base.total,
        row.took.as_secs_f64(),
        per_sec(row.placed, row.took),
        row.non_empty,
        row.non_empty as f64 / base.lower_bound.max(1) as f64,
        base.lower_bound
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
    let base = Baseline { total: args.tasks, lower_bound: lb, bfd: bfd.as_ref().map(|b| b.non_empty) };
    report(&Row { name: "keelson", placed, took, non_empty: state.non_empty_nodes() as u64, skew }, &base);
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
        let mut g = TaskGroup { count: 1, ..all_jobs[i % all_jobs.len()].groups[0].clone() };
        // A new task mounts a new volume; reusing the workload's would ask for a volume
        // whose single writer is already running (an unplaceable task, not a placement).
        for v in &mut g.volumes {
            v.name = format!("probe{i}");
        }
        let job = Job::new(format!("probe-one-{i}"), vec![g]);
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
        for name in ["nomad-like", "k8s-like"] {
            let t = Instant::now();
            let r: RefResult =
                if name == "nomad-like" { nomad_like(&snap, &all_jobs, args.seed) } else { kubernetes_like(&snap, &all_jobs) };
            let took = t.elapsed();
            report(&Row { name, placed: r.placed, took, non_empty: r.non_empty, skew: skew.map(|_| r.spread_skew) }, &base);
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
