//! `localcloud-up-reset`: how long `localcloud up` and `localcloud reset` take, each
//! timed from the command until it returns, which it does once every role answers by
//! name through edge from the LAN machine (its unbound, the cloud's DNS server, edge, a
//! task). A first, untimed up and down builds the roles' image, so no timed run builds
//! it (the "images already built"). `down` between the `up` runs; interleaved: up,
//! reset, down, up, reset, down, ... so machine noise falls on both alike. Prints every
//! run and the medians.
//!
//! `cargo run --release -p keelson-benches --bin localcloud-up-reset` (`--runs`, `--hosts`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use keelson_benches::proxy_bench::{example_binary, median, Fallible};

#[derive(Parser, Debug)]
#[command(about = "localcloud: up and reset times")]
struct Args {
    /// Runs of each (medians of these).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Hosts of the cloud.
    #[arg(long, default_value_t = 3)]
    hosts: usize,
}

const NAME: &str = "lcbench";

/// Runs `localcloud` with `args` and returns how long it took.
fn timed(localcloud: &Path, state: &Path, args: &[&str]) -> Fallible<f64> {
    let t0 = Instant::now();
    let out = Command::new(localcloud)
        .arg("--name")
        .arg(NAME)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", localcloud.display()))?;
    let seconds = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!("localcloud {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(seconds)
}

/// Takes the cloud down when dropped (a failed run leaves nothing behind).
struct Down<'a>(&'a Path, &'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        if self.1.join("localcloud.json").exists() {
            let _ = timed(self.0, self.1, &["down"]);
        }
    }
}

fn bench(args: Args) -> Fallible<()> {
    for name in ["node-agent", "edge", "dns-catalog"] {
        example_binary(name)?;
    }
    let localcloud = example_binary("localcloud")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let state = dir.path().join("state");
    let hosts = args.hosts.to_string();
    let up_args = ["up", "--hosts", &hosts, "--underlay", "198.18.95.0/24"];
    {
        // Untimed: builds the roles' image if missing, and warms the caches.
        let _down = Down(&localcloud, &state);
        timed(&localcloud, &state, &up_args)?;
    }
    let (mut ups, mut resets) = (Vec::new(), Vec::new());
    for run in 1..=args.runs {
        let _down = Down(&localcloud, &state);
        let up = timed(&localcloud, &state, &up_args)?;
        let reset = timed(&localcloud, &state, &["reset"])?;
        let down = timed(&localcloud, &state, &["down"])?;
        println!("run {run}: up {up:.2} s, reset {reset:.2} s, down {down:.2} s");
        ups.push(up);
        resets.push(reset);
    }
    println!("localcloud up ({} hosts), median of {}: {:.2} s", args.hosts, ups.len(), median(ups));
    println!("localcloud reset, median of {}: {:.2} s", resets.len(), median(resets));
    Ok(())
}

fn main() -> std::process::ExitCode {
    keelson_benches::run_bench_main("localcloud-up-reset", async { bench(Args::parse()) })
}
