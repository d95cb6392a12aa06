//! Benchmarks for keelson. `cargo bench -p keelson-benches` runs the criterion benches
//! of the hot paths; results and the commands that reproduce them are in BENCHMARKS.md.
//!
//! This library holds the seeded workload builders the benches share, so a bench and a
//! test can build exactly the same input.
//!
//! ```
//! let (cluster, job) = keelson_benches::placement_workload(100, 50, 7);
//! assert_eq!(cluster.nodes.len(), 100);
//! assert_eq!(job.groups[0].count, 50);
//! ```

pub mod c1m;
pub mod placement;
pub mod procstat;
pub mod proxy_bench;

use keelson_scheduler::{ClusterSnapshot, Constraint, Job, Node, Resources, TaskGroup};

/// A small deterministic PRNG (SplitMix64), so workloads are reproducible without a
/// dependency on a random crate's version.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// `nodes` nodes in 4 zones with mixed sizes, and a job of `tasks` tasks constrained to
/// avoid one zone.
pub fn placement_workload(nodes: usize, tasks: u32, seed: u64) -> (ClusterSnapshot, Job) {
    let mut rng = SplitMix::new(seed);
    let nodes = (0..nodes)
        .map(|i| {
            let size = 1 + rng.below(4);
            Node::new(format!("node-{i}"), Resources::new(size * 4000, size * 8192)).with_attribute("zone", format!("z{}", i % 4))
        })
        .collect();
    let job = Job::new(
        "bench",
        vec![TaskGroup::new("web", tasks, Resources::new(250, 512)).with_constraint(Constraint::not_equal("attr.zone", "z3"))],
    );
    (ClusterSnapshot { nodes, ..ClusterSnapshot::default() }, job)
}

/// Runs a bench binary's async body on a two-worker runtime: exit status 0, or 1 with
/// `<name>: <error>` on stderr.
pub fn run_bench_main(name: &str, body: impl std::future::Future<Output = Result<(), String>>) -> std::process::ExitCode {
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(body));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
