//! `testgrid-vs-serial`: a suite of 40 module tests of about 2 s each (`sleep 2` and a
//! line of output), run by `testgrid quick --workers 4` from a reused snapshot, against
//! the loop a hand-written script would be: one `docker run --rm` after another, of the
//! same tests from the same image. Rounds alternate the order; figures are medians.
//!
//! Figures:
//! - wall time of the whole suite, each way, and the ratio (testgrid/serial; below 1 is
//!   testgrid ahead);
//! - `testgrid full` once (snapshot built and tested, then the suite), for scale;
//! - quick-mode start-up: `testgrid quick --changed-since HEAD` with nothing changed, so
//!   the time from launch to the report with the snapshot reused and no test to run.
//!
//! `cargo run --release -p keelson-benches --bin testgrid-vs-serial` (`--rounds`,
//! `--tests`, `--seconds`, `--workers`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use keelson_benches::proxy_bench::{example_binary, median, Fallible};

#[derive(Parser, Debug)]
#[command(about = "testgrid --workers N against a serial docker run loop of the same tests")]
struct Args {
    /// Interleaved rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Module tests in the suite.
    #[arg(long, default_value_t = 40)]
    tests: usize,
    /// How long each test sleeps.
    #[arg(long, default_value_t = 2)]
    seconds: u64,
    /// testgrid's workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
}

/// Removes the suite's images at the end (also on error).
struct Images;

impl Drop for Images {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("docker").args(["images", "-q", "--filter", "label=keelson.testgrid"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rmi", "-f", id]).output();
            }
        }
    }
}

fn check(what: &str, out: std::io::Result<std::process::Output>) -> Fallible<std::process::Output> {
    let out = out.map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(out)
}

fn write_suite(dir: &Path, busybox: &str, tests: usize, seconds: u64) -> Fallible<()> {
    let io = |e: std::io::Error| e.to_string();
    std::fs::create_dir_all(dir.join("baseline")).map_err(io)?;
    std::fs::write(dir.join("testgrid.toml"), "[baseline]\ncontext = \"baseline\"\ntest = [\"true\"]\n").map_err(io)?;
    std::fs::write(dir.join("baseline/Dockerfile"), format!("FROM {busybox}\nRUN echo provisioned > /state\n")).map_err(io)?;
    for i in 0..tests {
        let m = dir.join("modules").join(format!("m{i:03}"));
        std::fs::create_dir_all(&m).map_err(io)?;
        std::fs::write(m.join("test.sh"), format!("sleep {seconds}\necho module {i} ok\n")).map_err(io)?;
    }
    for args in [&["init", "-q"][..], &["add", "-A"], &["-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "suite"]] {
        check("git", Command::new("git").arg("-C").arg(dir).args(args).output())?;
    }
    Ok(())
}

/// The suite image testgrid built (the newest `testgrid-suite` tag).
fn suite_image() -> Fallible<String> {
    let out =
        check("docker images", Command::new("docker").args(["images", "--format", "{{.Repository}}:{{.Tag}}", "testgrid-suite"]).output())?;
    String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_owned).ok_or_else(|| "testgrid built no suite image".into())
}

fn timed(what: &str, cmd: &mut Command) -> Fallible<f64> {
    let start = Instant::now();
    check(what, cmd.output())?;
    Ok(start.elapsed().as_secs_f64())
}

async fn bench(args: Args) -> Fallible<()> {
    let testgrid = example_binary("testgrid")?;
    let busybox = keelson_testkit::docker::busybox_image().map_err(|e| e.to_string())?;
    let _images = Images;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let suite = work.path().join("suite");
    write_suite(&suite, &busybox, args.tests, args.seconds)?;
    let suite_arg = suite.to_string_lossy().into_owned();
    let workers = args.workers.to_string();

    // Once, for scale: the snapshot built and tested, then every module.
    let full = timed("testgrid full", Command::new(&testgrid).args(["full", &suite_arg, "--workers", &workers]))?;
    println!("testgrid full ({} tests, snapshot built): {full:.1} s", args.tests);
    let image = suite_image()?;

    let (mut grid, mut serial, mut startup) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let run_grid = |v: &mut Vec<f64>| -> Fallible<()> {
            v.push(timed("testgrid quick", Command::new(&testgrid).args(["quick", &suite_arg, "--workers", &workers]))?);
            Ok(())
        };
        let run_serial = |v: &mut Vec<f64>| -> Fallible<()> {
            let start = Instant::now();
            for i in 0..args.tests {
                let script = format!("cd /testgrid/modules/m{i:03} && sh test.sh");
                check("docker run", Command::new("docker").args(["run", "--rm", &image, "/bin/sh", "-c", &script]).output())?;
            }
            v.push(start.elapsed().as_secs_f64());
            Ok(())
        };
        if round % 2 == 0 {
            run_grid(&mut grid)?;
            run_serial(&mut serial)?;
        } else {
            run_serial(&mut serial)?;
            run_grid(&mut grid)?;
        }
        startup.push(timed(
            "testgrid quick (nothing changed)",
            Command::new(&testgrid).args(["quick", &suite_arg, "--changed-since", "HEAD"]),
        )?);
        println!(
            "round {}: testgrid {:.1} s, serial {:.1} s, quick start-up {:.2} s",
            round + 1,
            grid[round],
            serial[round],
            startup[round]
        );
    }
    let (g, s, u) = (median(grid), median(serial), median(startup));
    println!("testgrid quick --workers {}: {g:.1} s (median of {})", args.workers, args.rounds);
    println!("serial docker run loop: {s:.1} s (median of {})", args.rounds);
    println!("ratio wall testgrid/serial: {:.3}", g / s);
    println!("quick-mode start-up (snapshot reused, nothing to run): {u:.2} s");
    Ok(())
}

fn main() -> std::process::ExitCode {
    keelson_benches::run_bench_main("testgrid-vs-serial", bench(Args::parse()))
}
