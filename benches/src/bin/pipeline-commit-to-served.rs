//! `pipeline-commit-to-served`: how long from `git push` to the new version answering
//! through edge, on the platform of the pipeline's end-to-end test (etcd, keelson's
//! registry, logd, a node agent on the Docker Engine here, edge, `pipeline`): the
//! fixture app (busybox httpd, a testgrid suite of one module, 2 replicas rolled one at
//! a time with 1 s of minimum health), pushed `--pushes` times with a new page each time.
//! Each push is timed until edge serves the new page; the pipeline's own record gives the
//! split (build, test, push, deploy). Prints each push and the median.
//!
//! `cargo run --release -p keelson-benches --bin pipeline-commit-to-served` (`--pushes`).

#[path = "../../../examples/tests/support/pipeline_stack.rs"]
#[allow(dead_code)]
mod pipeline_stack;

use std::time::{Duration, Instant};

use clap::Parser;
use keelson_benches::proxy_bench::{example_binary, median, Fallible};

#[derive(Parser, Debug)]
#[command(about = "git push to served through edge, through keelson's pipeline")]
struct Args {
    /// Pushes to time.
    #[arg(long, default_value_t = 10)]
    pushes: usize,
}

async fn bench(args: Args) -> Fallible<()> {
    let mut bins = std::collections::HashMap::new();
    for name in ["registry", "logd", "node-agent", "edge", "pipeline"] {
        bins.insert(name, example_binary(name)?);
    }
    let stack = pipeline_stack::Stack::start(&|name| bins[name].clone(), pipeline_stack::Hosts::Loopback);
    let mut times = Vec::new();
    for i in 1..=args.pushes {
        let page = format!("v{i}");
        std::fs::write(stack.work.join("www/index.html"), format!("{page}\n")).map_err(|e| e.to_string())?;
        let pushed = Instant::now();
        stack.push(&page);
        stack.until_served(&page, Duration::from_secs(180)).await;
        let seconds = pushed.elapsed().as_secs_f64();
        let run = stack.ended(&format!("shop-{i}")).await;
        let split: Vec<String> = run["steps"]
            .as_array()
            .map(|s| {
                s.iter().map(|s| format!("{} {:.1} s", s["name"].as_str().unwrap_or("?"), s["seconds"].as_f64().unwrap_or(0.0))).collect()
            })
            .unwrap_or_default();
        println!("push {i}: served after {seconds:.1} s ({})", split.join(", "));
        times.push(seconds);
    }
    println!("commit to served, median of {}: {:.1} s", times.len(), median(times));
    Ok(())
}

fn main() -> std::process::ExitCode {
    keelson_benches::run_bench_main("pipeline-commit-to-served", bench(Args::parse()))
}
