//! `docker-start`: time to start `--containers` busybox httpd containers (default 100)
//! through keelson's Docker driver with bounded concurrency until every one is running,
//! against a serial `docker run -d` loop of the same containers in the same run
//! (alternating, medians of `--rounds`). Every container is removed after each run.
//!
//! `cargo run --release -p keelson-benches --bin docker-start`

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use keelson_scheduler::{DockerDriver, Driver, TaskSpec, TaskState};

#[derive(Parser, Debug)]
#[command(about = "start containers through the Docker driver against a serial docker run loop")]
struct Args {
    /// Containers per run.
    #[arg(long, default_value_t = 100)]
    containers: usize,
    /// Starts in flight at once through the driver.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const LABEL: &str = "keelson.bench=docker-start";

fn remove_all() -> Result<(), String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={LABEL}")])
        .output()
        .map_err(|e| format!("docker ps: {e}"))?;
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect();
    for chunk in ids.chunks(50) {
        Command::new("docker").args(["rm", "-f"]).args(chunk).output().map_err(|e| format!("docker rm: {e}"))?;
    }
    Ok(())
}

async fn through_driver(driver: &DockerDriver, image: &str, n: usize, concurrency: usize, round: usize) -> Result<Duration, String> {
    let started = Instant::now();
    let results: Vec<Result<(), String>> = futures::stream::iter(0..n)
        .map(|i| async move {
            let spec =
                TaskSpec { image: Some(image.to_owned()), ..TaskSpec::new(format!("bench-{round}-{i}"), ["httpd", "-f", "-p", "8080"]) }
                    .with_label("keelson.bench", "docker-start");
            let status = driver.start(spec).await.map_err(|e| e.to_string())?;
            if status.state == TaskState::Running {
                Ok(())
            } else {
                Err(format!("container {i} is {:?}", status.state))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let took = started.elapsed();
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    Ok(took)
}

fn serial_docker_run(image: &str, n: usize, round: usize) -> Result<Duration, String> {
    let started = Instant::now();
    for i in 0..n {
        let name = format!("bench-serial-{round}-{i}");
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &name, "--label", LABEL, image, "httpd", "-f", "-p", "8080"])
            .output()
            .map_err(|e| format!("docker run: {e}"))?;
        if !out.status.success() {
            return Err(format!("docker run {name}: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    Ok(started.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run(args: &Args) -> Result<(), String> {
    let image = keelson_testkit::docker::busybox_image().map_err(|e| e.to_string())?;
    let driver = DockerDriver::connect().await.map_err(|e| e.to_string())?;
    remove_all()?;
    println!("docker-start: {} containers, driver concurrency {}, {} rounds", args.containers, args.concurrency, args.rounds);
    let (mut ours, mut serial) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        for k in 0..2 {
            let (name, took) = if (round + k) % 2 == 0 {
                ("keelson", through_driver(&driver, &image, args.containers, args.concurrency, round).await)
            } else {
                ("docker run loop", serial_docker_run(&image, args.containers, round))
            };
            remove_all()?;
            let took = took?;
            println!("  round {round} {name:<16} {:>8.2} s", took.as_secs_f64());
            if name == "keelson" { &mut ours } else { &mut serial }.push(took.as_secs_f64());
        }
    }
    let (a, b) = (median(ours), median(serial));
    println!("keelson driver  {a:.2} s ({:.0} ms per container)", a * 1000.0 / args.containers as f64);
    println!("docker run loop {b:.2} s ({:.0} ms per container)", b * 1000.0 / args.containers as f64);
    println!("ratio start-time keelson/serial-docker-run: {:.2}", a / b);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let code = keelson_benches::run_bench_main("docker-start", run(&args));
    // Whatever happened, no bench container is left behind.
    let _ = remove_all();
    code
}
