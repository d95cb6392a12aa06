//! Hot paths of the embedded defaults: route lookup + pick (per request) and bin-pack
//! placement (per plan).

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keelson_benches::placement::{cluster, jobs, Workload};
use keelson_routing::{Endpoint, Host, MemoryRouter, Route, RouteChange, Router};
use keelson_scheduler::{ClusterState, EngineConfig, Job, PlacementEngine, Scheduler, TaskGroup};

fn route_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let router = MemoryRouter::new();
    let changes: Vec<RouteChange> = (0..10_000)
        .map(|i| {
            let endpoints = (0..4).map(|e| Endpoint::new(format!("e{e}"), SocketAddr::from(([127, 0, 0, 1], 10_000 + e)))).collect();
            RouteChange::Upsert(Route::new(Host::new(format!("svc-{i}.bench.test")).expect("host"), endpoints))
        })
        .collect();
    rt.block_on(router.apply(changes)).expect("apply");
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    // Host strings built up front: the bench measures the proxy's per-request work
    // (snapshot load, hash probe, pick), not string formatting.
    let hosts: Vec<String> = (0..10_000).map(|i| format!("svc-{i}.bench.test")).collect();
    g.bench_function("snapshot+lookup+pick, 10k routes", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % hosts.len();
            let table = router.snapshot();
            black_box(table.lookup(&hosts[i]).and_then(|r| r.pick()).map(|e| e.addr))
        })
    });
    // Issue 6 target: a one-endpoint delta on a 10,000-route table applied in <= 1 ms.
    // Alternates two versions of one route so every iteration is a real change.
    let flip: Vec<RouteChange> = (0..2u16)
        .map(|v| {
            let endpoints = (0..4).map(|e| Endpoint::new(format!("e{e}"), SocketAddr::from(([127, 0, 0, 1], 20_000 + e + v)))).collect();
            RouteChange::Upsert(Route::new(Host::new("svc-77.bench.test").expect("host"), endpoints))
        })
        .collect();
    g.bench_function("one-endpoint delta, 10k routes", |b| {
        let mut v = 0usize;
        b.iter(|| {
            v ^= 1;
            let table = router.snapshot();
            black_box(table.apply(std::slice::from_ref(&flip[v])).expect("apply"))
        })
    });
    g.finish();
}

fn placement(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler");
    let engine = PlacementEngine::new();
    for (nodes, tasks) in [(100usize, 100u32), (1_000, 1_000)] {
        let (cluster, job) = keelson_benches::placement_workload(nodes, tasks, 42);
        g.throughput(Throughput::Elements(u64::from(tasks)));
        g.bench_function(format!("plan {tasks} tasks on {nodes} nodes"), |b| {
            b.iter(|| black_box(engine.plan(&cluster, &job).expect("plan")))
        });
    }
    g.finish();
}

/// One-task and 1,000-task dry-run plans on a 10,000-node cluster already holding the
/// plain workload (1M tasks): the per-job cost a control plane pays.
fn loaded_cluster(c: &mut Criterion) {
    let snap = cluster(10_000, 42);
    let all = jobs(Workload::Plain, 10_000, 1_000_000, 42);
    let config = EngineConfig::default();
    let mut state = ClusterState::from_snapshot(&snap).expect("cluster");
    for j in &all {
        state.place(j, &config).expect("place");
    }
    let mut g = c.benchmark_group("scheduler-loaded-10k");
    g.sample_size(20);
    let mut i = 0usize;
    g.bench_function("plan 1 task", |b| {
        b.iter(|| {
            i += 1;
            let job = Job::new(format!("p{i}"), vec![TaskGroup { count: 1, ..all[i % all.len()].groups[0].clone() }]);
            black_box(state.plan(&job, &config).expect("plan"))
        })
    });
    g.bench_function("plan 1000 tasks", |b| {
        b.iter(|| {
            i += 1;
            let job = Job::new(format!("q{i}"), vec![TaskGroup { count: 1000, ..all[i % all.len()].groups[0].clone() }]);
            black_box(state.plan(&job, &config).expect("plan"))
        })
    });
    g.finish();
}

criterion_group!(benches, route_lookup, placement, loaded_cluster);
criterion_main!(benches);
