//! `balancer-tail`: the p99 through `edge` when one of four backends answers 5 ms late,
//! for round robin, least requests and Peak-EWMA, against the same balancer with four
//! healthy backends, in the same run. wrk paces the load (a fixed delay between requests
//! on each connection, so every setup is offered the same rate); `edge` runs on CPU 0,
//! wrk and the backends on CPU 1; runs are interleaved and each figure is the median of
//! `--rounds`. The target (issue 6): with Peak-EWMA, p99 with the slow backend within
//! 1.1× of the all-healthy p99. Each run with the slow backend also counts the share of
//! requests the slow backend served (asked of the backend itself; target ≤ 1% for
//! Peak-EWMA). `--hog` keeps a busy loop on wrk's CPU for the whole run, so both cores
//! are busy, as on a loaded machine.
//!
//! `cargo run --release -p keelson-benches --bin balancer-tail -- --hog`

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keelson_benches::proxy_bench::{
    backend_served, bench_main, edge_binary, loopback, median, spawn_pinned, start_backends, tool, wait_ready_host, write, wrk, BenchArgs,
    Fallible, Server, LOAD_CPU, PROXY_CPU,
};

#[derive(Parser, Debug)]
#[command(about = "p99 through edge with one slow backend, per balancer")]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    /// Client connections; each waits 2 ms between requests.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// How late the slow backend answers, in milliseconds.
    #[arg(long, default_value_t = 5)]
    slow_ms: u64,
    /// A busy loop on the load CPU throughout (both cores busy).
    #[arg(long)]
    hog: bool,
}

/// A busy loop pinned to the load CPU, killed when dropped.
struct Hog(std::process::Child);

impl Hog {
    fn start() -> Fallible<Hog> {
        let child = std::process::Command::new("taskset")
            .args(["-c", LOAD_CPU, "sh", "-c", "while :; do :; done"])
            .spawn()
            .map_err(|e| format!("starting the CPU hog: {e}"))?;
        Ok(Hog(child))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const BALANCERS: [&str; 3] = ["round_robin", "least_requests", "peak_ewma"];

fn routes_json(healthy: &[u16], slow: &[u16]) -> String {
    let endpoints = |ports: &[u16]| -> String {
        ports.iter().enumerate().map(|(i, p)| format!("{{\"id\": \"b{i}\", \"addr\": \"127.0.0.1:{p}\"}}")).collect::<Vec<_>>().join(", ")
    };
    let mut routes = Vec::new();
    for b in BALANCERS {
        for (set, ports) in [("healthy", healthy), ("slow", slow)] {
            routes.push(format!(
                "{{\"host\": \"{}\", \"balancer\": {{\"kind\": \"{b}\"}}, \"endpoints\": [{}]}}",
                host(b, set),
                endpoints(ports)
            ));
        }
    }
    format!("{{\"routes\": [{}]}}", routes.join(", "))
}

fn host(balancer: &str, set: &str) -> String {
    format!("{}-{set}.test", balancer.replace('_', "-"))
}

fn run(args: &Args) -> Fallible<()> {
    let wrk_bin = tool("wrk", "wrk")?;
    tool("taskset", "util-linux")?;
    let edge = edge_binary(args.common.edge.as_deref())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ports = keelson_testkit::free_ports(9).map_err(|e| e.to_string())?;
    let (healthy, slow, listen) = (&ports[0..4], &ports[4..8], ports[8]);
    let slow_delay = Duration::from_millis(args.slow_ms);
    let mut backends: Vec<(u16, Duration)> = healthy.iter().chain(&slow[..3]).map(|p| (*p, Duration::ZERO)).collect();
    backends.push((slow[3], slow_delay));
    let _backends = start_backends(&backends)?;
    let routes = dir.path().join("routes.json");
    write(&routes, &routes_json(healthy, slow))?;
    let child = spawn_pinned(
        PROXY_CPU,
        &edge,
        &["--routes", &routes.to_string_lossy(), "--listen", &loopback(listen).to_string(), "--threads", "1"],
    )?;
    let server = Server { name: "keelson", child, addr: loopback(listen) };
    for b in BALANCERS {
        for set in ["healthy", "slow"] {
            wait_ready_host(&server, &host(b, set))?;
        }
    }
    let script = dir.path().join("pace.lua");
    write(&script, "function delay()\n  return 2\nend\n")?;
    let script = script.to_string_lossy().into_owned();
    let _hog = if args.hog { Some(Hog::start()?) } else { None };
    println!(
        "balancer-tail: {} rounds x {} s, {} paced connections, one of four backends {} ms late{}",
        args.common.rounds,
        args.common.seconds,
        args.connections,
        args.slow_ms,
        if args.hog { ", a busy loop on the load CPU" } else { "" }
    );
    let cases: Vec<(&str, &str)> = BALANCERS.iter().flat_map(|b| [(*b, "healthy"), (*b, "slow")]).collect();
    let mut p99: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    let mut share: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..args.common.rounds {
        for k in 0..cases.len() {
            let (b, set) = cases[(round + k) % cases.len()];
            let before = backend_served(slow[3])?;
            let r = wrk(&wrk_bin, server.addr, &host(b, set), args.connections, args.common.seconds, &["-s", &script])?;
            let slow_share = (backend_served(slow[3])? - before) as f64 / r.requests.max(1) as f64;
            println!(
                "  round {round} {b:<15} {set:<8} {:>8.0} req/s  p99 {:>7.0} us  errors {}{}",
                r.rps,
                r.p99_us,
                r.errors,
                if set == "slow" { format!("  slow backend served {:.2}%", slow_share * 100.0) } else { String::new() }
            );
            if set == "slow" {
                share.entry(b).or_default().push(slow_share);
            }
            if r.errors > 0 {
                return Err(format!("{b}/{set}: {} failed requests", r.errors));
            }
            p99.entry((b, set)).or_default().push(r.p99_us);
        }
    }
    println!();
    println!("{:<16} {:>14} {:>14} {:>8} {:>12}", "balancer", "p99 healthy", "p99 one slow", "ratio", "slow share");
    for b in BALANCERS {
        let (h, s) = (median(p99[&(b, "healthy")].clone()), median(p99[&(b, "slow")].clone()));
        println!("{b:<16} {h:>11.0} us {s:>11.0} us {:>8.2} {:>11.2}%", s / h, median(share[b].clone()) * 100.0);
    }
    for b in BALANCERS {
        let (h, s) = (median(p99[&(b, "healthy")].clone()), median(p99[&(b, "slow")].clone()));
        println!("ratio p99-one-slow/all-healthy {b}: {:.2}", s / h);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    bench_main("balancer-tail", args.common.serve_backends.as_deref(), || run(&args))
}
